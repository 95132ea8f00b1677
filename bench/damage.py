"""Fault injection at scale (#33): every file a finished run wrote, damaged five ways, then every command
that reads it; and signals at every phase of a run, then the resume. A traceback, a hang, an exit code
the manual does not give, or a published number that changed with nothing said ("silent") is a finding.

    python bench/damage.py [--out bench/results/damage.txt] [--parts files,signals] [--jobs 2]

Files: a tiny run (synthetic data, the four default arms, one seed, resnet18 at 24 px) is made once
("pristine"), and a second one of other images and another seed ("foreign": the same files of another
data set and task). Each file of the pristine results dir, in a fresh copy, is in turn

    empty      truncated to 0 bytes (what a power loss leaves)
    half       cut to half its length
    garbage    random bytes of its length
    foreign    the same file of the foreign run (another data set's cache entry, another task's model)
    fifo       a FIFO (reading it would wait for ever)

and then `status`, `report --format json`, `run` (the same manifest: what it retrains must give the
pristine numbers, or say why not) and, for a task's files, `predict` with each classifier of the run.
"Silent" means: the command exited 0, the numbers it published (the report's every-arm table, or the
probabilities `predict` printed) differ from the pristine run's, and it printed no note or warning.

Signals: the run, from nothing, is sent SIGINT or SIGHUP (to its process group, as a terminal does),
SIGTERM or SIGKILL (to the runner), or SIGKILL to its running worker, at fractions of the pristine run's
wall time from its start (planning, pretraining, the classifiers, the report); the stop must end as
docs/reliability.md says (130 for the first three; a killed worker is started again and the run ends
0), and `run` again must finish with the pristine numbers.

Prints one line per case that is a finding and a summary; exit 0 when there are none.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "runner.cli"]

MANIFEST = """\
name: dmg
datasets:
  syn: {{source: synthetic, seed: {data_seed}, per_class: 12, size: 32, image_size: 24,
         classes: {{normal: [class0], finding: [class1]}}, positive: finding, split: {{val: 0.25, test: 0.25}}}}
methods: [byol-finetune, byol-linear, supervised, random-linear]
labels: {{fractions: [1.0]}}
seeds: [{seed}]
model: {{arch: resnet18}}
pretrain: {{epochs: 3, min_steps: 6, batch_size: 8, proj_hidden: 16, pred_hidden: 16, proj_dim: 8, warmup_epochs: 0}}
finetune: {{epochs: 1, min_steps: 4, batch_size: 8}}
run: {{device: cpu, progress_every_s: 5, checkpoint_every_steps: 2}}
executor: {{max_parallel: 1, retries: 0}}
"""
DAMAGES = ("empty", "half", "garbage", "foreign", "fifo")
ALLOWED = {"status": {0, 2}, "report": {0, 2}, "run": {0, 2}, "predict": {0, 2}}
PREDICT_READS = ("task.json", "metrics.json", "model.pt", "encoder.pt")  # a task's files predict opens
TIMEOUT = {"status": 60, "report": 90, "run": 300, "predict": 60}


def cli(args: list[str], timeout: float, cwd: Path) -> dict:
    """A byol-runner command in its own process group: exit code, output, seconds, and whether it hung."""
    t0 = time.monotonic()
    p = subprocess.Popen(CLI + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    try:
        out, err = p.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        hung = True
    return {"rc": p.returncode, "out": out, "err": err, "s": time.monotonic() - t0, "hung": hung}


def arms_of(report: dict) -> dict:
    """The every-arm table's numbers: (data set, labels, method, metric) -> (mean, n)."""
    out = {}
    for a in report.get("arms", []):
        for metric, v in a.items():
            if isinstance(v, dict) and "mean" in v:
                mean = None if v["mean"] is None else round(float(v["mean"]), 9)
                out[(a["dataset"], a["labels"], a["method"], metric)] = (mean, v.get("n"))
    return out


def said(r: dict, report: dict | None = None) -> bool:
    """Whether a command said something was wrong: any line on stderr (a clean rerun of the pristine run
    prints none: the control case checks it), a "Left out:" line in the printed report, or the JSON
    report's list of tasks left out."""
    if r["err"].strip() or "left out:" in r["out"].lower():
        return True
    return bool(report and report.get("not_own"))


def make_run(base: Path, name: str, data_seed: int, seed: int) -> tuple[Path, Path]:
    d = base / name
    d.mkdir(parents=True)
    manifest = d / "m.yaml"
    manifest.write_text(MANIFEST.format(data_seed=data_seed, seed=seed))
    r = cli(["run", str(manifest), "--results", str(d / "results")], 600, d)
    if r["rc"] != 0:
        sys.exit(f"the {name} run failed ({r['rc']}): {r['err'][-2000:]}")
    return manifest, d / "results"


def task_kinds(results: Path) -> dict[str, str]:
    """task folder name -> its method (from task.json), so a file maps to the same task of another run."""
    out = {}
    for t in (results / "tasks").iterdir():
        spec = json.loads((t / "task.json").read_text())
        out[t.name] = f"{spec.get('method', spec.get('kind'))}"
    return out


def counterpart(rel: Path, pristine: Path, foreign: Path) -> Path | None:
    """The same file of the foreign run: a task's file by its task's method, a cache file by its name."""
    parts = rel.parts
    if parts[0] == "tasks":
        method = task_kinds(pristine)[parts[1]]
        other = [n for n, m in task_kinds(foreign).items() if m == method]
        return foreign / "tasks" / other[0] / Path(*parts[2:]) if other else None
    if parts[0] == "cache":
        entries = [e for e in (foreign / "cache").iterdir() if e.is_dir()]
        return entries[0] / Path(*parts[2:]) if entries else None
    p = foreign / rel
    return p if p.exists() else None


def damage(path: Path, how: str, other: Path | None, rng: random.Random) -> bool:
    size = path.stat().st_size
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "garbage":
        path.write_bytes(rng.randbytes(max(size, 16)))
    elif how == "foreign":
        if other is None or not other.is_file():
            return False
        shutil.copyfile(other, path)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    return True


def pristine_predictions(manifest_dir: Path, results: Path, image: Path) -> dict[str, dict]:
    out = {}
    for tid, method in task_kinds(results).items():
        if (results / "tasks" / tid / "model.pt").exists():
            r = cli(["predict", tid, str(image), "--results", str(results), "--json"], 120, manifest_dir)
            if r["rc"] != 0:
                sys.exit(f"predict on the pristine run's {method} failed: {r['err'][-1000:]}")
            out[tid] = json.loads(r["out"])
    return out


def judge(cmd: str, r: dict) -> str | None:
    if r["hung"]:
        return f"hang (over {TIMEOUT[cmd]} s)"
    if "Traceback (most recent call last)" in r["err"]:
        return "traceback: " + r["err"].strip().splitlines()[-1][:200]
    if r["rc"] not in ALLOWED[cmd]:
        return f"exit {r['rc']}: " + (r["err"].strip().splitlines() or ["(no output)"])[-1][:200]
    return None


def file_case(ctx: dict, rel: Path, how: str, seed: int) -> dict:
    work = Path(tempfile.mkdtemp(dir=ctx["tmp"]))
    results = work / "results"
    shutil.copytree(ctx["pristine"], results, symlinks=True)
    target = results / rel
    rng = random.Random(seed)
    if how != "none" and not damage(target, how, counterpart(rel, ctx["pristine"], ctx["foreign"]), rng):
        shutil.rmtree(work, ignore_errors=True)
        return {"file": str(rel), "damage": how, "skipped": "no counterpart"}
    findings: list[str] = []
    commands = {"status": ["status", "--results", str(results)],
                "report": ["report", "--results", str(results), "--format", "json"]}
    for cmd, args in commands.items():
        r = cli(args, TIMEOUT[cmd], ctx["dir"])
        bad = judge(cmd, r)
        if bad:
            findings.append(f"{cmd}: {bad}")
        elif cmd == "report" and r["rc"] == 0:
            try:
                printed = json.loads(r["out"])
                numbers = arms_of(printed)
            except json.JSONDecodeError:
                printed, numbers = None, None
                findings.append("report: --format json printed no JSON")
            if numbers is not None and numbers != ctx["arms"] and not said(r, printed):
                findings.append("report: silent (the every-arm table changed, nothing said)")
    if rel.parts[0] == "tasks" and rel.name in PREDICT_READS:
        for tid, expected in ctx["predictions"].items():
            r = cli(["predict", tid, str(ctx["image"]), "--results", str(results), "--json"], TIMEOUT["predict"], ctx["dir"])
            bad = judge("predict", r)
            if bad:
                findings.append(f"predict {ctx['kinds'][tid]}: {bad}")
            elif r["rc"] == 0 and not said(r):
                try:
                    got = json.loads(r["out"])
                except json.JSONDecodeError:
                    got = None
                if got != expected:
                    findings.append(f"predict {ctx['kinds'][tid]}: silent (other probabilities, nothing said)")
    r = cli(["run", str(ctx["manifest"]), "--results", str(results)], TIMEOUT["run"], ctx["dir"])
    bad = judge("run", r)
    if bad:
        findings.append(f"run: {bad}")
    elif r["rc"] == 0:
        try:
            numbers = arms_of(json.loads((results / "dmg" / "results.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            numbers = None
            findings.append(f"run: exit 0 without a readable results.json ({type(e).__name__})")
        if numbers is not None and numbers != ctx["arms"] and not said(r):
            findings.append("run: silent (published numbers differ from the pristine run's, nothing said)")
    shutil.rmtree(work, ignore_errors=True)
    if how == "none" and said(r):  # the control: an undamaged copy must pass without a word, or "said" means nothing
        findings.append("control: the rerun of an undamaged copy printed on stderr: " + r["err"].strip()[:200])
    return {"file": str(rel), "damage": how, "findings": findings, "run_rc": r["rc"], "said": said(r)}


def alive_children(pid: int) -> list[int]:
    """Worker processes under the runner (any depth), found through /proc."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name)) if b"worker" in cmd else None
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def phase_of(results: Path) -> str:
    done = sum(1 for _ in results.glob("tasks/*/metrics.json")) if results.exists() else 0
    if (results / "dmg" / "results.json").exists():
        return "report"
    return f"{done}/5 tasks done" if results.exists() else "planning"


def report_complete(results: Path) -> bool:
    """The run recorded done and its report in place: a stop that comes now comes after the work."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{results / 'runner.db'}?mode=ro", uri=True) as db:
            row = db.execute("SELECT status FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return False
    return row == ("done",) and all((results / "dmg" / f"results.{x}").is_file() for x in ("md", "csv", "json", "html"))


def signal_case(ctx: dict, sig_name: str, at: float) -> dict:
    work = Path(tempfile.mkdtemp(dir=ctx["tmp"]))
    results = work / "results"
    p = subprocess.Popen(CLI + ["run", str(ctx["manifest"]), "--results", str(results)], cwd=ctx["dir"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         # as from a terminal, also when this script runs under nohup (which the runner now honours)
                         preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP, signal.SIGINT)],
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    time.sleep(at)
    phase = phase_of(results)
    workers = alive_children(p.pid)  # before a kill: a killed runner's children belong to init
    sent = True
    if p.poll() is not None:
        sent = False
    elif sig_name in ("SIGINT", "SIGHUP"):
        os.killpg(p.pid, getattr(signal, sig_name))
    elif sig_name == "SIGKILL-worker":
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
        else:
            sent = False
    else:
        os.kill(p.pid, getattr(signal, sig_name))
    findings = []
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        findings.append("stopped run: hang (over 120 s)")
    if sig_name == "SIGKILL":  # its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop at their next step
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(running(c) for c in workers):
            time.sleep(0.2)
        findings += [f"a worker ({c}) outlived its killed runner by 60 s" for c in workers if running(c)]
    if "Traceback (most recent call last)" in err:
        findings.append("stopped run: traceback: " + err.strip().splitlines()[-1][:200])
    # (SIGINT's own death, -2, after the "interrupted" line was CPython's: runner.cli._forget_interrupt)
    expected = {"SIGINT": {130}, "SIGHUP": {130}, "SIGTERM": {130}, "SIGKILL": {-9}, "SIGKILL-worker": {0}}[sig_name]
    if sig_name in ("SIGTERM", "SIGHUP") and p.returncode == -getattr(signal, sig_name) and report_complete(results):
        expected = expected | {p.returncode}  # the run had ended, its report written: the signal's own death is right
    if findings or (sent and p.returncode not in expected):
        (ctx["tmp"].parent / f"byol-damage-{sig_name}-{at:.2f}.stderr").write_text(err)  # the whole of it, to read
    if sent and p.returncode not in expected and not findings:
        findings.append(f"stopped run: exit {p.returncode}, expected {sorted(expected)}: "
                        + (err.strip().splitlines() or ["(no output)"])[-1][:200])
    r = cli(["run", str(ctx["manifest"]), "--results", str(results)], TIMEOUT["run"], ctx["dir"])
    bad = judge("run", r)
    if bad:
        findings.append(f"resume: {bad}")
    elif r["rc"] != 0:
        findings.append(f"resume: exit {r['rc']}: " + (r["err"].strip().splitlines() or [""])[-1][:200])
    else:
        numbers = arms_of(json.loads((results / "dmg" / "results.json").read_text()))
        if numbers != ctx["arms"]:
            findings.append("resume: published numbers differ from the uninterrupted run's" + ("" if said(r) else ", nothing said"))
    shutil.rmtree(work, ignore_errors=True)
    return {"signal": sig_name, "at_s": round(at, 2), "phase": phase, "sent": sent, "stop_rc": p.returncode,
            "findings": findings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--parts", default="files,signals")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--match", default="", help="only the files whose path contains this (a quick look)")
    ap.add_argument("--moments", type=int, default=6, help="signal moments across the pristine run's wall time")
    args = ap.parse_args()
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    tmp = Path(tempfile.mkdtemp(prefix="byol-damage-"))
    try:
        t0 = time.monotonic()
        manifest, pristine = make_run(tmp, "pristine", 0, 0)
        wall = time.monotonic() - t0
        _, foreign = make_run(tmp, "foreign", 1, 1)
        image = tmp / "one.png"
        from PIL import Image

        Image.new("L", (32, 32), 90).save(image)
        report = json.loads((pristine / "dmg" / "results.json").read_text())
        ctx = {"tmp": tmp, "dir": tmp / "pristine", "manifest": manifest, "pristine": pristine, "foreign": foreign,
               "arms": arms_of(report), "image": image, "kinds": task_kinds(pristine)}
        ctx["predictions"] = pristine_predictions(ctx["dir"], pristine, image)
        say(f"pristine run: {wall:.1f} s, {len(ctx['kinds'])} tasks; git {git_rev()}; {os.cpu_count()} CPUs")
        findings = 0
        if "files" in args.parts:
            files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file() and not p.is_symlink()
                           and args.match in str(p.relative_to(pristine)))
            cases = [(Path("runner.db"), "none")] + [(f, how) for f in files for how in DAMAGES]
            say(f"files: {len(files)} files x {len(DAMAGES)} damages = {len(cases) - 1} cases, and one undamaged copy "
                "(the control)")
            t1 = time.monotonic()
            tally: dict[str, int] = {}
            pool = ThreadPoolExecutor(args.jobs)
            for i, o in enumerate(pool.map(lambda c: file_case(ctx, c[0], c[1], zlib.crc32(f'{c[0]} {c[1]}'.encode())), cases), 1):
                print(f"  {i}/{len(cases)} {o['file']} [{o['damage']}]: "
                      f"{'skipped' if o.get('skipped') else len(o['findings'])} finding(s)", file=sys.stderr, flush=True)
                if o.get("skipped"):
                    tally["skipped (no counterpart)"] = tally.get("skipped (no counterpart)", 0) + 1
                    continue
                name = o["file"]
                for t, m in ctx["kinds"].items():
                    name = name.replace(t, m)
                tally["run exit 0"] = tally.get("run exit 0", 0) + (o["run_rc"] == 0)
                tally["run said something"] = tally.get("run said something", 0) + o["said"]
                for f in o["findings"]:
                    findings += 1
                    say(f"FINDING {name} [{o['damage']}]: {f}")
            pool.shutdown()
            say(f"files: {len(cases)} cases in {time.monotonic() - t1:.0f} s; " + "; ".join(f"{k}: {v}" for k, v in tally.items()))
        if "signals" in args.parts:
            sigs = ("SIGINT", "SIGHUP", "SIGTERM", "SIGKILL", "SIGKILL-worker")
            moments = [wall * (i + 0.5) / args.moments for i in range(args.moments)]
            cases = [(s, m) for s in sigs for m in moments]
            say(f"signals: {len(sigs)} signals x {len(moments)} moments (s: {', '.join(f'{m:.1f}' for m in moments)}) = {len(cases)} cases")
            t1 = time.monotonic()
            outcomes = [signal_case(ctx, s, m) for s, m in cases]  # one at a time: the moments are wall-clock times
            for o in outcomes:
                for f in o["findings"]:
                    findings += 1
                    say(f"FINDING {o['signal']} at {o['at_s']} s ({o['phase']}): {f}")
                say(f"  {o['signal']:<15} at {o['at_s']:>5} s  {o['phase']:<16} stop exit {o['stop_rc']}"
                    + ("" if o["sent"] else " (ended before the signal)") + f"  {'ok' if not o['findings'] else 'FINDING'}")
            say(f"signals: {len(cases)} cases in {time.monotonic() - t1:.0f} s")
        say(f"findings: {findings}")
        return 1 if findings else 0
    finally:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)


def git_rev() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
