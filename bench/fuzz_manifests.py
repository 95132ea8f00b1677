"""Fuzzed manifests through `byol-runner plan` (in this process, many) and `byol-runner run` (a fresh
process each, fewer): every outcome must be a plan or run that works, or one `error:` line and exit
2. A traceback, a hang (over --hang-s seconds) or another exit code is a finding.

    python bench/fuzz_manifests.py --plans 2000 --runs 100 [--seed 0] [--out bench/results/fuzz.txt]

Each case starts from one of a few valid manifests (synthetic, csv and imagefolder data made here at
small sizes, an npz) and applies one to three mutations: a key deleted, renamed or duplicated, a value
replaced by one of another type or an extreme (0, -1, 2**64, nan, inf, "", a long or non-ASCII
string, a path outside the data, a list, a mapping, null), a list emptied or made huge, the text cut,
a byte flipped, tabs, a YAML alias bomb. The run cases take the smallest schedules (min_steps 1) so
that a hundred finish in minutes; a case whose plan is refused is not run.

Prints one line per finding and a summary: cases, accepted, refused (exit 2, one error line), and the
findings by kind. Exit 0 when there are none.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BASE_SYNTHETIC = {
    "name": "fuzz",
    "datasets": {"syn": {"source": "synthetic", "per_class": 12, "size": 32, "image_size": 24,
                         "classes": {"normal": ["class0"], "finding": ["class1"]}, "positive": "finding",
                         "split": {"val": 0.25, "test": 0.25}}},
    "methods": ["byol-finetune", "supervised"],
    "labels": {"fractions": [1.0]},
    "seeds": [0],
    "model": {"arch": "resnet18"},
    "pretrain": {"epochs": 1, "min_steps": 1, "batch_size": 8, "proj_hidden": 16, "pred_hidden": 16, "proj_dim": 8,
                 "warmup_epochs": 0},
    "finetune": {"epochs": 1, "min_steps": 1, "batch_size": 8},
    "run": {"device": "cpu", "progress_every_s": 5},
    "executor": {"max_parallel": 2, "retries": 0},
}

ODD_VALUES = [0, -1, 1, 2**64, -(2**63), 1e308, float("nan"), float("inf"), -0.0, 0.5, "", " ", "x" * 5000, "é☃\u202e",
              "../../../../etc/passwd", "/dev/zero", "${HOME}", "${NOPE}", "~", [], [1, 2], {}, {"a": 1}, None, True, False,
              "resnet1000", "cuda:7", "{}.png", "{:>99999}", "[", "*", "seborrheic keratosis", "1e-9", "NaN"]


def make_data(root: Path) -> list[dict]:
    """The base manifests, their data written under root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, v in (("normal", 60), ("finding", 190)):
        (root / "folder" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.integers(0, 40, (32, 32)) + v).astype(np.uint8)).save(root / "folder" / cls / f"{i}.png")
    (root / "table").mkdir()
    rows = ["file;label"]
    for i in range(20):
        Image.fromarray((rng.integers(0, 40, (32, 32)) + 60 + 130 * (i % 2)).astype(np.uint8)).save(root / "table" / f"{i:02d}.png")
        rows.append(f"{i:02d}.png;{'yes' if i % 2 else 'no'}")
    (root / "table" / "labels.csv").write_text("\n".join(rows) + "\n", encoding="cp1252")
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 16), ("val", 6), ("test", 6))}
    arrays |= {f"{s}_labels": np.arange(n) % 2 for s, n in (("train", 16), ("val", 6), ("test", 6))}
    np.savez(root / "arrays.npz", **arrays)
    folder = copy.deepcopy(BASE_SYNTHETIC)
    folder["datasets"] = {"f": {"source": "imagefolder", "root": str(root / "folder"), "image_size": 24, "positive": "finding",
                                "split": {"val": 0.25, "test": 0.25}}}
    table = copy.deepcopy(BASE_SYNTHETIC)
    table["datasets"] = {"t": {"source": "csv", "root": str(root / "table"), "image_column": "file", "label_column": "label",
                               "classes": {"neg": ["no"], "pos": ["yes"]}, "positive": "pos", "image_size": 24,
                               "split": {"val": 0.25, "test": 0.25}}}
    npz = copy.deepcopy(BASE_SYNTHETIC)
    npz["datasets"] = {"a": {"source": "npz", "path": str(root / "arrays.npz"), "image_size": 24, "split": {"strategy": "given"}}}
    return [BASE_SYNTHETIC, folder, table, npz]


def _paths(node, prefix=()):  # noqa: ANN001, ANN202 - every (path, value) in a YAML tree
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(tree, path, value) -> None:  # noqa: ANN001
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def mutate_tree(tree: dict, rng: random.Random) -> dict:
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path, value = rng.choice([pv for pv in _paths(tree) if pv[0]])
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif op < 0.25 and isinstance(parent, dict):
            parent[str(path[-1]) + rng.choice(["s", "_", "X", " "])] = parent.pop(path[-1])
        elif op < 0.35 and isinstance(value, list):
            _set(tree, path, [] if rng.random() < 0.5 else value * rng.choice([50, 2000]))
        elif op < 0.42 and isinstance(value, (int, float)) and not isinstance(value, bool):
            _set(tree, path, rng.choice([value * 1000, value * 100000, -value, value + 0.5]))
        else:
            _set(tree, path, copy.deepcopy(rng.choice(ODD_VALUES)))
    return tree


def mutate_text(text: str, rng: random.Random) -> str:
    op = rng.randrange(6)
    if op == 0:
        return text[: rng.randrange(len(text))]
    if op == 1:
        i = rng.randrange(len(text))
        return text[:i] + chr(rng.randrange(1, 0x3000)) + text[i + 1:]
    if op == 2:
        return text.replace("  ", "\t", rng.randint(1, 3))
    if op == 3:  # an alias bomb: each level refers to the one before ten times
        bomb = "x-a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        for k in range(1, 9):
            bomb += f"x-{chr(97 + k)}: &{chr(97 + k)} [" + ", ".join([f"*{chr(96 + k)}"] * 10) + "]\n"
        return bomb + text.replace("seeds: [0]", "seeds: *i") if rng.random() < 0.5 else bomb + text
    if op == 4:
        return text + "\n" + text  # every key twice
    return "".join(c for c in text if rng.random() > 0.01)


def dump(tree: dict) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=10**6)


class Hang(Exception):
    pass


def plan_in_process(path: Path, results: Path, hang_s: float) -> tuple[str, str]:
    """(outcome, detail): ok, refused, traceback, hang, exit-N."""
    from runner.cli import main

    def on_alarm(*_):  # noqa: ANN002, ANN202
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["plan", str(path), "--results", str(results)])
    except Hang:
        return "hang", f"plan over {hang_s} s"
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001 - what escapes main() is what a user sees as a traceback
        return "traceback", traceback.format_exc().strip().splitlines()[-1][:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return _judge(code, err.getvalue())


def _judge(code: int, stderr: str) -> tuple[str, str]:
    if "Traceback (most recent call last)" in stderr:
        return "traceback", stderr.strip().splitlines()[-1][:300]
    if code == 0:
        return "ok", ""
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    if code == 2 and errors:
        return "refused", errors[0][:200]
    return f"exit-{code}", (stderr.strip().splitlines() or [""])[-1][:300]


def run_subprocess(path: Path, results: Path, limit_s: float) -> tuple[str, str]:
    """A run, stopped at limit_s: a long one (a mutation asked for 100,000 steps) that is still
    reporting progress then counts as `long`, one that reported nothing in the last hang window as a hang."""
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(path), "--results", str(results)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        newest = max((p.stat().st_mtime for p in results.glob("tasks/*/events.jsonl")), default=0.0)
        os.killpg(proc.pid, signal.SIGINT)  # as a user's Ctrl-C: the run records its tasks and exits 130
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "hang", f"run did not stop within 60 s of a SIGINT (after {limit_s:.0f} s)"
        if proc.returncode != 130:
            return f"exit-{proc.returncode}", f"after SIGINT at {limit_s:.0f} s"
        if time.time() - newest < 30:
            return "long", ""
        return "hang", f"run over {limit_s:.0f} s with no event in its last 30 s"
    return _judge(proc.returncode, err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-s", type=float, default=60.0, help="a plan longer than this is a hang")
    ap.add_argument("--run-limit-s", type=float, default=45.0, help="a run is stopped (SIGINT) after this; still "
                    "progressing, it counts as long, not as a hang")
    ap.add_argument("--out", help="also write the summary and findings here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="byol-fuzz-"))
    bases = make_data(work)
    results = work / "results"
    counts: dict[str, int] = {}
    findings: list[str] = []
    accepted: list[Path] = []
    t0 = time.time()
    for i in range(args.plans):
        base = bases[i % len(bases)]
        text = dump(mutate_tree(base, rng)) if rng.random() < 0.8 else mutate_text(dump(base), rng)
        path = work / "cases" / f"plan-{i:05d}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        outcome, detail = plan_in_process(path, results, args.hang_s)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "ok":
            accepted.append(path)
        elif outcome != "refused":
            findings.append(f"plan {path.name}: {outcome}: {detail}")
            print(findings[-1], flush=True)
        else:
            path.unlink()
        if (i + 1) % 250 == 0:
            print(f"... {i + 1} plans in {time.time() - t0:.0f} s: {counts}", flush=True)
    plans_s = time.time() - t0
    run_counts: dict[str, int] = {}
    t1 = time.time()
    for k, path in enumerate(rng.sample(accepted, min(args.runs, len(accepted)))):
        outcome, detail = run_subprocess(path, work / f"run-{k:04d}", args.run_limit_s)
        run_counts[outcome] = run_counts.get(outcome, 0) + 1
        if outcome not in ("ok", "refused", "long"):
            findings.append(f"run {path.name}: {outcome}: {detail}")
            print(findings[-1], flush=True)
        if (k + 1) % 10 == 0:
            print(f"... {k + 1} runs in {time.time() - t1:.0f} s: {run_counts}", flush=True)
    runs_s = time.time() - t1
    bad = {k: v for k, v in {**counts, **{f"run {k}": v for k, v in run_counts.items()}}.items()
           if k not in ("ok", "refused", "run ok", "run refused", "run long")}
    summary = (f"plan: {args.plans} fuzzed manifests in {plans_s:.0f} s: {counts.get('ok', 0)} accepted, "
               f"{counts.get('refused', 0)} refused with one error line (exit 2)\n"
               f"run: {sum(run_counts.values())} of the accepted ones in {runs_s:.0f} s: {run_counts.get('ok', 0)} finished, "
               f"{run_counts.get('refused', 0)} refused with one error line, {run_counts.get('long', 0)} still training "
               f"at {args.run_limit_s:.0f} s (stopped by SIGINT, exit 130)\n"
               f"findings (tracebacks, plans over {args.hang_s:.0f} s, runs silent for 30 s or not stopping, other exits): "
               f"{sum(bad.values())} {json.dumps(bad)}")
    print(summary)
    if args.out:
        Path(args.out).write_text(f"# python bench/fuzz_manifests.py --plans {args.plans} --runs {args.runs} --seed {args.seed}\n"
                                  + summary + "\n" + "\n".join(findings) + "\n")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
