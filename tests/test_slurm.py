"""The slurm executor. Its batch script, settings and bookkeeping in process (bash runs the script for
real); then, against a real one-node Slurm cluster on this machine (slurmctld and slurmd, started by
`.ci/slurm-up.sh`), the guarantees of every executor: the same results as the local executor, a
killed runner's jobs adopted (no task runs twice), `scancel` from outside retried without using up
`retries`, Slurm's time limit and executor.timeout_s ending as timed out, Ctrl-C cancelling the jobs,
and a requeued (preempted) job resuming from its checkpoint. Tests that need the cluster are skipped,
with the reason, when no Slurm controller answers."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.executors.base import Handle, Slot
from runner.executors.slurm import SlurmExecutor, partition_of, read_exit
from runner.executors.specs import SlurmSpec
from tests.conftest import REFERENCE, REPO, SHARED_DATA, TINY, cli_here, real_data, run_cli

# ---- in process: settings, the script, the bookkeeping ---------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("time_limit", "1 hour", "is not a Slurm time limit"),
    ("mem", "16GB", "is not a Slurm memory size"),
    ("extra_args", ["--job-name=x"], "not allowed in extra_args (the runner names each job)"),
    ("extra_args", ["--time=10"], "use executor.time_limit"),
    ("extra_args", ["-p gpu"], "short options such as -p are not taken"),
    ("setup", ["module load a\nrm -rf /"], "each setup entry is one shell line"),
    ("partition", "gpu; rm", "letters, digits"),
])
def test_bad_slurm_settings_are_refused_with_what_to_write(write_manifest, field, value, expected):
    text = TINY.format(pre_epochs=2, ft_steps=2).replace(
        "executor: {max_parallel: 2, retries: 1}", f"executor: {{kind: slurm, {field}: {json.dumps(value)}}}")
    r = cli_here("plan", str(write_manifest(text)))
    assert r.returncode == 2 and expected in r.stderr, r.stderr


def test_good_slurm_settings_become_sbatch_options():
    spec = SlurmSpec(partition="gpu", account="lab", qos="normal", time_limit="1-12:00:00", gpus_per_task=2,
                     cpus_per_task=8, mem="64G", constraint="a100", extra_args=["--reservation=ml", "--exclusive"])
    opts = SlurmExecutor(spec).sbatch_options("abcdef0123456789", Path("/r/tasks/x"), Path("/r"), 17, 2)
    for o in ("--partition=gpu", "--account=lab", "--qos=normal", "--time=1-12:00:00", "--gres=gpu:2",
              "--cpus-per-task=8", "--mem=64G", "--constraint=a100", "--reservation=ml", "--exclusive", "--requeue",
              "--output=/r/tasks/x/worker.log", "--open-mode=append"):
        assert o in opts, (o, opts)
    name = [o for o in opts if o.startswith("--job-name=")][0]
    comment = [o for o in opts if o.startswith("--comment=")][0]
    assert "abcdef01" in name and name.endswith("-a2")
    assert "task=abcdef0123456789" in comment and "attempt=2" in comment and "attempt-id=17" in comment
    gpus = SlurmExecutor(SlurmSpec(gpus_per_task=1, gpu_request="gpus", requeue=False)).sbatch_options("t" * 16, Path("/r/t"), Path("/r"), 1, 1)
    assert "--gpus=1" in gpus and "--no-requeue" in gpus and not any(o.startswith("--gres") for o in gpus)


def test_sinfo_lines_are_summed_per_partition():
    sinfo = ("cpu*|up|3|10/20/0/30|(null)|c[1-3]\ncpu*|up|1|0/8/0/8|(null)|c4\n"
             "gpu|up|2|4/60/0/64|gpu:a100:4(S:0-1)|g[1-2]\nold|down|1|0/0/4/4|(null)|o1\n")
    cpu = partition_of(sinfo, None)
    assert (cpu.name, cpu.nodes, cpu.cpus, cpu.gpus) == ("cpu", 4, 38, 0)
    gpu = partition_of(sinfo, "gpu")
    assert (gpu.nodes, gpu.cpus, gpu.gpus) == (2, 64, 8)
    with pytest.raises(Exception, match="'a100' is not a partition of this Slurm cluster \\(partitions: cpu, gpu, old\\)"):
        partition_of(sinfo, "a100")


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for the worker's Python: `$0 -m runner.worker TASK --results R`."""
    p = tmp_path / "fake python"
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)
    return p


def _script(tmp_path: Path, python: Path, setup: list[str] | None = None) -> tuple[Path, Path, Path]:
    folder = tmp_path / "results 100%" / "tasks" / "t1"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text("{}")
    ex = SlurmExecutor(SlurmSpec(python=shlex.quote(str(python)), setup=setup or []))  # a command line: quoted
    exit_file = folder / "slurm" / "attempt-3.exit"
    exit_file.parent.mkdir()
    script = folder / "slurm" / "attempt-3.sh"
    script.write_text(ex.script("t1", folder / "task.json", folder.parent.parent, exit_file, 1))
    return script, exit_file, folder


def test_the_batch_script_runs_the_worker_and_writes_its_exit_code_on_paths_with_spaces(tmp_path):
    """bash runs the script as slurmd would (no Slurm needed): the worker gets its task and results dir
    whole, the script passes on its exit code and records it, and its log line is an event."""
    python = _fake_python(tmp_path, 'echo "args: $*" > "$(dirname "$3")/args.txt"; echo "threads=$OMP_NUM_THREADS"; exit 7\n')
    script, exit_file, folder = _script(tmp_path, python, setup=["export FROM_SETUP=yes"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    r = subprocess.run(["bash", str(script)], env={**env, "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "3",
                                                    "BYOL_RUNNER_PARENT_PID": "1"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 7 and "threads=3" in r.stdout, r.stdout + r.stderr
    assert (folder / "args.txt").read_text().strip() == f"args: -m runner.worker {folder / 'task.json'} --results {folder.parent.parent}"
    info = read_exit(exit_file)
    assert info is not None and info["code"] == "7" and info["job"] == "42" and info["signal"] == ""
    [event] = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert event["kind"] == "log" and "Slurm job 42 on node" in event["message"] and event["task"] == "t1"


def _term_when(proc: subprocess.Popen, ready: Path) -> str:
    deadline = time.time() + 20
    while time.time() < deadline and not ready.exists():
        time.sleep(0.05)
    assert ready.exists()
    os.killpg(proc.pid, signal.SIGTERM)  # the whole job, as slurmd signals it
    out, _ = proc.communicate(timeout=20)
    return out


def test_sigterm_to_the_job_reaches_the_worker_and_the_exit_file_says_so(tmp_path):
    """What scancel, a time limit and preemption do: SIGTERM to the job's processes. The worker saves and
    ends; the script waits for it and records its code and the signal."""
    python = _fake_python(tmp_path, f"trap 'echo saved; exit 143' TERM\ntouch {shlex.quote(str(tmp_path / 'ready'))}\n"
                                    "while :; do sleep 0.1; done\n")
    script, exit_file, folder = _script(tmp_path, python)
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True, stdout=subprocess.PIPE, text=True)
    out = _term_when(proc, tmp_path / "ready")
    assert proc.returncode == 143 and "saved" in out
    info = read_exit(exit_file)
    assert info is not None and info["code"] == "143" and info["signal"] == "TERM"


def test_sigterm_during_setup_starts_no_worker(tmp_path):
    """A job cancelled (or out of time) while its setup runs (a `module load`, an image pull) ends there."""
    python = _fake_python(tmp_path, f"touch {shlex.quote(str(tmp_path / 'worker-ran'))}\n")
    ready = tmp_path / "in-setup"
    script, exit_file, _ = _script(tmp_path, python, setup=[f"touch {shlex.quote(str(ready))}", "sleep 3"])
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True, stdout=subprocess.PIPE, text=True)
    _term_when(proc, ready)
    info = read_exit(exit_file)
    assert proc.returncode == 143 and info is not None and "during executor.setup" in info["note"]
    assert not (tmp_path / "worker-ran").exists()


def test_a_setup_that_leaves_no_python_is_one_line_in_the_exit_file(tmp_path):
    script, exit_file, _ = _script(tmp_path, tmp_path / "no-such-python")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    info = read_exit(exit_file)
    assert r.returncode == 127 and info is not None and "after executor.setup" in info["note"]


def _ended(tmp_path: Path, state: str | None, exit_text: str | None, spec: SlurmSpec | None = None) -> tuple[int, list[dict]]:
    folder = tmp_path / "tasks" / "t"
    (folder / "slurm").mkdir(parents=True, exist_ok=True)
    (folder / "events.jsonl").write_text("")
    ex = SlurmExecutor(spec or SlurmSpec(mem="8G"))
    st = ex._state("77", folder, 5)
    if exit_text is not None:
        st["exit"].write_text(exit_text)
    code = ex._ended(Handle("t", Slot("slurm0"), time.time(), state=st), state, read_exit(st["exit"]))
    return code, [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("state, exit_text, code, error_type, words", [
    ("COMPLETED", "code=0\nsignal=\nend=1\n", 0, None, None),
    ("FAILED", "code=1\nsignal=\nend=1\n", 1, None, None),  # the worker's own error event says why
    ("TIMEOUT", "code=143\nsignal=TERM\nend=1\n", 143, "timeout", "timed out: Slurm's time limit"),
    ("CANCELLED", "code=143\nsignal=TERM\nend=1\n", 143, "killed", "cancelled from outside byol-runner"),
    ("CANCELLED", None, 143, "killed", "cancelled from outside"),  # SIGKILLed before it wrote anything
    ("OUT_OF_MEMORY", None, 137, "oom", "killed for memory: Slurm job 77 went over its memory (executor.mem = 8G)"),
    ("NODE_FAIL", None, 137, "killed", "the node of Slurm job 77 failed"),
    ("COMPLETED", None, 1, "slurm", "on a filesystem the nodes share"),
    (None, "code=143\nsignal=TERM\nend=1\n", 143, "killed", "while no runner watched"),
    (None, "code=0\nsignal=\nend=1\n", 0, None, None),  # ended long ago (gone from squeue): its exit file tells
])
def test_how_a_job_ended_becomes_the_attempt_s_outcome(tmp_path, state, exit_text, code, error_type, words):
    """Each way a job ends, as squeue's state and the job's exit file tell it: the exit code the scheduler
    gets and the error it records (`killed` is retried without using up `retries`; a time limit, memory
    and a lost exit file count as failures)."""
    from runner.watch import killed_from_outside

    got, events = _ended(tmp_path, state, exit_text)
    assert got == code
    if words is None:
        assert events == []
    else:
        [e] = events
        assert e["kind"] == "error" and e["error_type"] == error_type and words in e["message"], e
        assert killed_from_outside(got, error_type) == (error_type == "killed")


class _Queue:
    """squeue's answers for `poll`, set by the test (None: squeue failed)."""

    def __init__(self, monkeypatch) -> None:  # noqa: ANN001
        import runner.executors.slurm as slurm

        self.jobs: dict | None = {}
        monkeypatch.setattr(slurm, "squeue", lambda: None if self.jobs is None else dict(self.jobs))

    def set(self, state: str | None, reason: str = "None") -> None:
        from runner.executors.slurm import Job

        self.jobs = {} if state is None else {"77": Job("77", state, "n1" if state == "RUNNING" else "", reason, "")}


def _watched(tmp_path: Path, spec: SlurmSpec | None = None) -> tuple[SlurmExecutor, Handle]:
    folder = tmp_path / "tasks" / "t"
    (folder / "slurm").mkdir(parents=True)
    (folder / "events.jsonl").write_text("")
    ex = SlurmExecutor(spec or SlurmSpec())
    return ex, Handle("t", Slot("slurm0"), time.time(), state=ex._state("77", folder, 5))


def _poll(ex: SlurmExecutor, h: Handle) -> int | None:
    ex._queue = None  # as after QUEUE_MAX_AGE_S
    return ex.poll(h)


def test_poll_decides_nothing_while_squeue_fails_or_before_the_job_is_listed(tmp_path, monkeypatch):
    q = _Queue(monkeypatch)
    ex, h = _watched(tmp_path)
    assert _poll(ex, h) is None  # just submitted, not yet in squeue's answer: not "ended"
    q.set("RUNNING")
    assert _poll(ex, h) is None and h.node == "n1"
    h.state["exit"].write_text("code=143\nsignal=TERM\nend=1\n")  # a requeued job's exit file from its last run
    q.jobs = None  # and the controller stops answering: the old file decides nothing
    assert _poll(ex, h) is None and _poll(ex, h) is None
    q.set("PENDING", "BeginTime")  # requeued: the attempt goes on
    assert _poll(ex, h) is None
    assert "was requeued (BeginTime)" in (h.state["folder"] / "events.jsonl").read_text()


def test_poll_waits_for_a_preempted_job_s_requeue_and_for_files_nfs_shows_late(tmp_path, monkeypatch):
    q = _Queue(monkeypatch)
    ex, h = _watched(tmp_path)
    q.set("RUNNING")
    _poll(ex, h)
    q.set("PREEMPTED")  # on its way back to the queue (requeue: true)
    assert _poll(ex, h) is None
    q.set("COMPLETED")
    assert _poll(ex, h) is None  # no exit file visible yet
    h.state["exit"].write_text("code=0\nsignal=\nend=1\n")
    assert _poll(ex, h) is None  # exit 0 but metrics.json not visible yet
    (h.state["folder"] / "metrics.json").write_text("{}")
    assert _poll(ex, h) == 0
    ex2, h2 = _watched(tmp_path / "2")
    q.set("RUNNING")
    _poll(ex2, h2)
    q.set("COMPLETED")
    h2.state["ended_at"] = time.time() - 1000  # past EXIT_PATIENCE_S: what is known decides
    assert _poll(ex2, h2) == 1 and "without writing" in (h2.state["folder"] / "events.jsonl").read_text()


def test_the_runner_s_timeout_clock_starts_when_the_job_runs_and_held_jobs_say_how_to_release(tmp_path, monkeypatch):
    q = _Queue(monkeypatch)
    ex, h = _watched(tmp_path)
    h.started = time.time() - 500
    q.set("PENDING", "JobHeldUser")
    assert _poll(ex, h) is None and time.time() - h.started < 5  # queued: no clock runs
    q.set("RUNNING")
    _poll(ex, h)
    started = h.started
    time.sleep(0.05)
    _poll(ex, h)
    assert h.started == started  # running: the clock runs from its start
    text = (h.state["folder"] / "events.jsonl").read_text()
    assert text.count("JobHeldUser") == 1 and "scontrol release 77" in text


def test_doctor_says_what_the_slurm_executor_needs_and_fails_only_a_slurm_manifest(write_manifest, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"  # a PATH with a Python but no Slurm commands
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    plain = cli_here("doctor", "--no-gpu", "--json")
    [c] = [c for c in json.loads(plain.stdout)["checks"] if c["name"] == "Slurm commands"]
    assert c["status"] == "warn" and "sbatch" in c["detail"] and "needed only for --executor slurm" in c["detail"]
    text = TINY.format(pre_epochs=2, ft_steps=2).replace("executor: {max_parallel: 2, retries: 1}", "executor: {kind: slurm}")
    r = cli_here("doctor", str(write_manifest(text)), "--no-gpu", "--json")
    [c] = [c for c in json.loads(r.stdout)["checks"] if c["name"] == "Slurm commands"]
    assert r.returncode == 1 and c["status"] == "fail" and "slurm-client" in c["fix"]


# ---- a real Slurm cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    """A Slurm controller that answers, with a partition whose node is up (`.ci/slurm-up.sh` starts one)."""
    if shutil.which("sinfo") is None:
        pytest.skip("no Slurm here (Debian: apt-get install slurm-wlm munge; then .ci/slurm-up.sh as root)")
    r = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not any(s in r.stdout for s in ("idle", "mixed", "allocated")):
        pytest.skip(f"no Slurm controller answers with a node up (.ci/slurm-up.sh starts one): {(r.stderr or r.stdout).strip()[:200]}")
    return r.stdout


def slurm_manifest(tmp_path: Path, pre_epochs: int = REFERENCE["pre_epochs"], executor: str = "retries: 1",
                   methods: str = "[byol-finetune, supervised]", name: str = "slurm.yaml") -> Path:
    """The tiny matrix on Slurm, one CPU a job; with the defaults, the tasks of `tiny_reference`."""
    text = TINY.format(pre_epochs=pre_epochs, ft_steps=REFERENCE["ft_steps"]).replace(
        "executor: {max_parallel: 2, retries: 1}", f"executor: {{kind: slurm, max_parallel: 2, cpus_per_task: 1, {executor}}}").replace(
        "methods: [byol-finetune, byol-linear, supervised, random-linear]", f"methods: {methods}")
    p = tmp_path / name
    p.write_text(text)
    return p


def _start(manifest: Path, results: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(manifest), "--results", str(results), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _jobs(results: Path) -> dict[str, list[str]]:
    """The Slurm job ids each task's attempts had, from the files the executor keeps beside them."""
    out: dict[str, list[str]] = {}
    for f in sorted(results.glob("tasks/*/slurm/attempt-*.job")):
        out.setdefault(f.parent.parent.name, []).append(f.read_text().strip())
    return out


def _state(job: str) -> str:
    r = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _pretrain_running(results: Path, min_step: int = 0, timeout: float = 180) -> tuple[Path, str]:
    """The pretrain task's folder and job once its worker has reported step `min_step` (and written a
    checkpoint when min_step > 0)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for folder in results.glob("tasks/*"):
            events = folder / "events.jsonl"
            if not events.is_file() or json.loads((folder / "task.json").read_text())["kind"] != "pretrain":
                continue
            steps = [e.get("step") or 0 for e in map(json.loads, events.read_text().splitlines()) if e["kind"] == "progress"]
            jobs = _jobs(results).get(folder.name)
            if jobs and steps and max(steps) >= min_step and (min_step == 0 or (folder / "checkpoint.pt").exists()):
                return folder, jobs[-1]
        time.sleep(0.2)
    pytest.fail(f"the pretraining did not reach step {min_step} on Slurm")


def _attempts(results: Path, task: str | None = None) -> list[tuple]:
    with sqlite3.connect(results / "runner.db") as db:
        q = "SELECT task_id, number, status, error, executor FROM attempts" + (" WHERE task_id=?" if task else "") + " ORDER BY id"
        return db.execute(q, (task,) if task else ()).fetchall()


def _same_arms(a: Path, b: Path, name: str) -> None:
    x = json.loads((a / name / "results.json").read_text())["arms"]
    y = json.loads((b / name / "results.json").read_text())["arms"]
    assert [(r["dataset"], r["labels"], r["method"], r["accuracy"], r["loss"]) for r in x] == \
           [(r["dataset"], r["labels"], r["method"], r["accuracy"], r["loss"]) for r in y]


@pytest.mark.e2e
def test_the_ci_manifest_on_slurm_gives_the_local_executor_s_results(slurm, tmp_path):
    """`run experiments/ci.yaml --executor slurm`: every task one job, named and commented with its run,
    task and attempt, each exit file written by the job; the table equals the local executor's."""
    real_data("head_ct")
    env = {"BYOL_DATA": str(SHARED_DATA)}
    local = run_cli("run", "experiments/ci.yaml", "--results", str(tmp_path / "local"), env=env, timeout=900)
    assert local.returncode == 0, local.stdout + local.stderr
    r = run_cli("run", "experiments/ci.yaml", "--executor", "slurm", "--results", str(tmp_path / "slurm"), env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    _same_arms(tmp_path / "local", tmp_path / "slurm", "ci")
    jobs = _jobs(tmp_path / "slurm")
    assert len(jobs) == 9 and all(len(j) == 1 for j in jobs.values()), jobs
    assert {row[4] for row in _attempts(tmp_path / "slurm")} == {"slurm"}
    task, [job] = next(iter(jobs.items()))
    q = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%j|%k|%T"], capture_output=True, text=True).stdout
    assert f"byol-ci-{task[:8]}-a1" in q and f"run=ci task={task} attempt=1" in q and "COMPLETED" in q, q
    for task, [job] in jobs.items():
        exit_file = next((tmp_path / "slurm" / "tasks" / task / "slurm").glob("*.exit"))
        assert read_exit(exit_file)["code"] == "0" and read_exit(exit_file)["job"] == job


@pytest.mark.e2e
def test_a_killed_runner_s_jobs_run_on_and_the_next_run_adopts_them(slurm, tiny_reference, tmp_path):
    """SIGKILL the runner while the pretraining's job runs: the job is the cluster's and goes on; the next
    `run` finds it with squeue and watches it to its end; no task runs twice; the table is the reference's."""
    results = tmp_path / "results"
    proc = _start(slurm_manifest(tmp_path), results)
    folder, job = _pretrain_running(results, min_step=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _state(job) in ("RUNNING", "COMPLETING", "COMPLETED"), _state(job)
    r = run_cli("run", str(slurm_manifest(tmp_path)), "--results", str(results), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"5 done; \d+ workers started, (\d+) adopted from a previous runner", r.stdout)
    assert m and int(m.group(1)) >= 1, r.stdout
    assert all(len(j) == 1 for j in _jobs(results).values()), _jobs(results)  # one job per task: none ran twice
    rows = _attempts(results)  # five attempts, all done: none interrupted, none run again
    assert [row[2] for row in rows] == ["done"] * 5 and len({row[0] for row in rows}) == 5, rows
    assert [row[2] for row in _attempts(results, folder.name)] == ["done"]  # the killed runner's attempt, adopted
    _same_arms(tiny_reference[1], results, "tiny")


@pytest.mark.e2e
def test_scancel_from_outside_is_retried_without_using_up_retries(slurm, tmp_path):
    results = tmp_path / "results"
    proc = _start(slurm_manifest(tmp_path, pre_epochs=30, executor="retries: 0", methods="[byol-linear]"), results)
    folder, job = _pretrain_running(results, min_step=1)
    subprocess.run(["scancel", job], check=True, timeout=30)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    rows = _attempts(results, folder.name)
    assert [r[2] for r in rows] == ["failed", "done"], rows
    assert f"Slurm job {job} was cancelled from outside byol-runner" in rows[0][3]
    assert len(_jobs(results)[folder.name]) == 2 and _state(job) == "CANCELLED"


@pytest.mark.e2e
def test_slurm_s_time_limit_and_executor_timeout_both_end_an_attempt_as_timed_out(slurm, tmp_path):
    """A job over Slurm's time limit (1 minute) and one over the runner's timeout_s: each attempt fails
    saying which limit ended it (counted against retries: 0, so the task fails and the run exits 1)."""
    long = "pretrain: {epochs: 4000, min_steps: 0, batch_size: 16"
    for limit, words in (('time_limit: "1", retries: 0', "timed out: Slurm's time limit of 1 ended job"),
                         ("timeout_s: 15, retries: 0", "wall-clock limit of 15 s reached (executor.timeout_s)")):
        results = tmp_path / limit.split(":")[0]
        m = slurm_manifest(tmp_path, executor=limit, methods="[byol-linear]", name=f"{limit.split(':')[0]}.yaml")
        m.write_text(m.read_text().replace("pretrain: {epochs: 8, min_steps: 0, batch_size: 16", long))
        r = run_cli("run", str(m), "--results", str(results), timeout=600)
        assert r.returncode == 1, r.stdout + r.stderr
        [(task, _, status, error, _)] = [row for row in _attempts(results) if row[2] != "pending"]
        assert status == "failed" and words in error, error
        [job] = _jobs(results)[task]
        assert _state(job) == ("TIMEOUT" if "time_limit" in limit else "CANCELLED")


@pytest.mark.e2e
def test_ctrl_c_cancels_the_jobs_and_a_plain_run_resumes(slurm, tmp_path):
    results = tmp_path / "results"
    m = slurm_manifest(tmp_path, pre_epochs=30)
    proc = _start(m, results)
    _pretrain_running(results, min_step=1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    states = [_state(j) for jobs in _jobs(results).values() for j in jobs]
    assert states and all(s in ("CANCELLED", "COMPLETED") for s in states) and "CANCELLED" in states, states
    rows = _attempts(results)
    assert rows and all(r[2] in ("interrupted", "done") for r in rows) and "interrupted" in [r[2] for r in rows], rows
    again = run_cli("run", str(m), "--results", str(results), timeout=600)  # what the message says to do
    assert again.returncode == 0 and "5 done" in again.stdout, again.stdout + again.stderr
    assert not [j for jobs in _jobs(results).values() for j in jobs if _state(j) not in ("CANCELLED", "COMPLETED")]


@pytest.mark.e2e
def test_a_requeued_job_keeps_its_attempt_and_resumes_from_its_checkpoint(slurm, tiny_reference, tmp_path):
    """Preemption with requeue, as `scontrol requeue` does it: SIGTERM to the job, which goes back to the
    queue with the same id. The runner waits for it; the worker resumes from its last checkpoint; the
    table is the uninterrupted reference's."""
    results = tmp_path / "results"
    proc = _start(slurm_manifest(tmp_path), results)
    folder, job = _pretrain_running(results, min_step=5)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and _state(job) not in ("PENDING", "REQUEUED"):
        time.sleep(0.2)
    assert _state(job) in ("PENDING", "REQUEUED"), _state(job)
    # Slurm holds a requeued job for 2 minutes before it may start again: not in a test
    assert subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30).returncode == 0
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert [r[2] for r in _attempts(results, folder.name)] == ["done"]
    assert _jobs(results)[folder.name] == [job]
    text = (folder / "events.jsonl").read_text()
    assert f"Slurm job {job} on node" in text and "(restart 1)" in text and "resumed from checkpoint at step" in text
    _same_arms(tiny_reference[1], results, "tiny")


@pytest.mark.e2e
def test_the_tui_s_cancel_scancels_the_job_and_the_run_goes_on(slurm, tmp_path):
    """The TUI's cancel is a control request (`commands.request`): the scheduler scancels that task's job,
    records the attempt cancelled and the task failed, and the rest of the run goes on."""
    from runner.commands import request

    results = tmp_path / "results"
    proc = _start(slurm_manifest(tmp_path, pre_epochs=30, methods="[byol-linear, supervised]"), results)
    folder, job = _pretrain_running(results, min_step=1)
    request(results, "cancel", folder.name)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out + err  # the pretraining failed (cancelled), its probes were blocked
    assert _attempts(results, folder.name)[-1][2:4] == ("cancelled", "cancelled by the user")
    assert _state(job) == "CANCELLED"
    with sqlite3.connect(results / "runner.db") as db:
        statuses = dict(db.execute("SELECT kind, status FROM tasks WHERE kind IN ('supervised', 'linear')").fetchall())
    assert statuses == {"supervised": "done", "linear": "blocked"}, statuses
