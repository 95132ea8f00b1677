"""The local executor's preloader: workers forked from a process with PyTorch loaded run in their own
session, write where a fresh worker writes, and report the exit codes a fresh worker would."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from runner.worker.launch import Preloader


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
