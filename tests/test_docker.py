"""The docker executor against a real Docker engine: containers run the project's own virtualenv,
bind-mounted read-only into the CI image (a debootstrapped Debian, docker/build-ci-image.sh).

Skipped, with the reason shown, where no engine answers (`.ci/run` installs and starts one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, fault_env, real_data, run_cli, tiny

CI_IMAGE = os.environ.get("BYOL_RUNNER_TEST_IMAGE", "byol-runner-ci:bookworm")
LABEL = "io.github.byol-runner"


@pytest.fixture(scope="session")
def client():
    docker = pytest.importorskip("docker")
    try:
        c = docker.from_env(timeout=30)
        c.ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Docker engine answers ({str(e).splitlines()[0][:120]}): .ci/run installs and starts one")
    try:
        c.images.get(CI_IMAGE)
    except docker.errors.ImageNotFound:
        build = subprocess.run(["bash", str(REPO / "docker" / "build-ci-image.sh"), CI_IMAGE], capture_output=True, text=True)
        if build.returncode != 0:
            pytest.skip(f"the CI image {CI_IMAGE} is missing and could not be built: {build.stderr.strip()[-200:]}")
    return c


@pytest.fixture
def denv(client, tmp_path) -> dict:  # noqa: ANN001
    """The environment that runs tasks in the CI image; afterwards no container of the test is left,
    even when it failed halfway."""
    # as root (CI), the tasks run as root only because this says so (byol-runner refuses it unasked)
    yield {"BYOL_RUNNER_IMAGE": CI_IMAGE, "BYOL_RUNNER_HOST_VENV": "1", **({"BYOL_RUNNER_USER": "0:0"} if os.getuid() == 0 else {})}
    for c in client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL}.results"}):
        if (c.attrs.get("Labels") or {}).get(f"{LABEL}.results", "").startswith(str(tmp_path.resolve())):
            c.remove(force=True)


def ours(client, results: Path) -> list:  # noqa: ANN001
    """The containers of a results dir (inspected; one removed while being listed is left out)."""
    docker = pytest.importorskip("docker")
    out = []
    for c in client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL}.results={results.resolve()}"}):
        try:
            c.reload()
        except docker.errors.NotFound:
            continue
        out.append(c)
    return out


def attempts(results: Path) -> list[tuple]:
    with sqlite3.connect(results / "runner.db") as db:
        return db.execute("SELECT a.task_id, t.kind, a.number, a.status, a.exit_code, a.error FROM attempts a "
                          "JOIN tasks t ON t.id=a.task_id ORDER BY a.id").fetchall()


def results_of(results: Path) -> dict[str, dict]:
    """metrics.json of every task, without its timing and where it ran (a container's host name is its id)."""
    out = {}
    for m in sorted((results / "tasks").glob("*/metrics.json")):
        d = json.loads(m.read_text())
        d.pop("seconds", None)
        d.pop("environment", None)
        out[m.parent.name] = d
    return out


def _wait(what: str, cond, timeout: float = 120.0):  # noqa: ANN001, ANN202
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _started(c) -> float:  # noqa: ANN001
    """A container's start time, in seconds since the epoch (the engine gives nanoseconds in ISO 8601)."""
    from datetime import datetime

    text = c.attrs["State"]["StartedAt"].rstrip("Z")
    whole, _, frac = text.partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (frac or "0"))


def _running_pretrain(client, results: Path, number: int, checkpoint: bool = False):  # noqa: ANN001, ANN202
    """The running container of the pretraining's attempt `number`, once it has logged progress (and
    written a checkpoint)."""
    for c in ours(client, results):
        folder = results / "tasks" / c.labels[f"{LABEL}.task"]
        if c.status != "running" or c.labels[f"{LABEL}.attempt"] != str(number):
            continue
        if json.loads((folder / "task.json").read_text())["kind"] != "pretrain":
            continue
        events = (folder / "events.jsonl").read_text().splitlines() if (folder / "events.jsonl").exists() else []
        if checkpoint and not (folder / "checkpoint.pt").exists():
            continue
        if any(e["kind"] == "progress" and e["ts"] > _started(c) for e in map(json.loads, events)):
            return c
    return None


def _local_worker(task_dir: Path, results: Path, encoder: Path | None = None) -> dict:
    """Run one task's worker as the local executor does (a process on this machine, one thread as in a
    2-slot CPU run), on a copy of its task.json; returns its metrics without the timing."""
    dest = results / "tasks" / task_dir.name
    dest.mkdir(parents=True)
    shutil.copy(task_dir / "task.json", dest / "task.json")
    if encoder is not None:
        (results / "tasks" / encoder.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(encoder, results / "tasks" / encoder.parent.name / "encoder.pt")
    r = run_cli("worker", str(dest / "task.json"), env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((dest / "metrics.json").read_text())
    m.pop("seconds")
    m.pop("environment")
    return m


@pytest.mark.e2e
def test_a_matrix_runs_in_containers_survives_docker_kill_and_a_killed_runner_and_equals_local(client, denv, tmp_path):
    """The tiny matrix (Model 1 fine-tuned and linear, Model 2) with --executor docker. `docker kill` of the pretraining's container: that attempt
    fails as killed and is retried from its checkpoint; then the runner is SIGKILLed while the retry
    runs: the container survives, the next `run` adopts it, no task runs twice, no container is left,
    and the numbers equal those of the same tasks run as local processes."""
    results = tmp_path / "results"
    manifest = tiny(tmp_path, pre_epochs=16, ft_steps=5)
    manifest.write_text(manifest.read_text().replace("[byol-finetune, supervised]", "[byol-finetune, byol-linear, supervised]"))
    runner = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(manifest), "--executor", "docker",
                               "--results", str(results)], cwd=REPO, env={**os.environ, **denv},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _wait("the pretraining's first checkpoint", lambda: _running_pretrain(client, results, 1, checkpoint=True))
        first.kill()
        second = _wait("the pretraining's second container", lambda: _running_pretrain(client, results, 2))
        assert runner.poll() is None
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
        second.reload()
        assert second.status == "running"  # the container outlives its runner
    finally:
        if runner.poll() is None:
            runner.kill()
    again = run_cli("run", str(manifest), "--executor", "docker", "--results", str(results), env=denv)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "adopted from a previous runner" in again.stdout and "7 done" in again.stdout
    rows = attempts(results)
    pre = [r for r in rows if r[1] == "pretrain"]
    assert [(r[2], r[3], r[4]) for r in pre] == [(1, "failed", 137), (2, "done", 0)]
    assert "killed (SIGKILL, exit 137) from outside byol-runner" in pre[0][5]
    others = [r for r in rows if r[1] != "pretrain"]
    assert len(others) == 6 and all(r[2] == 1 and r[3] == "done" for r in others)  # every other task ran once
    assert ours(client, results) == []
    pre_dir = results / "tasks" / pre[0][0]
    events = [json.loads(line) for line in (pre_dir / "events.jsonl").read_text().splitlines()]
    assert any("resumed from checkpoint at step" in (e.get("message") or "") for e in events)
    with sqlite3.connect(results / "runner.db") as db:
        assert {e for (e,) in db.execute("SELECT executor FROM attempts")} == {"docker"}
        # the adopted attempt's progress after the runner's death reached the store
        last = db.execute("SELECT MAX(step) FROM metric_points WHERE task_id=?", (pre[0][0],)).fetchone()[0]
    assert last == max(e["step"] for e in events if e["kind"] == "progress")
    # written through the /results mount as the invoking user: the image cache, the task files
    assert any((results / "cache").iterdir())
    assert all(p.stat().st_uid == os.getuid() for p in (results / "tasks").rglob("*"))

    # the same task ids as local processes give the same numbers
    local = tmp_path / "local"
    in_docker = results_of(results)
    kinds = {tid: m["kind"] for tid, m in in_docker.items()}
    sup = next(t for t, k in kinds.items() if k == "supervised")
    ft = next(t for t, k in kinds.items() if k == "finetune")
    lin = next(t for t, k in kinds.items() if k == "linear")
    assert _local_worker(results / "tasks" / sup, local) == in_docker[sup]
    assert _local_worker(results / "tasks" / ft, local, encoder=pre_dir / "encoder.pt") == in_docker[ft]
    assert _local_worker(results / "tasks" / lin, local, encoder=pre_dir / "encoder.pt") == in_docker[lin]


@pytest.mark.e2e
def test_containers_that_ended_while_no_runner_watched_are_recorded_not_rerun(client, denv, tmp_path):
    results = tmp_path / "results"
    manifest = tiny(tmp_path, pre_epochs=4, ft_steps=5)
    runner = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(manifest), "--executor", "docker",
                               "--results", str(results)], cwd=REPO, env={**os.environ, **denv},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait("the first containers", lambda: ours(client, results))
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    # a container the runner created but was killed before starting (the kill can land there) did nothing:
    # the next runner removes it and runs its task again
    found = ours(client, results)
    started = [c for c in found if c.attrs["State"]["Status"] != "created"]
    assert all(c.wait(timeout=120)["StatusCode"] == 0 for c in started)  # they finish with no runner
    again = run_cli("run", str(manifest), "--executor", "docker", "--results", str(results), env=denv)
    assert again.returncode == 0, again.stdout + again.stderr
    if started:
        assert f"{5 - len(started)} workers started, {len(started)} adopted from a previous runner" in again.stdout
    else:  # the kill landed before any container started: nothing to adopt (and the line says none)
        assert "5 workers started in" in again.stdout and "adopted" not in again.stdout, again.stdout
    rows = attempts(results)
    done = [r for r in rows if r[3] == "done"]
    assert len(done) == 5 and len({r[0] for r in done}) == 5  # every task done once
    assert all(r[3] == "interrupted" for r in rows if r[3] != "done")  # an attempt that never ran, if the kill left one
    assert ours(client, results) == []


@pytest.mark.e2e
def test_a_task_on_real_images_reads_its_data_set_mounted_read_only(client, denv, tmp_path):
    """Head CT (Kaggle layout: a labels CSV and PNGs) mounted at /data/hemorrhage; the task.json still
    names the host's folder, which does not exist inside the container."""
    head_ct = real_data("head_ct")
    manifest = tmp_path / "ct.yaml"
    manifest.write_text(f"""\
name: ct
datasets:
  hemorrhage:
    source: csv
    root: {head_ct}
    image_column: id
    label_column: hemorrhage
    image_pattern: '{{}}.png'
    classes: {{normal: ['0'], hemorrhage: ['1']}}
    positive: hemorrhage
    image_size: 32
    split: {{strategy: stratified, val: 0.2, test: 0.2}}
methods: [supervised]
labels: {{fractions: [1.0]}}
seeds: [0]
model: {{arch: resnet18}}
finetune: {{epochs: 1, min_steps: 4, batch_size: 16}}
run: {{device: cpu}}
executor: {{retries: 0}}
""")
    results = tmp_path / "results"
    r = run_cli("run", str(manifest), "--executor", "docker", "--results", str(results), env=denv)
    assert r.returncode == 0, r.stdout + r.stderr + "".join(p.read_text() for p in results.glob("tasks/*/worker.log"))
    [(tid, kind, number, status, code, error)] = attempts(results)
    m = json.loads((results / "tasks" / tid / "metrics.json").read_text())
    assert m["dataset"] == "hemorrhage" and m["class_names"] == ["normal", "hemorrhage"]
    assert m["n_labeled"] > 100 and 0.0 <= m["test"]["accuracy"] <= 1.0
    assert ours(client, results) == []


def _pretrain_only(tmp_path: Path, executor: str) -> Path:
    """BYOL pretraining long enough to be stopped, and the fine-tune that waits for it."""
    manifest = tiny(tmp_path, pre_epochs=200)
    text = manifest.read_text().replace("methods: [byol-finetune, supervised]", "methods: [byol-finetune]")
    manifest.write_text(text.replace("fractions: [0.25, 1.0]", "fractions: [1.0]").replace(
        "executor: {max_parallel: 2, retries: 1}", executor))
    return manifest


@pytest.mark.e2e
def test_the_wall_clock_limit_and_ctrl_c_stop_the_container(client, denv, tmp_path):
    limited = _pretrain_only(tmp_path, "executor: {kind: docker, retries: 0, timeout_s: 6, stop_grace_s: 5}")
    r = run_cli("run", str(limited), "--executor", "docker", "--results", str(tmp_path / "limited"), env=denv)
    assert r.returncode == 1
    rows = attempts(tmp_path / "limited")
    assert [(k, s) for _, k, _, s, _, _ in rows] == [("pretrain", "failed")]
    assert rows[0][5] == "wall-clock limit of 6 s reached (executor.timeout_s)"
    assert ours(client, tmp_path / "limited") == []

    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(_pretrain_only(tmp_path, "executor: {}")),
                             "--executor", "docker", "--results", str(results)], cwd=REPO, env={**os.environ, **denv},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = _wait("the pretraining's container", lambda: _running_pretrain(client, results, 1))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert [(k, s) for _, k, _, s, _, _ in attempts(results)] == [("pretrain", "interrupted")]
    assert ours(client, results) == [] and running.id not in {c.id for c in client.containers.list(all=True)}
    events = (results / "tasks" / attempts(results)[0][0] / "events.jsonl").read_text()
    assert "stopped by SIGTERM" in events  # the worker got SIGTERM through the container's init


@pytest.mark.e2e
def test_a_failing_worker_s_error_and_output_come_back_from_its_container(client, denv, tmp_path):
    manifest = tiny(tmp_path)
    text = manifest.read_text().replace("methods: [byol-finetune, supervised]", "methods: [supervised]")
    # the fault reaches the container the way a user's settings do: the manifest's executor.env
    fault = json.dumps(fault_env("supervised"))
    manifest.write_text(text.replace("fractions: [0.25, 1.0]", "fractions: [1.0]").replace(
        "executor: {max_parallel: 2, retries: 1}", f"executor: {{kind: docker, retries: 0, env: {fault}}}"))
    results = tmp_path / "results"
    r = run_cli("run", str(manifest), "--executor", "docker", "--results", str(results), env=denv)
    assert r.returncode == 1
    [(tid, kind, number, status, code, error)] = attempts(results)
    assert (status, code) == ("failed", 1)
    assert error == "RuntimeError: injected failure for kind supervised (BYOL_RUNNER_TEST_FAULT)"  # the worker's own
    log = (results / "tasks" / tid / "worker.log").read_text()  # the container's output, streamed
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith(error)
    assert ours(client, results) == []


@pytest.mark.e2e
def test_a_container_over_its_memory_limit_is_reported_as_killed_for_memory(client, denv, tmp_path):
    manifest = tiny(tmp_path)
    text = manifest.read_text().replace("methods: [byol-finetune, supervised]", "methods: [supervised]")
    text = text.replace("fractions: [0.25, 1.0]", "fractions: [1.0]")
    manifest.write_text(text.replace("executor: {max_parallel: 2, retries: 1}",
                                     "executor: {kind: docker, retries: 0, memory: 150m, keep_containers: true}"))
    r = run_cli("run", str(manifest), "--executor", "docker", "--results", str(tmp_path / "results"), env=denv)
    assert r.returncode == 1
    [(tid, kind, number, status, code, error)] = attempts(tmp_path / "results")
    assert (kind, status, code) == ("supervised", "failed", 137)
    assert error.startswith("killed for memory: the container went over its memory limit of 150m")
    # keep_containers: the ended container is left for inspection, and the engine says why it ended
    [kept] = ours(client, tmp_path / "results")
    assert kept.attrs["State"]["OOMKilled"] is True and kept.labels[f"{LABEL}.task"] == tid


@pytest.mark.e2e
def test_the_container_spec_for_a_two_gpu_host_is_accepted_by_the_engine(client, tmp_path):
    """Without a GPU here, the spec of each slot's container is created (not started) and read back."""
    from runner.executors.base import Slot
    from runner.contracts import TaskSpec
    from runner.executors.docker import DockerExecutor
    from runner.executors.specs import DockerSpec
    from runner.executors.docker_spec import container_spec

    head_ct = real_data("head_ct")
    spec = DockerSpec(kind="docker", image=CI_IMAGE, memory="2g", env={"EXTRA": "1"}, user="1234:1234",
                      mounts=["/etc:/host-etc", "/var/tmp:/scratch:rw"])
    task = TaskSpec(id="t1", kind="supervised", dataset="hemorrhage", settings={},
                    data={"source": "csv", "root": str(head_ct), "image_column": "id", "label_column": "hemorrhage"})
    results = tmp_path / "results"
    (results / "tasks" / "t1").mkdir(parents=True)
    made = []
    try:
        for gpu in (0, 1):
            tid = f"t{gpu}"
            kw = container_spec(spec, task, tid, results, Slot(f"gpu{gpu}", gpu), "study", attempt_id=7 + gpu, number=1)
            kw.pop("detach")
            kw["name"] += f"-{os.getpid()}"
            c = client.containers.create(**kw)
            made.append(c)
            a = client.api.inspect_container(c.id)
            host = a["HostConfig"]
            assert host["DeviceRequests"] == [{"Driver": "", "Count": 0, "DeviceIDs": [str(gpu)], "Capabilities": [["gpu"]],
                                               "Options": {}}]
            assert host["ShmSize"] == 8 * 2**30 and host["Memory"] == 2 * 2**30 and host["MemorySwap"] == 2 * 2**30
            assert host["NetworkMode"] == "none" and host["Init"] is True
            mounts = {m["Target"]: (m["Source"], m.get("ReadOnly", False)) for m in host["Mounts"]}
            assert mounts["/results"] == (str(results.resolve()), False)
            assert mounts["/data/hemorrhage"] == (str(head_ct.resolve()), True)
            # extra mounts are read-only unless ':rw' is written
            assert mounts["/host-etc"] == ("/etc", True) and mounts["/scratch"] == ("/var/tmp", False)
            # hardened: no capabilities, no privilege gain, a pids limit, a read-only root with a /tmp
            assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
            assert host["PidsLimit"] == 4096 and host["ReadonlyRootfs"] is True and set(host["Tmpfs"]) == {"/tmp"}
            cfg = a["Config"]
            assert cfg["User"] == "1234:1234"
            assert cfg["Labels"][f"{LABEL}.task"] == tid and cfg["Labels"][f"{LABEL}.attempt-id"] == str(7 + gpu)
            assert cfg["Labels"][f"{LABEL}.results"] == str(results.resolve())
            assert cfg["Cmd"] == ["worker", f"/results/tasks/{tid}/task.json", "--results", "/results", "--data-root", "/data/hemorrhage"]
            assert "EXTRA=1" in cfg["Env"] and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in cfg["Env"]
    finally:
        for c in made:
            c.remove(force=True)

    # started for real on this GPU-less engine: the GPU runtime is missing, and the message says what to do
    from runner.errors import UserError

    (results / "tasks" / "t1" / "task.json").write_text(task.model_dump_json())
    ex = DockerExecutor(spec)
    ex.bind(results, "study")
    with pytest.raises(UserError, match="NVIDIA Container Toolkit"):
        ex.submit("t1", results / "tasks" / "t1" / "task.json", results, Slot("gpu1", 1), attempt_id=9)
    assert ours(client, results) == []


@pytest.mark.e2e
def test_doctor_and_run_say_what_is_missing(client, denv, tmp_path):
    ok = run_cli("doctor", "--image", CI_IMAGE, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checks = {c["name"]: c for c in json.loads(ok.stdout)["checks"]}
    assert checks["Docker daemon"]["status"] == "ok" and checks["image"]["status"] == "ok"
    assert checks["GPU runtime"]["status"] in ("ok", "warn")  # warn: no GPU on this host
    if checks["GPU runtime"]["status"] == "warn":
        assert "NVIDIA Container Toolkit" in checks["GPU runtime"]["fix"]

    assert client.containers.list(all=True, filters={"label": f"{LABEL}.doctor"}) == []  # its throwaway is gone
    missing = run_cli("doctor", "--image", "byol-runner-test:no-such-tag")
    assert missing.returncode == 1 and "docker build -t byol-runner-test:no-such-tag ." in missing.stdout

    manifest = tiny(tmp_path)
    no_image = run_cli("run", str(manifest), "--executor", "docker", "--results", str(tmp_path / "r"),
                       env={"BYOL_RUNNER_IMAGE": "byol-runner-test:no-such-tag"})
    assert no_image.returncode == 2 and "docker image 'byol-runner-test:no-such-tag' not found" in no_image.stderr
    assert "pulling docker image byol-runner-test:no-such-tag" in no_image.stderr  # pull: missing tried first
    assert "(pulling it failed: " in no_image.stderr  # no registry is reachable here
    assert "Traceback" not in no_image.stderr


def test_run_on_docker_without_a_daemon_says_so_and_exits_2(tmp_path):
    """Needs no engine (so it is in `make test-quick`): the Docker SDK pointed at a socket nobody serves."""
    pytest.importorskip("docker")
    no_daemon = run_cli("run", str(tiny(tmp_path)), "--executor", "docker", "--results", str(tmp_path / "r"),
                        env={"BYOL_RUNNER_IMAGE": CI_IMAGE, "DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert no_daemon.returncode == 2 and "cannot reach the Docker daemon" in no_daemon.stderr, no_daemon.stderr
    assert "Traceback" not in no_daemon.stderr and not (tmp_path / "r" / "tasks").exists()  # refused before any task


def test_compose_file_runs_the_ci_job_headless_and_reserves_gpus_for_the_runner():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    runner, ci = compose["services"]["runner"], compose["services"]["ci"]
    devices = runner["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and runner["shm_size"]
    assert any(v.endswith(":/results") or ":/results:" in v for v in runner["volumes"])
    assert "experiments/ci.yaml" in " ".join(ci["command"]) and "deploy" not in ci
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "USER " in dockerfile and 'ENTRYPOINT ["/usr/local/bin/byol-runner-entrypoint"]' in dockerfile


@pytest.mark.parametrize("setting,expected", [
    ("memory: lots", r"executor\.memory: 'lots' is not a size"),
    ("mounts: ['data:/data']", r"executor\.mounts: 'data:/data': a mount is '/host/path:/container/path'"),
    ("user: bob", r"executor\.user: 'bob': give a numeric uid"),
    ("imag: x", r"executor\.imag: unknown key \(did you mean 'image'\?\)"),
    ("address: ray://x", r"executor\.address: not a setting of the docker executor \(only the ray executor has it\)"),
    ("docker: {memory: 2g}", r"executor: the docker settings now sit directly under executor, not under executor\.docker"),
])
def test_bad_docker_settings_name_their_place(tmp_path, setting, expected):
    """No engine needed: the manifest is checked before anything runs."""
    import re

    from runner.errors import ManifestError
    from runner.manifest import load_manifest

    p = tmp_path / "m.yaml"
    p.write_text(f"name: t\ndatasets:\n  s: {{source: synthetic}}\nexecutor:\n  kind: docker\n  {setting}\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert re.search(expected, str(e.value)), str(e.value)
    assert re.match(rf"{re.escape(str(p))}:[456]: ", str(e.value)), str(e.value)


def test_tasks_run_as_root_only_when_asked_by_name(monkeypatch):
    from runner.errors import UserError
    from runner.executors.specs import DockerSpec
    from runner.executors.docker_spec import task_user

    monkeypatch.delenv("BYOL_RUNNER_USER", raising=False)
    monkeypatch.setattr(os, "getuid", lambda: 0)
    with pytest.raises(UserError, match=r"runs as root, and its task containers would too: set executor\.user"):
        task_user(DockerSpec())
    assert task_user(DockerSpec(user="0:0")) == "0:0"
    monkeypatch.setenv("BYOL_RUNNER_USER", "0:0")
    assert task_user(DockerSpec()) == "0:0"
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 100)
    monkeypatch.delenv("BYOL_RUNNER_USER")
    assert task_user(DockerSpec()) == "1000:100"


def test_each_executor_reads_its_own_section_and_an_override_keeps_the_shared_settings():
    """`run --executor KIND` on a manifest written for another kind: the shared settings carry over,
    the others are named as dropped; the manifest's own kind is read as written."""
    from runner.executors.registry import spec_for
    from runner.manifest import parse_manifest

    docker = parse_manifest("name: t\ndatasets:\n  s: {source: synthetic}\n"
                            "executor: {kind: docker, retries: 3, timeout_s: 60, gpus: 1, memory: 2g, image: x:1}\n").executor
    assert (docker.kind, docker.memory, docker.image, docker.retries) == ("docker", "2g", "x:1", 3)
    assert spec_for(docker, "docker") == (docker, [])
    local, dropped = spec_for(docker, "local")
    assert (local.kind, local.retries, local.timeout_s, local.gpus) == ("local", 3, 60, 1) and dropped == ["image", "memory"]
    ray, dropped = spec_for(docker, "ray")
    assert (ray.kind, ray.retries, ray.address) == ("ray", 3, None) and dropped == ["gpus", "image", "memory"]
    plain = parse_manifest("name: t\ndatasets:\n  s: {source: synthetic}\nexecutor: {max_parallel: 2}\n").executor
    assert (plain.kind, plain.max_parallel) == ("local", 2)
    as_docker, dropped = spec_for(plain, "docker")
    assert (as_docker.image, as_docker.max_parallel, dropped) == ("byol-runner:latest", 2, [])


def test_a_folder_named_docker_on_the_path_is_not_taken_for_the_sdk(monkeypatch):
    """On a machine without the docker SDK, `python -m runner.cli` from a checkout imported the
    checkout's docker/ folder as `docker` (a namespace package), and doctor said "module 'docker' has
    no attribute 'from_env'" (seen on the lent GPU machine): now the missing SDK is named."""
    import types

    from runner.errors import UserError
    from runner.executors.docker_spec import docker_sdk

    folder = types.ModuleType("docker")
    folder.__path__ = ["/checkout/docker"]
    monkeypatch.setitem(sys.modules, "docker", folder)
    with pytest.raises(UserError, match=r"needs the docker SDK: pip install docker \(`import docker` found /checkout/docker"):
        docker_sdk()
