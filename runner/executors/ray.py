"""`ray`: one Ray task per cell, on whichever node has the resources (`num_gpus`, `num_cpus`).

One choice, documented: the Ray task runs the worker as a SUBPROCESS (`byol-runner worker`), with
CUDA_VISIBLE_DEVICES from Ray's own GPU assignment, so a worker that dies (or is killed) is an exit
code like any other, and the Ray task reports it. No shared filesystem is assumed: the task spec and
the encoder and the model.pt a task needs travel as arguments; events stream back to the driver while
the task runs, through one small actor (`EventHub`) that the driver drains on every scheduler tick
into the task's local events.jsonl (so `status` and the TUI's curves stay live); metrics.json,
worker.log and the encoder.pt or model.pt the task made come back as its return value and are written
into the driver's results dir (metrics.json last, atomically). Data sets are read on the node at the path in
task.json: they must be at the same path on every node. Each node keeps its own decoded-image cache
under $BYOL_RUNNER_RAY_DIR (default: <tmp>/byol-runner-ray), and a task's folder there only while it
runs (what it made travels back to the driver; the inputs a task was sent stay, and are overwritten
by the next task sent them).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from runner.atomic import atomic_write_text, temp_path
from runner.contracts import TaskSpec
from runner.errors import UserError
from runner.executors.base import Executor, Handle, Slot, append_error_event
from runner.executors.specs import RaySpec

ARTIFACTS = ("encoder.pt", "model.pt")  # what a worker leaves beside its metrics.json, brought back to the driver


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError('the ray executor needs Ray: pip install "byol-runner[ray]"') from None
    return ray


def _write_inputs(root: Path, inputs: list[tuple[str, bytes]]) -> None:
    """The files a task was sent (a path of its spec: its encoder, the model it scores; the bytes), each
    written aside and renamed into place: two tasks on one node may be sent the same encoder."""
    for rel, blob in inputs:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, target)


def _remote_functions(ray):  # noqa: ANN001, ANN202 - defined lazily: importing this module needs no ray
    @ray.remote(num_cpus=0)
    class EventHub:
        def __init__(self) -> None:
            self.lines: dict[str, list[str]] = {}

        def push(self, task_id: str, lines: list[str]) -> None:
            self.lines.setdefault(task_id, []).extend(lines)

        def drain(self, task_id: str) -> list[str]:
            return self.lines.pop(task_id, [])

    @ray.remote(max_retries=0)  # the runner's retry policy decides, not Ray's
    def run_task(task_id: str, spec_text: str, inputs: list[tuple[str, bytes]], hub) -> dict:  # noqa: ANN001
        import subprocess
        import sys
        import tempfile

        root = Path(os.environ.get("BYOL_RUNNER_RAY_DIR", Path(tempfile.gettempdir()) / "byol-runner-ray"))
        folder = root / "tasks" / task_id
        folder.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "events.jsonl"):
            (folder / stale).unlink(missing_ok=True)
        (folder / "task.json").write_text(spec_text)
        _write_inputs(root, inputs)
        ctx = ray.get_runtime_context()
        node = ctx.get_node_id()[:12]
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ray.get_gpu_ids())
        with open(folder / "worker.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "worker", str(folder / "task.json"), "--results", str(root)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            from runner.contracts import event_line

            hub.push.remote(task_id, [event_line(task_id, "log", message=f"on ray node {node} (worker pid {proc.pid})", node=node).rstrip("\n")])
            offset = 0
            while True:
                done = proc.poll() is not None
                try:
                    with open(folder / "events.jsonl", "rb") as f:
                        f.seek(offset)
                        data = f.read()
                    end = data.rfind(b"\n") + 1
                    if end:
                        hub.push.remote(task_id, data[:end].decode().splitlines())
                        offset += end
                except FileNotFoundError:
                    pass
                if done:
                    break
                time.sleep(0.3)
        out = {"exit_code": proc.returncode, "node": node, "log": (folder / "worker.log").read_text(errors="replace")}
        out["metrics"] = (folder / "metrics.json").read_text() if (folder / "metrics.json").is_file() else None
        out["artifacts"] = {name: (folder / name).read_bytes() for name in ARTIFACTS
                            if proc.returncode == 0 and (folder / name).is_file()}
        shutil.rmtree(folder, ignore_errors=True)  # what the task made travels back in `out`: the node keeps no copy
        return out

    return EventHub, run_task


class RayExecutor(Executor):
    name = "ray"
    Spec = RaySpec

    def __init__(self, address: str | None = None, cpus_per_task: float = 1.0) -> None:
        ray = self.ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot reach the Ray cluster at {address or 'auto'}: {e}") from None
        self.cpus_per_task = cpus_per_task
        EventHub, self.run_task = _remote_functions(ray)
        self.hub = EventHub.remote()

    @classmethod
    def from_spec(cls, spec, limit: int | None) -> tuple[RayExecutor, list[Slot]]:  # noqa: ANN001
        ex = cls(spec.address, spec.cpus_per_task)
        return ex, ex.cluster_slots(limit)

    def cluster_slots(self, max_parallel: int | None) -> list[Slot]:
        """One slot per GPU in the cluster, or per `cpus_per_task` CPUs when it has none."""
        res = self.ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if gpus:
            slots = [Slot(f"ray-gpu{i}", i) for i in range(gpus)]
        else:
            slots = [Slot(f"ray-cpu{i}") for i in range(max(1, int(res.get("CPU", 1) // self.cpus_per_task)))]
        return slots[:max_parallel] if max_parallel else slots

    def submit(self, task_id: str, task_json: Path, results: Path, slot: Slot, attempt_id: int = 0, number: int = 1) -> Handle:
        spec_text = task_json.read_text()
        spec = TaskSpec.read(task_json)
        inputs = []
        for what, path in (("encoder", spec.encoder), ("model", spec.model)):
            if path and not (results / path).resolve().is_relative_to(results.resolve()):
                raise UserError(f"task {task_id}: {what} {path!r} points outside the results dir: task.json was edited by hand")
            if path and (results / path).is_file():  # a missing one: the worker says so
                inputs.append((path, (results / path).read_bytes()))
        ref = self.run_task.options(num_gpus=0 if slot.gpu is None else 1, num_cpus=self.cpus_per_task).remote(
            task_id, spec_text, inputs, self.hub)
        return Handle(task_id, slot, time.time(), pid=None, node="ray", state={"ref": ref, "folder": task_json.parent})

    def _drain(self, handle: Handle) -> None:
        lines = self.ray.get(self.hub.drain.remote(handle.task_id))
        if lines:
            with open(handle.state["folder"] / "events.jsonl", "a") as f:
                f.write("".join(line + "\n" for line in lines))
            for line in lines:
                if '"node"' in line:
                    handle.node = json.loads(line).get("node", handle.node)

    def poll(self, handle: Handle) -> int | None:
        self._drain(handle)
        ready, _ = self.ray.wait([handle.state["ref"]], timeout=0)
        if not ready:
            return None
        folder: Path = handle.state["folder"]
        try:
            out = self.ray.get(handle.state["ref"])
        except Exception as e:  # noqa: BLE001 - node lost, worker crashed, cancelled: a failed attempt
            self._drain(handle)
            reason = f"Ray: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            append_error_event(folder, handle.task_id, reason, "ray")
            return 1
        self._drain(handle)
        handle.node = out["node"]
        with open(folder / "worker.log", "a") as f:
            f.write(out["log"])
        for name, blob in out["artifacts"].items():
            if name in ARTIFACTS:
                tmp = temp_path(folder / name)
                tmp.write_bytes(blob)
                os.replace(tmp, folder / name)
        if out["metrics"] is not None:
            atomic_write_text(folder / "metrics.json", out["metrics"])  # last: its presence means done
        return int(out["exit_code"])

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        self.ray.cancel(handle.state["ref"], force=True)
        deadline = time.time() + grace_s
        while time.time() < deadline and not self.ray.wait([handle.state["ref"]], timeout=0.2)[0]:
            pass
