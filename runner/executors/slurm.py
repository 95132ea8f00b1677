"""`slurm`: one Slurm batch job per task attempt, submitted with `sbatch` from this host.

The runner writes a small batch script into the task's folder (`slurm/attempt-<id>.sh`) and submits
it with the manifest's partition, account, qos, time limit, GPUs, CPUs, memory and constraint on
sbatch's command line; the job runs the manifest's `setup` lines, then `python -m runner.worker` on
the task's task.json, exactly as the local executor does. Nothing travels but files: the results dir
(and the data sets) must be on a filesystem the nodes share, at the same path. The job appends its
output to the task's worker.log, its events to events.jsonl (the TUI's curves stay live), and when
the worker ends it writes its own exit code to `slurm/attempt-<id>.exit`, so that no accounting
database (`sacct`) is needed.

A job's name and comment carry the run, task and attempt (`byol-runner results=<key> run=<name>
task=<id> attempt=<n> attempt-id=<row>`) and its id is kept in `slurm/attempt-<id>.job`: a runner
killed while jobs ran finds them again with `squeue` and adopts them, and records those that ended
meanwhile from their exit files. How a job ended is read from `squeue --states=all` (Slurm keeps an
ended job there for MinJobAge, 300 s by default): its time limit (timed out, counted as a failure),
`scancel` from outside or preemption without requeue (killed from outside: retried without using up
`retries`), out of memory, a failed node. A preempted job that Slurm requeues keeps its attempt: it
waits in the queue again and its worker resumes from the task's last checkpoint. Jobs survive the
runner (they are the cluster's); Ctrl-C, a timeout and the TUI's cancel `scancel` them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UserError
from runner.executors.base import Executor, Handle, Slot, append_error_event
from runner.executors.specs import MAX_PARALLEL, SlurmSpec

ACTIVE = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
EXIT_PATIENCE_S = 90.0  # an ended job's files may reach this host late (NFS caches entries up to 60 s): wait this long
QUEUE_MAX_AGE_S = 5.0  # one squeue call serves every poll within this time (sites rate-limit the controller's RPCs)
CLOSE_PATIENCE_S = 60.0  # how long the run's end waits for cancelled jobs to end
DEFAULT_MAX_PARALLEL = 16  # jobs in the queue at once unless max_parallel says: a shared cluster has submit limits
SUBMIT_TRIES = 4  # sbatch attempts for one job when the controller is busy or unreachable
TRANSIENT = ("socket timed out", "unable to contact slurm controller", "resource temporarily unavailable",
             "slurm temporarily unable", "connection refused", "communication connection failure", "try again")
COMMAND_TIMEOUT_S = 60.0
INSTALL_FIX = "install Slurm's client commands (Debian/Ubuntu: slurm-client) or run byol-runner on the cluster's login node"
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs", "vfat", "zfs", "ramfs"}


@dataclass
class Job:
    """One line of `squeue`: a job's id, state, node(s), why it waits, its comment."""

    id: str
    state: str
    nodes: str
    reason: str
    comment: str


def results_key(results: Path) -> str:
    """A short, space-free name of this results dir, carried in each job's comment: a random key kept in
    it (`slurm-key`), so that a results dir deleted and made again at the same path is not the same one."""
    path = results / "slurm-key"
    for _ in range(2):
        try:
            key = path.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{16}", key):
                return key
        except FileNotFoundError:
            pass
        except OSError:
            break
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # another runner made it first: read theirs
        except OSError:
            break  # no results dir (yet): the path's hash
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(8).hex() + "\n")
    return hashlib.sha256(str(results.resolve()).encode()).hexdigest()[:16]


def slurm_command(args: list[str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """A Slurm client command; a missing command or one that hangs is a UserError saying so."""
    if shutil.which(args[0]) is None:
        raise UserError(f"the slurm executor needs `{args[0]}` on this host: {INSTALL_FIX}")
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(args[:2])}` did not answer in {timeout:g} s: is slurmctld up? (`scontrol ping`)") from None


def squeue() -> dict[str, Job] | None:
    """This user's jobs, those that ended within MinJobAge included, by id; None when squeue fails."""
    try:
        r = slurm_command(["squeue", "-h", "--states=all", "-u", str(os.getuid()), "-o", "%i|%T|%N|%r|%k"], timeout=30)
    except UserError:
        return None
    if r.returncode != 0:
        return None
    jobs = {}
    for line in r.stdout.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5:
            jobs[parts[0]] = Job(*parts)
    return jobs


def read_exit(path: Path) -> dict[str, str] | None:
    """The `key=value` lines a job wrote when its worker ended; None until the whole file is there."""
    try:
        text = path.read_text()
    except OSError:
        return None
    out = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return out if "code" in out and out.get("end") == "1" else None


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (/proc/mounts' longest matching mount point)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


class SlurmExecutor(Executor):
    name = "slurm"
    Spec = SlurmSpec

    def __init__(self, spec: SlurmSpec) -> None:
        self.spec = spec
        self.python = shlex.split(spec.python) if spec.python else [sys.executable]
        self._stopping: list[dict] = []  # the states of jobs this run cancelled
        self.results: Path | None = None
        self.run_name = "run"
        self._queue: dict[str, Job] | None = None
        self._queue_at = 0.0
        self.partition: Partition | None = None

    @classmethod
    def from_spec(cls, spec, limit: int | None) -> tuple[SlurmExecutor, list[Slot]]:  # noqa: ANN001
        ex = cls(spec)
        ex.partition = ex.read_partition()
        n = limit or ex.default_slots()
        return ex, [Slot(f"slurm{i}") for i in range(max(1, min(n, MAX_PARALLEL)))]

    def read_partition(self) -> Partition:
        r = slurm_command(SINFO)
        if r.returncode != 0:
            raise UserError(f"sinfo failed: {(r.stderr or r.stdout).strip()[:300]} (is slurmctld up? `scontrol ping`)")
        return partition_of(r.stdout, self.spec.partition)

    def default_slots(self) -> int:
        """Jobs at once when max_parallel is not given: as many as the partition's CPUs (or GPUs) hold, at
        most DEFAULT_MAX_PARALLEL."""
        p = self.partition
        fits = p.gpus // self.spec.gpus_per_task if self.spec.gpus_per_task else p.cpus // self.spec.cpus_per_task
        return max(1, min(fits, DEFAULT_MAX_PARALLEL))

    def bind(self, results: Path, run_name: str) -> None:
        self.results, self.run_name = results.resolve(), run_name
        kind = filesystem_type(self.results)
        if kind in LOCAL_FILESYSTEMS:
            nodes = (self.partition or self.read_partition()).nodelist
            if _hostnames(nodes) - {os.uname().nodename.split(".")[0]}:
                print(f"warning: the results dir {self.results} is on a local {kind} filesystem of this host; the "
                      f"Slurm nodes ({nodes}) must see it at the same path (and the data sets too), or every job "
                      "fails without writing its exit code", file=sys.stderr, flush=True)

    # ---- start -----------------------------------------------------------------------------

    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        results = results.resolve()
        folder = task_json.parent.resolve()
        files = folder / "slurm"
        files.mkdir(exist_ok=True)
        stem = files / f"attempt-{attempt_id}"
        Path(f"{stem}.exit").unlink(missing_ok=True)
        script = Path(f"{stem}.sh")
        script.write_text(self.script(task_id, folder / "task.json", results, Path(f"{stem}.exit"), number))
        args = ["sbatch", "--parsable", *self.sbatch_options(task_id, folder, results, attempt_id, number), str(script)]
        job = self._sbatch(args, task_id, attempt_id)
        Path(f"{stem}.job").write_text(job + "\n")
        self._queue = None  # the next poll asks squeue afresh: the new job is in it
        return Handle(task_id, slot, time.time(), pid=None, node="slurm", state=self._state(job, folder, attempt_id))

    def _sbatch(self, args: list[str], task_id: str, attempt_id: int) -> str:
        """The job id sbatch gives; a busy or unreachable controller is tried again (after looking for the
        job in the queue: sbatch may have timed out after the job was accepted); a refusal is a UserError."""
        said = ""
        for i in range(SUBMIT_TRIES):
            try:
                r = slurm_command(args)
                said = (r.stderr or r.stdout).strip()
                job = r.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
                if r.returncode == 0 and job.isdigit():
                    return job
            except UserError as e:
                if shutil.which("sbatch") is None:
                    raise
                said = str(e)
            if not any(t in said.lower() for t in TRANSIENT):
                break
            found = self._job_by_comment(squeue(), attempt_id)
            if found is not None:
                return found
            time.sleep(2.0 * 2**i)
        limit = " (a submit limit: lower executor.max_parallel)" if "maxsubmit" in said.lower() else ""
        raise UserError(f"sbatch refused the job of task {task_id}{limit}: {said[:500]}")

    def _state(self, job: str, folder: Path, attempt_id: int) -> dict:
        return {"job": job, "folder": folder, "exit": folder / "slurm" / f"attempt-{attempt_id}.exit", "cancelled": False,
                "running": False, "seen": False, "ended_at": None, "said": set()}

    def sbatch_options(self, task_id: str, folder: Path, results: Path, attempt_id: int, number: int) -> list[str]:
        s = self.spec
        log = str(folder / "worker.log").replace("%", "%%")
        opts = [f"--job-name=byol-{self.run_name}-{task_id[:8]}-a{number}",
                f"--comment=byol-runner results={results_key(results)} run={self.run_name} task={task_id} "
                f"attempt={number} attempt-id={attempt_id}",
                f"--output={log}", "--open-mode=append", "--ntasks=1", f"--cpus-per-task={s.cpus_per_task}",
                f"--chdir={os.getcwd()}", "--export=ALL", "--requeue" if s.requeue else "--no-requeue"]
        for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("time", s.time_limit),
                            ("mem", s.mem), ("constraint", s.constraint)):
            if value is not None:
                opts.append(f"--{flag}={value}")
        if s.gpus_per_task:
            opts.append(f"--gres=gpu:{s.gpus_per_task}" if s.gpu_request == "gres" else f"--gpus={s.gpus_per_task}")
        return opts + list(s.extra_args)

    def script(self, task_id: str, task_json: Path, results: Path, exit_file: Path, number: int) -> str:
        """The batch script of one attempt: setup, the worker, and the exit file the job writes itself."""
        q = shlex.quote
        events = q(str(task_json.parent / "events.jsonl"))
        python = " ".join(q(w) for w in self.python)
        cpus = self.spec.cpus_per_task
        cpu_only = "" if self.spec.gpus_per_task else "export CUDA_VISIBLE_DEVICES=  # a CPU job: no GPU it was not given\n"
        unseen = f"byol-runner: {task_json} is not visible on this node: the results dir must be on a filesystem it shares"
        return f"""#!/bin/bash
# byol-runner: attempt {number} of task {task_id} (run {self.run_name}), written for sbatch by the slurm executor
exit_file={q(str(exit_file))}
finish() {{  # the job's own record of how it ended: read by the runner (no sacct needed)
  printf 'code=%s\\nsignal=%s\\nhost=%s\\njob=%s\\nrestarts=%s\\nnote=%s\\nend=1\\n' "$1" "$stopped" "$(hostname -s)" \\
    "${{SLURM_JOB_ID:-}}" "${{SLURM_RESTART_COUNT:-0}}" "$2" > "$exit_file.part" && mv -f "$exit_file.part" "$exit_file"
  exit "$1"
}}
stopped=
trap 'stopped=TERM' TERM  # scancel, the time limit, preemption: Slurm signals the worker too; it saves and ends
if [ ! -f {q(str(task_json))} ]; then echo {q(unseen)}; exit 3; fi
rm -f "$exit_file"
unset BYOL_RUNNER_PARENT_PID  # the job belongs to the cluster: it outlives the runner that submitted it
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{cpus}}} MKL_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{cpus}}}
{cpu_only}printf '{{"ts": %s, "task": "%s", "kind": "log", "epoch": null, "step": null, "message": "Slurm job %s on node %s (restart %s)", "node": "%s"}}\\n' \\
  "$(date +%s.%3N)" {q(task_id)} "${{SLURM_JOB_ID:-}}" "$(hostname -s)" "${{SLURM_RESTART_COUNT:-0}}" "$(hostname -s)" >> {events}
# ---- executor.setup
{chr(10).join(self.spec.setup)}
# ----
if [ -n "$stopped" ]; then finish 143 "stopped by SIGTERM during executor.setup"; fi
if ! command -v {q(self.python[0])} >/dev/null 2>&1; then
  echo {q(f"byol-runner: {self.python[0]} not found on this node after executor.setup")}
  finish 127 {q(f"no {self.python[0]} on the node after executor.setup")}
fi
{python} -m runner.worker {q(str(task_json))} --results {q(str(results))} &
pid=$!
while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done
wait "$pid" 2>/dev/null; last=$?  # the worker's own code, if bash still has it (a trapped signal cut the first wait)
case "$last" in 127|-*) ;; *) code=$last ;; esac
finish "$code" ""
"""

    # ---- watch -----------------------------------------------------------------------------

    def jobs(self, fresh: bool = False, exit_seen: bool = False) -> dict[str, Job] | None:
        """squeue's view, at most QUEUE_MAX_AGE_S old (a job's exit file, once seen, asks sooner)."""
        age = time.time() - self._queue_at
        if fresh or self._queue is None or age > QUEUE_MAX_AGE_S or (exit_seen and age > 1.0):
            self._queue, self._queue_at = squeue(), time.time()
        return self._queue

    def poll(self, handle: Handle) -> int | None:
        st = handle.state
        if "exit_code" in st:
            return st["exit_code"]
        info = read_exit(st["exit"])
        queue = self.jobs(exit_seen=info is not None)
        if queue is None:  # the controller does not answer: nothing is decided (a requeued job's old exit file misleads)
            if "unreachable" not in st["said"]:
                st["said"].add("unreachable")
                print(f"warning: squeue does not answer; waiting for it to tell how Slurm job {st['job']} is doing",
                      file=sys.stderr, flush=True)
            return None
        st["said"].discard("unreachable")
        job = queue.get(st["job"])
        if job is not None and job.state in ACTIVE:
            st["seen"], st["ended_at"] = True, None
            self._follow(handle, job)
            return None
        if not st["running"]:
            handle.started = time.time()
        first = st["ended_at"] = st["ended_at"] or time.time()
        if time.time() - first < EXIT_PATIENCE_S and self._wait_longer(st, job, info):
            return None
        return self._ended(handle, job.state if job else None, info)

    def _wait_longer(self, st: dict, job: Job | None, info: dict[str, str] | None) -> bool:
        """Whether an ended (or unlisted) job may yet say more: listed late after sbatch; preempted and about
        to be requeued; its exit file, or the worker's metrics.json, not yet visible here (NFS caches)."""
        if job is None and not st["seen"]:
            return True
        if job is not None and job.state == "PREEMPTED" and self.spec.requeue:
            return True
        if st["cancelled"]:
            return False
        if info is None:
            return True
        if info.get("code") == "0":
            os.listdir(st["folder"])  # a fresh listing: NFS revalidates the folder's cached entries
            return not (st["folder"] / "metrics.json").exists()
        return False

    def _follow(self, handle: Handle, job: Job) -> None:
        """A job in the queue: while it waits, why (once per reason; held ones say how to release them) and
        no clock runs (the runner's timeout_s counts from its start); when it runs, its node; a running job
        back in the queue was requeued (preempted): its attempt goes on."""
        st = handle.state
        if job.state == "RUNNING" and not st["running"]:
            st["running"], handle.started = True, time.time()
            handle.node = job.nodes or handle.node
        elif job.state != "RUNNING" and not st["running"]:
            handle.started = time.time()
        if job.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT") and st["running"]:
            st["running"] = False
            append_log(st["folder"], handle.task_id, f"Slurm job {st['job']} was requeued ({job.reason}): it waits in the "
                       "queue again and resumes from the task's last checkpoint")
        if not st["running"] and job.state != "RUNNING" and ("wait", job.state, job.reason) not in st["said"]:
            st["said"].add(("wait", job.state, job.reason))
            held = job.state in ("REQUEUE_HOLD", "SPECIAL_EXIT") or "held" in job.reason.lower()
            append_log(st["folder"], handle.task_id, f"Slurm job {st['job']} is {job.state.lower()} ({job.reason})"
                       + (f": held, it runs once released (`scontrol release {st['job']}`)" if held else ""))

    def _ended(self, handle: Handle, state: str | None, info: dict[str, str] | None) -> int:
        st, job = handle.state, handle.state["job"]
        code = int(info["code"]) if info and info["code"].lstrip("-").isdigit() else None
        if info and info.get("host"):
            handle.node = info["host"]
        message = kind = None
        if st["cancelled"]:
            code = 143 if code is None else code
        elif state in ("TIMEOUT", "DEADLINE"):
            limit = f"of {self.spec.time_limit} " if self.spec.time_limit else ""
            message, kind = f"timed out: Slurm's time limit {limit}ended job {job} (executor.time_limit)", "timeout"
            code = code or 143
        elif state in ("CANCELLED", "PREEMPTED"):
            message, kind = (f"Slurm job {job} was {'preempted' if state == 'PREEMPTED' else 'cancelled'} from outside "
                             "byol-runner (scancel, or preemption without requeue)"), "killed"
            code = 143
        elif state == "OUT_OF_MEMORY":
            message, kind = (f"killed for memory: Slurm job {job} went over its memory (executor.mem{' = ' + self.spec.mem if self.spec.mem else ''}); "
                             "raise executor.mem, or lower batch_size or image_size"), "oom"
            code = 137
        elif state in ("NODE_FAIL", "BOOT_FAIL"):
            message, kind, code = f"the node of Slurm job {job} failed ({state})", "killed", 137
        elif info is None:
            message = (f"Slurm job {job} ended ({state or 'no longer known to Slurm'}) without writing {st['exit']}: is "
                       f"the results dir on a filesystem the nodes share? (it is {filesystem_type(st['folder'])} here; "
                       "the job's output is in the task's worker.log on that filesystem)")
            kind, code = "slurm", 1
        elif info.get("note"):
            message, kind = f"Slurm job {job} on {info.get('host', '?')}: {info['note']}", "slurm"
        elif info.get("signal") == "TERM" and state is None and code:
            message, kind = (f"Slurm job {job} was stopped by SIGTERM while no runner watched, and Slurm no longer "
                             "says why (scancel, its time limit, or preemption)"), "killed"
        if message is not None:
            append_error_event(st["folder"], handle.task_id, message, kind)
        st["exit_code"] = 1 if code is None else code
        return st["exit_code"]

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        """scancel: Slurm sends SIGTERM to the job's processes (the worker saves its checkpoint); once the
        job has ended, or after grace_s, SIGKILL, as the other executors do. The scheduler polls right
        after: the job's end is what it records (a timeout, the TUI's cancel, Ctrl-C)."""
        st = handle.state
        if "exit_code" in st:
            return
        if not st["cancelled"]:
            st["cancelled"] = True
            slurm_command(["scancel", st["job"]])
            self._stopping.append(st)
        if self._wait_gone([st], grace_s):
            slurm_command(["scancel", "--signal=KILL", "--full", st["job"]])
            self._wait_gone([st], 10.0)

    def _wait_gone(self, states: list[dict], patience_s: float) -> list[dict]:
        """Wait until these jobs have left squeue's active states and written their exit files (those that
        ran); returns those still ending."""
        deadline = time.time() + patience_s
        left = states
        while left and time.time() < deadline:
            queue = self.jobs(fresh=True)
            if queue is None:
                break
            left = [s for s in left if (j := queue.get(s["job"])) is not None and j.state in ACTIVE]
            if left:
                time.sleep(0.5)
        return left

    def close(self) -> None:
        """The jobs cancelled in this run that are still ending: waited for together (their workers save
        their checkpoints), so that a run started right after does not meet them."""
        ending = [s for s in self._stopping if "exit_code" not in s]
        if ending:
            left = self._wait_gone(ending, CLOSE_PATIENCE_S)
            if left:
                print(f"note: {len(left)} cancelled Slurm job(s) still ending ({', '.join(s['job'] for s in left)}); "
                      "Slurm kills them after its KillWait", file=sys.stderr, flush=True)

    # ---- a restarted runner ----------------------------------------------------------------

    def adopt(self, attempts: list) -> dict[int, Handle]:  # noqa: ANN001
        """This backend's attempts a killed runner left: their jobs still in the queue are watched again,
        those that ended meanwhile are recorded from their exit files; the rest run again."""
        if self.results is None:
            return {}
        queue = self.jobs(fresh=True)
        for wait in (2.0, 5.0, 10.0):
            if queue is not None or not any(a["executor"] == self.name for a in attempts):
                break
            time.sleep(wait)
            queue = self.jobs(fresh=True)
        if queue is None and any(a["executor"] == self.name for a in attempts):
            raise UserError("squeue does not answer, so which of the previous runner's Slurm jobs still run cannot be "
                            "told: nothing was started or cancelled; run again once `squeue` works")
        out: dict[int, Handle] = {}
        for a in attempts:
            if a["executor"] != self.name:
                continue
            folder = self.results / "tasks" / a["task_id"]
            job = _job_of(folder, int(a["id"])) or self._job_by_comment(queue, int(a["id"]))
            if job is None:
                continue
            st = self._state(job, folder, int(a["id"]))
            row = queue.get(job) if queue else None
            st["seen"] = row is not None
            if row is not None and not _is_attempt(row, self.results, int(a["id"])):
                continue  # the id is another job's now (a reinstalled cluster): this attempt's job is gone
            if row is not None or read_exit(st["exit"]) is not None:
                st["running"] = row is not None and row.state == "RUNNING"
                out[int(a["id"])] = Handle(a["task_id"], Slot(a["slot"] or "slurm0"), float(a["started"]), pid=None,
                                           node=(row.nodes if row and row.nodes else "slurm"), state=st)
        return out

    def _job_by_comment(self, queue: dict[str, Job] | None, attempt_id: int) -> str | None:
        """The job of an attempt whose id file was never written (the runner died right after sbatch)."""
        found = [j.id for j in (queue or {}).values() if self.results and _is_attempt(j, self.results, attempt_id)]
        return found[-1] if found else None

    @classmethod
    def stop_leftovers(cls, attempts: list, results: Path, grace_s: float) -> None:  # noqa: ANN001
        """The jobs of a dead slurm run that no executor adopted (the run now is local): cancelled."""
        queue = squeue() if shutil.which("squeue") else None
        jobs = [j for a in attempts if (j := _job_of(results / "tasks" / a["task_id"], int(a["id"])))
                and queue and j in queue and _is_attempt(queue[j], results, int(a["id"])) and queue[j].state in ACTIVE]
        if jobs and shutil.which("scancel"):
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=COMMAND_TIMEOUT_S)

    # ---- doctor ----------------------------------------------------------------------------

    @classmethod
    def checks(cls, spec) -> list[tuple[str, str, str, str]]:  # noqa: ANN001
        missing = [c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None]
        if missing:
            return [("Slurm commands", "fail", f"not found on this host: {', '.join(missing)}", INSTALL_FIX)]
        version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        out = [("Slurm commands", "ok", f"sbatch, squeue, scancel, sinfo ({version})", "")]
        try:
            r = slurm_command(SINFO, timeout=30)
        except UserError as e:
            return [*out, ("Slurm controller", "fail", str(e), "start slurmctld, or check SLURM_CONF")]
        if r.returncode != 0:
            return [*out, ("Slurm controller", "fail", (r.stderr or r.stdout).strip()[:200], "start slurmctld, or check SLURM_CONF")]
        try:
            p = partition_of(r.stdout, spec.partition)
        except UserError as e:
            return [*out, ("Slurm partition", "fail", str(e), "set executor.partition to one that `sinfo` lists")]
        status = "ok" if p.avail == "up" else "fail"
        detail = f"{p.name}: {p.avail}, {p.nodes} node(s), {p.cpus} CPUs, {p.gpus} GPUs ({p.nodelist})"
        if spec.gpus_per_task and not p.gpus:
            status, detail = "fail", detail + f"; no GPUs, but executor.gpus_per_task is {spec.gpus_per_task}"
        return [*out, ("Slurm partition", status, detail, "" if status == "ok" else "pick a partition that is up (and has GPUs)")]


def append_log(folder: Path, task_id: str, message: str) -> None:
    from runner.contracts import event_line

    with open(folder / "events.jsonl", "a") as f:
        f.write(event_line(task_id, "log", message=message))


def _is_attempt(job: Job, results: Path, attempt_id: int) -> bool:
    """Whether squeue's job is this results dir's attempt (by its comment; a job id can be another's)."""
    words = job.comment.split()
    return f"results={results_key(results)}" in words and f"attempt-id={attempt_id}" in words


def _job_of(folder: Path, attempt_id: int) -> str | None:
    try:
        job = (folder / "slurm" / f"attempt-{attempt_id}.job").read_text().strip()
    except OSError:
        return None
    return job if job.isdigit() else None


@dataclass
class Partition:
    """A partition as `sinfo` sums it over its lines: availability, nodes, CPUs, GPUs per node."""

    name: str
    avail: str
    nodes: int
    cpus: int  # in all
    gpus: int  # in all, from the nodes' gres
    gres: str
    nodelist: str


SINFO = ["sinfo", "-h", "-o", "%P|%a|%D|%C|%G|%N"]


def partition_of(sinfo: str, partition: str | None) -> Partition:
    """The partition `partition` (the default one, marked `*`, when None) from SINFO's output."""
    lines = [line.split("|") for line in sinfo.splitlines() if line.count("|") == 5]
    names = sorted({f[0].rstrip("*") for f in lines})
    if partition is None:
        default = [f[0] for f in lines if f[0].endswith("*")]
        if not default:
            raise UserError(f"the Slurm cluster has no default partition: set executor.partition (partitions: {', '.join(names) or 'none'})")
        partition = default[0].rstrip("*")
    mine = [f for f in lines if f[0].rstrip("*") == partition]
    if not mine:
        raise UserError(f"executor.partition {partition!r} is not a partition of this Slurm cluster (partitions: {', '.join(names) or 'none'})")
    nodes = cpus = gpus = 0
    for _, _, n, c, g, _ in mine:
        n_nodes = int(n) if n.isdigit() else 0
        total = c.split("/")[-1]
        nodes, cpus = nodes + n_nodes, cpus + (int(total) if total.isdigit() else 0)
        m = re.search(r"gpu(?::[^:(,]+)?:(\d+)", g)
        gpus += n_nodes * int(m.group(1)) if m else 0
    return Partition(partition, mine[0][1], nodes, cpus, gpus, ",".join(sorted({f[4] for f in mine})), ",".join(f[5] for f in mine))


def _hostnames(nodes: str) -> set[str]:
    """The host names of a Slurm node list (`n[01-03],gpu1`), expanded by `scontrol show hostnames`."""
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {nodes}
    return set(r.stdout.split()) if r.returncode == 0 else {nodes}
