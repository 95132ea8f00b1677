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
from textual.containers import ScrollableContainer
from textual.widgets import DataTable, Footer, Header, Input, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from runner.commands import request
from runner.console import rich_markdown
from runner.store import TaskRow
from runner.tui.queue import COLUMNS, FILTERS, SORTS, columns_for, shown_tasks, task_cells, task_name
from runner.tui.panes import draw_curves, results_markdown
from runner.tui.screens import Confirm, Help
from runner.tui.state import STATUS_ORDER, Snapshot, curve, detail, read_snapshot

class RunnerApp(App):
    TITLE = "byol-runner"
    CSS = """
    #summary { height: 1; padding: 0 1; background: $panel; }
    #curves { height: 1fr; }
    #results-scroll #table { width: auto; height: auto; }
    #dialog { width: 72; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    #dialog Horizontal { height: auto; }
    #dialog Static { width: 100%; }
    Confirm, Help { align: center middle; }
    #help { width: 96; max-width: 100%; height: auto; border: thick $accent; background: $surface; padding: 1 2; }
    Button { margin: 1 1 0 0; }
    #find { dock: bottom; display: none; }
    #find.shown { display: block; }
    """
    # the footer shows these in this order, as many as fit (at 80 columns through "sort", at 160 all);
    # `?` lists every key (runner/tui/screens.py KEYS)
    BINDINGS = [
        Binding("q", "quit_app", "quit"),
        Binding("question_mark", "help", "keys"),
        Binding("1", "pane('queue')", "queue"),
        Binding("2", "pane('curves')", "curves"),
        Binding("3", "pane('results')", "results"),
        Binding("4", "pane('detail')", "detail"),
        Binding("slash", "find", "find"),
        Binding("f", "cycle_filter", "filter"),
        Binding("s", "cycle_sort", "sort"),
        Binding("S", "reverse_sort", "reverse"),
        Binding("l", "show_log", "log"),
        Binding("r", "retry", "retry"),
        Binding("c", "cancel", "cancel"),
        Binding("o", "toggle_overlay", "overlay"),
        Binding("e", "toggle_extended", "every arm"),
        Binding("j", "move(1)", "down", show=False),
        Binding("k", "move(-1)", "up", show=False),
        Binding("escape", "escape", "close", show=False),
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
        self.find = ""  # the `/` text filter
        self.finding = False  # `/` was pressed: the find box, not the table, takes the keys
        self.sort: str | None = None  # a column, or None: the plan's order
        self.descending = False
        self.columns: tuple[str, ...] = COLUMNS
        self.results_markdown = ""  # what the Results tab shows, as the README would have it
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
                yield Input(placeholder="find: words of a task's name, kind, status or id; enter keeps it, Esc clears it",
                            id="find")
            with TabPane("Curves", id="curves-pane"):
                yield PlotextPlot(id="curves")
            with TabPane("Results", id="results"):
                with ScrollableContainer(id="results-scroll"):  # both ways: a wide table scrolls sideways, not cut
                    yield Static("no results yet", id="table")
            with TabPane("Detail", id="detail"):
                yield Static("select a task in the queue", id="detail-text")
        yield Footer(compact=True, show_command_palette=False)  # ctrl+p still opens it; its place holds a key at 80 columns

    def on_mount(self) -> None:
        self.set_columns(columns_for(self.size.width))
        self.query_one("#tasks", DataTable).focus()
        if self.start_run:
            self.launch(["run", str(self.manifest)])
        self.poll()
        self.set_interval(self.poll_s, self.poll)

    def set_columns(self, columns: tuple[str, ...]) -> None:
        """(Re)build the queue's columns: those the width allows, the sorted one marked ▲ or ▼."""
        table = self.query_one("#tasks", DataTable)
        table.clear(columns=True)
        self.rows.clear()
        self.columns = columns
        for col in columns:
            table.add_column(f"{col} {'▼' if self.descending else '▲'}" if col == self.sort else col, key=col)

    def on_resize(self, event) -> None:  # noqa: ANN001 - a Resize event
        columns = columns_for(event.size.width)
        if columns != self.columns:  # 80x24 shows the columns a run is followed by; a wide terminal all of them
            self.set_columns(columns)
            self.update_table(self.snapshot)

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
            + (f" · filter: {self.filter}" if self.filter else "") + (f" · find: {self.find}" if self.find else "")
            + (f" · sort: {self.sort} {'▼' if self.descending else '▲'}" if self.sort else ""))
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
        visible = shown_tasks(snap.tasks, self.filter, self.find, self.sort, self.descending, now)
        ids = [t.id for t in visible]
        rebuild = ids != [k for k in self.rows if k in set(ids)] or bool(set(self.rows) - set(ids))
        # the rows shown change (a filter, a sort, a task finishing under one): rebuilt in that order
        # a selected task still shown keeps the cursor; one a filter hides gives way to the row the cursor lands on
        quiet = rebuild and self.selected in set(ids)
        index = [COLUMNS.index(c) for c in self.columns]
        with table.prevent(DataTable.RowHighlighted) if quiet else contextlib.nullcontext():
            if rebuild:
                table.clear()
                self.rows.clear()
            for t in visible:
                full = task_cells(t, now)
                cells = tuple(full[i] for i in index)
                old = self.rows.get(t.id)
                if old is None:
                    table.add_row(*cells, key=t.id)
                else:
                    for col, a, b in zip(self.columns, old, cells):
                        if a != b:
                            table.update_cell(t.id, col, b, update_width=True)  # "15/40", "2.4612": never cut to the header's width
                self.rows[t.id] = cells
            if rebuild and self.selected in self.rows:
                table.move_cursor(row=table.get_row_index(self.selected))
        if not visible:  # nothing shown: r, c and l act on no hidden task
            self.selected = None

    def update_curves(self, series: dict, overlay: dict) -> None:
        plot = self.query_one("#curves", PlotextPlot)
        draw_curves(plot.plt, series, overlay, self.names, self.selected, self.overlay)
        plot.refresh()

    def update_results(self, snap: Snapshot) -> None:
        key = (snap.done, self.extended)
        if key == self.report_key:
            return  # metrics.json files change only when a task finishes
        self.report_key = key
        self.results_markdown = results_markdown(self.results, snap, self.extended)
        # tables as wide as their content (the pane scrolls sideways to them), prose wrapped to the screen
        from rich.measure import Measurement

        shown = rich_markdown(self.results_markdown, wrap=max(40, self.size.width - 4))
        table = self.query_one("#table", Static)
        table.styles.width = Measurement.get(self.console, self.console.options.update(width=10_000), shown).maximum
        table.update(shown)

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
        """A click on a header sorts by it (▲); a second click reverses (▼)."""
        column = event.column_key.value
        self.descending = not self.descending if column == self.sort else False
        self.resort(column)

    def resort(self, column: str | None) -> None:
        self.sort = column
        self.set_columns(self.columns)
        self.update_table(self.snapshot)
        self.poll()

    def action_cycle_sort(self) -> None:
        sorts = [c for c in SORTS if c is None or c in self.columns]
        self.descending = False
        self.resort(sorts[(sorts.index(self.sort) + 1) % len(sorts)] if self.sort in sorts else sorts[1])

    def action_reverse_sort(self) -> None:
        if self.sort is None:
            self.notify("sorted in the plan's order: `s` picks a column first", severity="warning")
            return
        self.descending = not self.descending
        self.resort(self.sort)

    def action_help(self) -> None:
        self.push_screen(Help())

    def action_find(self) -> None:
        box = self.query_one("#find", Input)
        box.add_class("shown")
        self.finding = True  # the tab switch below must not hand the keys back to the table
        self.action_pane("queue")
        box.focus()

    @on(Input.Changed, "#find")
    def find_changed(self, event: Input.Changed) -> None:
        self.find = event.value.strip()
        self.update_table(self.snapshot)
        self.poll()

    @on(Input.Submitted, "#find")
    def find_kept(self) -> None:
        self.query_one("#tasks", DataTable).focus()
        if not self.find:
            self.query_one("#find", Input).remove_class("shown")

    def action_escape(self) -> None:
        """Esc closes what is open: the key panel, then the find box (clearing it)."""
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
            return
        box = self.query_one("#find", Input)
        if box.has_class("shown"):
            box.value = ""
            box.remove_class("shown")
            self.query_one("#tasks", DataTable).focus()

    def action_move(self, delta: int) -> None:
        """j / k: down and up the queue (and scroll the results)."""
        pane = self.query_one(TabbedContent).active
        if pane == "queue":
            table = self.query_one("#tasks", DataTable)
            table.action_cursor_down() if delta > 0 else table.action_cursor_up()
        elif pane == "results":
            self.query_one("#results-scroll", ScrollableContainer).scroll_relative(y=delta * 3)

    @on(TabbedContent.TabActivated)
    def tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "queue":  # the keys act on the table at once (or the find box `/` opened), no Tab needed
            self.query_one("#find" if self.finding else "#tasks").focus()
        elif event.pane.id == "results":  # the arrows, Home/End and PgUp/PgDn scroll the tables at once (sideways too)
            self.query_one("#results-scroll", ScrollableContainer).focus(scroll_visible=False)
        self.finding = False

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
        if pane == "queue" and not self.finding:
            self.query_one("#tasks", DataTable).focus()

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
