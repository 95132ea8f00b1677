"""The supervised training loops: classifier training (fine-tune and supervised) and the linear probe,
and what every loop shares (the device context, the index stream, progress events, resuming).
Pretraining is `pretrain.py`.

Every loop reads a uint8 image tensor that sits on the device (pinned host memory when it does not
fit), draws batch indices from seeded per-epoch permutations (so a resumed run picks up at the same
batch), makes its views with `augment` on the device, and keeps its running loss on the device,
reading it back only when an event is due.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runner.ml.augment import augment, eval_view, preset_for
from runner.ml.checkpoint import CheckpointWriter, rng_state, safe_load, set_rng_state
from runner.ml.config import FinetuneSpec, ProbeSpec, RunSpec
from runner.ml.metrics import cross_entropy
from runner.ml.models import Backbone, Classifier
from runner.ml.optim import set_lr, split_decay_groups, warmup_cosine

Emit = Callable[..., None]  # emit(kind, **values)


@dataclass
class Context:
    """Where and how a task trains, and where its files go."""

    device: torch.device
    run: RunSpec
    task_dir: Path
    seed: int
    emit: Emit

    @property
    def bf16(self) -> bool:
        """bf16 autocast: asked for, or `auto` on a GPU. On a CPU `auto` is fp32, also where the CPU
        computes bf16 natively (AVX512-BF16, AMX; `native_bf16_cpu`): there a BYOL step in bf16 ran
        1.5× the fp32 one at 64 px (bench/cpu_path.py), but it rounds every activation to 3
        significant digits and its numbers are not fp32's, so a CPU run is bf16 only when the manifest
        asks. (Its steps repeat to the bit, at 16 px too, since SmallMapConv2d took over the 1x1 and
        2x2 maps whose oneDNN bf16 kernels did not: a test holds it.)"""
        return self.run.precision == "bf16" or (self.run.precision == "auto" and self.device.type == "cuda")

    @property
    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def eval_input(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """The deterministic evaluation view of a uint8 batch, in the network's layout."""
        return eval_view(x, size, channels_last=self.run.channels_last)

    def view(self, x: torch.Tensor, aug, size: int, gen: torch.Generator) -> torch.Tensor:
        """An augmented view of a uint8 batch, written directly in the network's input format
        (channels_last; bf16 under bf16 autocast, which would cast it there anyway)."""
        return augment(x, aug, size, gen, compiled=self.run.compile, channels_last=self.run.channels_last,
                       dtype=torch.bfloat16 if self.bf16 else None)

    def place(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.run.channels_last else module

    def maybe_compile(self, fn):
        return torch.compile(fn) if self.run.compile else fn


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware (oneDNN's own check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def to_device_images(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 images on the device, or in pinned host memory when they would take over 40% of the
    free GPU memory."""
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type != "cuda":
        return t
    free, _ = torch.cuda.mem_get_info(device)
    return t.to(device) if t.nbytes < 0.4 * free else t.pin_memory()


def take(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` of `images` (or labels) on `device`. Host-resident (pinned) images are gathered on
    the host and copied without waiting for the device; give them host indices (an IndexStream on
    the images' device), since reading device indices back would wait."""
    if images.device.type == device.type:
        return images.index_select(0, idx.to(images.device))
    return images.index_select(0, idx.cpu()).pin_memory().to(device, non_blocking=True)


class IndexStream:
    """Batches of `batch` indices out of range(n): consecutive seeded permutations, cut into batches.

    A batch may span two permutations, so a labeled set smaller than the batch still fills it (each
    image several times, each copy augmented anew). Batch k is a pure function of (seed, n, k)."""

    def __init__(self, n: int, batch: int, seed: int, device: torch.device) -> None:
        self.n, self.batch, self.seed, self.device = n, batch, seed, device
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            if self.device.type == "cuda":  # a copy from pinned memory does not wait for the device
                perm = perm.pin_memory().to(self.device, non_blocking=True)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def batch_at(self, k: int) -> torch.Tensor:
        start = k * self.batch
        e0, e1 = start // self.n, (start + self.batch - 1) // self.n
        flat = torch.cat([self._perm(e) for e in range(e0, e1 + 1)])
        off = start - e0 * self.n
        return flat[off : off + self.batch]


class Progress:
    """Progress events at a steady rate (not every step), with images/s measured between them: every
    run.progress_every_s seconds, and at least POINTS times a training, so that a short one still
    draws a loss curve (it drew one point an epoch: two for a two-epoch pretraining)."""

    POINTS = 100

    def __init__(self, ctx: Context, batch: int, total: int | None = None) -> None:
        self.ctx, self.batch, self.total = ctx, batch, total  # total: the steps of this training, for k/N and an ETA
        self.last_t, self.last_step = time.perf_counter(), None
        self.every = max(1, total // self.POINTS) if total else None

    def due(self, final: bool, step: int | None = None) -> bool:
        if final or self.last_step is None or time.perf_counter() - self.last_t >= self.ctx.run.progress_every_s:
            return True
        return self.every is not None and step is not None and step - self.last_step >= self.every

    def emit(self, step: int, epoch: int, **values: float) -> None:
        now = time.perf_counter()
        if self.last_step is not None and step > self.last_step:
            values["img_per_s"] = round((step - self.last_step) * self.batch / (now - self.last_t), 1)
        if self.total:
            values["total"] = self.total
        self.ctx.emit("progress", epoch=epoch, step=step, **values)
        self.last_t, self.last_step = now, step


def resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, dev_gen: torch.Generator, ctx: Context,
           steps_per_epoch: int, total: int) -> dict | None:
    """Load a task's checkpoint into the model, optimizer and augmentation generator, if there is one."""
    if not path.is_file():
        return None
    try:
        state = safe_load(path, ctx.device)
        step = int(state["step"])
    except Exception as e:  # noqa: BLE001 - truncated, overwritten, not a checkpoint: nothing was loaded yet
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        ctx.emit("log", message=f"{path.name} could not be read ({type(e).__name__}: {str(e)[:120]}): moved aside to "
                                f"{aside.name}; training starts from step 0")
        return None
    owner = state.get("task") if isinstance(state, dict) else None
    if owner != ctx.task_dir.name:  # another task's checkpoint (copied, swapped) or one that names none: never resumed from
        aside = path.with_name(path.name + ".foreign")
        os.replace(path, aside)
        whose = f"task {owner}'s" if owner else "a checkpoint that names no task (written before checkpoints carried their task)"
        ctx.emit("log", message=f"{path.name} is {whose}, not this task's ({ctx.task_dir.name}): moved aside to {aside.name}; "
                                "training starts from step 0")
        return None
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], dev_gen)
    except Exception as e:  # the model is half loaded now: this attempt fails, the next one starts from 0
        os.replace(path, path.with_name(path.name + ".damaged"))
        raise RuntimeError(f"{path.name} does not fit this task ({type(e).__name__}: {str(e)[:160]}): moved aside; "
                           "the next attempt starts from step 0") from None
    ctx.emit("log", epoch=step // steps_per_epoch, step=step, message=f"resumed from checkpoint at step {step} of {total}")
    return state


def load_encoder(path: Path, device: torch.device) -> Backbone:
    from runner.ml.weights import unpack

    state = safe_load(path, "cpu")
    backbone = Backbone(state["arch"], int(state["in_channels"]))
    backbone.load_state_dict(unpack(state["state_dict"]))
    return backbone.to(device)


# ---- classifier training: fine-tune (Model 1) and supervised (Model 2) ---------------------------


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, size: int, ctx: Context, batch: int = 256) -> torch.Tensor:
    """Softmax probabilities (N, K) on the CPU, in eval mode, on the deterministic view."""
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch):
        x = ctx.eval_input(images[start : start + batch].to(ctx.device, non_blocking=True), size)
        with ctx.amp:
            out.append(model(x).float().softmax(dim=1).cpu())
    return torch.cat(out)


def ce_from_probs(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return cross_entropy(probs.numpy(), labels.numpy())


def train_classifier(
    backbone: Backbone,
    pretrained: bool,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    spec: FinetuneSpec,
    size: int,
    ctx: Context,
) -> tuple[nn.Module, dict]:
    """Train all layers on the labeled set; return the model at the step with the lowest val loss.

    The head starts at zero weights with the log class prior as its bias, so step 0 predicts the
    labeled set's class frequencies; step 0 is a candidate of the validation selection, so a run
    that only overfits a handful of labels ends no worse on val than the prior. With `val` None (too
    few validation labels under the budget to choose anything) it trains the fixed schedule and keeps
    the last step."""
    run = _ClassifierTraining(backbone, pretrained, train, val, num_classes, spec, size, ctx)
    run.fit(run.start())
    return run.result()


def prior_head_classifier(backbone: Backbone, num_classes: int, labels: np.ndarray) -> Classifier:
    """A classifier whose head predicts the labels' class frequencies: zero weights, the log prior as
    its bias (+1 per class: no -inf for a class with no label)."""
    classifier = Classifier(backbone, num_classes)
    prior = np.bincount(labels, minlength=num_classes) + 1.0
    with torch.no_grad():
        classifier.head.weight.zero_()
        classifier.head.bias.copy_(torch.log(torch.as_tensor(prior / prior.sum(), dtype=torch.float32)))
    return classifier


class _ClassifierTraining:
    """One classifier's training, in its phases: set up (`__init__`), resume or score step 0
    (`start`), the steps (`fit`, `_evaluate` at each validation), the kept model (`result`)."""

    def __init__(self, backbone: Backbone, pretrained: bool, train: tuple[np.ndarray, np.ndarray],
                 val: tuple[np.ndarray, np.ndarray] | None, num_classes: int, spec: FinetuneSpec, size: int, ctx: Context) -> None:
        self.spec, self.size, self.ctx = spec, size, ctx
        self.model = model = ctx.place(prior_head_classifier(backbone, num_classes, train[1]))
        n = len(train[1])
        self.bs = bs = spec.batch_size
        self.steps_per_epoch = max(1, math.ceil(n / bs))
        total = max(spec.epochs * self.steps_per_epoch, spec.min_steps)
        self.total = total = min(total, spec.max_steps) if spec.max_steps else total
        # once an epoch, but at least every 5 steps' worth of a tiny set and at most ~50 times a run
        self.eval_every = spec.eval_every_steps or max(5, self.steps_per_epoch, total // 50)
        self.warmup = int(spec.warmup_frac * total)
        self.bb_scale = spec.backbone_lr_scale if pretrained else 1.0
        self.opt = _adamw(model, spec, self.bb_scale, ctx)
        self.aug, _ = preset_for(spec.augment, train[0].shape[1], "finetune")
        self.images = to_device_images(train[0], ctx.device)
        self.labels = torch.from_numpy(train[1]).to(self.images.device)
        self.selecting = val is not None
        if self.selecting:
            self.val_images = to_device_images(val[0], ctx.device)
            self.val_labels = torch.from_numpy(val[1])
        self.stream = IndexStream(n, bs, ctx.seed, self.images.device)
        self.dev_gen = torch.Generator(ctx.device).manual_seed(ctx.seed + 17)
        self.forward = ctx.maybe_compile(model)
        self.progress = Progress(ctx, bs, total)
        self.ckpt_path = ctx.task_dir / "checkpoint.pt"
        self.best: dict | None = None

    def _validate(self) -> tuple[float, float]:
        probs = predict(self.model, self.val_images, self.size, self.ctx)
        return ce_from_probs(probs, self.val_labels), float((probs.argmax(1) == self.val_labels).float().mean())

    def _keep(self, step: int, val_loss: float, val_acc: float) -> None:
        self.best = {"val_loss": val_loss, "val_accuracy": val_acc, "step": step,
                     "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def start(self) -> int:
        """The step to train from: a checkpoint's (with its best so far), else 0, scored when selecting."""
        state = resume(self.ckpt_path, self.model, self.opt, self.dev_gen, self.ctx, self.steps_per_epoch, self.total)
        if state:
            self.best = state["best"]
            return int(state["step"])
        if self.selecting:
            val_loss, val_acc = self._validate()
            self.ctx.emit("metric", epoch=0, step=0, val_loss=val_loss, val_acc=val_acc)
            self._keep(0, val_loss, val_acc)
        return 0

    def fit(self, start: int) -> None:
        ctx, spec = self.ctx, self.spec
        self.last_saved = start
        self.run_loss, self.run_count = torch.zeros((), device=ctx.device), 0
        with CheckpointWriter() as ckpt:
            for step in range(start, self.total):
                self.model.train()
                idx = self.stream.batch_at(step)
                x, y = ctx.view(take(self.images, idx, ctx.device), self.aug, self.size, self.dev_gen), take(self.labels, idx, ctx.device)
                set_lr(self.opt, warmup_cosine(step, self.total, self.warmup, spec.lr))
                with ctx.amp:
                    loss = F.cross_entropy(self.forward(x).float(), y, label_smoothing=spec.label_smoothing)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.run_loss += loss.detach()
                self.run_count += 1
                done, epoch = step + 1, step // self.steps_per_epoch
                if done % self.eval_every == 0 or done == self.total:
                    self._evaluate(done, epoch, ckpt)
                elif self.progress.due(False, done):
                    self.progress.emit(done, epoch, loss=round(float(self.run_loss) / max(self.run_count, 1), 5),
                                       lr=self.opt.param_groups[-1]["lr"])

    def _evaluate(self, done: int, epoch: int, ckpt: CheckpointWriter) -> None:
        """At a validation step: the training loss so far (a non-finite one stops the task), the val
        score and the best step, and a checkpoint when one is due (here, so `best` is current)."""
        train_loss = float(self.run_loss) / max(self.run_count, 1)
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss is {train_loss} at step {done} of {self.total} (training diverged): lower "
                               "finetune.lr and rerun")
        self.run_loss.zero_()
        self.run_count = 0
        if not self.selecting:
            self.ctx.emit("metric", epoch=epoch, step=done, loss=train_loss)
        else:
            val_loss, val_acc = self._validate()
            self.ctx.emit("metric", epoch=epoch, step=done, loss=train_loss, val_loss=val_loss, val_acc=val_acc)
            if val_loss < self.best["val_loss"]:
                self._keep(done, val_loss, val_acc)
        if done - self.last_saved >= self.ctx.run.checkpoint_every_steps and done < self.total:
            ckpt.save({"task": self.ctx.task_dir.name, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": done, "best": self.best,
                       "rng": rng_state(self.dev_gen)}, self.ckpt_path)
            self.last_saved = done

    def result(self) -> tuple[nn.Module, dict]:
        common = {"steps": self.total, "batch_size": self.bs, "backbone_lr_scale": self.bb_scale}
        if not self.selecting:
            return self.model, {"mode": "fixed schedule", "selected_step": self.total, "val_loss": None, "val_accuracy": None, **common}
        self.model.load_state_dict(self.best["state"])
        return self.model, {"mode": "validation", "selected_step": self.best["step"], "val_loss": self.best["val_loss"],
                            "val_accuracy": self.best["val_accuracy"], **common}


def _adamw(model: nn.Module, spec: FinetuneSpec, bb_scale: float, ctx: Context) -> torch.optim.Optimizer:
    """AdamW over the backbone (its learning rate scaled by bb_scale) and the head; no weight decay on
    biases and BatchNorm."""
    decay, no_decay = split_decay_groups([model.backbone])
    head_decay, head_no_decay = split_decay_groups([model.head])
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay, "lr_scale": bb_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": bb_scale},
        {"params": head_decay, "weight_decay": spec.weight_decay, "lr_scale": 1.0},
        {"params": head_no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    fused = ctx.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=spec.lr, fused=fused, foreach=None if fused else True)


# ---- linear probe ----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(backbone: Backbone, pixels: np.ndarray, size: int, ctx: Context, batch: int = 256) -> np.ndarray:
    """Frozen-encoder features (eval mode: BatchNorm uses its running statistics), once per image."""
    backbone = ctx.place(backbone).eval()
    images = to_device_images(pixels, ctx.device)
    feats = []
    for start in range(0, pixels.shape[0], batch):
        with ctx.amp:
            x = ctx.eval_input(images[start : start + batch].to(ctx.device, non_blocking=True), size)
            feats.append(backbone(x).float().cpu())
    return torch.cat(feats).numpy()


def linear_probe(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], spec: ProbeSpec, num_classes: int):
    """Logistic regression on standardized features; L2 strength (C) chosen by val loss, or
    `spec.fixed_c` when there is no "val" (too few validation labels to choose).
    Returns (fitted predict_proba over all classes, selection info, the fitted (scaler, regression))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(feats["train"])
    xtr = scaler.transform(feats["train"])
    if "val" not in feats:
        fixed = LogisticRegression(C=spec.fixed_c, max_iter=spec.max_iter).fit(xtr, labels["train"])
        return (lambda x: full_proba(fixed, scaler.transform(x), num_classes)), {
            "mode": "fixed schedule", "C": spec.fixed_c, "val_loss": None, "val_accuracy": None}, (scaler, fixed)
    xva = scaler.transform(feats["val"])
    best = None
    for c in spec.c_grid:
        clf = LogisticRegression(C=c, max_iter=spec.max_iter).fit(xtr, labels["train"])
        probs = full_proba(clf, xva, num_classes)
        loss = cross_entropy(probs, labels["val"])
        if best is None or loss < best[0]:
            best = (loss, c, clf, float((probs.argmax(1) == labels["val"]).mean()))
    loss, c, clf, acc = best

    def proba(x: np.ndarray) -> np.ndarray:
        return full_proba(clf, scaler.transform(x), num_classes)

    return proba, {"mode": "validation", "C": c, "val_loss": loss, "val_accuracy": acc}, (scaler, clf)


def full_proba(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba with a column for every class, also one absent from the labeled set."""
    p = clf.predict_proba(x)
    out = np.zeros((len(x), num_classes))
    out[:, clf.classes_] = p
    return out
