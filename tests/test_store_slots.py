"""The store's schema and concurrency, and how slots follow the visible GPUs."""

from __future__ import annotations

import sqlite3

import pytest

from runner.executors.base import make_slots
from runner.system import visible_gpus
from runner.plan import PlannedTask
from runner.store import SCHEMA_VERSION, Store


def test_store_is_wal_versioned_and_readers_do_not_block_the_writer(tmp_path):
    w = Store(tmp_path / "runner.db")
    assert w.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert w.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    run = w.begin_run("r", "name: r\n", "m.yaml", 1, "local")
    t = PlannedTask("abc", "supervised", "d", "supervised", 0, "10%", [], {})
    w.add_tasks(run, [t], set())
    reader = Store(tmp_path / "runner.db", readonly=True)
    reader.db.execute("BEGIN")
    assert reader.run_tasks(run)[0].status == "pending"  # a read transaction stays open ...
    a = w.start_attempt("abc", run, 1, "local", "cpu0", 123, "host")  # ... and the writer still commits
    w.add_points("abc", a, [{"kind": "progress", "ts": 1.0, "epoch": 0, "step": 5, "loss": 0.5, "img_per_s": 10.0}])
    w.commit()
    assert reader.run_tasks(run)[0].status == "pending"  # the reader's snapshot
    reader.db.execute("COMMIT")
    row = reader.run_tasks(run)[0]
    assert (row.status, row.step, row.loss, row.attempts) == ("running", 5, 0.5, 1)
    assert len(reader.points("abc")) == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.db.execute("DELETE FROM tasks")  # read-only
    # reopening migrates nothing and keeps the data
    w.close()
    again = Store(tmp_path / "runner.db")
    assert again.latest_run()["name"] == "r"


def test_a_database_from_a_newer_byol_runner_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "runner.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    from runner.errors import UserError

    with pytest.raises(UserError, match="written by a newer byol-runner .* upgrade byol-runner"):
        Store(tmp_path / "runner.db")


def test_slots_follow_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert visible_gpus() == [0, 1, 2]
    assert [s.name for s in make_slots("auto", None)] == ["gpu0", "gpu1", "gpu2"]
    assert [s.gpu for s in make_slots(2, None)] == [0, 1]
    assert [s.gpu for s in make_slots([2], None)] == [2]
    with pytest.raises(ValueError, match="GPU 5 is not visible"):
        make_slots([5], None)
    with pytest.raises(ValueError, match="4 asked, 3 visible"):
        make_slots(4, None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [s.name for s in make_slots("auto", 3)] == ["cpu0", "cpu1", "cpu2"]
    assert [s.name for s in make_slots("auto", None)] == ["cpu0"]


def test_the_ray_executor_without_ray_names_the_extra(monkeypatch):
    import sys

    from runner.errors import UserError
    from runner.executors.ray import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(UserError, match=r'pip install "byol-runner\[ray\]"'):
        RayExecutor()


@pytest.mark.parametrize("case", ["newer", "older", "no tables", "a table missing"])
def test_a_runner_db_this_version_cannot_read_says_what_to_do_in_one_line(tmp_path, case):
    """A runner.db from a newer byol-runner, an older one (read by status before run upgraded it), one
    copied without its -wal (no tables) or missing a table: status and report end in one line naming
    the fix, never a traceback; run never quietly starts a new history over a newer or damaged one."""
    import sqlite3

    from runner.store import SCHEMA_VERSION, Store
    from tests.conftest import cli_here

    results = tmp_path / "results"
    Store(results / "runner.db").close()
    with sqlite3.connect(results / "runner.db") as db:
        if case == "newer":
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        elif case == "older":
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
        elif case == "no tables":
            for t in ("runs", "tasks", "run_tasks", "attempts", "metric_points"):
                db.execute(f"DROP TABLE {t}")
            db.execute("PRAGMA user_version = 0")
        else:
            db.execute("DROP TABLE attempts")
    says = {"newer": "written by a newer byol-runner", "older": "upgrades it", "no tables": "--rebuild-store",
            "a table missing": "--rebuild-store"}[case]
    for cmd in (("status",), ("report",)):
        r = cli_here(*cmd, "--results", str(results))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr
    if case != "older":  # run (which opens it for writing) refuses too; an older one it upgrades
        with pytest.raises(Exception, match="newer byol-runner|--rebuild-store"):
            Store(results / "runner.db")
