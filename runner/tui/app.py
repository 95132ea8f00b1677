"""`byol-runner tui [MANIFEST]`: the queue, live loss curves, the results table and a task's detail.

With a manifest it starts that run (a headless `byol-runner run` in its own process) and shows it;
quitting asks before stopping it. Without one it attaches to the latest run of the results dir,
running or finished; quitting leaves the run alone. A worker thread reads the store every
`poll_s` seconds; the table is updated in place by row key, and only the rows that changed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Markdown, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from runner.commands import request
from runner.store import TaskRow
from runner.console import duration
from runner.tui.state import STATUS_ORDER, Snapshot, curve, detail, read_snapshot

def task_name(t) -> str:  # noqa: ANN001 - a TaskRow
    """A task as people tell tasks apart: method, label budget, seed (`byol-finetune 10% s0`), not its hash."""
    return " ".join(p for p in (t.dataset, t.method, t.budget or "", f"s{t.seed}") if p)


# short headers: the whole row fits 110 columns (time: elapsed, or what a finished attempt took; try: attempts)
COLUMNS = ("dataset", "method", "labels", "seed", "kind", "status", "slot", "epoch", "step", "loss", "img/s", "time", "ETA", "try")
STATUS_STYLE = {"done": "green", "running": "bold cyan", "pending": "dim", "failed": "bold red", "blocked": "red",
                "interrupted": "yellow"}
FILTERS = (None, "running", "failed", "pending", "done")


def progress_times(t, now: float) -> tuple[str, str]:  # noqa: ANN001 - a TaskRow
    """(elapsed, ETA) of a task's latest attempt: running, its time so far and the rest at its pace
    (steps done over the time taken, once it has taken steps); ended, the time it took."""
    if not t.started:
        return "", ""
    if t.status == "running":
        spent = now - t.started
        eta = duration(spent * (t.total - t.step) / t.step) if t.total and t.step and t.total > t.step else ""
        return duration(spent), eta
    return (duration(t.ended - t.started), "") if t.ended else ("", "")


def shown_status(t: TaskRow) -> str:
    """A task's status as the queue shows it: one the user cancelled says so (runner.db keeps it
    failed, with the error "cancelled by the user")."""
    return "cancelled" if t.status == "failed" and (t.error or "").startswith("cancelled by the user") else t.status


def task_cells(t: TaskRow, now: float) -> tuple:
    took, eta = progress_times(t, now)
    step = "" if t.step is None else (f"{t.step}/{t.total}" if t.total else str(t.step))
    return (t.dataset, t.method, t.budget or "", str(t.seed), t.kind,
            f"[{STATUS_STYLE.get(t.status, 'white')}]{shown_status(t)}[/]", t.slot or "",
            "" if t.epoch is None else str(t.epoch), step,
            "" if t.loss is None else f"{t.loss:.4f}", "" if not t.img_per_s else f"{t.img_per_s:.0f}", took, eta, str(t.attempts))


class Confirm(ModalScreen[bool]):
    """A yes/no question before anything that stops work: y or the red button says yes; n, Esc or
    the other button says no."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str, yes: str, no: str) -> None:
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question)
            with Horizontal():
                yield Button(f"{self.yes} (y)", id="yes", variant="error")
                yield Button(f"{self.no} (n)", id="no", variant="primary")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class RunnerApp(App):
    TITLE = "byol-runner"
    CSS = """
    #summary { height: 1; padding: 0 1; background: $panel; }
    #curves { height: 1fr; }
    #dialog { width: 72; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    #dialog Horizontal { height: auto; }
    #dialog Static { width: 100%; }
    Confirm { align: center middle; }
    Button { margin: 1 1 0 0; }
    """
    BINDINGS = [
        Binding("q", "quit_app", "quit"),
        Binding("r", "retry", "retry failed"),
        Binding("c", "cancel", "cancel running"),
        Binding("l", "show_log", "log"),
        Binding("f", "cycle_filter", "filter"),
        Binding("o", "toggle_overlay", "overlay"),
        Binding("e", "toggle_extended", "AUROC/BA"),
        Binding("1", "pane('queue')", "queue", show=False),
        Binding("2", "pane('curves')", "curves", show=False),
        Binding("3", "pane('results')", "results", show=False),
        Binding("4", "pane('detail')", "detail", show=False),
    ]

    def __init__(self, results: Path, manifest: Path | None = None, run_name: str | None = None, poll_s: float = 0.5,
                 start_run: bool = True) -> None:
        super().__init__()
        self.results, self.manifest, self.run_name, self.poll_s = Path(results), manifest, run_name, poll_s
        self.start_run = start_run and manifest is not None
        self.proc: subprocess.Popen | None = None
        self.run_error: str | None = None  # why the run this app started could not go on
        self.snapshot = Snapshot(None)
        self.rows: dict[str, tuple] = {}
        self.filter: str | None = None
        self.overlay = False
        self.extended = False
        self.selected: str | None = None
        self.names: dict[str, str] = {}  # task id -> its name as the queue shows it, for legends and toasts
        self.report_key: tuple | None = None

    # ---- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("waiting for a run ...", id="summary")
        with TabbedContent(initial="queue"):
            with TabPane("Queue", id="queue"):
                yield DataTable(id="tasks", cursor_type="row", zebra_stripes=True)
            with TabPane("Curves", id="curves-pane"):
                yield PlotextPlot(id="curves")
            with TabPane("Results", id="results"):
                yield Markdown("no results yet", id="table")
            with TabPane("Detail", id="detail"):
                yield Static("select a task in the queue", id="detail-text")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#tasks", DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        table.focus()
        if self.start_run:
            self.launch(["run", str(self.manifest)])
        self.poll()
        self.set_interval(self.poll_s, self.poll)

    # ---- the run process ------------------------------------------------------------------

    def launch(self, args: list[str]) -> None:
        """A headless `byol-runner run` (the scheduler: runner.db's only writer) in its own process."""
        self.results.mkdir(parents=True, exist_ok=True)
        with open(self.results / "tui-run.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "runner.cli", *args, "--results", str(self.results)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    # ---- polling -------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        snap = read_snapshot(self.results, self.run_name)
        series = curve(self.results, self.selected) if self.selected else {}
        overlay = {}
        if self.overlay and self.selected:
            sel = next((t for t in snap.tasks if t.id == self.selected), None)
            if sel is not None:
                overlay = {t.id: curve(self.results, t.id) for t in snap.tasks
                           if t.kind == sel.kind and t.dataset == sel.dataset and t.id != sel.id}
        self.call_from_thread(self.apply, snap, series, overlay)

    def launched_run_error(self) -> str | None:
        """The error a run this app started exited with (no daemon, no image, a bad manifest: exit 2 or
        a crash), from its last `error:` lines in tui-run.log; None while it runs or if it ended normally
        (0 done, 1 some tasks failed, 130 stopped)."""
        code = self.proc.poll() if self.proc is not None else None
        if code in (None, 0, 1, 130):
            return None
        log = self.results / "tui-run.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        return errors[-1] if errors else f"the run exited with code {code}: see {log}"

    def apply(self, snap: Snapshot, series: dict, overlay: dict) -> None:
        if self._exit or not self.screen.query("#summary"):  # a read that ends while the app quits: nothing to draw on
            return
        self.snapshot = snap
        if self.run_error is None:
            self.run_error = self.launched_run_error()
            if self.run_error is not None:
                self.notify(self.run_error, title="the run stopped", severity="error", timeout=30)
        if snap.run is None:
            if self.run_error is not None:
                self.query_one("#summary", Static).update(Text(f"the run could not start: {self.run_error}", style="bold red"))
            return
        c = snap.counts
        state = "running" if snap.scheduler_alive else snap.run["status"]
        self.query_one("#summary", Static).update(
            f"[b]{snap.run['name']}[/] ({state}) · {snap.done}/{len(snap.tasks)} done · "
            + " · ".join(f"{c[s]} {s}" for s in STATUS_ORDER if c.get(s) and s != "done")
            + (f" · filter: {self.filter}" if self.filter else ""))
        self.names = {t.id: task_name(t) for t in snap.tasks}
        self.update_table(snap)
        self.update_curves(series, overlay)
        self.update_results(snap)
        if self.selected and self.query_one(TabbedContent).active == "detail":
            task = next((t for t in snap.tasks if t.id == self.selected), None)
            if task:
                self.query_one("#detail-text", Static).update(Text(detail(self.results, task)))  # plain: "[failed]" is not markup

    def update_table(self, snap: Snapshot) -> None:
        table = self.query_one("#tasks", DataTable)
        now = time.time()
        visible = [t for t in snap.tasks if self.filter is None or t.status == self.filter]
        ids = [t.id for t in visible]
        rebuild = ids != [k for k in self.rows if k in set(ids)] or bool(set(self.rows) - set(ids))
        # the rows shown change (a filter, a task finishing under one): rebuilt in plan order
        # a selected task still shown keeps the cursor; one a filter hides gives way to the row the cursor lands on
        quiet = rebuild and self.selected in set(ids)
        with table.prevent(DataTable.RowHighlighted) if quiet else contextlib.nullcontext():
            if rebuild:
                table.clear()
                self.rows.clear()
            for t in visible:
                cells = task_cells(t, now)
                old = self.rows.get(t.id)
                if old is None:
                    table.add_row(*cells, key=t.id)
                else:
                    for col, a, b in zip(COLUMNS, old, cells):
                        if a != b:
                            table.update_cell(t.id, col, b, update_width=True)  # "15/40", "2.4612": never cut to the header's width
                self.rows[t.id] = cells
            if rebuild and self.selected in self.rows:
                table.move_cursor(row=table.get_row_index(self.selected))

    def update_curves(self, series: dict, overlay: dict) -> None:
        plot = self.query_one("#curves", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        if not series:
            plt.title("select a task in the queue (enter) to see its curves")
            plot.refresh()
            return
        for name in ("loss", "val_loss"):
            if name in series:
                xs, ys = zip(*series[name])
                plt.plot(list(xs), list(ys), label=f"{name} ({self.names.get(self.selected, self.selected)})")
        for tid, other in overlay.items():
            if "loss" in other:
                xs, ys = zip(*other["loss"])
                plt.plot(list(xs), list(ys), label=f"loss ({self.names.get(tid, tid)})")
        if "proj_std" in series:  # alone on the right axis: its own scale, so a fall towards 0 (collapse) shows
            xs, ys = zip(*series["proj_std"])
            plt.plot(list(xs), list(ys), label="proj std, right axis (collapse monitor: near 0 = collapsed)", yside="right")
        # τ follows a fixed schedule from tau_base to 1: its current value, not a flat line on a shared axis
        tau = f" · τ {series['tau'][-1][1]:.4f}" if "tau" in series else ""
        plt.xlabel("step")
        plt.title("loss by optimizer step (x axis)" + tau + (" · overlay: same kind and dataset" if self.overlay else ""))
        plot.refresh()

    def update_results(self, snap: Snapshot) -> None:
        key = (snap.done, self.extended)
        if key == self.report_key:
            return  # metrics.json files change only when a task finishes
        self.report_key = key
        from runner import report as R

        rep = R.build(self.results, snap.run["name"], snap.tasks, snap.run.get("arch", "ResNet50"), figures=False, bootstrap=0,
                      compare=snap.run.get("compare", (None, None)))
        text = R.to_markdown(rep)
        if self.extended:
            lines = ["| Dataset | Labels | Method | Seeds | Accuracy | AUROC | Balanced accuracy |", "|---|---|---|---|---|---|---|"]
            for a in rep["arms"]:
                f = lambda s: "—" if s["mean"] is None else f"{s['mean']:.3f}"  # noqa: E731
                lines.append(f"| {a['dataset']} | {a['labels']} | {a['method']} | {a['accuracy']['n']} | {f(a['accuracy'])} | "
                             f"{f(a['auroc'])} | {f(a['balanced_accuracy'])} |")
            text += "\n" + "\n".join(lines) + "\n"
        self.query_one("#table", Markdown).update(text)

    # ---- actions -------------------------------------------------------------------------

    @on(DataTable.RowHighlighted)
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value if event.row_key else None

    @on(DataTable.RowSelected)
    def row_selected(self, event: DataTable.RowSelected) -> None:
        self.selected = event.row_key.value
        self.action_pane("curves-pane")
        self.poll()

    @on(DataTable.HeaderSelected)
    def sort_by(self, event: DataTable.HeaderSelected) -> None:
        event.data_table.sort(event.column_key)

    def _selected_task(self) -> TaskRow | None:
        return next((t for t in self.snapshot.tasks if t.id == self.selected), None)

    def action_retry(self) -> None:
        t = self._selected_task()
        if t is None or t.status not in ("failed", "blocked", "interrupted"):
            self.notify("select a failed task to retry", severity="warning")
            return
        if self.snapshot.scheduler_alive:
            request(self.results, "retry", t.id)
        else:  # no scheduler: start one that retries this task
            manifest = self.snapshot.run.get("manifest_path") if self.snapshot.run else None
            if not manifest or not Path(manifest).is_file():
                self.notify(f"the run's manifest ({manifest}) is gone: cannot retry", severity="error")
                return
            self.launch(["run", manifest, "--retry", t.id])
        self.notify(f"retrying {task_name(t)}")

    def action_cancel(self) -> None:
        t = self._selected_task()
        if t is None or t.status != "running" or not self.snapshot.scheduler_alive:
            self.notify("select a running task to cancel", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                request(self.results, "cancel", t.id)
                self.notify(f"cancelling {task_name(t)}")

        self.push_screen(Confirm(f"Cancel {task_name(t)}? Its worker stops now and the task is marked cancelled (failed "
                                 "for the run); `r` or `byol-runner run --retry-failed` runs it again from the start.",
                                 "Cancel the task", "Keep it running"), answered)

    def action_show_log(self) -> None:
        self.action_pane("detail")
        self.poll()

    def action_pane(self, pane: str) -> None:
        self.query_one(TabbedContent).active = "curves-pane" if pane == "curves" else pane

    def action_cycle_filter(self) -> None:
        self.filter = FILTERS[(FILTERS.index(self.filter) + 1) % len(FILTERS)]
        self.poll()

    def action_toggle_overlay(self) -> None:
        self.overlay = not self.overlay
        self.poll()

    def action_toggle_extended(self) -> None:
        self.extended = not self.extended
        self.action_pane("results")
        self.poll()

    def action_quit_app(self) -> None:
        running = self.proc is not None and self.proc.poll() is None and self.start_run
        if not running:
            self.exit(0)
            return

        def answered(stop: bool | None) -> None:
            if stop:
                os.killpg(self.proc.pid, signal.SIGINT)  # the runner stops its workers and marks them interrupted
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.exit(0)

        self.push_screen(Confirm("This TUI started the run. Stop it and quit? Its workers stop and keep their last "
                                 "checkpoint; the next `byol-runner run` of the manifest resumes it.",
                                 "Stop and quit", "Keep running"), answered)
