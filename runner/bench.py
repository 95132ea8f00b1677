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
    from runner.ml.augment import preset_for
    from runner.ml.config import RunSpec, TrainSettings
    from runner.ml.models import Backbone, Classifier
    from runner.ml.pretrain import make_method, pretrain_step
    from runner.ml.train import Context, IndexStream, take
    from runner.worker import resolve_device

    dev = resolve_device(device)
    ctx = Context(device=dev, run=RunSpec(precision=precision, compile=compile), task_dir=None, seed=0, emit=lambda *a, **k: None)
    torch.manual_seed(0)
    n = batch * 4
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, device=dev)
    stream = IndexStream(n, batch, 0, dev)
    g = torch.Generator(dev).manual_seed(0)
    aug1, aug2 = preset_for("auto", channels, "pretrain")
    ft_aug, _ = preset_for("auto", channels, "finetune")
    counter = {"k": 0}

    def next_batch() -> torch.Tensor:
        counter["k"] += 1
        return take(images, stream.batch_at(counter["k"]), dev)

    result: dict = {
        "arch": arch, "image_size": size, "batch_size": batch, "channels": channels, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "precision": "bf16" if (precision == "bf16" or (precision == "auto" and dev.type == "cuda")) else "fp32",
        "compile": compile, "channels_last": True, "steps": steps, "warmup": warmup, "torch": torch.__version__,
    }
    if "augment" in parts:
        result["augment_only"] = _rate(lambda: (ctx.view(next_batch(), aug1, size, g), ctx.view(next_batch(), aug2, size, g)),
                                       steps, warmup, batch, dev)
    if "byol" in parts:
        method = make_method("byol", Backbone(arch, channels), TrainSettings(), batch, ctx)
        forward = ctx.maybe_compile(method.model)
        fixed = (ctx.view(next_batch(), aug1, size, g), ctx.view(next_batch(), aug2, size, g))

        def step(views=None) -> None:
            if views is None:
                x = next_batch()
                views = (ctx.view(x, aug1, size, g), ctx.view(x, aug2, size, g))
            pretrain_step(method, forward, ctx, views, 0.1, 1, 100)

        result["byol_compute"] = _rate(lambda: step(fixed), steps, warmup, batch, dev)
        result["byol_end_to_end"] = _rate(step, steps, warmup, batch, dev)
        result["byol_augment_share"] = 1 - result["byol_end_to_end"] / result["byol_compute"]
        del method, forward, fixed
    if "supervised" in parts:
        clf = ctx.place(Classifier(Backbone(arch, channels), 2))
        fused = dev.type == "cuda"
        opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
        forward = ctx.maybe_compile(clf)
        labels = torch.randint(0, 2, (batch,), device=dev)
        fixed_x = ctx.view(next_batch(), ft_aug, size, g)

        def sup_step(x=None) -> None:
            if x is None:
                x = ctx.view(next_batch(), ft_aug, size, g)
            with ctx.amp:
                loss = F.cross_entropy(forward(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        result["supervised_compute"] = _rate(lambda: sup_step(fixed_x), steps, warmup, batch, dev)
        result["supervised_end_to_end"] = _rate(sup_step, steps, warmup, batch, dev)
        result["supervised_augment_share"] = 1 - result["supervised_end_to_end"] / result["supervised_compute"]
    for k, v in list(result.items()):
        if isinstance(v, float):
            result[k] = round(v, 4 if "share" in k else 1)
    return result
