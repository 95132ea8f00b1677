"""The container the docker backend makes for one attempt (`container_spec`, a pure function the tests
hold against the real engine), and what it needs: the image, the user, this machine's virtualenv for a
bare image. Its manifest section, `DockerSpec`, is in `specs`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from runner.contracts import TaskSpec
from runner.errors import UserError
from runner.executors.base import Slot
from runner.executors.specs import DockerSpec

LABEL = "io.github.byol-runner"
L_RESULTS, L_RUN, L_TASK, L_ATTEMPT, L_ATTEMPT_ID, L_SLOT = (
    f"{LABEL}.{k}" for k in ("results", "run", "task", "attempt", "attempt-id", "slot"))
# what a container takes from the runner's environment: the numeric libraries' settings (a host that
# pins OPENBLAS_CORETYPE gets the same floats in a container as in a local process); nothing else, so
# no secret reaches a task (the manifest's executor.env adds what a user wants there)
FORWARDED_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "GOTOBLAS_")


def task_user(spec: DockerSpec) -> str:
    """The uid:gid a task container runs as: BYOL_RUNNER_USER, else executor.user, else the invoking user's
    ids. Root only when asked for by name: a runner started as root (sudo, a CI job) does not quietly
    run every task as root."""
    given = os.environ.get("BYOL_RUNNER_USER") or spec.user
    if given:
        return given
    if os.getuid() == 0:
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


def docker_sdk():  # noqa: ANN201 - the docker module
    """The docker SDK, imported when a container is made (importing the backend needs none)."""
    try:
        import docker
    except ImportError:
        docker = None
    if docker is None or not hasattr(docker, "from_env"):  # not installed, or a folder named docker/ on the path
        found = next(iter(getattr(docker, "__path__", [])), None) or getattr(docker, "__file__", None) or "a module"
        where = f" (`import docker` found {found}, not the SDK)" if docker else ""
        raise UserError(f"the docker executor needs the docker SDK: pip install docker{where}")
    return docker


def container_spec(spec: DockerSpec, task: TaskSpec, task_id: str, results: Path, slot: Slot, run_name: str, attempt_id: int,  # noqa: ANN001
                   number: int, cpu_threads: int | None = None) -> dict:
    """The keyword arguments of `containers.create` for one attempt (a pure function: the tests check it
    against the engine's API by creating, not starting, the containers)."""
    Mount = docker_sdk().types.Mount  # noqa: N806 - the SDK's class

    host_venv = spec.host_venv or os.environ.get("BYOL_RUNNER_HOST_VENV") == "1"
    prefix, binds = host_venv_setup() if host_venv else ([], [])
    results = results.resolve()
    data_binds, args = _data_mounts(task, task_id)
    binds = [*binds, (str(results), "/results", False), *data_binds, *_extra_mounts(spec)]
    env, device_requests = _environment(spec, slot, cpu_threads)
    kw = {
        "image": task_image(spec),
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
        **_hardening(spec),
    }
    if prefix:
        kw["entrypoint"] = prefix
    return kw


def _data_mounts(task: TaskSpec, task_id: str) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """The task's data set, read-only at /data/<name>, and the worker's arguments that say so."""
    from runner.data.sources import NpzSource, RootedSource, expand_path

    args = ["worker", f"/results/tasks/{task_id}/task.json", "--results", "/results"]
    data, dataset = task.data, task.dataset
    if isinstance(data, RootedSource):
        return [(str(data.root_path), f"/data/{dataset}", True)], [*args, "--data-root", f"/data/{dataset}"]
    if isinstance(data, NpzSource):
        host = str(Path(expand_path(data.path)).resolve().parent)
        return [(host, f"/data/{dataset}", True)], [*args, "--data-root", f"/data/{dataset}"]
    return [], args


def _extra_mounts(spec: DockerSpec) -> list[tuple[str, str, bool]]:
    """executor.mounts, read-only unless ':rw' is written."""
    out = []
    for m in spec.mounts:
        host, target, *mode = m.split(":")
        out.append((host, target, mode != ["rw"]))
    return out


def _environment(spec: DockerSpec, slot: Slot, cpu_threads: int | None) -> tuple[dict[str, str], list]:
    """The container's environment and its GPU request (none on a CPU slot, which gets its thread share)."""
    env = {"PYTHONUNBUFFERED": "1", "HOME": "/tmp", "BYOL_RUNNER_CONTAINER": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)})
    device_requests = []
    if slot.gpu is not None:
        device_requests = [docker_sdk().types.DeviceRequest(device_ids=[str(slot.gpu)], capabilities=[["gpu"]])]
        env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
    elif cpu_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cpu_threads)
    env.update(spec.env)
    return env, device_requests


def _hardening(spec: DockerSpec) -> dict:
    """No capabilities, no privilege gain (setuid), a pids limit, a read-only root filesystem (the task
    writes only /results, /tmp (its HOME) and /dev/shm), no network unless asked, a memory limit
    without swap (over it is a kill, not a crawl)."""
    kw = {"cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "pids_limit": spec.pids_limit, "read_only": True,
          "tmpfs": {"/tmp": "rw,nosuid,nodev,size=1g"}}
    if not spec.network:
        kw["network_mode"] = "none"
    if spec.memory:
        kw["mem_limit"] = spec.memory
        kw["memswap_limit"] = spec.memory
    return kw
