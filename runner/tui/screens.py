"""The TUI's modal screens: the yes/no question before anything that stops work, and the key help."""

from __future__ import annotations

from rich.table import Table
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

# (keys, what they do), the help screen's order; the app's bindings are these
KEYS = (
    ("1 2 3 4", "queue, curves, results, detail"),
    ("↑ ↓ / j k", "move in the queue (PgUp/PgDn, Home/End too)"),
    ("enter", "the selected task's curves"),
    ("l", "the selected task's detail: its data and budget in words, attempts, log and error lines"),
    ("/", "find: show the tasks whose name, kind, status or id hold the words typed (Esc clears)"),
    ("f", "filter by status: running, failed, pending, done, all"),
    ("s  S", "sort by the next column (▲ ascending); S reverses (▼); the plan's order after the last; a click on a "
             "header sorts by it, a second click reverses"),
    ("o", "curves: overlay the other tasks of the same kind and data set"),
    ("e", "results: the AUROC and balanced accuracy of every arm"),
    ("r", "retry the selected failed, blocked or interrupted task"),
    ("c", "cancel the selected running task (asks first)"),
    ("?", "this help (Esc, ? or q closes it)"),
    ("q", "quit (asks first when this TUI started the run: stopping it stops its workers)"),
)


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


class Help(ModalScreen[None]):
    """`?`: every key and what it does, as htop's and k9s's help screens list them."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "close")]

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for keys, what in KEYS:
            table.add_row(keys, what)
        with Vertical(id="help"):
            yield Static("[b]Keys[/b]   (Esc closes)\n")
            yield Static(table)

    def action_close(self) -> None:
        self.dismiss(None)
