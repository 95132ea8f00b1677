"""Training settings: what a manifest's model/pretrain/finetune/probe sections hold, and what a task
spec carries to the worker. Defaults run the study as the BYOL paper describes, scaled to a single
GPU and to data sets of a few thousand images."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from runner.choices import StrictModel, one_of

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
Arch = one_of(ARCHS, "backbone")
# augmentation presets (runner/ml/augment.py PRESETS; a test holds the two lists equal)
AUGMENT_PRESETS = ("auto", "byol", "xray", "ct", "finetune", "finetune-gray")
Augment = one_of(AUGMENT_PRESETS, "augmentation preset")
Width = Annotated[int, Field(ge=1, le=65536)]  # a head's width: a zero, a negative or a 1e30 fails here, not in a worker


class ModelSpec(StrictModel):
    arch: Arch = Field("resnet50", description="the ResNet backbone (torchvision's architectures and weights); resnet50 is the study's")
    image_size: int | None = Field(None, ge=16, le=1024, description="training crop side; default: the data set's image_size")
    imagenet_weights: str | None = Field(
        None, description="the arms that start from ImageNet weights load this file instead of torchvision's published one "
        "in the torch hub cache (which is checked against the hash its name carries); either way the file's sha256 is "
        "recorded in the task and is part of its id")


class RunSpec(StrictModel):
    """How a task uses the device."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is visible, else cpu")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on cuda, fp32 on the CPU; bf16 on a CPU with native bf16 (AVX512-BF16, "
        "AMX) ran a BYOL step at about 1.5× the fp32 step (bench/cpu_path.py, 64 px) but rounds activations to 3 "
        "significant digits, so it is asked for, not the default; part of the task ids")
    compile: bool = Field(False, description="torch.compile the networks (faster on a GPU after a minute of compiling; "
                          "not faster on a 2-core CPU: docs/speed.md)")
    channels_last: bool = Field(True, description="images and networks in channels_last layout (faster convolutions on GPUs and with oneDNN)")
    weights: Literal["fp32", "bf16"] = Field(
        "fp32", description="the precision encoder.pt and the classifiers' model.pt keep a network in. bf16: its weights are "
        "rounded to bfloat16 when training ends, before anything is scored (the test numbers, the calibration and `predict` "
        "are the rounded network's), and stored compressed: about a third of fp32's size (a ResNet50 classifier 33 MB, not "
        "95 MB). Not the same numbers as fp32's: the rounded encoder is what fine-tuning starts from. Part of the task ids when bf16")
    progress_every_s: float = Field(2.0, gt=0, description="at most one progress event per this many seconds")
    checkpoint_every_steps: int = Field(200, ge=1, description="optimizer steps between two checkpoints (a stopped task resumes from its last)")
    monitor_every_steps: int | None = Field(
        None, ge=0, description="steps between two kNN scores of a pretraining's encoder on the smallest budget's labels "
        "(the pretraining monitor; it changes no weight): default about ten a run; 0: off")
    monitor_labels: str = Field(
        "smallest", description="whose labels the pretraining monitor scores with: the smallest label budget's (default), "
        "'largest', or one of labels' budgets by name (e.g. '10%', '25/class'); its train part is the kNN memory bank, "
        "its validation part the queries. At 1% of a small data set that can be a handful of queries: a larger budget "
        "makes a steadier curve and costs more")


class PretrainSpec(StrictModel):
    """BYOL pretraining (Grill et al. 2020, with its LARS, schedules and heads)."""

    epochs: int = Field(100, ge=1, description="passes over the train split's images (no labels); see min_steps")
    min_steps: int = Field(
        5000, ge=0, description="at least this many optimizer steps however small the data set: 100 epochs of 120 images "
        "at batch 256 is 100 steps, against the BYOL paper's hundreds of thousands (the README's protocol gives the arithmetic)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (tests, smoke runs)")
    batch_size: int = Field(256, ge=2, description="images a step (each makes two views); capped at the train split's size")
    base_lr: float = Field(0.2, gt=0, description="LARS rate for a batch of 256, scaled linearly with batch_size")
    weight_decay: float = Field(1.5e-6, ge=0, description="LARS weight decay (biases and BatchNorm excluded), as in the BYOL paper")
    warmup_epochs: float = Field(10, ge=0, description="linear learning-rate warm-up, in epochs (at most half the steps), then cosine decay")
    tau_base: float = Field(0.99, gt=0, lt=1, description="0.996 in the paper for 1000 epochs; 0.99 suits short runs")
    proj_hidden: Width = Field(4096, description="projector hidden width (Linear, BN, ReLU, Linear)")
    proj_dim: Width = Field(256, description="projection size: the space the BYOL loss compares in")
    pred_hidden: Width = Field(4096, description="predictor hidden width")
    augment: Augment = Field("auto", description="auto (byol for colour, xray for gray), byol, xray, ct")


class SimSiamSpec(StrictModel):
    """SimSiam's own settings (Chen & He 2021); the loop's (epochs, min_steps, batch_size, augment) are
    `pretrain`'s. The optimizer's defaults are the paper's (SGD, 0.05 x batch/256, no warm-up below a
    batch of 1024); the views are `pretrain.augment`'s presets (BYOL's), not the paper's MoCo-v2 ones."""

    base_lr: float = Field(0.05, gt=0, description="SGD rate for a batch of 256, scaled linearly with batch_size")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay (the SimSiam paper's)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    proj_dim: Width = Field(2048, ge=2, description="the 3-layer projector's width and output")
    pred_hidden: Width = Field(512, ge=2, description="the predictor's bottleneck")
    fix_pred_lr: bool = Field(True, description="the predictor keeps the peak rate (no warm-up or decay), as in the paper")
    warmup_epochs: float = Field(0, ge=0, description="linear warm-up (the paper warms up only at batch 1024 and more)")


class FinetuneSpec(StrictModel):
    """Fine-tuning (all layers) and supervised training: one recipe for both models.

    AdamW with warm-up and cosine decay; batches are always full (a small labeled set is sampled
    with replacement, each copy augmented anew); the step with the lowest validation loss is the
    model scored on test. A pretrained backbone trains at `backbone_lr_scale` times the head's rate."""

    epochs: int = Field(30, ge=1, description="passes over the labeled images of the budget; see min_steps")
    min_steps: int = Field(200, ge=1, description="at least this many steps however few labels there are")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (tests, smoke runs)")
    batch_size: int = Field(64, ge=2, description="labeled images a step (a budget smaller than it repeats its images, each augmented anew)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the head (and of a backbone trained from random init)")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="for a pretrained backbone; random init uses 1")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (biases and BatchNorm excluded)")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    eval_every_steps: int | None = Field(None, ge=1, description="default: once an epoch, at least every 5 steps, at most about 50 times")
    augment: Augment = Field("auto", description="auto (finetune, or finetune-gray for gray images)")


class ProbeSpec(StrictModel):
    """Linear evaluation: features of the frozen encoder (eval mode) extracted once, standardized,
    then L2-regularized logistic regression with its strength chosen on validation."""

    c_grid: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [10.0**k for k in range(-4, 3)], min_length=1,
                                                        description="inverse L2 strengths tried; the one with the lowest validation loss is kept")
    fixed_c: float = Field(0.1, gt=0, description="the L2 strength when too few validation labels are left to choose one")
    max_iter: int = Field(2000, ge=10, description="iterations of the logistic regression's solver (lbfgs)")


class TrainSettings(StrictModel):
    model: ModelSpec = Field(default_factory=ModelSpec, description="the backbone and the training image size")
    run: RunSpec = Field(default_factory=RunSpec, description="how a task uses the device: precision, checkpoints, the monitor")
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec, description="BYOL pretraining (and the schedule SimSiam shares)")
    simsiam: SimSiamSpec = Field(default_factory=SimSiamSpec, description="SimSiam's own settings, for the simsiam-* arms")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec, description="fine-tuning and supervised training")
    probe: ProbeSpec = Field(default_factory=ProbeSpec, description="the linear probe: a logistic regression on frozen features")
