"""`docker`: one container per task attempt, through the docker SDK.

The container runs `byol-runner worker /results/tasks/<id>/task.json --results /results --data-root
/data/<dataset>`: the results dir is mounted read-write at /results, the task's data set read-only at
/data/<name>; its GPU comes as a DeviceRequest for the slot's device (none on a CPU slot); it runs as
the invoking user (files in the results dir stay theirs), with a large /dev/shm, no network unless
the manifest asks, and an init process that forwards signals.

Labels (`io.github.byol-runner.{results,run,task,attempt,attempt-id,slot}`) let a restarted runner
find its containers: those still running are adopted and watched again, those that ended while no
runner watched have their outcome recorded; no task runs twice. The container's output is streamed
into the task's worker.log by one thread per container; the wall-clock limit is the scheduler's
(the SDK's wait timeout is not a deadline). Failures are told apart: the worker's own error event
(CUDA out of memory among them), killed for memory (OOMKilled, or exit 137 under a memory limit),
killed from outside, an image that cannot run byol-runner; and, before anything runs, a daemon that
does not answer, a missing image or a missing GPU runtime, each with what to do.
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path

from runner.contracts import TaskSpec
from runner.errors import UserError
from runner.executors.base import Executor, Handle, Slot, append_error_event, this_machine
from runner.executors.docker_spec import L_ATTEMPT_ID, L_RESULTS, L_SLOT, container_spec, docker_sdk, task_image, task_user
from runner.executors.specs import DockerSpec

DAEMON_PATIENCE_S = 60.0  # a daemon that stops answering for this long fails the attempts it ran

DAEMON_FIX = ("start the Docker daemon (`sudo systemctl start docker`, or `dockerd &` as root), make sure your user "
              "may use it (the `docker` group), or point DOCKER_HOST at it")
GPU_FIX = ("install the NVIDIA Container Toolkit and restart the daemon "
           "(`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`); "
           "`byol-runner doctor` checks it")


class DaemonUnreachable(UserError):
    """The Docker daemon does not answer; `reason` is what the SDK said, the message adds the fix."""

    def __init__(self, e: BaseException) -> None:
        self.reason = f"cannot reach the Docker daemon ({_first_line(e)})"
        super().__init__(f"{self.reason}: {DAEMON_FIX}")


def connect(timeout: float = 30.0):  # noqa: ANN201
    """A docker client that has answered a ping, or DaemonUnreachable saying how to get one."""
    docker = docker_sdk()
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as e:  # noqa: BLE001 - DockerException, requests' ConnectionError, a socket's PermissionError
        raise DaemonUnreachable(e) from None
    return client


def image_fix(image: str) -> str:
    return (f"build it with `docker build -t {image} .` in the byol-runner checkout (see README, 'Running in "
            "containers'), or set executor.image / BYOL_RUNNER_IMAGE")


def image_missing_message(image: str) -> str:
    return f"docker image {image!r} not found: {image_fix(image)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_gpu_runtime_error(e: BaseException) -> bool:
    return "could not select device driver" in str(e)


class DockerExecutor(Executor):
    name = "docker"
    Spec = DockerSpec

    def __init__(self, spec, cpu_threads: int | None = None) -> None:  # noqa: ANN001 - the manifest's DockerSpec
        self.docker = docker_sdk()
        self.spec = spec
        self.cpu_threads = cpu_threads
        self.client = connect()
        self.image = task_image(spec)
        self._ensure_image()
        task_user(spec)  # root without asking for it: refused before anything runs
        self.results: Path | None = None
        self.run_name = "run"

    @classmethod
    def from_spec(cls, spec, limit: int | None) -> tuple[DockerExecutor, list[Slot]]:  # noqa: ANN001
        slots, threads = this_machine(spec, limit)
        return cls(spec, cpu_threads=threads), slots

    @classmethod
    def stop_leftovers(cls, attempts: list, results: Path, grace_s: float) -> None:  # noqa: ANN001
        """The containers of a dead docker run that no executor adopted (e.g. the run now is local)."""
        stop_orphans(results, {a["id"] for a in attempts}, grace_s)

    def _ensure_image(self) -> None:
        """The image is on this machine, pulled first if `pull` says so; else a UserError saying how."""
        errors = self.docker.errors
        present = True
        try:
            self.client.images.get(self.image)
        except errors.ImageNotFound:
            present = False
        except errors.DockerException as e:
            raise UserError(f"cannot inspect docker image {self.image!r} ({_first_line(e)}): {DAEMON_FIX}") from None
        if self.spec.pull == "always" or (self.spec.pull == "missing" and not present):
            print(f"pulling docker image {self.image} ...", file=sys.stderr, flush=True)
            try:
                self.client.images.pull(self.image)
                print(f"pulled {self.image}", file=sys.stderr, flush=True)
                return
            except errors.DockerException as e:
                if present:  # pull: always, registry unreachable: the local copy will do, say so
                    print(f"warning: could not pull {self.image} ({_first_line(e)}); using the local image",
                          file=sys.stderr, flush=True)
                    return
                raise UserError(f"{image_missing_message(self.image)} (pulling it failed: {_first_line(e)})") from None
        if not present:
            raise UserError(image_missing_message(self.image))

    def bind(self, results: Path, run_name: str) -> None:
        self.results, self.run_name = results.resolve(), run_name

    # ---- start -----------------------------------------------------------------------------

    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        errors = self.docker.errors
        task = TaskSpec.read(task_json)
        kw = container_spec(self.spec, task, task_id, results, slot, self.run_name, attempt_id, number, self.cpu_threads)
        kw.pop("detach")
        try:
            try:
                container = self.client.containers.create(**kw)
            except errors.APIError as e:
                if e.status_code != 409:  # 409: a container of that name is left over: remove it, once
                    raise
                self._remove_leftover(kw["name"])
                container = self.client.containers.create(**kw)
            try:
                container.start()
            except errors.APIError:
                container.remove(force=True)
                raise
        except errors.ImageNotFound:
            raise UserError(image_missing_message(kw["image"])) from None
        except errors.APIError as e:
            if is_gpu_runtime_error(e):
                raise UserError(f"Docker cannot give containers a GPU ({_first_line(e)}): {GPU_FIX}") from None
            raise UserError(f"docker could not start the container for task {task_id}: {e.explanation or e}") from None
        except (errors.DockerException, OSError) as e:  # requests' ConnectionError is an OSError
            raise DaemonUnreachable(e) from None
        handle = Handle(task_id, slot, time.time(), pid=None, node=socket.gethostname(),
                        state={"id": container.id, "name": kw["name"], "folder": task_json.parent, "cancelled": False,
                               "unreachable_since": None})
        self._follow(handle, since=None)
        return handle

    def _remove_leftover(self, name: str) -> None:
        old = self.client.containers.get(name)
        if old.status == "running":
            raise UserError(f"a container named {name} is running already: stop it (`docker stop {name}`) or wait for it")
        old.remove(force=True)

    def _follow(self, handle: Handle, since: int | None) -> None:
        """Stream the container's output into worker.log, in a thread that ends with the container."""
        cid, log_path = handle.state["id"], handle.state["folder"] / "worker.log"

        def pump() -> None:
            try:
                container = self.client.containers.get(cid)
                kwargs = {"stream": True, "follow": True}
                if since is not None:
                    kwargs["since"] = since
                with open(log_path, "ab") as f:
                    for chunk in container.logs(**kwargs):
                        f.write(chunk)
                        f.flush()
            except Exception:  # noqa: BLE001, S110 - the container went away: nothing more to copy
                pass

        t = threading.Thread(target=pump, name=f"logs-{handle.task_id[:12]}", daemon=True)
        t.start()
        handle.state["log_thread"] = t

    # ---- watch -----------------------------------------------------------------------------

    def poll(self, handle: Handle) -> int | None:
        if "exit_code" in handle.state:
            return handle.state["exit_code"]
        try:
            st = self.client.api.inspect_container(handle.state["id"])["State"]
        except self.docker.errors.NotFound:
            return self._ended(handle, 1, "the container disappeared (removed outside byol-runner, e.g. docker rm -f)", "vanished")
        except Exception as e:  # noqa: BLE001 - the daemon is not answering: wait, then give up on the attempt
            first = handle.state["unreachable_since"] = handle.state["unreachable_since"] or time.time()
            if time.time() - first < DAEMON_PATIENCE_S:
                return None
            return self._ended(handle, 1, f"the Docker daemon stopped answering ({_first_line(e)}): {DAEMON_FIX}", "daemon")
        handle.state["unreachable_since"] = None
        if st["Status"] in ("created", "running", "paused", "restarting", "removing"):
            return None
        code = int(st.get("ExitCode", 1))
        thread = handle.state.get("log_thread")
        if thread is not None:
            thread.join(timeout=5.0)
        message = kind = None
        if handle.state["cancelled"]:
            pass
        elif st.get("OOMKilled") or (code == 137 and self.spec.memory):
            limit = f"its memory limit of {self.spec.memory}" if self.spec.memory else "the host's memory"
            message = (f"killed for memory: the container went over {limit} (executor.memory); raise the limit, "
                       "or lower batch_size or image_size")
            kind = "oom"
            code = code or 137
        elif code == 137:
            message = "the container was killed (SIGKILL, exit 137) from outside byol-runner: docker kill, docker stop, or the host"
            kind = "killed"
        elif code in (126, 127):
            message = (f"the container could not run byol-runner (exit {code}: command not found or not executable): "
                       f"is byol-runner installed in the image {self.image!r}?")
            kind = "image"
        return self._ended(handle, code, message, kind)

    def _ended(self, handle: Handle, code: int, message: str | None, kind: str | None) -> int:
        if message is not None:
            append_error_event(handle.state["folder"], handle.task_id, message, kind)
        if not self.spec.keep_containers:
            try:
                self.client.api.remove_container(handle.state["id"], force=True)
            except Exception:  # noqa: BLE001, S110 - already gone, or the daemon is down: nothing to remove
                pass
        handle.state["exit_code"] = code
        return code

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        """SIGTERM through the container's init, SIGKILL after executor.stop_grace_s (docker stop)."""
        handle.state["cancelled"] = True
        try:
            self.client.api.stop(handle.state["id"], timeout=int(self.spec.stop_grace_s))
        except Exception:  # noqa: BLE001, S110 - already gone
            pass

    # ---- a restarted runner ----------------------------------------------------------------

    def adopt(self, attempts: list) -> dict[int, Handle]:  # noqa: ANN001
        if self.results is None:
            return {}
        by_id = {int(a["id"]): a for a in attempts}
        out: dict[int, Handle] = {}
        found = self.client.containers.list(all=True, filters={"label": f"{L_RESULTS}={self.results}"})
        for c in found:
            try:
                aid = int(c.labels.get(L_ATTEMPT_ID, "-1"))
            except ValueError:
                aid = -1
            a = by_id.get(aid)
            if a is None:  # its outcome is recorded already (the runner died before removing it)
                if c.status != "running" and not self.spec.keep_containers:
                    c.remove(force=True)
                continue
            if c.status == "created":  # the runner died between creating and starting it: it did nothing
                c.remove(force=True)  # not adopted: its attempt is recorded interrupted and the task runs again
                continue
            folder = self.results / "tasks" / a["task_id"]
            gpu = re.fullmatch(r"gpu(\d+)", c.labels.get(L_SLOT, ""))
            handle = Handle(a["task_id"], Slot(c.labels.get(L_SLOT, "cpu0"), int(gpu.group(1)) if gpu else None),
                            float(a["started"]), pid=None, node=socket.gethostname(),
                            state={"id": c.id, "name": c.name, "folder": folder, "cancelled": False,
                                   "unreachable_since": None})
            log = folder / "worker.log"
            self._follow(handle, since=int(log.stat().st_mtime) if log.exists() else None)
            out[aid] = handle
        return out


def stop_orphans(results: Path, attempt_ids: set[int], grace_s: float = 10.0) -> int:
    """Stop the containers of these attempts (a run on another executor finds a docker run's leftovers);
    returns how many were stopped. Best effort: no daemon, no containers."""
    try:
        docker = docker_sdk()
        client = docker.from_env(timeout=10)
        found = client.containers.list(all=True, filters={"label": f"{L_RESULTS}={results.resolve()}"})
    except Exception:  # noqa: BLE001 - no docker here: nothing of ours can be running in it
        return 0
    n = 0
    for c in found:
        if c.labels.get(L_ATTEMPT_ID, "").isdigit() and int(c.labels[L_ATTEMPT_ID]) in attempt_ids:
            c.stop(timeout=int(grace_s))
            c.remove(force=True)
            n += 1
    return n
