"""Seeded SIGKILLs of workers and of the runner at chosen moments (pretraining, fine-tuning, just after a
task wrote its result), against the uninterrupted reference run of the same manifest: in the end every
task is done once, its numbers are bit-equal to the reference's, runner.db is sound, and no worker is
left. BYOL_RUNNER_KILL_SEED picks another sequence of moments (the seed is printed on failure)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REFERENCE, REPO, tiny

KILLS = 10
TIMING_KEYS = {"seconds"}  # the only field of metrics.json that is not a result


def _running(results: Path) -> list[tuple[int, str, str, float]]:
    """(pid, task id, kind, started) of the attempts runner.db has running."""
    if not (results / "runner.db").is_file():
        return []
    try:
        with sqlite3.connect(f"file:{results / 'runner.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT a.pid, a.task_id, t.kind, a.started FROM attempts a JOIN tasks t ON t.id=a.task_id "
                              "WHERE a.status='running' AND a.pid IS NOT NULL").fetchall()
    except sqlite3.OperationalError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running (its parent has not reaped it yet)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _strip(m: object) -> object:
    if isinstance(m, dict):
        return {k: _strip(v) for k, v in m.items() if k not in TIMING_KEYS}
    if isinstance(m, list):
        return [_strip(v) for v in m]
    return m


KINDS = ("worker:pretrain", "worker:finetune", "worker:supervised", "worker:any", "runner:just-done", "runner:any")


def _kill_round(manifest: Path, results: Path, rng: random.Random, want: int, log: list[str]) -> int:
    """Run the manifest from scratch into `results`, SIGKILLing `want` times at seeded moments (each kind
    of moment once, in a seeded order, then seeded choices), restarting the runner after each of its
    deaths; the number of kills made."""
    kills = 0
    queue = list(KINDS)
    rng.shuffle(queue)

    def next_aim(retry: str | None = None) -> tuple[str, float, float]:
        if retry is not None:
            queue.insert(min(1, len(queue)), retry)  # not possible now: try it again after the next one
        return (queue.pop(0) if queue else rng.choice(KINDS)), time.time(), rng.uniform(0.3, 2.0)

    for _ in range(12):  # runner starts
        proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(manifest), "--results", str(results)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        per_task: dict[str, int] = {}
        done_before = {p.parent.name for p in results.glob("tasks/*/metrics.json")}
        aim, since, delay = next_aim()
        try:
            while proc.poll() is None and kills < want:
                if time.time() - since > 3.0:  # nothing of that kind to kill now: aim at another
                    aim, since, delay = next_aim(retry=aim)
                if aim.startswith("worker:"):
                    kind = aim.split(":")[1]
                    ripe = [r for r in _running(results) if (kind == "any" or r[2] == kind) and per_task.get(r[1], 0) < 2
                            and time.time() - r[3] > delay]
                    if ripe:
                        pid, tid, k, _ = rng.choice(sorted(ripe))
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        per_task[tid] = per_task.get(tid, 0) + 1
                        kills += 1
                        log.append(f"worker {k} {tid[:8]} {delay:.1f} s in")
                        aim, since, delay = next_aim()
                elif aim == "runner:just-done":
                    fresh = {p.parent.name for p in results.glob("tasks/*/metrics.json")} - done_before
                    if fresh:
                        proc.kill()
                        kills += 1
                        log.append(f"runner just after {sorted(fresh)[0][:8]} wrote metrics.json")
                        break
                elif aim == "runner:any" and time.time() - since > delay and _running(results):
                    proc.kill()
                    kills += 1
                    log.append(f"runner {delay:.1f} s into its run")
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err = proc.stderr.read()
        assert "Traceback" not in err, err
        if proc.returncode == 0:
            return kills
    return kills


@pytest.mark.e2e
def test_seeded_kills_of_workers_and_the_runner_leave_the_reference_results(tiny_reference, tmp_path):
    seed = int(os.environ.get("BYOL_RUNNER_KILL_SEED", "20261130"))
    rng = random.Random(seed)
    manifest = tiny(tmp_path, **REFERENCE)
    reference = tiny_reference[1]
    ref_tasks = sorted(p.name for p in (reference / "tasks").iterdir())
    log: list[str] = []
    total = 0
    for round_ in range(4):  # from scratch each round, until KILLS kills were made
        if total >= KILLS:
            break
        results = tmp_path / f"results{round_}"
        total += _kill_round(manifest, results, rng, KILLS - total, log)
        context = f"seed {seed}, round {round_}: " + "; ".join(log)
        # a last plain run starts nothing: the round's runs finished every task
        final = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(manifest), "--results", str(results)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0 and "0 workers started" in final.stdout, context + final.stdout + final.stderr
        assert sorted(p.name for p in (results / "tasks").iterdir()) == ref_tasks
        for tid in ref_tasks:
            got = json.loads((results / "tasks" / tid / "metrics.json").read_text())
            want = json.loads((reference / "tasks" / tid / "metrics.json").read_text())
            assert _strip(got) == _strip(want), f"{context}: task {tid} differs from the uninterrupted run"
        with sqlite3.connect(results / "runner.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            done = dict(db.execute("SELECT task_id, COUNT(*) FROM attempts WHERE status='done' GROUP BY task_id").fetchall())
            assert done == {tid: 1 for tid in ref_tasks}, context  # each result made by exactly one attempt
            assert db.execute("SELECT COUNT(*) FROM attempts WHERE status='running'").fetchone()[0] == 0
            assert db.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0] == 0
            pids = [p for (p,) in db.execute("SELECT DISTINCT pid FROM attempts WHERE pid IS NOT NULL")]
        time.sleep(0.5)
        left = [p for p in pids if _alive(p)]
        assert not left, f"{context}: workers left running: {left}"
        assert not list(results.rglob(".*.tmp-*")), context
    assert total >= KILLS, f"seed {seed}: " + "; ".join(log)
    print(f"seed {seed}: {total} kills: " + "; ".join(log))
