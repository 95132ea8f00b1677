"""The TUI in a real (headless) terminal through Textual's Pilot, against real runs and runner.db."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from textual.widgets import Static

from runner.tui.app import RunnerApp
from tests.conftest import TINY, copy_results, fault_env, run_cli


def tiny(tmp_path: Path) -> Path:
    """The runner tests' tiny matrix with Model 1 and Model 2 only: 5 tasks."""
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(pre_epochs=2, ft_steps=5).replace(
        "methods: [byol-finetune, byol-linear, supervised, random-linear]", "methods: [byol-finetune, supervised]"))
    return p


async def wait_for(pilot, cond, timeout: float = 180.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.3)
    raise AssertionError("condition not reached in time")


@pytest.mark.e2e
def test_a_run_started_from_the_tui_moves_tasks_to_done_and_fills_the_table(tmp_path):
    results = tmp_path / "results"
    app = RunnerApp(results, tiny(tmp_path), poll_s=0.2)
    seen: dict[str, set[str]] = {}

    async def scenario() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            def observe() -> bool:
                for t in app.snapshot.tasks:
                    seen.setdefault(t.id, set()).add(t.status)
                return bool(app.snapshot.tasks) and app.snapshot.done == len(app.snapshot.tasks) and not app.snapshot.scheduler_alive

            await wait_for(pilot, observe)
            await pilot.pause(0.5)
            table = app.query_one("#tasks")
            assert table.row_count == 5
            assert all("done" in table.get_row(t.id)[5] for t in app.snapshot.tasks)
            await pilot.press("3")
            await pilot.pause(0.5)
            text = app.results_markdown
            rows = [line for line in text.splitlines() if line.startswith("| syn (")]
            assert len(rows) == 2 and all("—" not in row for row in rows)
            await pilot.press("q")  # the run has ended: no question asked
            await pilot.pause(0.2)

    asyncio.run(scenario())
    assert any({"pending", "running", "done"} <= s for s in seen.values()), seen
    # the run's process writes the report and figures after its last task: it ends on its own, successfully
    assert app.proc is not None and app.proc.wait(timeout=120) == 0


@pytest.mark.e2e
def test_a_failed_task_is_retried_from_the_tui_and_ends_done(tmp_path):
    results = tmp_path / "results"
    manifest = tiny(tmp_path)  # only its two supervised tasks: the failing ones (and the fastest to fail)
    manifest.write_text(manifest.read_text().replace("methods: [byol-finetune, supervised]", "methods: [supervised]"))
    first = run_cli("run", str(manifest), "--results", str(results), env=fault_env("supervised"))
    assert first.returncode == 1
    app = RunnerApp(results, poll_s=0.2)

    async def scenario() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            await wait_for(pilot, lambda: bool(app.snapshot.tasks))
            failed = [t for t in app.snapshot.tasks if t.status == "failed"]
            assert len(failed) == 2
            table = app.query_one("#tasks")
            table.move_cursor(row=table.get_row_index(failed[0].id))
            await pilot.pause(0.3)
            assert app.selected == failed[0].id
            await pilot.press("r")
            await wait_for(pilot, lambda: any(t.id == failed[0].id and t.status == "done" for t in app.snapshot.tasks))
            await wait_for(pilot, lambda: not app.snapshot.scheduler_alive)
            still = [t.id for t in app.snapshot.tasks if t.status == "failed"]
            assert still == [failed[1].id]  # only the task asked for was retried
            await pilot.press("l")  # its detail: attempts with their errors
            detail = lambda: str(app.query_one("#detail-text").render())  # noqa: E731
            await wait_for(pilot, lambda: "attempt 1: failed" in detail(), timeout=30)
            assert "injected failure for kind supervised" in detail()

    asyncio.run(scenario())


@pytest.mark.e2e
def test_attaching_to_a_finished_run_shows_its_final_table(tiny_reference, tmp_path):
    results = copy_results(tiny_reference[1], tmp_path / "results")
    final = (results / "tiny" / "results.md").read_text().split("\n\n")[0]
    app = RunnerApp(results, poll_s=0.2)

    async def scenario() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            await wait_for(pilot, lambda: bool(app.snapshot.tasks))
            await pilot.press("3")
            await pilot.pause(0.5)
            text = app.results_markdown
            assert text.split("\n\n")[0] == final
            assert "(done)" in str(app.query_one("#summary").render())
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_headless_cli_refuses_tui_without_runs_and_without_a_terminal(tmp_path):
    r = run_cli("tui", "--results", str(tmp_path))
    assert r.returncode == 2 and "no runs in" in r.stderr
    from runner.store import Store

    store = Store(tmp_path / "runner.db")
    store.begin_run("x", "name: x\n", "/x.yaml", 0, "local")
    store.commit()
    store.close()
    r = run_cli("tui", "--results", str(tmp_path), timeout=60)  # stdin and stdout are pipes: it must not wait for keys
    assert r.returncode == 2 and "the TUI needs a terminal" in r.stderr


@pytest.mark.e2e
def test_cancel_and_retry_go_through_the_scheduler_and_quitting_asks_first(tmp_path):
    manifest = tmp_path / "long.yaml"
    manifest.write_text(TINY.format(pre_epochs=200, ft_steps=10))
    results = tmp_path / "results"
    app = RunnerApp(results, manifest, poll_s=0.2)

    async def scenario() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            pre = lambda: next((t for t in app.snapshot.tasks if t.kind == "pretrain"), None)  # noqa: E731
            await wait_for(pilot, lambda: pre() is not None and pre().status == "running" and (pre().step or 0) > 2)
            table = app.query_one("#tasks")
            table.move_cursor(row=table.get_row_index(pre().id))
            await pilot.pause(0.3)
            await pilot.press("c")  # asks first: n keeps it running
            await pilot.pause(0.3)
            assert app.screen.__class__.__name__ == "Confirm" and "Cancel syn byol-pretrain s0?" in str(
                app.screen.query_one(Static).render())
            await pilot.press("n")
            await pilot.pause(0.6)
            assert pre().status == "running" and not list((results / "control").glob("*.json"))
            await pilot.press("c")
            await pilot.pause(0.3)
            await pilot.press("y")
            await wait_for(pilot, lambda: pre().status == "failed")
            assert pre().error == "cancelled by the user"
            await pilot.pause(0.5)
            assert "cancelled" in str(app.query_one("#tasks").get_row(pre().id))  # the queue says cancelled, not failed
            await wait_for(pilot, lambda: any(t.status == "blocked" for t in app.snapshot.tasks))
            await pilot.press("r")  # the scheduler is alive: it takes the request and runs the task again
            await wait_for(pilot, lambda: pre().status == "running" and pre().attempts == 2)
            assert not any(t.status == "blocked" for t in app.snapshot.tasks)  # its dependents wait again
            assert not list((results / "control").glob("*.json"))  # requests consumed
            await pilot.press("q")
            await pilot.pause(0.5)
            assert app.screen.__class__.__name__ == "Confirm" and "Stop it and quit?" in str(app.screen.query_one(Static).render())
            await pilot.press("n")
            await pilot.pause(0.3)
            assert app.proc.poll() is None  # still running
            await pilot.press("q")
            await pilot.pause(0.3)
            await pilot.press("y")
            await pilot.pause(1.0)

    asyncio.run(scenario())
    assert app.proc.wait(timeout=60) == 130  # the run was stopped as asked, and says so


def test_a_run_that_cannot_start_says_why_on_screen(tmp_path, monkeypatch):
    """The run the TUI starts exits 2 (here: no Docker daemon at DOCKER_HOST): the screen says why
    instead of waiting for tasks that never come."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    manifest = tiny(tmp_path)
    manifest.write_text(manifest.read_text().replace("executor: {max_parallel: 2, retries: 1}", "executor: {kind: docker}"))
    app = RunnerApp(tmp_path / "results", manifest, poll_s=0.2)

    async def scenario() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            await wait_for(pilot, lambda: app.run_error is not None, timeout=60)
            await pilot.pause(0.3)
            summary = str(app.query_one("#summary").render())
            assert "the run could not start: cannot reach the Docker daemon" in summary
            await pilot.press("q")

    asyncio.run(scenario())
    assert app.proc.returncode == 2


def test_a_runner_db_being_created_reads_as_no_run_yet_and_an_old_empty_one_as_damaged(tmp_path):
    """A run started from the TUI creates runner.db and then its tables: a refresh in between read a
    table-less file and the TUI's worker died with "damaged" (seen in CI under load). A young file
    without tables is "no run yet"; one older than CREATING_S is damaged and says so."""
    import os
    import sqlite3

    from runner.store import StoreDamaged
    from runner.tui.state import CREATING_S, curve, read_snapshot

    results = tmp_path / "results"
    results.mkdir()
    db = results / "runner.db"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA user_version=0")
    snap = read_snapshot(results)
    assert snap.run is None and snap.tasks == []
    assert curve(results, "abc") == {}
    old = time.time() - CREATING_S - 60
    os.utime(db, (old, old))
    with pytest.raises(StoreDamaged, match="tables"):
        read_snapshot(results)
