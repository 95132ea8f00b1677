"""The queue table's rows: its columns (all of them on a wide terminal, the ones that matter on a
narrow one), a task's cells, the status and text filters and the sort orders. No textual here:
tested alone."""

from __future__ import annotations

from runner.console import duration, eta, eta_seconds
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


# a column's value on a task: the attribute it shows (numbers compared as numbers)
FIELDS = {"dataset": "dataset", "method": "method", "seed": "seed", "kind": "kind", "slot": "slot", "epoch": "epoch",
          "step": "step", "loss": "loss", "img/s": "img_per_s", "try": "attempts"}


def sort_value(t: TaskRow, column: str, now: float):  # noqa: ANN201 - a comparable, or None for a blank cell
    """What a column sorts a task by: the number or name its cell shows, statuses in the summary's
    order, budgets from the smallest; None where the cell is blank (those rows go last, either way)."""
    from runner.report import budget_order
    from runner.tui.state import STATUS_ORDER

    if column == "status":
        return STATUS_ORDER.index(t.status) if t.status in STATUS_ORDER else len(STATUS_ORDER)
    if column == "labels":
        return budget_order(t.budget) if t.budget else None
    if column in ("time", "ETA"):
        if not t.started or (t.status != "running" and not t.ended):
            return None
        spent = (now if t.status == "running" else t.ended) - t.started
        if column == "time":
            return spent
        return eta_seconds(spent, t.step, t.total) if t.status == "running" else None
    value = getattr(t, FIELDS.get(column, column), None)
    return None if value in (None, "") else value


def shown_tasks(tasks: list[TaskRow], status: str | None, text: str, sort: str | None, descending: bool,
                now: float) -> list[TaskRow]:
    """The rows the queue shows: the status filter, then the text filter, in the plan's order or sorted
    by a column (a stable sort: ties keep the plan's order; blank cells last, ascending or not)."""
    rows = [t for t in tasks if (status is None or t.status == status) and (not text or matches(t, text))]
    if not sort:
        return rows
    values = {t.id: sort_value(t, sort, now) for t in rows}
    blank = [t for t in rows if values[t.id] is None]
    return sorted((t for t in rows if values[t.id] is not None), key=lambda t: values[t.id], reverse=descending) + blank
