"""Every executor's section of the manifest (`executor: {kind: ..., ...}`), and the registry of backends.

A leaf of the executors: it imports nothing of theirs, so the manifest can read every backend's
settings without loading a backend (nor its SDK). A backend is one entry in `SPECS`: its settings
model, a pydantic model with `kind: Literal[name]` (the manifest's `executor` is the discriminated
union of them) whose `executor` names its `Executor` class as "module:Class" (`registry` imports it
when a run needs it).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from runner.choices import StrictModel



MAX_PARALLEL = 1024  # tasks at once: each is a process (or a container, a Ray task) with its own memory


class ExecutorSettings(StrictModel):
    """What every backend's section of the manifest has; a backend's `Spec` adds `kind` and its own."""

    executor: ClassVar[str] = ""  # "module:Class" of the backend's Executor
    max_parallel: int | None = Field(None, ge=1, le=MAX_PARALLEL,
                                     description=f"tasks at once (default: one per GPU, or 1 on the CPU); at most {MAX_PARALLEL}")
    retries: int = Field(1, ge=0, le=10, description="attempts after the first, for a task whose worker fails")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock limit of one attempt, enforced by the runner")


class MachineSettings(ExecutorSettings):
    """A backend that runs tasks on this machine's GPUs (or CPU slots)."""

    gpus: Literal["auto"] | Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] = Field(
        "auto", description="auto: every visible GPU; N: the first N; [ids]: those; one task per GPU at a time"
    )


class LocalSpec(MachineSettings):
    """local: one subprocess per task on this machine (the default)."""

    executor: ClassVar[str] = "runner.executors.local:LocalExecutor"
    kind: Literal["local"] = Field("local", description="one subprocess per task on this machine")
    preload: bool = Field(True, description="fork each task's worker from a process that has PyTorch loaded (about "
                          "two seconds less per task); false: a fresh Python per task (BYOL_RUNNER_PRELOAD=0 sets it)")


_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$")


def _size(v: str | None) -> str | None:
    if v is not None and not _SIZE.match(v):
        raise ValueError(f"{v!r} is not a size: a number with an optional unit b, k, m or g, e.g. 8g or 512m")
    return v


class DockerSpec(MachineSettings):
    """docker: one container per task attempt on this machine's Docker engine."""

    executor: ClassVar[str] = "runner.executors.docker:DockerExecutor"
    kind: Literal["docker"] = Field("docker", description="one container per task attempt")
    image: str = Field("byol-runner:latest", description="the image with byol-runner installed (see Dockerfile); "
                       "BYOL_RUNNER_IMAGE overrides it")
    pull: Literal["missing", "always", "never"] = Field(
        "missing", description="pull the image from its registry: when it is not on this machine, before every run, or never")
    shm_size: str = Field("8g", description="/dev/shm of a task container (Docker's 64m is too small for PyTorch)")
    memory: str | None = Field(None, description="memory limit of a task container, e.g. 32g (default: none); "
                               "a container over it is reported as killed for memory")
    network: bool = Field(False, description="give task containers a network (training needs none)")
    user: str | None = Field(None, description="uid:gid the tasks run as (default: the user running byol-runner; when "
                             "that is root, tasks run as root only if this says '0:0'); BYOL_RUNNER_USER overrides it")
    pids_limit: int = Field(4096, ge=64, description="processes and threads a task container may have")
    keep_containers: bool = Field(False, description="leave ended containers for inspection instead of removing them")
    stop_grace_s: float = Field(10.0, ge=0, description="seconds between SIGTERM and SIGKILL when a container is stopped")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of task containers")
    mounts: list[str] = Field(default_factory=list, description="extra bind mounts, '/host:/container[:ro|rw]', "
                              "read-only unless ':rw' is written")
    host_venv: bool = Field(
        False, description="run this machine's byol-runner virtualenv, bind-mounted read-only, instead of the image's "
        "own install (for a bare CI image; BYOL_RUNNER_HOST_VENV=1 sets it)")

    @field_validator("shm_size", "memory")
    @classmethod
    def _sizes(cls, v: str | None) -> str | None:
        return _size(v)

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, v: list[str]) -> list[str]:
        for m in v:
            parts = m.split(":")
            if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/") or \
                    (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"{m!r}: a mount is '/host/path:/container/path' with an optional ':ro' or ':rw'")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[0-9]+(:[0-9]+)?$", v):
            raise ValueError(f"{v!r}: give a numeric uid or uid:gid, e.g. 1000:1000")
        return v



class RaySpec(ExecutorSettings):
    """ray: one Ray task per cell, on whichever node of a Ray cluster has the resources."""

    executor: ClassVar[str] = "runner.executors.ray:RayExecutor"
    kind: Literal["ray"] = Field("ray", description="one Ray task per cell")
    address: str | None = Field(None, description="the cluster's address (default: RAY_ADDRESS, or a local Ray)")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs a task reserves")


_SLURM_TIME = re.compile(r"^([0-9]+|[0-9]+:[0-9]{1,2}|[0-9]+:[0-9]{1,2}:[0-9]{1,2}|[0-9]+-[0-9]+(:[0-9]{1,2}){0,2}|UNLIMITED|INFINITE)$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,:+@%=-]+$")  # a partition, account, qos
_SLURM_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:+@%=&|*\[\]()!-]+$")  # features with Slurm's & | [] * ! operators
_SLURM_MEM = re.compile(r"^[0-9]+[KMGT]?$")
_SLURM_FLAG = re.compile(r"^--[a-z][a-z0-9-]*(=[^\s]+)?$")
# sbatch options the executor sets itself (or that have a setting of their own): not allowed in extra_args
SLURM_OWN_FLAGS = {
    "job-name": "the runner names each job", "comment": "the runner's comment finds the job again",
    "output": "the job writes the task's worker.log", "error": "the job writes the task's worker.log",
    "open-mode": "worker.log is appended to", "parsable": "the runner reads the job id", "wrap": "the runner writes the script",
    "array": "one job per task attempt", "chdir": "the job runs where the runner runs", "export": "the job gets the runner's environment",
    "requeue": "use executor.requeue", "no-requeue": "use executor.requeue", "partition": "use executor.partition",
    "account": "use executor.account", "qos": "use executor.qos", "time": "use executor.time_limit",
    "gres": "use executor.gpus_per_task", "gpus": "use executor.gpus_per_task", "gpus-per-task": "use executor.gpus_per_task",
    "cpus-per-task": "use executor.cpus_per_task", "mem": "use executor.mem", "constraint": "use executor.constraint",
    "ntasks": "one worker per job", "nodes": "one worker per job", "wait": "the runner watches the job itself",
    "clusters": "the runner watches the jobs of the cluster it runs on: run it on that cluster's login node",
}


class SlurmSpec(ExecutorSettings):
    """slurm: one Slurm batch job per task attempt, submitted with sbatch from this host."""

    executor: ClassVar[str] = "runner.executors.slurm:SlurmExecutor"
    kind: Literal["slurm"] = Field("slurm", description="one Slurm batch job per task attempt (sbatch)")
    max_parallel: int | None = Field(None, ge=1, le=MAX_PARALLEL, description="jobs submitted at once (default: as many as "
                                     "the partition's CPUs, or GPUs, hold at cpus_per_task or gpus_per_task each, at most 16: "
                                     f"a shared cluster has submit limits); at most {MAX_PARALLEL}")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock limit of one attempt, enforced by the runner, "
                                    "counted from the job's start (not its time in the queue); see also time_limit")
    partition: str | None = Field(None, description="the partition jobs go to (default: the cluster's default partition)")
    account: str | None = Field(None, description="the account jobs are charged to (sbatch --account)")
    qos: str | None = Field(None, description="the quality of service (sbatch --qos)")
    time_limit: str | None = Field(None, description="Slurm's time limit of one job, in its format: minutes, "
                                   "MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (default: the partition's); a job "
                                   "over it ends as timed out")
    gpus_per_task: int = Field(0, ge=0, le=64, description="GPUs of each job (0: the task runs on its CPUs)")
    gpu_request: Literal["gres", "gpus"] = Field("gres", description="how GPUs are asked for: --gres=gpu:N (gres) or "
                                                 "--gpus=N (gpus), as the cluster expects")
    cpus_per_task: int = Field(1, ge=1, le=1024, description="CPUs of each job; the worker uses that many threads")
    mem: str | None = Field(None, description="memory of each job, e.g. 16G (sbatch --mem; default: the partition's)")
    constraint: str | None = Field(None, description="node features the job needs (sbatch --constraint)")
    extra_args: list[str] = Field(default_factory=list, description="more sbatch options, each one '--name' or "
                                  "'--name=value' (e.g. --reservation=ml, --exclusive); those the executor sets are refused")
    setup: list[str] = Field(default_factory=list, description="shell lines each job runs before the worker, e.g. "
                             "'module load cuda/12.4', 'source /shared/venvs/byol/bin/activate'")
    python: str | None = Field(None, description="the command that runs the worker's Python on the nodes (default: this "
                               "host's interpreter, which must be on the shared filesystem; 'python' when setup activates "
                               "one; a container: 'apptainer exec --nv /shared/byol.sif python')")
    requeue: bool = Field(True, description="let Slurm requeue a preempted job (sbatch --requeue); the requeued job "
                          "resumes from the task's last checkpoint")

    @field_validator("partition", "account", "qos")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_NAME.match(v):
            raise ValueError(f"{v!r}: letters, digits and _ . , : + @ % = - only")
        return v

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_CONSTRAINT.match(v):
            raise ValueError(f"{v!r}: node features joined by Slurm's & | [ ] * ! operators, with no spaces")
        return v

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_TIME.match(v):
            raise ValueError(f"{v!r} is not a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_MEM.match(v):
            raise ValueError(f"{v!r} is not a Slurm memory size: a number of megabytes, or with a unit K, M, G or T (e.g. 16G)")
        return v

    @field_validator("extra_args")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _SLURM_FLAG.match(a):
                raise ValueError(f"{a!r}: each extra sbatch option is one '--name' or '--name=value' with no spaces "
                                 "(short options such as -p are not taken)")
            name = a[2:].split("=", 1)[0]
            if name in SLURM_OWN_FLAGS:
                raise ValueError(f"{a!r}: not allowed in extra_args ({SLURM_OWN_FLAGS[name]})")
        return v

    @field_validator("setup")
    @classmethod
    def _lines(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line or "\r" in line or "\0" in line:
                raise ValueError(f"{line!r}: each setup entry is one shell line (give several entries)")
        return v

    @field_validator("python")
    @classmethod
    def _python(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c in v for c in "\n\r\0")):
            raise ValueError(f"{v!r}: a command name or path")
        return v


SPECS: dict[str, type[ExecutorSettings]] = {"local": LocalSpec, "docker": DockerSpec, "ray": RaySpec, "slurm": SlurmSpec}


def executor_specs() -> tuple[type[ExecutorSettings], ...]:
    """Every backend's manifest section, in registry order."""
    return tuple(SPECS.values())
