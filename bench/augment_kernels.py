"""What the compiled augmentation costs: kernels, library calls and time per view, eager vs compiled.

For each view of a preset it compiles `augment.apply` (as `run.compile` does), reads inductor's
generated code and counts the fused kernels and the library calls (matrix products, convolutions)
that nothing fuses with, then times eager and compiled views. It runs on the CPU or a GPU; on a CPU
the kernel counts are what a GPU gets too (the same fusion decisions), the times are only a ratio.

    python bench/augment_kernels.py --size 224 --batch 32 [--preset byol] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from runner.ml import augment as A


def _count(code: str, image_numel: int) -> dict:
    """Kernel launches, library calls, and the buffers of at least half an image batch that the
    generated code allocates (each one write and one read of the batch, the cost that dominates a
    memory-bound pipeline; the outputs of library calls are not among them)."""
    body = code[code.find("def call(") :] if "def call(" in code else code
    launches = re.findall(r"^\s+((?:cpp|triton)_\w+)(?:\.run)?\(", body, re.M)
    externs = re.findall(r"extern_kernels\.(\w+)\(|torch\.ops\.aten\.(\w+)\.default\(", body)
    big = 0
    for shape in re.findall(r"empty_strided_\w+\(\(([\d, ]+)\)", body):
        numel = 1
        for d in shape.replace(" ", "").strip(",").split(","):
            numel *= int(d)
        big += numel * 2 >= image_numel
    return {"kernels": len(launches), "library_calls": sorted("".join(e) for e in externs), "image_buffers": big}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--source", type=int, default=None, help="stored image size (default: --size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--preset", default="byol")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    from torch._inductor.utils import run_and_get_code

    dev = torch.device(args.device)
    views = A.PRESETS[args.preset]
    channels = 1 if args.preset in ("xray", "ct", "finetune-gray") else 3
    src = args.source or args.size
    images = torch.randint(0, 256, (args.batch, channels, src, src), dtype=torch.uint8, device=dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    out = {"device": str(dev), "preset": args.preset, "size": args.size, "batch": args.batch, "torch": torch.__version__, "views": []}
    for i, view in enumerate(views):
        g = torch.Generator(dev).manual_seed(0)
        p = A.draw(view, args.batch, channels, args.size, g, dev)
        torch._dynamo.reset()
        compiled = torch.compile(A.apply, dynamic=False)
        t0 = time.perf_counter()
        _, codes = run_and_get_code(compiled, images, p, view, args.size, True, dtype)
        compile_s = time.perf_counter() - t0
        row = {"view": i + 1, "compile_s": round(compile_s, 1), **_count("\n".join(codes), args.batch * channels * args.size**2)}
        for name, fn in (("eager", A.apply), ("compiled", compiled)):
            fn(images, p, view, args.size, True, dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn(images, p, view, args.size, True, dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row[f"{name}_ms"] = round((time.perf_counter() - t0) / args.reps * 1e3, 2)
        row["speedup"] = round(row["eager_ms"] / row["compiled_ms"], 2)
        out["views"].append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
