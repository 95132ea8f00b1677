"""`byol-runner bench`: training throughput of the BYOL and supervised steps, and of the augmentation.

For one backbone, resolution, batch size and precision it times, after warm-up steps:
- `byol_end_to_end`: gather a batch of the uint8 images held on the device, make two augmented views,
  online and target forward passes of each view, backward, LARS step, EMA update of the target;
- `byol_compute`: the same step on views made once beforehand (no augmentation);
- `supervised_end_to_end` / `supervised_compute`: the classifier step (AdamW) with and without its
  augmentation;
- `augment_only`: the two BYOL views alone (the data path).
Images per second count images, not views (a BYOL image is two views). `augment_share` is the part
of the end-to-end step time that the augmentation adds. The images are random pixels: throughput
does not depend on their content.
"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, steps: int, warmup: int, batch: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


class _Bench:
    """What every timed part shares: random uint8 images on the device, their batches, the views."""

    def __init__(self, arch: str, size: int, batch: int, precision: str, device: str, compile: bool, channels: int) -> None:
        from runner.ml.augment import preset_for
        from runner.ml.config import RunSpec
        from runner.ml.train import Context, IndexStream
        from runner.system import resolve_device

        self.arch, self.size, self.batch, self.channels = arch, size, batch, channels
        self.dev = dev = resolve_device(device)
        self.ctx = Context(device=dev, run=RunSpec(precision=precision, compile=compile), task_dir=None, seed=0,
                           emit=lambda *a, **k: None)
        torch.manual_seed(0)
        n = batch * 4
        self.images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, device=dev)
        self.stream = IndexStream(n, batch, 0, dev)
        self.g = torch.Generator(dev).manual_seed(0)
        self.aug1, self.aug2 = preset_for("auto", channels, "pretrain")
        self.ft_aug, _ = preset_for("auto", channels, "finetune")
        self.k = 0

    def next_batch(self) -> torch.Tensor:
        from runner.ml.train import take

        self.k += 1
        return take(self.images, self.stream.batch_at(self.k), self.dev)

    def views(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two BYOL views of one batch (of two batches when x is None, as the data path's cost is per view)."""
        first = x if x is not None else self.next_batch()
        second = x if x is not None else self.next_batch()
        return self.ctx.view(first, self.aug1, self.size, self.g), self.ctx.view(second, self.aug2, self.size, self.g)

    def rate(self, fn, steps: int, warmup: int) -> float:  # noqa: ANN001
        return _rate(fn, steps, warmup, self.batch, self.dev)


def _byol(b: _Bench, steps: int, warmup: int) -> dict:
    from runner.ml.config import TrainSettings
    from runner.ml.models import Backbone
    from runner.ml.pretrain import make_method, pretrain_step

    method = make_method("byol", Backbone(b.arch, b.channels), TrainSettings(), b.batch, b.ctx)
    forward = b.ctx.maybe_compile(method.model)
    fixed = b.views()

    def step(views=None) -> None:  # noqa: ANN001
        pretrain_step(method, forward, b.ctx, views if views is not None else b.views(b.next_batch()), 0.1, 1, 100)

    out = {"byol_compute": b.rate(lambda: step(fixed), steps, warmup), "byol_end_to_end": b.rate(step, steps, warmup)}
    out["byol_augment_share"] = 1 - out["byol_end_to_end"] / out["byol_compute"]
    return out


def _supervised(b: _Bench, steps: int, warmup: int) -> dict:
    from runner.ml.models import Backbone, Classifier

    clf = b.ctx.place(Classifier(Backbone(b.arch, b.channels), 2))
    fused = b.dev.type == "cuda"
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
    forward = b.ctx.maybe_compile(clf)
    labels = torch.randint(0, 2, (b.batch,), device=b.dev)
    fixed_x = b.ctx.view(b.next_batch(), b.ft_aug, b.size, b.g)

    def step(x=None) -> None:  # noqa: ANN001
        if x is None:
            x = b.ctx.view(b.next_batch(), b.ft_aug, b.size, b.g)
        with b.ctx.amp:
            loss = F.cross_entropy(forward(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {"supervised_compute": b.rate(lambda: step(fixed_x), steps, warmup), "supervised_end_to_end": b.rate(step, steps, warmup)}
    out["supervised_augment_share"] = 1 - out["supervised_end_to_end"] / out["supervised_compute"]
    return out


def run_bench(
    arch: str = "resnet50",
    size: int = 224,
    batch: int = 256,
    precision: str = "auto",
    device: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    compile: bool = False,
    channels: int = 3,
    parts: tuple[str, ...] = ("byol", "supervised", "augment"),
) -> dict:
    b = _Bench(arch, size, batch, precision, device, compile, channels)
    dev = b.dev
    result: dict = {
        "arch": arch, "image_size": size, "batch_size": batch, "channels": channels, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "precision": "bf16" if (precision == "bf16" or (precision == "auto" and dev.type == "cuda")) else "fp32",
        "compile": compile, "channels_last": True, "steps": steps, "warmup": warmup, "torch": torch.__version__,
    }
    if "augment" in parts:
        result["augment_only"] = b.rate(b.views, steps, warmup)
    if "byol" in parts:
        result.update(_byol(b, steps, warmup))
    if "supervised" in parts:
        result.update(_supervised(b, steps, warmup))
    for k, v in list(result.items()):
        if isinstance(v, float):
            result[k] = round(v, 4 if "share" in k else 1)
    return result
