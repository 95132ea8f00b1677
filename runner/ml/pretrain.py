"""Label-free pretraining: one loop, any method.

The loop owns what every method shares: the step count (epochs, with a floor of `min_steps`), the
batch index stream, the two augmented views, the learning-rate schedule (linear warm-up, cosine),
progress and per-epoch events, checkpoints and resuming, and writing encoder.pt. A method (a module
`runner.ml.<name>` with `make(backbone, settings, batch, ctx) -> Method`) supplies its networks and
optimizer, the loss of two views, its post-step update and its monitors. BYOL (`byol.py`) and
SimSiam (`simsiam.py`) are the two; `runner.arms.PRETRAININGS` names them.
"""

from __future__ import annotations

import importlib
import math
from typing import Protocol

import numpy as np
import torch
from torch import nn

from runner.ml.augment import preset_for
from runner.ml.checkpoint import CheckpointWriter, atomic_save, rng_state
from runner.ml.config import TrainSettings
from runner.ml.models import Backbone
from runner.ml.monitor import KnnData, KnnMonitor
from runner.ml.optim import set_lr, warmup_cosine
from runner.ml.train import Context, IndexStream, Progress, resume, take, to_device_images


class Method(Protocol):
    name: str
    model: nn.Module  # everything with state: what a checkpoint holds
    optimizer: torch.optim.Optimizer
    peak_lr: float  # the schedule's peak (already scaled with the batch)

    def encoder(self) -> Backbone:
        """The network encoder.pt holds (BYOL: the online encoder)."""

    def after_step(self, step: int, total: int) -> dict[str, float]:
        """The update after optimizer step `step` of `total` (BYOL: the target's EMA); returns the
        rates it used, which go into the progress events. Must not read a value back from the device."""

    def monitor(self, z: torch.Tensor) -> torch.Tensor:
        """A collapse monitor of the projections the forward returned (0 when collapsed)."""


def metric_interval(steps_per_epoch: int, total: int) -> int:
    """Steps between the per-epoch metric events (each a read-back from the device): once an epoch,
    but at most about 200 times a run, so a data set of one batch an epoch does not wait on the
    device at every step; always a whole number of epochs."""
    return steps_per_epoch * max(1, total // (200 * steps_per_epoch))


def make_method(name: str, backbone: Backbone, settings: TrainSettings, batch: int, ctx: Context) -> Method:
    return importlib.import_module(f"runner.ml.{name}").make(backbone, settings, batch, ctx)


def pretrain_step(method: Method, forward, ctx: Context, views: tuple[torch.Tensor, torch.Tensor], lr: float,
                  step: int, total: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimizer step on two views: (loss, the projections the method monitors, the rates of its
    post-step update), tensors left on the device. Nothing here reads a value back from the device,
    so the host queues the next step's work while the device runs this one (a test holds it to that)."""
    set_lr(method.optimizer, lr)
    with ctx.amp:
        loss, z = forward(*views)
    method.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.optimizer.step()
    rates = method.after_step(step, total)
    return loss.detach(), z, rates


def pretrain(pixels: np.ndarray, settings: TrainSettings, method_name: str, init: str, arch: str, size: int,
             ctx: Context, weights_sha256: str | None = None, monitor: KnnData | None = None) -> dict:
    """Pretrain on all of `pixels` (N, C, S, S uint8, no labels) from `init` weights ("random" or
    "imagenet", from the torch hub cache, checked against `weights_sha256`); writes encoder.pt; resumes
    from checkpoint.pt when one is there. `monitor`: labeled images the kNN monitor scores the encoder
    with (runner.ml.monitor), beside the untrained network's score; it changes no weight."""
    run = _Pretraining(pixels, settings, method_name, init, arch, size, ctx, weights_sha256, monitor)
    run.fit()
    return run.finish()


class _Pretraining:
    """One pretraining, in its phases: set up and resume (`__init__`), the steps (`fit`, `_report` after
    each: progress, the per-epoch metric, the checkpoint), the encoder and its summary (`finish`)."""

    def __init__(self, pixels: np.ndarray, settings: TrainSettings, method_name: str, init: str, arch: str, size: int,
                 ctx: Context, weights_sha256: str | None = None, monitor: KnnData | None = None) -> None:
        spec = settings.pretrain
        self.ctx, self.init, self.arch, self.size = ctx, init, arch, size
        self.n, self.channels = n, channels = pixels.shape[0], pixels.shape[1]
        self.bs = bs = min(spec.batch_size, n)
        self.steps_per_epoch = steps_per_epoch = n // bs
        # epochs, but at least min_steps optimizer steps: a small data set would otherwise get a few hundred
        total = max(spec.epochs * steps_per_epoch, spec.min_steps)
        self.total = total = total if spec.max_steps is None else min(spec.max_steps, total)
        weights = (settings.model.imagenet_weights or "DEFAULT") if init == "imagenet" else None
        backbone = Backbone(arch, channels, weights=weights, weights_sha256=weights_sha256)
        self.method = method = make_method(method_name, backbone, settings, bs, ctx)
        own = getattr(method, "warmup_epochs", None)  # a method's own warm-up (SimSiam: none at batch 256), else pretrain's
        self.warmup = min(int(round((spec.warmup_epochs if own is None else own) * steps_per_epoch)), total // 2)
        self.metric_every = metric_interval(steps_per_epoch, total)
        self.aug1, self.aug2 = preset_for(spec.augment, channels, "pretrain")
        self.images = to_device_images(pixels, ctx.device)
        self.stream = IndexStream(n, bs, ctx.seed, self.images.device)  # indices where the images are: no read-back
        self.dev_gen = torch.Generator(ctx.device).manual_seed(ctx.seed)
        self.ckpt_path = ctx.task_dir / "checkpoint.pt"
        self.monitor = None
        if monitor is not None:  # the untrained network's level, from the weights before any step or checkpoint
            self.monitor = KnnMonitor(monitor, size, ctx, KnnMonitor.interval(total, ctx.run.monitor_every_steps))
            self.monitor.baseline(method.encoder())
        state = resume(self.ckpt_path, method.model, method.optimizer, self.dev_gen, ctx, steps_per_epoch, total)
        self.step = int(state["step"]) if state else 0
        self.last_proj_std = state.get("proj_std") if state else None  # a resume at the last step runs no step
        self.forward = ctx.maybe_compile(method.model)
        start = "ImageNet weights" if init == "imagenet" else "random init"
        ctx.emit("log", epoch=self.step // steps_per_epoch, step=self.step,
                 message=f"{method.name} {arch} from {start} on {n} images, batch {bs}, {total} steps, lr {method.peak_lr:g}")
        self.progress = Progress(ctx, bs, total)
        self.z = None

    def fit(self) -> None:
        ctx, method = self.ctx, self.method
        self.run_loss, self.run_count = torch.zeros((), device=ctx.device), 0
        self.epoch_loss, self.epoch_count = torch.zeros((), device=ctx.device), 0
        method.model.train()
        with CheckpointWriter() as ckpt:  # written in the background; the block waits for the last one
            while self.step < self.total:
                epoch = self.step // self.steps_per_epoch
                x = take(self.images, self.stream.batch_at(self.step), ctx.device)
                views = (ctx.view(x, self.aug1, self.size, self.dev_gen), ctx.view(x, self.aug2, self.size, self.dev_gen))
                lr = warmup_cosine(self.step, self.total, self.warmup, method.peak_lr)
                loss, self.z, rates = pretrain_step(method, self.forward, ctx, views, lr, self.step, self.total)
                self.step += 1
                self.run_loss += loss
                self.epoch_loss += loss
                self.run_count += 1
                self.epoch_count += 1
                self._report(epoch, lr, rates, ckpt)

    def _report(self, epoch: int, lr: float, rates: dict[str, float], ckpt: CheckpointWriter) -> None:
        """After a step: progress when due, the metric event every `metric_every` steps (a non-finite
        loss stops the task), a checkpoint every checkpoint_every_steps and at the end."""
        step, total, method, ctx = self.step, self.total, self.method, self.ctx
        if self.progress.due(step == total, step):
            self.progress.emit(step, epoch, loss=round(float(self.run_loss) / self.run_count, 5), lr=lr, **rates,
                               proj_std=round(float(method.monitor(self.z)), 5))
            self.run_loss.zero_()
            self.run_count = 0
        if step % self.metric_every == 0 or step == total:
            mean = float(self.epoch_loss) / self.epoch_count
            if not math.isfinite(mean):
                raise RuntimeError(f"{method.name} loss is {mean} at step {step} of {total} (training diverged): lower "
                                   "the learning rate (pretrain.base_lr, simsiam.base_lr) and rerun")
            ctx.emit("metric", epoch=epoch, step=step, loss=mean, proj_std=float(method.monitor(self.z)))
            self.epoch_loss.zero_()
            self.epoch_count = 0
        if self.monitor is not None and self.monitor.due(step, total):
            self.monitor(method.encoder(), step, epoch)
        if step % ctx.run.checkpoint_every_steps == 0 or step == total:
            ckpt.save({"task": ctx.task_dir.name, "model": method.model.state_dict(), "optimizer": method.optimizer.state_dict(), "step": step,
                       "rng": rng_state(self.dev_gen), "proj_std": float(method.monitor(self.z))}, self.ckpt_path)

    def finish(self) -> dict:
        """encoder.pt (atomically), and the pretraining's summary for metrics.json."""
        from runner.ml.weights import pack, round_

        method = self.method
        keep = self.ctx.run.weights  # rounded here, before its dependants read it: they all read this file
        atomic_save({"arch": self.arch, "in_channels": self.channels,
                     "state_dict": pack(round_(method.encoder(), keep).state_dict(), keep)}, self.ctx.task_dir / "encoder.pt")
        out = {"method": method.name, "init": self.init, "steps": self.total, "batch_size": self.bs, "images": self.n,
               "final_proj_std": float(method.monitor(self.z)) if self.z is not None else self.last_proj_std}
        if self.monitor is not None:
            out["monitor"] = {"seconds": round(self.monitor.seconds, 2), "every_steps": self.monitor.every,
                              "untrained": self.monitor.base, "labels": self.monitor.data.counts()}
        return out
