"""The CPU path of a BYOL step (and of a supervised one), side by side: where its time goes, and how fast
each way of running it is.

- `today`: the product's step as the worker ran it before the CPU work of issue #31 (fp32,
  channels_last, eager, every convolution through PyTorch's oneDNN kernels; runner.ml.pretrain's step
  with the views made by runner.ml.augment);
- `reference` (BYOL only): a plain PyTorch step written here: torchvision's resnet18, the same BYOL
  heads and loss, an EMA target, SGD, eager fp32, NCHW (what a user would write in an afternoon);
- `fp32`: the product's step now, as a CPU run gets it by default: the convolutions whose output map
  has at most 2x2 pixels computed as one matrix product (runner.ml.models.SmallMapConv2d);
- `bf16`: the same with `run.precision: bf16` (bf16 autocast; on a CPU with native bf16, AVX512-BF16
  or AMX, its convolutions and matrix products run in bf16). Opt-in on the CPU: see `Context.bf16`.

Each is timed on the same random images (throughput does not depend on their content), for the
compute only (views made once) and end to end (the views made every step), in `--rounds` interleaved
rounds of `--steps` timed steps after `--warmup`, so that a busy moment of the machine touches every
path alike; the median round is reported with the spread, and the ratios to `today` are of the
medians. Beside it: a per-op profile (torch.profiler, self CPU time by category) of today's step and
of the bf16 one, the FLOPs of one step (torch.utils.flop_counter; a convolution's padding counted as
PyTorch counts it), and the fraction of this machine's peak each path reaches: the nominal fp32 peak
(cores x 2 FMA pipes x SIMD lanes x 2 FLOP x clock, from /proc/cpuinfo) and the rate of a large matrix
product in fp32 and in bf16 measured in the same run (what the hardware gives a kernel that does
nothing else).

    python bench/cpu_path.py [--size 64] [--batch 64] [--channels 3] [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def gemm_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def peak_gflops() -> dict:
    """fp32 peak of this machine's cores: FMA pipes × SIMD lanes × 2 FLOP × clock; and the measured
    rate of a 2048² matrix product in fp32 and bf16."""
    from runner.system import cpu_count

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    ghz = (max(mhz) / 1000) if mhz else 3.0
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    lanes = 16 if " avx512f" in flags else 8
    pipes = 2
    cores = cpu_count()
    return {"cores": cores, "ghz": round(ghz, 2), "fp32_lanes": lanes, "fma_pipes": pipes,
            "nominal_fp32_gflops": round(cores * pipes * lanes * 2 * ghz, 1),
            "gemm_fp32_gflops": round(gemm_gflops(torch.float32), 1), "gemm_bf16_gflops": round(gemm_gflops(torch.bfloat16), 1)}


# ---- the plain reference --------------------------------------------------------------------------


def _mlp(i: int, h: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))


class Reference:
    """BYOL as one would write it plainly: torchvision resnet18, projector and predictor, EMA target."""

    def __init__(self, channels: int, hidden: int, dim: int) -> None:
        import torchvision

        net = torchvision.models.resnet18()
        if channels == 1:
            net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        net.fc = nn.Identity()
        self.online = nn.Sequential(net, _mlp(512, hidden, dim))
        self.predictor = _mlp(dim, hidden, dim)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        params = [*self.online.parameters(), *self.predictor.parameters()]
        self.opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1.5e-6)

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> None:
        p1, p2 = self.predictor(self.online(v1)), self.predictor(self.online(v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        loss = (2 - 2 * F.cosine_similarity(p1, z2, dim=-1)).mean() + (2 - 2 * F.cosine_similarity(p2, z1, dim=-1)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for t, o in zip(self.target.parameters(), self.online.parameters()):
                t.mul_(0.99).add_(o, alpha=0.01)


# ---- the product's step -------------------------------------------------------------------------


def oneDNN_only(module: nn.Module) -> nn.Module:
    """Every convolution of `module` through PyTorch's own kernels again (today's path)."""
    from runner.ml.models import SmallMapConv2d

    for m in module.modules():
        if type(m) is SmallMapConv2d:
            m.__class__ = nn.Conv2d
    return module


class Product:
    """runner.ml's BYOL step with the given run settings, views made by runner.ml.augment."""

    def __init__(self, run, channels: int, size: int, batch: int, hidden: int, dim: int, today: bool = False) -> None:  # noqa: ANN001 - a RunSpec
        from runner.ml.augment import preset_for
        from runner.ml.config import PretrainSpec, TrainSettings
        from runner.ml.models import Backbone
        from runner.ml.pretrain import make_method
        from runner.ml.train import Context

        self.ctx = Context(torch.device("cpu"), run, Path("."), 0, lambda *a, **k: None)
        settings = TrainSettings(pretrain=PretrainSpec(proj_hidden=hidden, proj_dim=dim, pred_hidden=hidden))
        backbone = Backbone("resnet18", channels)
        self.method = make_method("byol", oneDNN_only(backbone) if today else backbone, settings, batch, self.ctx)
        if today:
            oneDNN_only(self.method.model)  # the target network is a copy made in make_method
        self.forward = self.ctx.maybe_compile(self.method.model)
        self.aug1, self.aug2 = preset_for("auto", channels, "pretrain")
        self.size = size
        self.g = torch.Generator().manual_seed(0)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctx.view(x, self.aug1, self.size, self.g), self.ctx.view(x, self.aug2, self.size, self.g)

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> None:
        from runner.ml.pretrain import pretrain_step

        pretrain_step(self.method, self.forward, self.ctx, (v1, v2), 0.1, 1, 100)


class Supervised:
    """A supervised fine-tuning step as runner.ml trains one: the classifier on one augmented view,
    cross-entropy, AdamW (foreach, as on the CPU)."""

    def __init__(self, run, channels: int, size: int, batch: int, today: bool = False) -> None:  # noqa: ANN001 - a RunSpec
        from runner.ml.augment import preset_for
        from runner.ml.models import Backbone, Classifier
        from runner.ml.train import Context

        self.ctx = Context(torch.device("cpu"), run, Path("."), 0, lambda *a, **k: None)
        clf = Classifier(Backbone("resnet18", channels), 2)
        self.model = self.ctx.place(oneDNN_only(clf) if today else clf)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=True)
        self.aug, _ = preset_for("auto", channels, "finetune")
        self.labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))
        self.size = size
        self.g = torch.Generator().manual_seed(0)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.ctx.view(x, self.aug, self.size, self.g),)

    def step(self, v: torch.Tensor) -> None:
        with self.ctx.amp:
            loss = F.cross_entropy(self.model(v).float(), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _rate(fn, steps: int, warmup: int, batch: int) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return batch * steps / (time.perf_counter() - t0)


def _flops(path: Product | Supervised, views: tuple[torch.Tensor, ...], batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        path.step(*views)
    return counter.get_total_flops() / batch


def _profile(path: Product | Supervised, x: torch.Tensor, steps: int = 4) -> dict[str, float]:
    """Self CPU time of an end-to-end step by category (share of the total). The small-map
    convolutions are matrix products, counted with the heads': the profiler names ops, not layers."""
    from torch.profiler import ProfilerActivity, profile

    def step() -> None:
        path.step(*path.views(x))

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    cats = {"convolution": ("conv", "mkldnn"), "batch_norm": ("batch_norm", "native_batch_norm"),
            "augmentation": ("grid_sampler", "affine_grid", "conv_depthwise", "reflection_pad", "matmul", "bmm", "clamp", "pow",
                             "where", "index", "rand", "randperm", "exp"),
            "optimizer and EMA": ("foreach", "_fused", "lerp", "addcdiv", "norm"),
            "matrix products (heads; 2x2 convolutions)": ("addmm", "mm", "linear"),
            "im2col of the 2x2 convolutions": ("cat", "constant_pad", "slice_backward")}
    out: dict[str, float] = {}
    total = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total
        total += t
        name = e.key.lower()
        cat = next((c for c, keys in cats.items() if any(k in name for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + t
    return {k: round(v / total, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--hidden", type=int, default=4096, help="projector and predictor hidden width (the paper's)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    from runner.ml.config import RunSpec
    from runner.ml.train import native_bf16_cpu

    torch.manual_seed(0)
    fp32 = RunSpec(device="cpu", precision="fp32", channels_last=True, compile=False)
    bf16 = RunSpec(device="cpu", precision="bf16", channels_last=True, compile=False)
    c, size, batch = args.channels, args.size, args.batch
    x = torch.randint(0, 256, (batch, c, size, size), dtype=torch.uint8)
    byol = {"today": Product(fp32, c, size, batch, args.hidden, args.dim, today=True),
            "reference": Reference(c, args.hidden, args.dim),
            "fp32": Product(fp32, c, size, batch, args.hidden, args.dim),
            "bf16": Product(bf16, c, size, batch, args.hidden, args.dim)}
    supervised = {"today": Supervised(fp32, c, size, batch, today=True), "fp32": Supervised(fp32, c, size, batch),
                  "bf16": Supervised(bf16, c, size, batch)}
    fixed = byol["today"].views(x)
    plain = tuple(v.contiguous().float() for v in fixed)
    fixed_sup = supervised["today"].views(x)
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, p in byol.items():
            views = plain if name == "reference" else fixed
            rates.setdefault(f"byol/{name}/compute", []).append(_rate(lambda p=p, v=views: p.step(*v), args.steps, args.warmup, batch))
            make = (lambda p=p: p.step(*byol["today"].views(x)) if isinstance(p, Reference) else p.step(*p.views(x)))
            rates.setdefault(f"byol/{name}/end_to_end", []).append(_rate(make, args.steps, args.warmup, batch))
        for name, p in supervised.items():
            rates.setdefault(f"supervised/{name}/compute", []).append(
                _rate(lambda p=p: p.step(*fixed_sup), args.steps, args.warmup, batch))
            rates.setdefault(f"supervised/{name}/end_to_end", []).append(
                _rate(lambda p=p: p.step(*p.views(x)), args.steps, args.warmup, batch))
        print("round", {k: round(v[-1], 1) for k, v in rates.items()}, file=sys.stderr, flush=True)
    flops = {"byol": _flops(byol["today"], fixed, batch), "supervised": _flops(supervised["today"], fixed_sup, batch)}
    peak = peak_gflops()
    median = {k: statistics.median(v) for k, v in rates.items()}

    def today(k: str) -> float:
        kind, _, part = k.split("/")
        return median[f"{kind}/today/{part}"]

    def paired(k: str) -> list[float]:
        kind, _, part = k.split("/")
        return [a / b for a, b in zip(rates[k], rates[f"{kind}/today/{part}"])]

    def gflops(k: str) -> float:
        return median[k] * flops[k.split("/")[0]] / 1e9

    out = {"setting": {"arch": "resnet18", "size": size, "batch": batch, "channels": c, "head_hidden": args.hidden,
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "native_bf16": native_bf16_cpu(),
                       "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup},
           "machine": peak, "gflop_per_image": {k: round(v / 1e9, 3) for k, v in flops.items()},
           "img_per_s": {k: {"median": round(v, 2), "rounds": [round(r, 2) for r in rates[k]],
                             "spread": round((max(rates[k]) - min(rates[k])) / v, 3)} for k, v in median.items()},
           "ratio_to_today": {k: round(v / today(k), 3) for k, v in median.items()},
           # the same ratio taken within each round (the paths timed minutes apart at most), then the median
           # and range over rounds: what a busy moment of the machine moves least
           "ratio_to_today_within_rounds": {k: {"median": round(statistics.median(r), 3), "min": round(min(r), 3),
                                                "max": round(max(r), 3)}
                                            for k in median for r in [paired(k)]},
           "gflops": {k: round(gflops(k), 1) for k in median},
           "fraction_of_nominal_fp32_peak": {k: round(gflops(k) / peak["nominal_fp32_gflops"], 3) for k in median},
           "fraction_of_gemm": {k: round(gflops(k) / peak["gemm_bf16_gflops" if "/bf16/" in k else "gemm_fp32_gflops"], 3)
                                for k in median},
           "profile_byol_today_end_to_end": _profile(byol["today"], x),
           "profile_byol_bf16_end_to_end": _profile(byol["bf16"], x)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
