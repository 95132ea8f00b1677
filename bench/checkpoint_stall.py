"""How long a training loop stops for a checkpoint: written in place (atomic_save) vs handed to the
background writer (CheckpointWriter.save, which only snapshots the state to the host).

    python bench/checkpoint_stall.py [--arch resnet50] [--reps 3] [--dir DIR]

The state is a real BYOL pretraining checkpoint (online and target networks, heads, LARS momentum,
RNG states) after one optimizer step. Prints JSON: the size and each stall in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from runner.ml.byol import BYOL
from runner.ml.checkpoint import CheckpointWriter, atomic_save, rng_state
from runner.ml.models import Backbone
from runner.ml.optim import lars_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder under the current one)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BYOL(Backbone(args.arch, 3)).to(dev)
    opt = lars_for(model.trainable_modules(), lr=0.1, weight_decay=1e-6)
    loss, _ = model(torch.rand(4, 3, 32, 32, device=dev), torch.rand(4, 3, 32, 32, device=dev))
    loss.backward()
    opt.step()
    gen = torch.Generator(dev).manual_seed(0)

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "rng": rng_state(gen)}

    with tempfile.TemporaryDirectory(dir=args.dir or ".") as d:
        path = Path(d) / "checkpoint.pt"
        in_place, background = [], []
        with CheckpointWriter() as ckpt:
            for _ in range(args.reps):
                t0 = time.perf_counter()
                atomic_save(state(), path)
                in_place.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ckpt.save(state(), path)
                background.append(time.perf_counter() - t0)
                ckpt.wait()  # the next in-place write must not share the disk with this one
        size = path.stat().st_size
    print(json.dumps({"arch": args.arch, "device": str(dev), "checkpoint_mb": round(size / 1e6, 1),
                      "in_place_s": [round(x, 3) for x in in_place], "background_s": [round(x, 3) for x in background],
                      "median_ratio": round(statistics.median(in_place) / statistics.median(background), 1)}))


if __name__ == "__main__":
    main()
