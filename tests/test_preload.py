"""The local executor's preloader: workers forked from a process with PyTorch loaded run in their own
session, write where a fresh worker writes, and report the exit codes a fresh worker would."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.worker.launch import Preloader
from tests.conftest import REPO, tiny


def _wait(pre: Preloader, pid: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        code = pre.poll(pid)
        if code is not None:
            return code
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} did not end")


def test_forked_workers_run_in_their_own_session_and_report_their_exit_codes(tmp_path: Path):
    ok = tmp_path / "tasks" / "n" / "task.json"
    ok.parent.mkdir(parents=True)
    ok.write_text(json.dumps({"id": "n", "kind": "noop", "dataset": "x", "data": {"source": "synthetic"}, "settings": {}}))
    bad = tmp_path / "tasks" / "b" / "task.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    pre = Preloader(log=tmp_path / "preloader.log")
    try:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "BYOL_RUNNER_PARENT_PID": str(os.getpid())}
        pid = pre.spawn([str(ok), "--results", str(tmp_path)], env, str(ok.parent / "worker.log"), str(tmp_path))
        assert os.getpgid(pid) == pid  # its own session by the time its pid is known: a cancel reaches its group
        assert _wait(pre, pid) == 0 and json.loads((ok.parent / "metrics.json").read_text())["noop"] is True
        events = [json.loads(line) for line in (ok.parent / "events.jsonl").read_text().splitlines()]
        assert events[-1]["kind"] == "done" and f"worker pid {pid}" in events[0]["message"]

        pid2 = pre.spawn([str(bad), "--results", str(tmp_path)], env, str(bad.parent / "worker.log"), str(tmp_path))
        assert _wait(pre, pid2) == 2  # a start error, as a fresh worker exits
        assert "not a valid task spec" in (bad.parent / "worker.log").read_text()
        assert pre.poll(pid) == 0  # earlier codes stay known
    finally:
        pre.close()
    assert pre.proc.returncode is not None  # closing ends the preloader


def _children(pid: int, marker: str) -> list[int]:
    """The processes whose parent is `pid` and whose command line holds `marker`."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and marker in cmd:
                out.append(int(proc.name))
    return out


@pytest.mark.e2e
def test_a_sigkilled_preloader_stops_its_workers_without_using_up_their_retries(tmp_path):
    """SIGKILL of the preloader mid-run (the OOM killer picks the biggest process): its forked workers get
    SIGTERM (their parent died) and keep their checkpoints; with `retries: 0` the run still ends with
    every task done, the next workers started as fresh processes, and the kill is recorded as from outside."""
    manifest = tiny(tmp_path, pre_epochs=30)
    manifest.write_text(manifest.read_text().replace("retries: 1", "retries: 0"))
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(manifest), "--results", str(results)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(results.glob("tasks/*/checkpoint.pt")):
        time.sleep(0.1)
    [preloader] = _children(proc.pid, "runner.worker.preload")
    os.kill(preloader, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert "the preloader failed" in err and "fresh processes" in err, err
    with sqlite3.connect(results / "runner.db") as db:
        failed = db.execute("SELECT error FROM attempts WHERE status='failed'").fetchall()
        statuses = {s for (s,) in db.execute("SELECT status FROM tasks")}
    assert failed and all("stopped by SIGTERM" in e for (e,) in failed), failed
    assert statuses == {"done"}
