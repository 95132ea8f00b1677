"""The queue table's rows: its columns (all of them on a wide terminal, the ones that matter on a
narrow one), a task's cells, the status and text filters and the sort orders. No textual here:
tested alone."""

from __future__ import annotations

from runner.console import duration, eta
from runner.store import TaskRow


def task_name(t) -> str:  # noqa: ANN001 - a TaskRow
    """A task as people tell tasks apart: method, label budget, seed (`byol-finetune 10% s0`), not its hash."""
    return " ".join(p for p in (t.dataset, t.method, t.budget or "", f"s{t.seed}") if p)


# short headers: the whole row fits 110 columns (time: elapsed, or what a finished attempt took; try: attempts)
COLUMNS = ("dataset", "method", "labels", "seed", "kind", "status", "slot", "epoch", "step", "loss", "img/s", "time", "ETA", "try")
# below WIDE_AT columns: the ones a person follows a run by (kind, slot, epoch, img/s and time are in the detail)
NARROW = ("dataset", "method", "labels", "seed", "status", "step", "loss", "ETA", "try")
WIDE_AT = 110
STATUS_STYLE = {"done": "green", "running": "bold cyan", "pending": "dim", "failed": "bold red", "blocked": "red",
                "interrupted": "yellow", "cancelled": "yellow"}
FILTERS = (None, "running", "failed", "pending", "done")
# what `s` cycles through: None is the plan's order (pretrainings before what needs them)
SORTS = (None, "status", "dataset", "method", "labels", "step", "loss", "time", "ETA")


def columns_for(width: int) -> tuple[str, ...]:
    return COLUMNS if width >= WIDE_AT else NARROW


def progress_times(t, now: float) -> tuple[str, str]:  # noqa: ANN001 - a TaskRow
    """(elapsed, ETA) of a task's latest attempt: running, its time so far and the rest at its pace
    (steps done over the time taken, once it has taken steps); ended, the time it took."""
    if not t.started:
        return "", ""
    if t.status == "running":
        spent = now - t.started
        return duration(spent), eta(spent, t.step, t.total)
    return (duration(t.ended - t.started), "") if t.ended else ("", "")


def shown_status(t: TaskRow) -> str:
    """A task's status as the queue shows it: one the user cancelled says so (runner.db keeps it
    failed, with the error "cancelled by the user")."""
    return "cancelled" if t.status == "failed" and (t.error or "").startswith("cancelled by the user") else t.status


def task_cells(t: TaskRow, now: float) -> tuple:
    """Every column's cell (COLUMNS' order)."""
    took, left = progress_times(t, now)
    step = "" if t.step is None else (f"{t.step}/{t.total}" if t.total else str(t.step))
    status = shown_status(t)
    return (t.dataset, t.method, t.budget or "", str(t.seed), t.kind, f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]",
            t.slot or "", "" if t.epoch is None else str(t.epoch), step,
            "" if t.loss is None else f"{t.loss:.4f}", "" if not t.img_per_s else f"{t.img_per_s:.0f}", took, left, str(t.attempts))


def matches(t: TaskRow, text: str) -> bool:
    """The `/` filter: every word of the text is in the task's name, kind, status or id (any case)."""
    hay = f"{task_name(t)} {t.kind} {shown_status(t)} {t.id}".lower()
    return all(w in hay for w in text.lower().split())


def _budget(b: str | None) -> float:
    try:
        return float((b or "").rstrip("%"))
    except ValueError:
        return -1.0


def sort_key(column: str, now: float):  # noqa: ANN201 - a key function
    """How a column orders tasks: numbers as numbers, statuses as the summary lists them, blanks last."""
    from runner.tui.state import STATUS_ORDER

    def key(t: TaskRow) -> tuple:
        if column == "status":
            return (STATUS_ORDER.index(t.status) if t.status in STATUS_ORDER else 99,)
        if column == "labels":
            return (_budget(t.budget),)
        if column == "step":
            return (t.step is None, t.step or 0)
        if column == "loss":
            return (t.loss is None, t.loss or 0.0)
        if column in ("time", "ETA"):
            spent = (now - t.started if t.status == "running" else (t.ended or 0) - t.started) if t.started else None
            if column == "ETA":
                spent = spent * (t.total - t.step) / t.step if spent and t.total and t.step and t.total > t.step else None
            return (spent is None, spent or 0.0)
        return (str(getattr(t, column, "") or ""),)

    return key


def shown_tasks(tasks: list[TaskRow], status: str | None, text: str, sort: str | None, descending: bool,
                now: float) -> list[TaskRow]:
    """The rows the queue shows: the status filter, then the text filter, in the plan's order or sorted
    (a stable sort: ties keep the plan's order)."""
    rows = [t for t in tasks if (status is None or t.status == status) and (not text or matches(t, text))]
    return sorted(rows, key=sort_key(sort, now), reverse=descending) if sort else rows
