"""`byol-runner worker TASK_JSON` (or `python -m runner.worker TASK_JSON`): train ONE task, as a container, a Ray task or a local process runs it.

Input: `tasks/<id>/task.json` (a `TaskSpec`). Output, in the same folder: `events.jsonl` (one JSON
object a line, flushed as training goes), `metrics.json` (written last and atomically: its presence
means done), artifacts (`encoder.pt`; `checkpoint.pt` while training). Paths in the spec are
relative to the results dir, which is the task folder's grandparent unless `--results` says so.

Exit codes: 0 done; 1 training failed (error event with the exception); 2 the task cannot start
(bad task.json, missing encoder, no GPU for a GPU task); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from pydantic import ValidationError

from runner.arms import CLASSIFIER_KINDS, EVALUATE
from runner.atomic import read_json
from runner.contracts import ENGINE_VERSION, EventKind, TaskSpec, event_line
from runner.data.cache import file_sha
from runner.errors import StartError, UserError
from runner.system import resolve_device
from runner.worker import kinds as K


class EventLog:
    """Appends one JSON line per event and flushes it, so a reader (the runner, the TUI) sees it now."""

    def __init__(self, path: Path, task: str) -> None:
        self.task = task
        self.f = open(path, "a", buffering=1)

    def emit(self, kind: EventKind | str, epoch: int | None = None, step: int | None = None, **values) -> None:
        self.f.write(event_line(self.task, kind, epoch, step, **values))
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def load_task(path: Path, data_root: str | None = None) -> TaskSpec:
    """The task spec; with `data_root`, its data set's folder (or npz file's folder) is that path, as
    where a container mounts it: the spec is checked against the data set where it is, not where the
    runner saw it."""
    try:
        raw = read_json(path)
        if data_root is not None and isinstance(raw, dict) and isinstance(raw.get("data"), dict):
            data = raw["data"]
            if "root" in data:
                data["root"] = data_root
            elif "path" in data:
                data["path"] = str(Path(data_root) / Path(str(data["path"])).name)
        return TaskSpec.model_validate(raw)
    except FileNotFoundError:
        raise StartError(f"{path}: no such task file") from None
    except ValueError as e:
        if not isinstance(e, ValidationError):  # not JSON at all
            raise StartError(f"{path}: not a valid task spec: not JSON ({e})") from None
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise StartError(f"{path}: not a valid task spec: {where}: {first['msg']} ({e.error_count()} errors)") from None


def run_task(task: TaskSpec, task_dir: Path, results: Path, log: EventLog) -> dict:
    """Train one task; its metrics.json content. Each kind is a small function in `kinds`; every
    labeled kind ends in the same scoring step (`kinds.score`)."""
    if task.kind == "noop":
        return {"noop": True}
    import torch

    from runner.data.dataset import prepare
    from runner.ml import train as T

    device = resolve_device(task.settings.run.device)
    encoder_path = _checked_paths(task, results)
    torch.manual_seed(task.seed)
    ctx = T.Context(device=device, run=task.settings.run, task_dir=task_dir, seed=task.seed, emit=log.emit)
    if task.kind == EVALUATE:
        return K.evaluate(task, results, ctx, log)
    ds = prepare(task.dataset, task.data, results / task.cache_dir)
    log.emit("log", message=f"{task.kind} on {task.dataset}: {len(ds.keys)} images, {ds.channels} channel(s), device {device}")
    started = time.perf_counter()
    if task.kind == "pretrain":
        return K.pretrain(task, ds, ctx, log) | {"seconds": round(time.perf_counter() - started, 2)}
    if task.budget is None:
        raise StartError(f"task {task.id} ({task.kind}) has no label budget")
    labels = K.Labels(task, ds, log)
    train = K.classifier if task.kind in CLASSIFIER_KINDS else K.probe
    val_probs, probs, selection, network = train(task, ds, labels, encoder_path, ctx)
    metrics, temperature = K.score(task, ds, labels, val_probs, probs, selection)
    K.save_model(task, ds, labels, metrics, temperature if labels.selecting else None, network, ctx)
    return metrics | {"seconds": round(time.perf_counter() - started, 2),
                      "artifacts": {"model.pt": file_sha(task_dir / "model.pt")}}


def _checked_paths(task: TaskSpec, results: Path) -> Path | None:
    """The task's encoder (None for a kind without one), once its paths are known to stay inside the
    results dir and the encoder a fine-tune or probe needs is there."""
    for what, rel in (("cache_dir", task.cache_dir), ("encoder", task.encoder)):
        if rel is not None and not K.inside(results / rel, results):
            raise StartError(f"task {task.id}: {what} {rel!r} points outside the results dir {results}: task.json was edited by hand")
    encoder_path = results / task.encoder if task.encoder else None
    if task.kind in ("finetune", "linear") and (encoder_path is None or not encoder_path.is_file()):
        raise StartError(f"task {task.id} ({task.kind}) needs the pretrained encoder {encoder_path}, which does not exist: "
                         "run its pretrain task first")
    return encoder_path


def _environment(task: TaskSpec) -> dict:
    import platform

    import torch

    from runner.ml.train import Context

    device = resolve_device(task.settings.run.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores, {_cpu_kernels()})"
    bf16 = Context(device, task.settings.run, Path("."), 0, lambda *a, **k: None).bf16
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "host": os.uname().nodename,
            "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads()}


def _cpu_kernels() -> str:
    """The vector instructions PyTorch's CPU kernels use ("AVX512", "AVX2"; oneDNN's cap when one is set):
    on a CPU, what makes two machines' numbers differ in their last bits, and then in their results."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return f"{cap} kernels" + (f", oneDNN capped at {onednn}" if onednn else "")


def _disk_full(e: BaseException) -> bool:
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


_STOPPED: list[int] = []  # the SIGTERM received, once one has come


def _on_sigterm(signum, frame):  # noqa: ANN001
    _STOPPED.append(signum)
    raise SystemExit(143)


def die_with_parent() -> None:
    """Under the local executor: get SIGTERM when the runner dies (even by SIGKILL), so no worker
    trains on unwatched; its last checkpoint is where the next run resumes."""
    parent = os.environ.get("BYOL_RUNNER_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(task_json: str, results: str | None = None, data_root: str | None = None) -> int:
    """Run the task of `task_json`; the worker's exit code (the module's docstring lists them)."""
    path = Path(task_json).resolve()
    task_dir = path.parent
    results_dir = Path(results).resolve() if results else task_dir.parent.parent
    log = EventLog(task_dir / "events.jsonl", task_dir.name)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        die_with_parent()
        task = load_task(path, data_root)  # data_root: the same task, its data mounted elsewhere (/data/<name>)
        log.task = task.id
        log.emit("log", message=f"worker pid {os.getpid()} on {os.uname().nodename}, engine {ENGINE_VERSION}")
        _finish(task, task_dir, run_task(task, task_dir, results_dir, log), log)
        return 0
    except StartError as e:
        log.emit("error", message=str(e), error_type="start")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if e.code == 143:
            log.emit("error", message="stopped by SIGTERM", error_type="interrupted")
            return 143
        raise
    except KeyboardInterrupt:
        log.emit("error", message="interrupted", error_type="interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - every failure must end as an error event and an exit code
        if _STOPPED:  # SIGTERM inside torch.save's C++ writer comes out as its RuntimeError: still a stop
            print(f"stopped by SIGTERM during a write ({type(e).__name__}: {e})", file=sys.stderr)
            log.emit("error", message="stopped by SIGTERM", error_type="interrupted")
            return 143
        text, kind = _failure(e, task_dir)
        log.emit("error", message=text, error_type=kind)
        traceback.print_exc()
        return 1
    finally:
        log.close()


def _finish(task: TaskSpec, task_dir: Path, result: dict, log: EventLog) -> None:
    """metrics.json, written last and atomically (its presence means done); the checkpoint has served."""
    from runner.atomic import atomic_write_json

    if task.kind != "noop":
        result["environment"] = _environment(task)  # for the report's provenance: where and with what it ran
    metrics = {"task": task.id, "kind": task.kind, "dataset": task.dataset, "seed": task.seed,
               "budget": task.budget.model_dump() if task.budget else None, "engine_version": ENGINE_VERSION, **result}
    atomic_write_json(metrics, task_dir / "metrics.json")
    (task_dir / "checkpoint.pt").unlink(missing_ok=True)
    log.emit("done", message="metrics.json written")


def _failure(e: Exception, task_dir: Path) -> tuple[str, str]:
    """A failed task's error message and type: CUDA out of memory, a full disk, bad data, or a bug."""
    text = f"{type(e).__name__}: {e}"
    if "CUDA out of memory" in str(e) or type(e).__name__ == "OutOfMemoryError":
        return f"CUDA out of memory: lower pretrain/finetune batch_size or image_size, or use a larger GPU ({text})", "cuda_oom"
    if _disk_full(e):
        from runner.errors import DISK_FULL, free_space

        return (f"{DISK_FULL} of {task_dir} ({free_space(str(task_dir))} free): free some space, then `byol-runner run` "
                f"resumes from the last checkpoint ({text})"), "disk_full"
    return text, "data" if isinstance(e, UserError) else "exception"
