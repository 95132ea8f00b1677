"""The Ray executor against a real two-node Ray cluster on this machine (127.0.0.1, token auth off
for this throw-away cluster only), stopped at the end."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.tui.app import RunnerApp
from tests.conftest import REPO, run_cli
from tests.conftest import REFERENCE, TINY

ray = pytest.importorskip("ray", reason='the Ray executor needs ray (pip install "byol-runner[ray]")')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` plus a second `ray start --address`, each with its own temp dir and 1 CPU."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    base = tmp_path_factory.mktemp("ray")  # the nodes' task folders and cache too, removed at the end
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "BYOL_RUNNER_RAY_DIR": str(base / "work")}
    head = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", "--port", str(port),
                           "--temp-dir", str(base / "head"), "--num-cpus", "1", "--include-dashboard=false",
                           "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    if head.returncode != 0:
        pytest.skip(f"a local Ray head did not start: {head.stderr[-500:]}")
    node = subprocess.run([str(ray_bin), "start", "--address", f"127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                           "--temp-dir", str(base / "node2"), "--num-cpus", "1", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert node.returncode == 0, node.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


def manifest(tmp_path: Path, address: str, pre_epochs: int = REFERENCE["pre_epochs"]) -> Path:
    """The tiny matrix on the cluster; with the default epochs, the tasks of `tiny_reference`."""
    text = TINY.format(pre_epochs=pre_epochs, ft_steps=REFERENCE["ft_steps"]).replace(
        "executor: {max_parallel: 2, retries: 1}", f'executor: {{kind: ray, address: "{address}", retries: 1}}').replace(
        "methods: [byol-finetune, byol-linear, supervised, random-linear]", "methods: [byol-finetune, supervised]")
    p = tmp_path / "ray.yaml"
    p.write_text(text)
    return p


def _env() -> dict:
    return {"RAY_AUTH_MODE": "disabled"}


@pytest.mark.e2e
def test_a_matrix_runs_on_both_nodes_and_equals_the_local_executor(cluster, tiny_reference, tmp_path):
    m = manifest(tmp_path, cluster)
    r = run_cli("run", str(m), "--results", str(tmp_path / "ray"), env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    with sqlite3.connect(tmp_path / "ray" / "runner.db") as db:
        nodes = [n for (n,) in db.execute("SELECT node FROM attempts WHERE status='done'")]
        executors = {e for (e,) in db.execute("SELECT executor FROM attempts")}
    assert len(nodes) == 5 and len(set(nodes)) == 2, nodes  # placed on both nodes, recorded per attempt
    assert executors == {"ray"}
    # the same manifest run by local processes, two at a time, one thread each: what a 1-CPU Ray task
    # gets (the thread count changes the floats)
    local = tiny_reference[1]
    assert sorted(os.listdir(tmp_path / "ray" / "tasks")) == sorted(os.listdir(local / "tasks"))
    a = json.loads((tmp_path / "ray" / "tiny" / "results.json").read_text())["arms"]
    b = json.loads((local / "tiny" / "results.json").read_text())["arms"]
    assert [(x["method"], x["accuracy"], x["loss"]) for x in a] == [(y["method"], y["accuracy"], y["loss"]) for y in b]
    # the artifacts came back to the driver's results dir: the pretrained encoder, the logs
    pre = [p for p in (tmp_path / "ray" / "tasks").iterdir() if json.loads((p / "task.json").read_text())["kind"] == "pretrain"]
    assert (pre[0] / "encoder.pt").is_file() and "on ray node" in (pre[0] / "events.jsonl").read_text()
    from runner.plan import is_done

    for task in (tmp_path / "ray" / "tasks").iterdir():  # and every classifier's model.pt, matching its recorded checksum
        assert is_done(tmp_path / "ray", task.name) and (task in pre or (task / "model.pt").is_file())


def _ray_task_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::run_task"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.e2e
def test_killing_the_ray_worker_of_a_running_task_fails_that_attempt_and_it_is_retried(cluster, tmp_path):
    results = tmp_path / "results"
    m = manifest(tmp_path, cluster, pre_epochs=10)
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(m), "--results", str(results)], cwd=REPO,
                            env={**os.environ, **_env()}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    killed = None
    while time.time() < deadline and killed is None:
        events = list(results.glob("tasks/*/events.jsonl"))
        if any('"kind": "progress"' in e.read_text() for e in events) and _ray_task_pids():
            killed = _ray_task_pids()[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.3)
    assert killed, "no Ray task to kill"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    with sqlite3.connect(results / "runner.db") as db:
        failed = db.execute("SELECT task_id, error FROM attempts WHERE status='failed'").fetchall()
        for tid, _ in failed:
            assert db.execute("SELECT status FROM tasks WHERE id=?", (tid,)).fetchone()[0] == "done"
    assert len(failed) == 1 and "Ray" in failed[0][1], failed


@pytest.mark.e2e
def test_the_tui_shows_live_curves_of_a_task_running_on_ray(cluster, tmp_path):
    results = tmp_path / "results"
    m = manifest(tmp_path, cluster, pre_epochs=30)
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(m), "--results", str(results)], cwd=REPO,
                            env={**os.environ, **_env()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (results / "runner.db").is_file():
            time.sleep(0.2)
        app = RunnerApp(results, poll_s=0.2)
        seen: list[int] = []

        async def scenario() -> None:
            async with app.run_test(size=(130, 40)) as pilot:
                end = time.monotonic() + 180
                while time.monotonic() < end:
                    pre = next((t for t in app.snapshot.tasks if t.kind == "pretrain"), None)
                    if pre is not None and pre.status == "running":
                        table = app.query_one("#tasks")
                        if app.selected != pre.id:
                            table.move_cursor(row=table.get_row_index(pre.id))
                            await pilot.press("enter")
                        from runner.tui.state import curve

                        pts = curve(results, pre.id).get("loss", [])
                        if pts:
                            seen.append(len(pts))
                        if len(seen) >= 2 and seen[-1] > seen[0]:
                            break  # the curve grew while the task ran on Ray
                    await pilot.pause(0.5)

        asyncio.run(scenario())
        assert len(seen) >= 2 and seen[-1] > seen[0], seen
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
