"""Near-duplicate groups (runner/data/neardup.py) on a manifest's data sets: how many pairs and groups
the perceptual hash and the thumbnail correlation find, how many of those pairs the split puts in two
splits when they are not grouped, and how long finding them takes.

    BYOL_DATA=../shared/data python bench/near_duplicates.py experiments/study-cpu.yaml [--sets melanoma]
        [--bits 8] [--correlation 0.92] [--sheet /tmp/pairs.png]

--sheet draws the first pairs found (each pair side by side, from the decoded images) to look at.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--sets", nargs="*", help="data set names (default: all)")
    ap.add_argument("--cache", default="results/cache", help="the decoded-image cache to read or fill")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--correlation", type=float, default=0.92)
    ap.add_argument("--sheet", help="a PNG of the first 24 pairs found")
    args = ap.parse_args()

    import numpy as np

    from runner.data import neardup
    from runner.data.dataset import prepare
    from runner.manifest import load_manifest

    m = load_manifest(args.manifest)
    for name, spec in m.datasets.items():
        if args.sets and name not in args.sets or spec.external_test_of:
            continue
        ds = prepare(name, spec, Path(args.cache))
        images = ds.table.images[ds.rows]
        t0 = time.perf_counter()
        hashes = neardup.phash(images)
        t1 = time.perf_counter()
        candidates = neardup.near_pairs(hashes, args.bits)
        t2 = time.perf_counter()
        pairs = neardup.find(images, args.bits, args.correlation)
        t3 = time.perf_counter()
        grouped = neardup.join(ds.groups, pairs)
        s = neardup.summary(ds.keys, ds.groups, grouped, pairs, ds.splits)
        print(f"{name}: {len(ds.keys)} images at {spec.image_size} px; hash {t1 - t0:.2f} s, pairs within {args.bits} bits "
              f"{t2 - t1:.2f} s ({len(candidates)} candidates), confirmed at r >= {args.correlation}: {len(pairs)} pairs "
              f"({t3 - t0:.2f} s in all, hashing again included)")
        print(f"  groups formed {s['groups']} ({s['images_in_groups']} images, the largest {s['largest']}); "
              f"pairs across train/val/test in the split without grouping: {s['pairs_across_splits']}")
        bits = np.array([p[2] for p in candidates]) if candidates else np.zeros(0)
        print("  candidates by bits: " + ", ".join(f"<={b}: {int((bits <= b).sum())}" for b in range(0, args.bits + 1, 2)))
        if args.sheet and pairs:
            _sheet(ds, pairs[:24], args.sheet.replace(".png", f"-{name}.png"))


def _sheet(ds, pairs, path: str) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    side = ds.table.images.shape[-1]
    sheet = Image.new("RGB", (side * 8 + 14, side * ((len(pairs) + 3) // 4)), "white")
    for n, (i, j, *_) in enumerate(pairs):
        r, c = divmod(n, 4)
        for k, idx in enumerate((i, j)):
            a = ds.table.images[ds.rows[idx]]
            im = Image.fromarray(np.moveaxis(a, 0, -1) if a.shape[0] == 3 else a[0])
            sheet.paste(im.convert("RGB"), ((c * 2 + k) * side + c * 4, r * side))
    sheet.save(path)
    print(f"  pairs drawn: {path}")


if __name__ == "__main__":
    main()
