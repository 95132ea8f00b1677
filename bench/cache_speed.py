"""Decode the chest X-ray set into a fresh image cache, then load it again from the cache.

    python bench/cache_speed.py [--root ../shared/data/chest_xray] [--size 224] [--repeats 5]

Prints JSON: the cold time (scan, hash and decode every file on all cores, write the cache, read
the pixels back) and two warm times: `warm_load` (scan the folder, find the entry by the content
fingerprint, memory-map the array: what a worker pays before training) and `warm_read` (the same
plus reading every pixel once). The issue's goal is a second load at least 20x faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from runner.data.cache import load_images
from runner.system import cpu_count
from runner.data.sources import ImageFolderSource, scan

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    spec = ImageFolderSource(
        source="imagefolder", root=args.root, image_size=args.size, split_dirs={"train": "train", "val": "val", "test": "test"}
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        items = scan(spec)
        cold = load_images(spec, items, Path(tmp))
        np.asarray(cold.images).sum()  # touch every byte
        cold_s = time.perf_counter() - t0
        warm, warm_read = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            table = load_images(spec, scan(spec), Path(tmp))
            assert table.from_cache
            warm.append(time.perf_counter() - t0)
            np.asarray(table.images).sum()
            warm_read.append(time.perf_counter() - t0)
    warm_s, warm_read_s = statistics.median(warm), statistics.median(warm_read)
    print(json.dumps({
        "bench": "cache_speed",
        "images": len(items),
        "image_size": args.size,
        "channels": cold.channels,
        "workers": cpu_count(),
        "cold_decode_s": round(cold_s, 3),
        "cold_images_per_s": round(len(items) / cold_s, 1),
        "warm_load_s_median": round(warm_s, 4),
        "warm_read_s_median": round(warm_read_s, 4),
        "speedup_load": round(cold_s / warm_s, 1),
        "speedup_read": round(cold_s / warm_read_s, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
