"""The docker backend's manifest section (`executor: {kind: docker, ...}`) and the container it makes
for one attempt (`container_spec`, a pure function the tests hold against the real engine)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from runner.contracts import TaskSpec
from runner.executors.base import MachineSettings, Slot

LABEL = "io.github.byol-runner"
L_RESULTS, L_RUN, L_TASK, L_ATTEMPT, L_ATTEMPT_ID, L_SLOT = (
    f"{LABEL}.{k}" for k in ("results", "run", "task", "attempt", "attempt-id", "slot"))
# what a container takes from the runner's environment: the numeric libraries' settings (a host that
# pins OPENBLAS_CORETYPE gets the same floats in a container as in a local process); nothing else, so
# no secret reaches a task (the manifest's executor.env adds what a user wants there)
FORWARDED_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "GOTOBLAS_")
_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$")


def _size(v: str | None) -> str | None:
    if v is not None and not _SIZE.match(v):
        raise ValueError(f"{v!r} is not a size: a number with an optional unit b, k, m or g, e.g. 8g or 512m")
    return v


class DockerSpec(MachineSettings):
    """docker: one container per task attempt on this machine's Docker engine."""

    kind: Literal["docker"] = "docker"
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


def task_user(spec: DockerSpec) -> str:
    """The uid:gid a task container runs as: BYOL_RUNNER_USER, else executor.user, else the invoking user's
    ids. Root only when asked for by name: a runner started as root (sudo, a CI job) does not quietly
    run every task as root."""
    given = os.environ.get("BYOL_RUNNER_USER") or spec.user
    if given:
        return given
    if os.getuid() == 0:
        from runner.errors import UserError

        raise UserError("byol-runner runs as root, and its task containers would too: set executor.user to the "
                        "uid:gid that owns the results dir (e.g. '1000:1000'), or to '0:0' to run them as root on "
                        "purpose (BYOL_RUNNER_USER sets it too)")
    return f"{os.getuid()}:{os.getgid()}"


def task_image(spec) -> str:  # noqa: ANN001 - the manifest's DockerSpec
    """The image tasks run in: BYOL_RUNNER_IMAGE, else the manifest's."""
    return os.environ.get("BYOL_RUNNER_IMAGE") or spec.image


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


def host_venv_setup() -> tuple[list[str], list[tuple[str, str, bool]]]:
    """The command prefix and read-only mounts that run THIS machine's byol-runner (its virtualenv, its
    Python and its source, each at its own path) inside a bare image."""
    import runner

    source = Path(runner.__file__).resolve().parents[1]
    paths = {source, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parents[1]}
    keep: list[Path] = []
    for p in sorted(paths, key=lambda q: len(q.parts)):
        if not any(p == k or k in p.parents for k in keep):
            keep.append(p)
    return [sys.executable, "-m", "runner.cli"], [(str(p), str(p), True) for p in keep]


def container_spec(spec: DockerSpec, task: TaskSpec, task_id: str, results: Path, slot: Slot, run_name: str, attempt_id: int,  # noqa: ANN001
                   number: int, cpu_threads: int | None = None) -> dict:
    """The keyword arguments of `containers.create` for one attempt (a pure function: the tests check it
    against the engine's API by creating, not starting, the containers)."""
    from runner.executors.docker import _docker

    _docker()
    from docker.types import DeviceRequest, Mount

    from runner.data.sources import NpzSource, RootedSource, expand_path

    image = task_image(spec)
    host_venv = spec.host_venv or os.environ.get("BYOL_RUNNER_HOST_VENV") == "1"
    prefix, binds = host_venv_setup() if host_venv else ([], [])
    results = results.resolve()
    binds = [*binds, (str(results), "/results", False)]
    args = ["worker", f"/results/tasks/{task_id}/task.json", "--results", "/results"]
    data, dataset = task.data, task.dataset
    if isinstance(data, RootedSource):
        binds.append((str(data.root_path), f"/data/{dataset}", True))
        args += ["--data-root", f"/data/{dataset}"]
    elif isinstance(data, NpzSource):
        binds.append((str(Path(expand_path(data.path)).resolve().parent), f"/data/{dataset}", True))
        args += ["--data-root", f"/data/{dataset}"]
    for m in spec.mounts:
        host, target, *mode = m.split(":")
        binds.append((host, target, mode != ["rw"]))  # read-only unless ':rw' is written
    env = {"PYTHONUNBUFFERED": "1", "HOME": "/tmp", "BYOL_RUNNER_CONTAINER": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)})
    device_requests = []
    if slot.gpu is not None:
        device_requests = [DeviceRequest(device_ids=[str(slot.gpu)], capabilities=[["gpu"]])]
        env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
    elif cpu_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cpu_threads)
    env.update(spec.env)
    kw = {
        "image": image,
        "command": args,
        "name": _name_part(f"byol-runner-{run_name}-{task_id[:40]}-a{number}"),
        "labels": {L_RESULTS: str(results), L_RUN: run_name, L_TASK: task_id, L_ATTEMPT: str(number),
                   L_ATTEMPT_ID: str(attempt_id), L_SLOT: slot.name},
        "user": task_user(spec),
        "environment": env,
        "mounts": [Mount(target=t, source=h, type="bind", read_only=ro) for h, t, ro in binds],
        "shm_size": spec.shm_size,
        "device_requests": device_requests,
        "init": True,
        "working_dir": "/results",
        "detach": True,
        # hardened: no capabilities, no privilege gain (setuid), a pids limit, a read-only root
        # filesystem; the task writes only /results, /tmp (its HOME) and /dev/shm
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": spec.pids_limit,
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=1g"},
    }
    if prefix:
        kw["entrypoint"] = prefix
    if not spec.network:
        kw["network_mode"] = "none"
    if spec.memory:
        kw["mem_limit"] = spec.memory
        kw["memswap_limit"] = spec.memory  # no swap: over the limit is a kill, not a crawl
    return kw


