"""Snapshots of the TUI's main screens at a fixed size, on a fixed, hand-made run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.plan import PlannedTask
from runner.store import Store
from runner.tui.app import RunnerApp

SIZE = (110, 30)


@pytest.fixture
def fixed_results(tmp_path) -> Path:
    """A finished run of 6 tasks (4 done, 1 failed, 1 blocked) with curves and metrics, no clocks."""
    results = tmp_path / "results"
    store = Store(results / "runner.db")
    run = store.begin_run("study", "name: study\nmodel: {arch: resnet18}\n", "/nonexistent/study.yaml", 0, "local")
    tasks = [
        PlannedTask("pre0000000000001", "pretrain", "ct", "byol-pretrain", 0, None, [], {}),
        PlannedTask("fin0000000000001", "finetune", "ct", "byol-finetune", 0, "10%", ["pre0000000000001"], {}),
        PlannedTask("sup0000000000001", "supervised", "ct", "supervised", 0, "10%", [], {}),
        PlannedTask("fin0000000000002", "finetune", "ct", "byol-finetune", 0, "100%", ["pre0000000000001"], {}),
        PlannedTask("sup0000000000002", "supervised", "ct", "supervised", 0, "100%", [], {}),
        PlannedTask("lin0000000000002", "linear", "ct", "byol-linear", 0, "100%", ["pre0000000000001"], {}),
    ]
    store.add_tasks(run, tasks, set())
    outcome = {"pre0000000000001": "done", "fin0000000000001": "done", "sup0000000000001": "done", "fin0000000000002": "done",
               "sup0000000000002": "failed", "lin0000000000002": "blocked"}
    acc = {"fin0000000000001": 0.75, "sup0000000000001": 0.70, "fin0000000000002": 0.85}
    for i, t in enumerate(tasks):
        d = results / "tasks" / t.id
        d.mkdir(parents=True)
        (d / "task.json").write_text(json.dumps({"id": t.id, "kind": t.kind, "dataset": "ct", "seed": 0,
                                                 "data": {"source": "csv", "image_size": 64},
                                                 "budget": {"fraction": float(t.budget.rstrip("%")) / 100} if t.budget else None,
                                                 "settings": {"model": {"arch": "resnet18", "image_size": None}}}))
        (d / "worker.log").write_text(f"worker log of {t.id}\nline two\n")
        ts = 1_000_000_000.0  # 2001-09-09 01:46:40 UTC (the test pins TZ)
        events = [{"ts": ts, "kind": "log", "message": f"worker pid {100 + i} on host, engine 4"},
                  {"ts": ts + 1, "kind": "log", "message": f"{t.kind} on ct: 200 images, 1 channel(s), device cuda"},
                  {"ts": ts + 2, "kind": "progress", "step": 1, "loss": 3.0}]
        if outcome[t.id] == "failed":
            events.append({"ts": ts + 42, "kind": "error", "message": "RuntimeError: CUDA out of memory"})
        (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        if outcome[t.id] == "blocked":
            store.set_status(t.id, "blocked", "dependency failed")
            continue
        a = store.start_attempt(t.id, run, 1, "local", f"cpu{i % 2}", None, "host")
        points = [{"kind": "progress", "ts": float(k), "epoch": k // 5, "step": k, "loss": 3.0 - 0.04 * k, "tau": 0.99 + 0.0002 * k,
                   "proj_std": 0.06, "total": 50} for k in range(1, 51)]
        if t.kind == "pretrain":  # the pretraining monitor: kNN AUROC rising from the untrained network's 0.60
            points += [{"kind": "metric", "ts": 60.0 + k, "epoch": k // 5, "step": k, "knn_auroc": 0.6 + 0.003 * k,
                        "knn_acc": 0.6, "knn_base_auroc": 0.6, "knn_base_acc": 0.55} for k in (0, 10, 20, 30, 40, 50)]
        store.add_points(t.id, a, points)
        ok = outcome[t.id] == "done"
        store.end_attempt(a, "done" if ok else "failed", 0 if ok else 1, None if ok else "RuntimeError: CUDA out of memory")
        store.set_status(t.id, outcome[t.id], None if ok else "RuntimeError: CUDA out of memory")
        if ok and t.id in acc:
            (d / "metrics.json").write_text(json.dumps({"task": t.id, "test": {"accuracy": acc[t.id], "loss": 0.5, "auroc": 0.8,
                                                                 "balanced_accuracy": acc[t.id], "confusion_matrix": [[1, 0], [0, 1]]}}))
        elif ok:
            (d / "metrics.json").write_text(json.dumps({"task": t.id, "pretrain": {"steps": 50}}))
    store.db.execute("UPDATE attempts SET started=1000.0, ended=1042.0")  # no clock in the picture
    store.commit()
    store.end_run(run, "failed", 1)
    store.close()
    return results


def app_for(results: Path) -> RunnerApp:
    return RunnerApp(results, poll_s=3600)  # one read at start: the screen does not change under the camera


def test_queue_screen(snap_compare, fixed_results):
    assert snap_compare(app_for(fixed_results), terminal_size=SIZE, run_before=_settle)


def test_results_screen(snap_compare, fixed_results):
    assert snap_compare(app_for(fixed_results), press=["3"], terminal_size=SIZE, run_before=_settle)


def test_curves_of_the_selected_task(snap_compare, fixed_results):
    assert snap_compare(app_for(fixed_results), press=["enter"], terminal_size=SIZE, run_before=_settle)


def test_failed_filter_and_detail(snap_compare, fixed_results, monkeypatch):
    """The log view (l) of the failed task: its attempt with its exit code, its data and budget in
    words, the log and error lines of its events, and its worker.log."""
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert snap_compare(app_for(fixed_results), press=["f", "f", "down", "l"], terminal_size=SIZE, run_before=_settle)
    finally:
        monkeypatch.undo()
        time.tzset()


async def _settle(pilot) -> None:  # noqa: ANN001
    await pilot.pause(0.8)


def test_filtering_keeps_the_plan_order_and_the_selected_row(fixed_results):
    """Cycling the filter through every status and back shows the rows in the plan's order each time
    (a row that comes back is not appended at the end); the cursor and the selection agree."""
    import asyncio

    from runner.tui.queue import FILTERS

    app = app_for(fixed_results)
    plan_order = ["pre0000000000001", "fin0000000000001", "sup0000000000001", "fin0000000000002", "sup0000000000002",
                  "lin0000000000002"]

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.8)
            table = app.query_one("#tasks")
            table.move_cursor(row=3)
            await pilot.pause(0.3)
            assert app.selected == "fin0000000000002"
            for _ in FILTERS:
                await pilot.press("f")
                await pilot.pause(0.5)
                keys = [row.key.value for row in table.ordered_rows]
                assert keys == [k for k in plan_order if k in keys], (app.filter, keys)
            assert app.filter is None and [row.key.value for row in table.ordered_rows] == plan_order
            assert table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == app.selected  # one selection
            table.move_cursor(row=3)
            await pilot.pause(0.3)
            app.snapshot.tasks[0].status = "running"  # a task changes status under no filter: nothing moves
            app.update_table(app.snapshot)
            await pilot.pause(0.3)
            assert app.selected == "fin0000000000002" and table.cursor_row == 3
            await pilot.press("q")

    asyncio.run(scenario())


@pytest.mark.e2e
def test_a_running_task_shows_step_of_total_elapsed_and_eta_and_a_finished_one_its_time(tiny_reference):
    """Progress events carry the training's total steps; the queue shows step k/N, the time so far
    and the rest at the pace so far; a finished task keeps the time it took."""
    import time

    from runner.contracts import read_events
    from runner.store import TaskRow
    from runner.tui.queue import progress_times, task_cells

    results = tiny_reference[1]
    for task in (results / "tasks").iterdir():
        steps = [e for e in read_events(task / "events.jsonl")[0] if e.get("kind") == "progress"]
        if steps:  # every training's progress says how many steps it has (events come at a steady rate, not each step)
            assert all(e["total"] == steps[0]["total"] >= e["step"] for e in steps), [(e["step"], e["total"]) for e in steps]
    now = time.time()
    row = TaskRow("t", "finetune", "ct", "byol-finetune", 0, "10%", [], "running", 1, 10, 0.5, 100.0, None, 1, "cpu0",
                  started=now - 30, total=40)
    assert progress_times(row, now) == ("30s", "1m30s")
    cells = task_cells(row, now)
    assert "10/40" in cells and "1m30s" in cells
    done = TaskRow("t", "finetune", "ct", "byol-finetune", 0, "10%", [], "done", 4, 40, 0.4, 100.0, None, 1, "cpu0",
                   started=now - 100, total=40, ended=now - 100 + 3725)
    assert progress_times(done, now) == ("1h02m", "")


def shown_text(widget) -> str:  # noqa: ANN001 - a widget
    """What a widget shows on the screen, line by line."""
    from textual.geometry import Region

    return "\n".join(line.text.rstrip() for line in widget.render_lines(Region(0, 0, widget.size.width, widget.size.height)))


def test_help_screen(snap_compare, fixed_results):
    """`?`: every key with what it does, over the queue."""
    assert snap_compare(app_for(fixed_results), press=["question_mark"], terminal_size=SIZE, run_before=_settle)


def test_queue_at_80x24(snap_compare, fixed_results):
    """At 80x24 the queue keeps the columns a run is followed by (step, loss, ETA, attempts) and the
    footer its keys; kind, slot, epoch, img/s and time are in the detail."""
    assert snap_compare(app_for(fixed_results), terminal_size=(80, 24), run_before=_settle)


def test_keys_as_in_htop_and_k9s(fixed_results):
    """? opens the key help and Esc closes it; j/k move; s sorts by the next column with ▲ on its
    header and S reverses it (▼); / finds by text and Esc clears it; after a tab switch the table has
    the keys; Esc closes textual's key panel."""
    import asyncio

    app = app_for(fixed_results)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.8)
            table = app.query_one("#tasks")
            keys = lambda: [row.key.value for row in table.ordered_rows]  # noqa: E731
            await pilot.press("question_mark")
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "Help"
            assert "sort by the next column" in "".join(shown_text(w) for w in app.screen.query("Static"))
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert type(app.screen).__name__ != "Help"
            await pilot.press("3", "1")
            await pilot.pause(0.2)
            assert app.focused is table  # no Tab needed after a switch
            await pilot.press("j", "j")
            await pilot.pause(0.2)
            assert table.cursor_row == 2 and app.selected == "sup0000000000001"
            await pilot.press("k")
            await pilot.pause(0.2)
            assert table.cursor_row == 1
            await pilot.press("s")  # status: running, failed, blocked, ..., done; ties in the plan's order
            await pilot.pause(0.3)
            assert app.sort == "status" and keys()[:2] == ["sup0000000000002", "lin0000000000002"]
            assert str(table.columns["status"].label) == "status ▲"
            assert table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == app.selected == "fin0000000000001"
            await pilot.press("S")
            await pilot.pause(0.3)
            assert keys()[-2:] == ["lin0000000000002", "sup0000000000002"] and str(table.columns["status"].label) == "status ▼"
            assert "sort: status ▼" in str(app.query_one("#summary").render())
            await pilot.press("slash")
            await pilot.pause(0.2)
            assert app.focused is app.query_one("#find")
            await pilot.press(*"sup")
            await pilot.pause(0.3)
            assert sorted(keys()) == ["sup0000000000001", "sup0000000000002"] and "find: sup" in str(app.query_one("#summary").render())
            await pilot.press("enter")  # keeps the filter, the table takes the keys again
            await pilot.pause(0.2)
            assert app.focused is table and len(keys()) == 2
            await pilot.press("escape")
            await pilot.pause(0.3)
            assert len(keys()) == 6 and app.find == "" and not app.query_one("#find").has_class("shown")
            await pilot.press("3", "slash")  # from another tab: the queue shows, and the find box takes the typing
            await pilot.pause(0.3)
            assert app.query_one("TabbedContent").active == "queue" and app.focused is app.query_one("#find")
            await pilot.press(*"zzz")
            await pilot.pause(0.3)
            assert keys() == [] and app.selected is None and app.sort == "status"  # nothing shown: nothing selected
            await pilot.press("escape")
            await pilot.pause(0.3)
            app.action_show_help_panel()
            await pilot.pause(0.3)
            assert app.screen.query("HelpPanel")
            await pilot.press("escape")
            await pilot.pause(0.3)
            assert not app.screen.query("HelpPanel")
            await pilot.press("q")

    asyncio.run(scenario())


def test_sorting_compares_numbers_budgets_and_puts_blank_cells_last():
    """s/S and header clicks: numbers as numbers (seed 10 after 2), budgets from the smallest
    (5/class before 1%), and a blank cell last whether ascending or descending."""
    from runner.store import TaskRow
    from runner.tui.queue import shown_tasks

    def row(tid: str, seed: int, budget: str | None, loss: float | None, attempts: int) -> TaskRow:
        return TaskRow(tid, "finetune", "ct", "byol-finetune", seed, budget, [], "done", None, None, loss, None, None, attempts)

    tasks = [row("a", 10, "100%", 0.3, 1), row("b", 2, None, None, 3), row("c", 1, "5/class", 0.1, 2), row("d", 2, "1%", 0.2, 0)]
    ids = lambda column, down=False: [t.id for t in shown_tasks(tasks, None, "", column, down, 0.0)]  # noqa: E731
    assert ids("seed") == ["c", "b", "d", "a"] and ids("seed", True) == ["a", "b", "d", "c"]
    assert ids("labels") == ["c", "d", "a", "b"] and ids("labels", True) == ["a", "d", "c", "b"]
    assert ids("loss") == ["c", "d", "a", "b"] and ids("loss", True) == ["a", "d", "c", "b"]
    assert ids("try") == ["d", "a", "c", "b"]
    assert ids(None) == ["a", "b", "c", "d"] and [t.id for t in shown_tasks(tasks, None, "5/class", None, False, 0.0)] == ["c"]
    # time and ETA as the cells show them: a running task's ETA at its pace, a finished one has none
    fast = TaskRow("f", "finetune", "ct", "supervised", 0, "1%", [], "running", 1, 30, 0.5, None, None, 1, started=70.0, total=40)
    slow = TaskRow("s", "finetune", "ct", "supervised", 1, "1%", [], "running", 1, 10, 0.5, None, None, 1, started=40.0, total=40)
    ended = TaskRow("e", "finetune", "ct", "supervised", 2, "1%", [], "done", 1, 40, 0.5, None, None, 1, started=0.0, total=40,
                    ended=90.0)
    eta_order = [t.id for t in shown_tasks([ended, slow, fast], None, "", "ETA", False, 100.0)]
    time_order = [t.id for t in shown_tasks([ended, slow, fast], None, "", "time", False, 100.0)]
    assert eta_order == ["f", "s", "e"] and time_order == ["f", "s", "e"]  # ETA 10 s < 180 s, blank last; time 30 < 60 < 90


def test_results_tables_keep_their_width_on_a_wide_terminal(fixed_results):
    """At 220x60 the Results tab's table is as wide as its content, not stretched over the screen."""
    import asyncio

    app = app_for(fixed_results)

    async def scenario() -> None:
        async with app.run_test(size=(220, 60)) as pilot:
            await pilot.pause(0.8)
            await pilot.press("3")
            await pilot.pause(0.5)
            lines = shown_text(app.query_one("#table")).splitlines()
            header = next(line for line in lines if "Model 1 accuracy" in line)
            assert len(header) < 120, header
            assert "| Dataset |" in app.results_markdown
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_help_screen_lists_every_key_the_app_binds():
    """`?` is written by hand (runner/tui/screens.py KEYS): a key bound in the app and missing there
    fails here, so the help cannot fall behind the bindings."""
    from runner.tui.screens import KEYS

    listed = {k for keys, _ in KEYS for k in keys.split()} | {"Esc"}
    names = {"question_mark": "?", "slash": "/", "escape": "Esc"}
    bound = {names.get(k, k) for b in RunnerApp.BINDINGS for k in b.key.split(",")}
    assert bound <= listed, sorted(bound - listed)


@pytest.mark.parametrize("size", [(60, 20), (80, 24), (160, 45)])
def test_the_every_arm_table_scrolls_sideways_and_to_its_last_row(fixed_results, size):
    """Results, then `e` (every arm): a table wider than the screen (here at 60 columns) scrolls
    sideways with its numbers whole (never "0.7" for 0.750); End reaches its last row at every size."""
    import asyncio

    from textual.containers import ScrollableContainer

    app = app_for(fixed_results)

    async def scenario() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause(0.8)
            await pilot.press("3", "e")
            await pilot.pause(0.5)
            pane = app.query_one("#results-scroll", ScrollableContainer)
            lines = shown_text(app.query_one("#table")).splitlines()
            assert any("0.750" in line for line in lines) and not any(" 0.7 " in f"{line} " for line in lines)
            widest = max(len(line.rstrip()) for line in app.results_markdown and shown_text(app.query_one("#table")).splitlines())
            assert (pane.max_scroll_x > 0) == (widest > pane.scrollable_content_region.width)
            if size[0] == 60:
                assert pane.max_scroll_x > 0  # wider than the screen: reachable sideways, not cut
                await pilot.press("right", "right", "right")  # with no click or Tab first: the pane has the keys
                for _ in range(30):
                    await pilot.pause(0.1)
                    if pane.scroll_x > 0:
                        break
                assert pane.scroll_x > 0
                pane.scroll_to(x=pane.max_scroll_x, animate=False)
                await pilot.pause(0.2)
                assert pane.scroll_x == pane.max_scroll_x
            await pilot.press("end")
            for _ in range(30):  # the scroll is animated: wait for it to land (up to 3 s on a loaded machine)
                await pilot.pause(0.1)
                if pane.scroll_y == pane.max_scroll_y:
                    break
            assert pane.scroll_y == pane.max_scroll_y
            last = [line for line in lines if line.strip()][-1]
            visible = pane.scroll_y + pane.scrollable_content_region.height
            assert lines.index(last) < visible  # the last line is on the screen once scrolled to the end
            await pilot.press("q")

    asyncio.run(scenario())
