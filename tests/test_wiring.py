"""The science's wiring, not its blocks: how the pretraining loop pairs views, schedules its rates and
draws its augmentations; which labels each task's choices may read; which settings each task id
depends on; and the metrics on cases where every confusion is possible.

Each test here was written against a plausible one-line mistake that the block tests let through
(`bench/mutations.py` applies them one at a time and reruns these files). All of it runs in this
process on tiny synthetic or random images: resnet18, 16-32 px, a few optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm

from runner.ml import train as T
from runner.ml.augment import PRESETS, augment, draw
from runner.ml.byol import BYOL, byol_loss, tau_at
from runner.ml.config import FinetuneSpec, PretrainSpec, RunSpec, TrainSettings
from runner.ml.metrics import classification_metrics
from runner.ml.models import Backbone
from runner.ml.optim import LARS
from runner.ml.pretrain import pretrain
from runner.stats import bootstrap_metrics, paired_difference
from tests.conftest import fake_imagenet_weights


def small_byol(channels: int = 1) -> BYOL:
    return BYOL(Backbone("resnet18", channels), proj_hidden=64, proj_dim=16, pred_hidden=64)


def recording_context(tmp_path: Path, seed: int = 0) -> tuple[T.Context, list[dict]]:
    events: list[dict] = []

    def emit(kind: str, **values) -> None:
        events.append({"kind": kind, **values})

    run = RunSpec(device="cpu", progress_every_s=1e-9, checkpoint_every_steps=10_000)  # a progress event every step
    return T.Context(device=torch.device("cpu"), run=run, task_dir=tmp_path, seed=seed, emit=emit), events


# ---- BYOL: which prediction meets which target ---------------------------------------------------


def test_the_loss_pairs_each_views_prediction_with_the_other_views_target():
    torch.manual_seed(0)
    model = small_byol()  # train mode: BatchNorm normalizes by the batch, the same batch gives the same output
    with torch.no_grad():  # a target unlike the online network, as after some training
        for p in model.target_parameters():
            p.add_(0.05 * torch.randn_like(p))
    v1, v2 = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)

    def online(v: torch.Tensor) -> torch.Tensor:
        return model.predictor(model.online_projector(model.online_encoder(v)))

    def target(v: torch.Tensor) -> torch.Tensor:
        return model.target_projector(model.target_encoder(v))

    loss, z1 = model(v1, v2)
    crossed = byol_loss(online(v1), target(v2)) + byol_loss(online(v2), target(v1))
    same_view = byol_loss(online(v1), target(v1)) + byol_loss(online(v2), target(v2))
    assert torch.isclose(loss, crossed, atol=1e-6)
    assert not torch.isclose(loss, same_view, atol=1e-3)
    assert torch.allclose(z1, target(v1), atol=1e-6)  # the collapse monitor reads view 1's target projection


def test_the_targets_batchnorm_statistics_follow_the_online_network():
    model = small_byol()
    online_bns = [m for m in [*model.online_encoder.modules(), *model.online_projector.modules()] if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert online_bns
    with torch.no_grad():
        for i, bn in enumerate(online_bns):
            bn.running_mean.add_(1.0 + i)
            bn.running_var.mul_(2.0)
    model.update_target(0.99)  # parameters move by 1%, statistics are copied whole
    src = [*model.online_encoder.buffers(), *model.online_projector.buffers()]
    dst = [*model.target_encoder.buffers(), *model.target_projector.buffers()]
    assert len(src) == len(dst)
    for s, d in zip(src, dst):
        assert torch.equal(s, d)


def test_the_collapse_monitor_measures_spread_across_the_batch():
    from runner.ml.byol import projection_std

    one_point = torch.randn(1, 64).repeat(256, 1)  # every image mapped to ONE (uneven) vector: collapsed
    assert projection_std(one_point) < 1e-6
    spread = torch.randn(256, 64)
    assert projection_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.1)


def test_tau_follows_the_cosine_between_its_checkpoints():
    base, total = 0.99, 1000
    for k in (0, 100, 250, 500, 750, 900, 1000):
        assert tau_at(k, total, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2, abs=1e-12)


def test_lars_decays_the_weights_towards_zero_and_adapts_the_decayed_step():
    eta, wd, lr = 0.001, 0.1, 1.0
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    b = torch.nn.Parameter(torch.ones(4))
    opt = LARS([{"params": [w]}, {"params": [b], "exclude": True, "weight_decay": 0.0}], lr=lr, momentum=0.0, weight_decay=wd, eta=eta)
    w.grad = torch.full((4, 4), 0.5)
    b.grad = torch.full((4,), 0.5)
    opt.step()
    g = 0.5 + wd * 2.0  # the decay is added to the gradient: 0.7, ||g|| = 2.8
    trust = eta * 8.0 / (g * 4)
    assert torch.allclose(w, torch.full((4, 4), 2.0 - lr * trust * g))
    assert torch.allclose(b, torch.full((4,), 0.5))  # excluded: no decay, no trust ratio
    # no gradient at all: decay alone shrinks the weights
    w.grad = torch.zeros(4, 4)
    before = float(w.detach().norm())
    opt.step()
    assert float(w.detach().norm()) < before


def test_lars_momentum_carries_the_previous_step():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = LARS([{"params": [w], "exclude": True, "weight_decay": 0.0}], lr=0.5, momentum=0.9, weight_decay=0.0)
    for g in (1.0, 2.0):
        w.grad = torch.full((3,), g)
        opt.step()
    # buffer: 1, then 0.9 * 1 + 2 = 2.9; weights: -0.5 * 1 - 0.5 * 2.9
    assert torch.allclose(w.detach(), torch.full((3,), -0.5 * 1.0 - 0.5 * 2.9))


def test_a_pretrained_backbone_trains_at_its_scaled_rate():
    from runner.ml.optim import set_lr

    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr_scale": 0.1}, {"params": [q]}], lr=1.0)
    set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.002), pytest.approx(0.02)]


# ---- the pretraining loop, run for 16 steps with its views and events recorded ---------------------

N_IMAGES, BATCH, EPOCHS, WARMUP_EPOCHS, BASE_LR, TAU_BASE = 32, 8, 4, 1.0, 0.2, 0.99


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory) -> dict:
    """The pretraining loop with BYOL on 32 random 1-channel images, batch 8 (4 steps an epoch, 16 in all, warm-up 4),
    with every call of the augmentation recorded: the preset, the generator state it started from,
    the batch and the view."""
    tmp = tmp_path_factory.mktemp("pretrain")
    ctx, events = recording_context(tmp, seed=3)
    calls: list[dict] = []
    taus: list[float] = []
    models: list[BYOL] = []
    real, real_update = T.augment, BYOL.update_target

    def update_spy(self, tau):
        taus.append(tau)
        if not models:
            models.append(self)
        return real_update(self, tau)

    def spy(images, aug, size, g, **kw):
        calls.append({"aug": aug, "state": g.get_state().clone(), "images": images.clone(), "size": size})
        return real(images, aug, size, g, **kw)

    spec = PretrainSpec(epochs=EPOCHS, min_steps=0, batch_size=BATCH, base_lr=BASE_LR, warmup_epochs=WARMUP_EPOCHS, tau_base=TAU_BASE,
                        proj_hidden=32, proj_dim=16, pred_hidden=32)
    pixels = np.random.default_rng(0).integers(0, 256, (N_IMAGES, 1, 16, 16), dtype=np.uint8)
    mp = pytest.MonkeyPatch()
    mp.setattr(T, "augment", spy)
    mp.setattr(BYOL, "update_target", update_spy)
    try:
        summary = pretrain(pixels, TrainSettings(pretrain=spec), "byol", "random", "resnet18", 16, ctx)
    finally:
        mp.undo()
    encoder = torch.load(tmp / "encoder.pt", weights_only=True)
    return {"summary": summary, "events": events, "calls": calls, "spec": spec, "taus": taus, "model": models[0],
            "encoder": encoder}


def expected_lr(k: int, total: int, warmup: int, peak: float) -> float:
    """The recipe written out: linear warm-up to the peak over `warmup` steps, then a cosine to 0."""
    if k < warmup:
        return peak * (k + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


def test_pretraining_rates_follow_the_recipe_at_every_point(pretraining):
    total = EPOCHS * (N_IMAGES // BATCH)
    warmup = int(WARMUP_EPOCHS * (N_IMAGES // BATCH))
    peak = BASE_LR * BATCH / 256  # the linear scaling rule: the base rate is for a batch of 256
    assert pretraining["summary"]["steps"] == total == 16
    progress = {e["step"]: e for e in pretraining["events"] if e["kind"] == "progress"}
    assert sorted(progress) == list(range(1, total + 1))  # one event after every step
    for k in (0, 1, warmup - 1, warmup, total // 4, total // 2, 3 * total // 4, total - 1):
        e = progress[k + 1]  # the event after step k carries that step's rates
        assert e["lr"] == pytest.approx(expected_lr(k, total, warmup, peak), rel=1e-9), k
        assert e["tau"] == pytest.approx(1 - (1 - TAU_BASE) * (math.cos(math.pi * k / total) + 1) / 2, rel=1e-12), k
    assert progress[1]["lr"] == pytest.approx(peak / warmup)  # warm-up starts low
    # the target moves by the rate of its step, once a step
    taus = pretraining["taus"]
    assert len(taus) == total
    assert all(t == pytest.approx(tau_at(k, total, TAU_BASE), rel=1e-12) for k, t in enumerate(taus))


def test_a_small_data_set_gets_the_floor_of_pretraining_steps(tmp_path):
    ctx, events = recording_context(tmp_path)
    ctx.run = RunSpec(device="cpu", progress_every_s=60, checkpoint_every_steps=10_000)
    pixels = np.random.default_rng(1).integers(0, 256, (8, 1, 16, 16), dtype=np.uint8)
    spec = PretrainSpec(epochs=2, min_steps=7, batch_size=8, warmup_epochs=1, proj_hidden=16, proj_dim=8, pred_hidden=16)
    summary = pretrain(pixels, TrainSettings(pretrain=spec), "byol", "random", "resnet18", 16, ctx)
    assert summary["steps"] == 7  # 2 epochs of one batch would be 2 steps
    assert [e["step"] for e in events if e["kind"] == "metric"] == list(range(1, 8))
    # a loss point at every step of so short a pretraining, though a minute passes between timed ones
    assert [e["step"] for e in events if e["kind"] == "progress"] == list(range(1, 8))
    from runner.ml.train import Progress

    prog = Progress(ctx, 8, total=1000)  # a long one: at least 100 points, not one an epoch
    shown = []
    for step in range(1, 1001):
        if prog.due(step == 1000, step):
            prog.emit(step, 0, loss=1.0)
            shown.append(step)
    assert shown[:3] == [1, 11, 21] and shown[-1] == 1000 and 100 <= len(shown) <= 102
    # one batch an epoch over a long run: the per-epoch metric (a read-back) about 200 times, not at every step
    from runner.ml.pretrain import metric_interval

    assert metric_interval(1, 7) == 1 and metric_interval(3, 120) == 3
    assert metric_interval(1, 5000) == 25 and metric_interval(2, 5000) == 24 and metric_interval(14, 5000) == 14
    assert PretrainSpec().min_steps == 5000  # the default: thousands of steps for a data set of hundreds


def test_the_saved_encoder_is_the_online_network(pretraining):
    model, saved = pretraining["model"], pretraining["encoder"]["state_dict"]
    online, target = model.online_encoder.state_dict(), model.target_encoder.state_dict()
    weights = [k for k in online if k.endswith("weight")]
    assert all(torch.equal(saved[k], online[k]) for k in online)
    assert any(not torch.equal(saved[k], target[k]) for k in weights)  # the EMA target differs after 16 steps


def test_every_step_makes_two_different_views_of_the_same_batch_with_the_two_presets(pretraining):
    calls = pretraining["calls"]
    assert len(calls) == 2 * pretraining["summary"]["steps"]
    view1, view2 = PRESETS["xray"]  # `augment: auto` on 1-channel images
    assert view1 != view2  # the recipe is asymmetric (blur 1.0 / 0.1, solarize 0.0 / 0.2)
    for a, b in zip(calls[0::2], calls[1::2]):
        assert (a["aug"], b["aug"]) == (view1, view2)
        assert torch.equal(a["images"], b["images"])  # two views of ONE batch
        thetas = []
        for c in (a, b):
            g = torch.Generator().manual_seed(0)
            g.set_state(c["state"])
            thetas.append(draw(c["aug"], BATCH, 1, c["size"], g, torch.device("cpu"))["theta"])
        differs = (thetas[0] - thetas[1]).abs().flatten(1).amax(1) > 1e-6
        assert bool(differs.all()), "a sample got the same crop and flip in both views"


# ---- the augmentation's per-op rates --------------------------------------------------------------

N_RATE = 2000


def _neutral(aug):
    """`aug` with every random op off and the crop the whole image."""
    return replace(aug, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rotate_deg=0.0, jitter_p=0.0,
                   grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _changed_share(image: np.ndarray, aug, seed: int) -> float:
    """Share of N_RATE copies of `image` that `aug` changes, against the neutral view of the same copies."""
    batch = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(image, (N_RATE, *image.shape))))
    size = image.shape[-1]
    ref = augment(batch, _neutral(aug), size, torch.Generator().manual_seed(seed))
    out = augment(batch, aug, size, torch.Generator().manual_seed(seed))
    return float(((out - ref).abs().flatten(1).amax(1) > 1e-3).double().mean())


def _images() -> dict[str, np.ndarray]:
    s = 8
    half = np.zeros((3, s, s), np.uint8)
    half[:, :, : s // 2] = 220  # left half bright: a flip shows
    checker = ((np.indices((s, s)).sum(0) % 2) * 200 + 20).astype(np.uint8)[None].repeat(3, 0)  # a blur shows
    flat = np.full((3, s, s), 128, np.uint8)  # mid gray: a brightness change shows
    red = np.stack([np.full((s, s), v, np.uint8) for v in (200, 40, 90)])  # a grayscale shows
    bright = np.full((3, s, s), 204, np.uint8)  # 0.8: solarizing makes it 0.2
    return {"hflip": half, "blur": checker, "jitter": flat, "grayscale": red, "solarize": bright}


@pytest.mark.parametrize("preset", ["byol", "xray"])
@pytest.mark.parametrize("view", [0, 1])
def test_each_random_op_fires_at_its_probability(preset, view):
    aug = PRESETS[preset][view]
    images = _images()
    channels = 3 if preset == "byol" else 1
    rates = {
        "hflip": (replace(_neutral(aug), hflip=aug.hflip), aug.hflip),
        "jitter": (replace(_neutral(aug), jitter_p=aug.jitter_p, contrast=0.0, saturation=0.0, hue=0.0, gamma=0.0), aug.jitter_p),
        "solarize": (replace(_neutral(aug), solarize_p=aug.solarize_p), aug.solarize_p),
        # sigmas of 1-2 output pixels, so every blurred sample shows (the preset's smallest are invisible at 8 px)
        "blur": (replace(_neutral(aug), blur_p=aug.blur_p, blur_sigma=(224 / 8, 2 * 224 / 8)), aug.blur_p),
    }
    if channels == 3:
        rates["grayscale"] = (replace(_neutral(aug), grayscale_p=aug.grayscale_p), aug.grayscale_p)
    for i, (op, (isolated, p)) in enumerate(rates.items()):
        image = images[op][:channels]
        share = _changed_share(image, isolated, seed=100 + i)
        if op == "blur":  # exactly round(p * batch) samples are blurred
            assert share == round(p * N_RATE) / N_RATE, (op, share, p)
            continue
        tol = 4 * math.sqrt(max(p * (1 - p), 1e-12) / N_RATE)
        assert abs(share - p) <= tol + 1e-9, (preset, view, op, share, p)


def test_every_view_is_normalized_with_the_stems_statistics():
    from runner.ml.augment import GRAY_MEAN, GRAY_STD, RGB_MEAN, RGB_STD, eval_view

    for channels, mean, std in ((3, RGB_MEAN, RGB_STD), (1, GRAY_MEAN, GRAY_STD)):
        flat = torch.full((2, channels, 8, 8), 153, dtype=torch.uint8)  # 0.6 everywhere
        want = torch.tensor([(0.6 - m) / s for m, s in zip(mean, std)]).view(1, channels, 1, 1).expand(2, channels, 8, 8)
        assert torch.allclose(eval_view(flat, 8), want, atol=1e-5)
        view = augment(flat, _neutral(PRESETS["byol"][0]), 8, torch.Generator().manual_seed(0))
        assert torch.allclose(view, want, atol=1e-4)


def test_crops_cover_the_presets_area_and_aspect_ranges():
    from runner.ml.augment import affine_params

    aug = replace(PRESETS["byol"][0], rotate_deg=0.0)
    theta = affine_params(aug, 20_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()  # no rotation: the diagonal is the crop's size
    area, ratio = (w * h).numpy(), (w / h).numpy()
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 + 1e-6
    assert np.quantile(area, 0.1) < 0.25 and np.quantile(area, 0.9) > 0.75  # spread over the range, not one size
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    assert np.quantile(ratio, 0.1) < 0.85 and np.quantile(ratio, 0.9) > 1.15
    # the areas torchvision's RandomResizedCrop gives on a square image (clamping would give 0.535)
    import torchvision.transforms as TV

    torch.manual_seed(0)
    ref = [np.prod(TV.RandomResizedCrop.get_params(torch.zeros(1, 224, 224), [0.08, 1.0], [3 / 4, 4 / 3])[2:]) / 224**2
           for _ in range(4000)]
    assert float(area.mean()) == pytest.approx(float(np.mean(ref)), abs=0.015)


def test_a_fraction_of_a_class_is_the_nearest_count():
    from runner.data.splits import LabelBudget

    ten = LabelBudget(fraction=0.1)
    assert [ten.count(n) for n in (24, 25, 35, 938)] == [2, 3, 4, 94]  # 2.4, 2.5, 3.5, 93.8 rounded half up
    assert LabelBudget(fraction=0.01).count(938) == 9 and LabelBudget(per_class=5).count(938) == 5


def test_validation_labels_are_drawn_at_the_budgets_rate_and_nest():
    from runner.data.splits import LabelBudget, validation_subset

    keys = [f"img{i:04d}" for i in range(1000)]
    labels = np.r_[np.zeros(300, int), np.ones(700, int)]
    val = np.arange(0, 1000, 5)  # 60 of class 0, 140 of class 1
    train_counts = [240, 560]
    names = ["a", "b"]
    for seed in (0, 1):
        subsets = {}
        for b in (LabelBudget(fraction=0.01), LabelBudget(fraction=0.1), LabelBudget(per_class=56), LabelBudget(fraction=1.0)):
            sub = validation_subset(val, keys, labels, names, b, train_counts, seed)
            subsets[b.name] = set(sub.tolist())
            per_class = np.bincount(labels[sub], minlength=2).tolist()
            rate = b.fraction if b.fraction is not None else [56 / 240, 56 / 560]
            rates = rate if isinstance(rate, list) else [rate, rate]
            want = [max(1, min(n, int(np.floor(r * n + 0.5)))) for r, n in zip(rates, (60, 140))]
            assert per_class == want, (b.name, per_class, want)  # the rate, rounded, with a floor of one a class
        assert subsets["1%"] <= subsets["10%"] <= subsets["100%"]  # nested like the training subsets
        assert subsets["100%"] == set(val.tolist())
    other = validation_subset(val, keys, labels, names, LabelBudget(fraction=0.1), train_counts, 1)
    assert set(other.tolist()) != set(validation_subset(val, keys, labels, names, LabelBudget(fraction=0.1), train_counts, 0).tolist())


# ---- metrics where every confusion is possible ------------------------------------------------------

# 10 test images, 6 positive; predictions make sensitivity 4/6, specificity 3/4, accuracy 7/10 and
# balanced accuracy 17/24: no two of them equal, so a swap or a shortcut shows.
LABELS = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
P_POS = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.35, 0.1, 0.55])


def _probs(p_pos: np.ndarray) -> np.ndarray:
    return np.stack([1 - p_pos, p_pos], 1)


def _sk(labels: np.ndarray, p_pos: np.ndarray, pos: int = 1) -> dict:
    pred = (p_pos >= 0.5).astype(int)  # the argmax of the two columns
    return {
        "accuracy": skm.accuracy_score(labels, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
        "sensitivity": skm.recall_score(labels, pred, pos_label=pos),
        "specificity": skm.recall_score(labels, pred, pos_label=1 - pos),
        "auroc": skm.roc_auc_score(labels == pos, _probs(p_pos)[:, pos]),
        "loss": skm.log_loss(labels, _probs(p_pos), labels=[0, 1]),
    }


@pytest.mark.parametrize("positive", [1, 0])
def test_task_metrics_tell_sensitivity_specificity_and_balanced_accuracy_apart(positive):
    got = classification_metrics(_probs(P_POS), LABELS, positive)
    want = _sk(LABELS, P_POS, positive)
    assert len({round(want[m], 6) for m in ("accuracy", "balanced_accuracy", "sensitivity", "specificity")}) == 4
    for m, v in want.items():
        assert got[m] == pytest.approx(v), m


def test_report_metrics_pool_seeds_and_keep_each_metric_apart():
    rng = np.random.default_rng(1)
    seeds = [P_POS, np.clip(P_POS + rng.normal(0, 0.2, len(P_POS)), 0.01, 0.99)]
    pooled_labels, pooled_p = np.tile(LABELS, 2), np.concatenate(seeds)
    want = _sk(pooled_labels, pooled_p)
    assert len({round(want[m], 6) for m in ("accuracy", "balanced_accuracy", "sensitivity", "specificity")}) == 4
    got = bootstrap_metrics([(_probs(p), LABELS) for p in seeds], positive=1, b=50)
    for m in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "loss"):
        assert got[m]["value"] == pytest.approx(want[m]), m
    one = bootstrap_metrics([(_probs(P_POS), LABELS)], positive=1, b=50)
    for m, v in _sk(LABELS, P_POS).items():
        assert one[m]["value"] == pytest.approx(v), m
    # the paired difference is the difference of the pooled values, metric by metric
    diff = paired_difference([(_probs(P_POS), LABELS)], [(_probs(seeds[1]), LABELS)], positive=1, b=50)
    other = _sk(LABELS, seeds[1])
    for m in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auroc", "loss"):
        assert diff[m]["value"] == pytest.approx(one[m]["value"] - other[m]), m


# ---- classifier selection: the lowest validation loss, and those weights kept ----------------------


def test_the_kept_classifier_is_the_logged_evaluation_with_the_lowest_validation_loss(tmp_path):
    """Train images are dark (class 0) or bright (class 1); the validation labels are the other way
    round, so every step of learning makes validation worse and the best evaluation is the first."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 16)
    x = np.where(y[:, None, None, None] == 1, 200, 40) + rng.integers(-20, 20, (32, 1, 16, 16))
    x = x.clip(0, 255).astype(np.uint8)
    ctx, events = recording_context(tmp_path)
    torch.manual_seed(0)
    spec = FinetuneSpec(epochs=1, min_steps=12, batch_size=16, lr=3e-3, eval_every_steps=3)
    model, sel = T.train_classifier(Backbone("resnet18", 1), False, (x, y), (x, 1 - y), 2, spec, 16, ctx)
    logged = [(e["step"], e["val_loss"]) for e in events if e["kind"] == "metric"]
    assert [s for s, _ in logged] == [0, 3, 6, 9, 12]
    best_step, best_loss = min(logged, key=lambda sl: sl[1])
    assert logged[-1][1] > best_loss + 0.01  # the last evaluation is not the best one here
    assert sel["selected_step"] == best_step and sel["val_loss"] == pytest.approx(best_loss)
    probs = T.predict(model, torch.from_numpy(x), 16, ctx)
    assert T.ce_from_probs(probs, torch.from_numpy(1 - y)) == pytest.approx(best_loss, abs=1e-5)  # those weights


def test_the_probe_strength_is_the_grid_point_with_the_lowest_validation_loss():
    """Separable train features, validation labels that are coin flips: the train loss always prefers
    the weakest regularization, the validation loss the strongest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from runner.ml.config import ProbeSpec

    rng = np.random.default_rng(0)
    ytr = np.repeat([0, 1], 20)
    xtr = rng.normal(0, 1, (40, 4)) + 3 * ytr[:, None]
    xva, yva = rng.normal(1.5, 2, (40, 4)), rng.integers(0, 2, 40)
    spec = ProbeSpec(c_grid=[1e-4, 1e-2, 1.0, 100.0], max_iter=500)
    _, sel, _ = T.linear_probe({"train": xtr, "val": xva}, {"train": ytr, "val": yva}, spec, 2)
    scaler = StandardScaler().fit(xtr)
    val_loss = {}
    for c in spec.c_grid:
        clf = LogisticRegression(C=c, max_iter=500).fit(scaler.transform(xtr), ytr)
        val_loss[c] = skm.log_loss(yva, clf.predict_proba(scaler.transform(xva)), labels=[0, 1])
    best = min(val_loss, key=val_loss.get)
    assert best != max(spec.c_grid)  # the case tells validation from training selection
    assert sel["C"] == best and sel["val_loss"] == pytest.approx(val_loss[best], rel=1e-6)


# ---- no choice of any task reads the test split -----------------------------------------------------

SYNTHETIC = {"source": "synthetic", "num_classes": 2, "per_class": 24, "size": 16, "image_size": 16,
             "classes": {"normal": ["class0"], "finding": ["class1"]}, "positive": "finding",
             "split": {"strategy": "stratified", "val": 0.25, "test": 0.25}}
TINY_SETTINGS = {
    "model": {"arch": "resnet18"},
    "run": {"device": "cpu", "progress_every_s": 60, "checkpoint_every_steps": 10_000},
    "pretrain": {"epochs": 2, "min_steps": 0, "batch_size": 8, "proj_hidden": 32, "pred_hidden": 32, "proj_dim": 16, "warmup_epochs": 0.5},
    "finetune": {"epochs": 1, "min_steps": 9, "batch_size": 8, "eval_every_steps": 3},
    "probe": {"c_grid": [0.001, 0.1, 10.0], "max_iter": 200},
}


BUDGET = {"fraction": 0.5, "min_validation_per_class": 2}  # 6 of 12 train and 3 of 6 validation images a class


def _run(results: Path, kind: str, scrambled: str | None, monkeypatch, encoder: str | None = None,
         budget: dict = BUDGET, data: dict = SYNTHETIC) -> tuple[dict, Path]:
    """run_task in this process. `scrambled`: "test", the test split's images are noise and its labels
    flipped; "outside budget", so are those of every train and validation image outside the task's
    budget (for pretraining, only the labels: it may read every train image, no label)."""
    from runner.data import dataset as D
    from runner.contracts import TaskSpec
    from runner.worker.run import EventLog, run_task

    real = D.prepare

    def prepare(*args, **kwargs):
        ds = real(*args, **kwargs)
        if not scrambled:
            return ds
        if scrambled == "test":
            test = ds.splits["test"]
        else:
            from runner.data.splits import LabelBudget

            b = LabelBudget(fraction=budget.get("fraction"), per_class=budget.get("per_class"))
            kept = {"labeled": ds.labeled(b, 1), "validation": ds.validation(b, 1)}
            test = np.setdiff1d(np.r_[ds.splits["train"], ds.splits["val"]], np.r_[kept["labeled"], kept["validation"]])
        labels = ds.labels.copy()
        labels[test] = 1 - labels[test]
        noise = np.random.default_rng(7).integers(0, 256, (len(ds.keys), *ds.table.images.shape[1:]), dtype=np.uint8)

        class Scrambled(D.PreparedDataset):
            # which images carry the budget's labels is drawn per class, from every image's class (the
            # simulated labeling); what is checked here is that nothing else reads the others
            if scrambled == "outside budget":
                def labeled(self, b, seed):  # noqa: ANN001, ARG002
                    return kept["labeled"]

                def validation(self, b, seed):  # noqa: ANN001, ARG002
                    return kept["validation"]

            def pixels(self, idx):
                idx = np.asarray(idx)
                out = super().pixels(idx)
                in_test = np.isin(idx, test) & (kind != "pretrain" or scrambled == "test")
                out[in_test] = noise[idx[in_test]]
                return out

        return Scrambled(**({f.name: getattr(ds, f.name) for f in fields(ds)} | {"labels": labels}))

    monkeypatch.setattr(D, "prepare", prepare)
    b_part = "none" if kind == "pretrain" else f"{budget.get('fraction')}-{budget.get('per_class')}"
    tid = f"{kind}-{scrambled.replace(' ', '-') if scrambled else 'clean'}-{b_part}" + ("" if data is SYNTHETIC else "-other-data")
    task_dir = results / "tasks" / tid
    task_dir.mkdir(parents=True, exist_ok=True)
    spec = TaskSpec.model_validate({"id": tid, "kind": kind, "dataset": "syn", "data": data, "seed": 1,
                                    "budget": None if kind == "pretrain" else budget,
                                    "settings": TINY_SETTINGS | {"model": {**TINY_SETTINGS["model"], "imagenet_weights": str(
                                        results / "torch_home" / "fake-resnet18-imagenet.pth")}}, "encoder": encoder})
    log = EventLog(task_dir / "events.jsonl", tid)
    try:
        return run_task(spec, task_dir, results, log), task_dir
    finally:
        log.close()
        monkeypatch.setattr(D, "prepare", real)


@pytest.fixture(scope="module")
def scramble_results(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("scramble")
    fake_imagenet_weights(results / "torch_home")
    return results


PRETRAINED = "tasks/pretrain-clean-none/encoder.pt"


def _pretrained(results: Path, monkeypatch) -> str:
    if not (results / PRETRAINED).is_file():
        _run(results, "pretrain", None, monkeypatch)
    return PRETRAINED


@pytest.mark.parametrize("scramble", ["test", "outside budget"])
def test_pretraining_reads_no_test_image_and_no_label(scramble_results, monkeypatch, scramble):
    clean = scramble_results / Path(_pretrained(scramble_results, monkeypatch)).parent
    _, scrambled = _run(scramble_results, "pretrain", scramble, monkeypatch)
    a = torch.load(clean / "encoder.pt", weights_only=True)["state_dict"]
    b = torch.load(scrambled / "encoder.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["finetune", "linear", "supervised", "supervised-imagenet", "random-linear", "imagenet-linear"])
def test_no_choice_of_a_classifier_task_reads_the_test_split(scramble_results, monkeypatch, kind):
    """Selection step, probe strength and temperature are the same whatever the test split holds;
    only the test metrics move."""
    encoder = _pretrained(scramble_results, monkeypatch) if kind in ("finetune", "linear") else None
    clean, _ = _run(scramble_results, kind, None, monkeypatch, encoder)
    scrambled, _ = _run(scramble_results, kind, "test", monkeypatch, encoder)
    assert clean["selection"]["mode"] == "validation"
    assert clean["selection"] == scrambled["selection"]
    assert clean["temperature"] == scrambled["temperature"]
    # half of each class's 12 train images and 3 of its 6 validation images: every label counted
    assert clean["n_train_labels"] == 12 and clean["n_val_labels"] == 6 and clean["n_labeled"] == scrambled["n_labeled"] == 18
    assert clean["test"]["n"] == scrambled["test"]["n"]
    assert clean["test"]["loss_uncalibrated"] != scrambled["test"]["loss_uncalibrated"]  # the scramble took effect
    # the labels and images outside the budget: nothing about the task changes, its test results included
    outside, _ = _run(scramble_results, kind, "outside budget", monkeypatch, encoder)
    assert outside["selection"] == clean["selection"] and outside["temperature"] == clean["temperature"]
    assert outside["test"] == clean["test"] and outside["predictions"] == clean["predictions"]


@pytest.mark.parametrize("kind", ["finetune", "linear"])
def test_too_few_validation_labels_train_a_fixed_schedule(scramble_results, monkeypatch, kind):
    """One label a class: 1/12 of 6 validation images rounds to 0, the floor keeps 1, under the 2 a
    choice needs: no selection step, no probe strength chosen, no temperature, and only train labels used."""
    encoder = _pretrained(scramble_results, monkeypatch)
    m, task_dir = _run(scramble_results, kind, None, monkeypatch, encoder, budget={"per_class": 1, "min_validation_per_class": 2})
    assert m["selection"]["mode"] == "fixed schedule" and m["temperature"] is None
    assert m["n_train_labels"] == 2 and m["n_val_labels"] == 0 and m["n_labeled"] == 2
    if kind == "finetune":
        assert m["selection"]["selected_step"] == m["selection"]["steps"]
        import json

        metric = [json.loads(x) for x in (task_dir / "events.jsonl").read_text().splitlines() if '"kind": "metric"' in x]
        assert metric and not any("val_loss" in e for e in metric)  # no validation label was read
    else:
        assert m["selection"]["C"] == 0.1


# ---- task ids: each settings section and each upstream task moves exactly its dependants --------------

PLAN_BASE = {
    "name": "wiring",
    "datasets": {"syn": SYNTHETIC},
    "methods": ["byol-finetune", "byol-linear", "supervised", "supervised-imagenet", "random-linear",
                "byol-imagenet-finetune", "byol-imagenet-linear", "simsiam-finetune", "simsiam-linear", "imagenet-linear"],
    "labels": {"fractions": [0.5]},
    "seeds": [0],
    **{k: v for k, v in TINY_SETTINGS.items()},
    "simsiam": {"proj_dim": 32, "pred_hidden": 8},
}
PRETRAINS = {"byol-pretrain", "byol-imagenet-pretrain", "simsiam-pretrain"}
BYOL_ARMS = {"byol-pretrain", "byol-finetune", "byol-linear"}
BYOL_IMAGENET = {"byol-imagenet-pretrain", "byol-imagenet-finetune", "byol-imagenet-linear"}
SIMSIAM = {"simsiam-pretrain", "simsiam-finetune", "simsiam-linear"}
ALL = BYOL_ARMS | BYOL_IMAGENET | SIMSIAM | {"supervised", "supervised-imagenet", "random-linear", "imagenet-linear"}
# a change to one part of the manifest -> the arms whose task ids must change (and no other)
AFFECTED = {
    "model": (("model", "image_size"), 24, ALL),
    # SimSiam's loop settings (epochs, batch, warm-up, augment) are pretrain's
    "pretrain": (("pretrain", "tau_base"), 0.98, BYOL_ARMS | BYOL_IMAGENET | SIMSIAM),
    "simsiam": (("simsiam", "base_lr"), 0.1, SIMSIAM),
    "finetune": (("finetune", "lr"), 2e-3, {"byol-finetune", "supervised", "supervised-imagenet", "byol-imagenet-finetune",
                                              "simsiam-finetune"}),
    "probe": (("probe", "max_iter"), 300, {"byol-linear", "random-linear", "byol-imagenet-linear", "simsiam-linear",
                                            "imagenet-linear"}),
    "run": (("run", "progress_every_s"), 5.0, set()),
    "precision": (("run", "precision"), "fp32", ALL),  # a result of its own (auto may be bf16 on this CPU)
    "labels": (("labels", "fractions"), [0.4], ALL - PRETRAINS),
    "validation": (("labels", "validation"), "full", ALL - PRETRAINS),
    "min_validation": (("labels", "min_validation_per_class"), 3, ALL - PRETRAINS),
    "seeds": (("seeds",), [1], ALL),
    "data": (("datasets", "syn", "per_class"), 25, ALL),
}


def _plan_ids(manifest: dict, results: Path, weights_content: bytes | None = None) -> dict[str, str]:
    from runner.manifest import parse_manifest
    from runner.plan import make_plan

    weights, _ = fake_imagenet_weights(results / "torch_home", loadable=False)
    if weights_content is not None:
        weights.write_bytes(weights_content)
    manifest = {**manifest, "model": {"imagenet_weights": str(weights), **manifest.get("model", {})}}

    plan = make_plan(parse_manifest(yaml.safe_dump(manifest)), results)
    ids = {t.method: t.id for t in plan.tasks}
    assert len(ids) == len(set(ids.values())) == len(plan.tasks)  # every arm and pretraining its own task
    return ids


def test_a_new_engine_version_changes_every_id(tmp_path, monkeypatch):
    import runner.plan

    base = _plan_ids(PLAN_BASE, tmp_path)
    monkeypatch.setattr(runner.plan, "ENGINE_VERSION", runner.plan.ENGINE_VERSION + 1)
    new = _plan_ids(PLAN_BASE, tmp_path)
    assert all(new[m] != base[m] for m in ALL)


def test_another_imagenet_weights_file_changes_exactly_the_ids_that_start_from_it(tmp_path):
    """The ImageNet weights' sha256 is part of the id of what loads them: another file (of the same
    name and place) is another result; its path is not (moving the file changes nothing)."""
    base = _plan_ids(PLAN_BASE, tmp_path)
    other = _plan_ids(PLAN_BASE, tmp_path, weights_content=b"other weights")
    assert {m for m in ALL if other[m] != base[m]} == BYOL_IMAGENET | {"supervised-imagenet", "imagenet-linear"}
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "w.pth").write_bytes(b"not weights")  # the first file's bytes, elsewhere
    again = _plan_ids({**PLAN_BASE, "model": {**PLAN_BASE["model"], "imagenet_weights": str(moved / "w.pth")}}, tmp_path / "r2")
    assert again == base


@pytest.mark.parametrize("part", sorted(AFFECTED))
def test_each_setting_changes_exactly_the_ids_that_depend_on_it(part, tmp_path, monkeypatch):
    import copy

    path, value, affected = AFFECTED[part]
    base = _plan_ids(PLAN_BASE, tmp_path)
    assert set(base) == ALL
    changed = copy.deepcopy(PLAN_BASE)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    new = _plan_ids(changed, tmp_path)
    moved = {m for m in ALL if new[m] != base[m]}
    assert moved == affected, part


# ---- what the table is made of: faults a snapshot or an end-to-end run was needed to see -----------


IMBALANCED = {**SYNTHETIC, "num_classes": 3, "classes": {"normal": ["class0"], "finding": ["class1", "class2"]}}  # 1 : 2


def test_a_classifiers_bar_is_its_test_splits_class_frequencies_not_its_labeled_subsets(scramble_results, monkeypatch):
    """A budget of 4 labels a class (balanced) on a 1 : 2 data set: † compares the test loss with the
    constant guess of the test split's frequencies (1 : 2), not of the labeled subset (1 : 1)."""
    from runner.ml.metrics import prior_loss

    m, _ = _run(scramble_results, "supervised", None, monkeypatch, budget={"per_class": 4, "min_validation_per_class": 2},
                data=IMBALANCED)
    test = np.asarray(m["predictions"]["test_labels"])
    assert np.bincount(test).tolist()[1] == 2 * np.bincount(test).tolist()[0]
    assert m["prior_loss"] == pytest.approx(prior_loss(test, test, 2))
    assert m["prior_loss"] < prior_loss(np.array([0, 1]), test, 2) - 0.05  # the labeled subset's 1 : 1 guess


def test_an_external_set_is_scored_with_the_classifiers_temperature_and_held_against_its_training_prior(
        scramble_results, monkeypatch):
    """The evaluate task's stored probabilities are the classifier's raw ones with its temperature
    applied, and its † bar is the constant guess of the classifier's training labels (1 : 1 here),
    not the external set's own frequencies (1 : 2)."""
    from runner.contracts import TaskSpec
    from runner.data.dataset import prepare
    from runner.ml import saved as S
    from runner.ml.metrics import apply_temperature, prior_loss
    from runner.worker.run import EventLog, run_task

    _, clf_dir = _run(scramble_results, "supervised", None, monkeypatch)
    model = S.load(clf_dir / "model.pt")
    assert model["temperature"] not in (None, 1.0)  # a temperature that, left out, would change every probability
    ext = {**IMBALANCED, "seed": 9, "external_test_of": "syn"}
    ext.pop("split")
    tid = "evaluate-ext"
    task_dir = scramble_results / "tasks" / tid
    task_dir.mkdir(parents=True, exist_ok=True)
    spec = TaskSpec.model_validate({"id": tid, "kind": "evaluate", "dataset": "ext", "data": ext, "seed": 1,
                                    "settings": TINY_SETTINGS, "model": f"tasks/{clf_dir.name}/model.pt"})
    log = EventLog(task_dir / "events.jsonl", tid)
    try:
        m = run_task(spec, task_dir, scramble_results, log)
    finally:
        log.close()
    ds = prepare("ext", spec.data, scramble_results / "cache", classes_of=model["class_names"])
    test = ds.splits["test"]
    ctx, _ = _cpu(scramble_results)
    raw = S.Scorer(model, scramble_results, torch.device("cpu"), ctx).raw(ds.pixels(test))
    assert np.allclose(m["predictions"]["test_probs"], apply_temperature(raw, model["temperature"]), atol=1e-5)
    assert not np.allclose(m["predictions"]["test_probs"], raw, atol=1e-3)
    labels = ds.labels[test]
    trained = np.repeat(np.arange(2), model["train_counts"])
    assert model["train_counts"][0] == model["train_counts"][1]
    assert m["prior_loss"] == pytest.approx(prior_loss(trained, labels, 2))
    assert m["prior_loss"] > prior_loss(labels, labels, 2) + 0.05  # the external set's own 1 : 2 guess


def _cpu(folder: Path):  # noqa: ANN202 - a train.Context and its events
    from runner.ml.config import RunSpec
    from runner.ml.train import Context

    events: list[dict] = []
    run = RunSpec(device="cpu", progress_every_s=60, checkpoint_every_steps=10_000)
    return Context(torch.device("cpu"), run, folder, 0, lambda kind, **v: events.append({"kind": kind, **v})), events


@pytest.mark.parametrize("from_pretraining", [True, False])
def test_a_pretrained_backbone_fine_tunes_at_its_scaled_rate(tmp_path, monkeypatch, from_pretraining):
    """backbone_lr_scale (0.1) times the head's learning rate for a pretrained backbone, at every
    step; the same rate as the head's from random init."""
    from runner.ml import train as T
    from runner.ml.config import FinetuneSpec
    from runner.ml.models import Backbone

    seen: list[tuple[float, float]] = []
    real = T.set_lr

    def spy(opt, lr):  # noqa: ANN001
        real(opt, lr)
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[-1]["lr"]))  # a backbone group, a head group

    monkeypatch.setattr(T, "set_lr", spy)
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8), np.r_[np.zeros(8, int), np.ones(8, int)])
    spec = FinetuneSpec(epochs=1, min_steps=4, batch_size=8, eval_every_steps=2, warmup_frac=0.0)
    ctx, _ = _cpu(tmp_path)
    T.train_classifier(Backbone("resnet18", 1), from_pretraining, train, None, 2, spec, 16, ctx)
    assert len(seen) == 4 and all(head > 0 for _, head in seen)
    assert all(bb == pytest.approx(head * (spec.backbone_lr_scale if from_pretraining else 1.0)) for bb, head in seen)


def test_events_are_read_from_a_regular_file_only_and_in_bounded_pieces(tmp_path, monkeypatch):
    """events.jsonl replaced by a FIFO, a link to /dev/zero or a link to another task's events: every
    reader (run's tail, status, report, the TUI) gets no events at once, instead of hanging on the FIFO
    or reading /dev/zero until memory runs out; a real file is read in pieces of at most the bound, the
    offset carrying on where a piece ended."""
    import os
    import threading

    from runner import contracts
    from runner.contracts import event_line, read_events

    real = tmp_path / "real.jsonl"
    real.write_text("".join(event_line("t", "progress", step=i, loss=1.0) for i in range(50)))
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    (tmp_path / "link.jsonl").symlink_to(real)
    done = {}
    worker = threading.Thread(target=lambda: done.update({n: read_events(tmp_path / n) for n in ("fifo.jsonl", "zero.jsonl", "link.jsonl")}),
                              daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "a reader hung"
    assert done == {"fifo.jsonl": ([], 0), "zero.jsonl": ([], 0), "link.jsonl": ([], 0)}
    line = len(event_line("t", "progress", step=0, loss=1.0))
    monkeypatch.setattr(contracts, "EVENTS_READ_MAX", line * 20 + 5)  # 20 whole lines and part of one a call
    steps, offset = [], 0
    for _ in range(3):
        events, offset = read_events(real, offset)
        steps += [e["step"] for e in events]
    assert steps == list(range(50)) and offset == real.stat().st_size
