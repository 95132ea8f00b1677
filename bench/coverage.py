"""Do the report's 95% intervals of Δ AUROC keep their promise? Simulated studies with a known true Δ
(tests/simulate.py), analysed through runner.stats exactly as a report does, at 3 and 5 seeds, in
three settings: the seeds' disagreement dominates, the test sample's dominates, and patients with
several images whose errors go together (analysed by patient, as when the data set names them, and
by image, as when it does not). Beside each: the construction it replaced (engine 4's pigeonhole
bootstrap with its percentile interval), and how often each test rejects Δ = 0 when it is true.

    python bench/coverage.py [--reps 1000] [--b 200] [--seeds 3 5]

Prints one JSON object (the table), e.g. into bench/results/coverage-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.simulate import SETTINGS, coverage, pigeonhole_method, product_method  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated studies per cell")
    ap.add_argument("--b", type=int, default=200, help="bootstrap replicates per analysis")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5])
    args = ap.parse_args()
    settings = {**SETTINGS, "clustered, analysed by image": replace(SETTINGS["clustered"], name="clustered, by image", groups_known=False)}
    rows = []
    t0 = time.perf_counter()
    for name, setting in settings.items():
        for s in args.seeds:
            new = coverage(setting, s, args.reps, b=args.b, seed=s, method=product_method)
            old = coverage(setting, s, args.reps, b=args.b, seed=s, method=pigeonhole_method)
            rows.append({"setting": name, "seeds": s, "true_delta": new["true_delta"],
                         "coverage": new["coverage"], "width": round(new["width"], 4), "false_positive": new["false_positive"],
                         "old_coverage": old["coverage"], "old_width": round(old["width"], 4),
                         "old_false_positive": old["false_positive"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"reps": args.reps, "bootstrap": args.b, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
