"""What forking workers from a preloaded process saves: the same manifest run with a fresh Python per
task (BYOL_RUNNER_PRELOAD=0) and with the local executor's preloader, alternately, into fresh results
dirs; the wall time of each `byol-runner run` and of its tasks, and whether both give the same numbers.

    python bench/preload.py [MANIFEST] [--repeats 2] [--against DIR]

`--against DIR`: a checkout of another commit (`git worktree add DIR REF`), run the same way in turns
with this one (its own code: cwd and PYTHONPATH point at it), to compare two versions in one run.

Default manifest: the runner tests' tiny matrix (5 tasks: a BYOL pretraining, its two fine-tunes, two
supervised baselines; resnet18 at 24 px on the CPU), where start-up is a large share of each task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(manifest: Path, results: Path, preload: bool, tree: Path = REPO) -> dict:
    env = {**os.environ, "BYOL_RUNNER_PRELOAD": "1" if preload else "0", "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(manifest), "--results", str(results)], cwd=tree,
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"run failed:\n{r.stdout}\n{r.stderr}")
    line = next(x for x in r.stdout.splitlines() if "workers started in" in x)
    tasks_s = float(line.split("workers started in ")[1].split(" s")[0])
    metrics = {p.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
               for p in results.glob("tasks/*/metrics.json")}
    return {"wall_s": wall, "tasks_s": tasks_s, "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest", nargs="?", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--against", type=Path, help="another checkout to time in turns with this one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest
        if manifest is None:
            sys.path.insert(0, str(REPO))
            from tests.conftest import REFERENCE, tiny

            manifest = tiny(Path(tmp), **REFERENCE)
        trees = {"this": REPO, **({"against": args.against.resolve()} if args.against else {})}
        rows: dict[str, list[dict]] = {f"{t}/{name}": [] for t in trees for name in ("fresh", "preloaded")}
        for i in range(args.repeats):
            for t, tree in trees.items():
                for name in ("fresh", "preloaded"):
                    rows[f"{t}/{name}"].append(run(manifest, Path(tmp) / f"{t}-{name}{i}", name == "preloaded", tree))
        first = rows["this/fresh"][0]["metrics"]
        out = {key: {"wall_s": [round(r["wall_s"], 2) for r in rs], "tasks_s": [r["tasks_s"] for r in rs]}
               for key, rs in rows.items()}
        best = {key: min(v["tasks_s"]) for key, v in out.items()}
        for t in trees:
            out[f"{t}/tasks_ratio_preloaded_to_fresh"] = round(best[f"{t}/preloaded"] / best[f"{t}/fresh"], 3)
            out[f"{t}/same_metrics"] = all(r["metrics"] == first for key, rs in rows.items() if key.startswith(t) for r in rs)
        if args.against:
            out["against"] = str(args.against)
            out["preloaded_tasks_ratio_this_to_against"] = round(best["this/preloaded"] / best["against/preloaded"], 3)
        out["manifest"] = str(args.manifest or "tests tiny matrix (5 tasks)")
        out["cpus"] = os.cpu_count()
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
