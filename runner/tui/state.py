"""What the TUI shows, read from runner.db and the task folders, without textual (testable alone).

The TUI never writes runner.db: it reads a snapshot at a steady rate (from a worker thread), and its
actions go to the scheduler as control files (`runner.commands.request`), or start a scheduler.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner.contracts import read_events
from runner.system import pid_alive
from runner.store import Store, TaskRow

STATUS_ORDER = ("running", "failed", "blocked", "interrupted", "pending", "done")


@dataclass
class Snapshot:
    run: dict | None
    tasks: list[TaskRow] = field(default_factory=list)
    scheduler_alive: bool = False
    read_ms: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tasks:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    @property
    def done(self) -> int:
        return sum(1 for t in self.tasks if t.status == "done")


CREATING_S = 30.0  # a runner.db without tables this young is one a run started a moment ago is creating


def _open(db: Path) -> Store | None:
    """The store read-only, or None when there is none yet: no file, or a file the run just started
    (from this TUI, say) has created and not yet given its tables (reading it then failed the TUI's
    refresh with "damaged"). An older file without tables is damaged, and said so."""
    from runner.store import StoreDamaged

    if not db.is_file():
        return None
    try:
        return Store(db, readonly=True)
    except StoreDamaged:
        try:
            young = time.time() - db.stat().st_mtime < CREATING_S
        except OSError:
            return None
        if young:
            return None
        raise


def read_snapshot(results: Path, run_name: str | None = None) -> Snapshot:
    t0 = time.perf_counter()
    db = results / "runner.db"
    store = _open(db)
    if store is None:
        return Snapshot(None)
    try:
        run = store.latest_run(run_name)
        if run is None:
            return Snapshot(None)
        tasks = store.run_tasks(run["id"])
        from runner.report import arch_of, compare_of

        info = {k: run[k] for k in ("id", "name", "status", "pid", "started", "ended", "manifest_path", "executor")}
        info["arch"] = arch_of(run["manifest"])
        info["compare"] = compare_of(run["manifest"])
        alive = run["status"] == "running" and pid_alive(run["pid"])
        started = store.latest_attempts(run["id"])
    finally:
        store.close()
    for t in tasks:
        a = started.get(t.id)
        t.slot, t.started, t.ended = (a["slot"], a["started"], a["ended"]) if a else (None, None, None)
    return Snapshot(info, tasks, alive, (time.perf_counter() - t0) * 1000)


def curve(results: Path, task_id: str) -> dict[str, list[tuple[float, float]]]:
    """The series of one task's points: loss per step, validation loss, tau, the collapse monitor and
    the pretraining monitor (kNN AUROC, and the untrained network's)."""
    db = results / "runner.db"
    store = _open(db)
    if store is None:
        return {}
    try:
        rows = store.points(task_id)
    finally:
        store.close()
    series: dict[str, list[tuple[float, float]]] = {"loss": [], "val_loss": [], "tau": [], "proj_std": [], "knn_auroc": [],
                                                    "knn_base_auroc": []}
    for r in rows:
        if r["step"] is None:
            continue
        if r["kind"] == "progress" and r["loss"] is not None:
            series["loss"].append((r["step"], r["loss"]))
        if r["kind"] == "metric" and r["loss"] is not None and r["val_loss"] is not None:
            series["loss"].append((r["step"], r["loss"]))
        if r["val_loss"] is not None:
            series["val_loss"].append((r["step"], r["val_loss"]))
        if r["tau"] is not None:
            series["tau"].append((r["step"], r["tau"]))
        if r["proj_std"] is not None and r["kind"] == "progress":
            series["proj_std"].append((r["step"], r["proj_std"]))
        for k in ("knn_auroc", "knn_base_auroc"):
            if r[k] is not None:
                series[k].append((r["step"], r[k]))
    return {k: v for k, v in series.items() if v}


def detail(results: Path, task: TaskRow, log_lines: int = 40) -> str:
    """The selected task in words: what it is, its attempts (with their errors), its data and model,
    the log and error lines of its events.jsonl (where a worker says what it does), and the tail of
    worker.log when the worker printed anything there (a traceback)."""
    folder = results / "tasks" / task.id
    name = " ".join(p for p in (task.dataset, task.method, task.budget or "", f"seed {task.seed}") if p)
    parts = [f"{name}  [{task.status}]   task {task.id}, kind {task.kind}"]
    if task.error:
        parts.append(f"error: {task.error}")
    db = results / "runner.db"
    if db.is_file():
        store = Store(db, readonly=True)
        try:
            for a in store.attempts(task.id):
                took = f"{a['ended'] - a['started']:.1f} s" if a["ended"] else "running"
                ended = f", exit {a['exit_code']}" if a["exit_code"] is not None else ""
                parts.append(f"attempt {a['number']}: {a['status']} on {a['slot']} ({a['executor']}, {took}{ended})"
                             + (f": {a['error']}" if a["error"] else ""))
        finally:
            store.close()
    try:
        spec = json.loads((folder / "task.json").read_text())
        parts += _spec_lines(spec)
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    events = [e for e in read_events(folder / "events.jsonl")[0] if e.get("kind") in ("log", "error") and e.get("message")]
    parts.append(f"--- events: log and error lines ({len(events[-log_lines:])} of {len(events)}) ---" if events
                 else "(no events yet)")
    for e in events[-log_lines:]:
        when = time.strftime("%H:%M:%S", time.localtime(e["ts"])) if isinstance(e.get("ts"), (int, float)) else "--:--:--"
        parts.append(f"{when} {'ERROR ' if e['kind'] == 'error' else ''}{e['message']}")
    try:
        from runner.atomic import open_regular

        with open_regular(folder / "worker.log") as f:  # a FIFO there would freeze the TUI
            f.seek(max(0, os.fstat(f.fileno()).st_size - (64 << 10)))
            tail = f.read().decode(errors="replace").splitlines()[-log_lines:]
    except (OSError, ValueError):
        tail = []
    if any(line.strip() for line in tail):
        parts.append("--- worker.log (tail) ---")
        parts += tail
    return "\n".join(parts)


def _spec_lines(spec: dict) -> list[str]:
    """task.json for a person: the data as the network sees it, the budget, what it depends on."""
    data, model = spec.get("data") or {}, (spec.get("settings") or {}).get("model") or {}
    size = data.get("image_size")
    net = model.get("image_size") or size
    budget = spec.get("budget") or {}
    amount = (f"{budget['fraction']:.0%} of each class's labels" if budget.get("fraction") is not None
              else f"{budget['per_class']} labels per class" if budget.get("per_class") is not None else "no labels (pretraining)")
    lines = [f"data: {spec.get('dataset')} ({data.get('source')}), images at {size} px"
             + (f", network input {net} px" if net != size else "") + f"; {amount}"
             + (" (the budget of the classifier it scores)" if spec.get("kind") == "evaluate" else "") + f"; seed {spec.get('seed')}",
             f"model: {model.get('arch', '?')}" + (f"; pretraining {spec['pretraining']}" if spec.get("pretraining") else "")]
    if spec.get("encoder"):
        lines.append(f"reads: {spec['encoder']} (its pretraining's encoder)")
    if spec.get("model"):
        lines.append(f"scores: {spec['model']} (the classifier it evaluates on this external test set)")
    return lines
