"""runner.db: the one shared state. SQLite in WAL mode: the scheduler is its only writer; status, the
TUI and report open it read-only and never block the writer.

Tables: runs (one per `run` of a manifest), tasks (content-addressed, shared by every run that needs
them), run_tasks (which run needs which task), attempts (one per worker start: when, where, how it
ended), metric_points (the curves, from the workers' events). The schema version is SQLite's
user_version; `MIGRATIONS[i]` takes a database from version i to i + 1.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UserError

MIGRATIONS = [
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, manifest TEXT NOT NULL, manifest_path TEXT,
        started REAL NOT NULL, ended REAL, status TEXT NOT NULL, pid INTEGER, executor TEXT, exit_code INTEGER
    );
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, dataset TEXT NOT NULL, method TEXT NOT NULL, seed INTEGER NOT NULL,
        budget TEXT, deps TEXT NOT NULL, status TEXT NOT NULL, epoch INTEGER, step INTEGER, loss REAL,
        img_per_s REAL, error TEXT, updated REAL
    );
    CREATE TABLE run_tasks (run_id INTEGER NOT NULL, task_id TEXT NOT NULL, position INTEGER NOT NULL,
                            PRIMARY KEY (run_id, task_id));
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, run_id INTEGER NOT NULL, number INTEGER NOT NULL,
        started REAL NOT NULL, ended REAL, status TEXT NOT NULL, exit_code INTEGER, error TEXT,
        executor TEXT, slot TEXT, pid INTEGER, node TEXT
    );
    CREATE INDEX attempts_task ON attempts (task_id);
    CREATE TABLE metric_points (
        task_id TEXT NOT NULL, attempt_id INTEGER, ts REAL, kind TEXT NOT NULL, epoch INTEGER, step INTEGER,
        loss REAL, val_loss REAL, val_acc REAL, lr REAL, tau REAL, proj_std REAL, img_per_s REAL
    );
    CREATE INDEX points_task ON metric_points (task_id, step);
    """,
    # 2: a task's total steps, from its progress events (the TUI's and `run`'s k/N and ETA)
    "ALTER TABLE tasks ADD COLUMN total INTEGER;",
    # 3: the pretraining monitor's kNN scores, and the untrained network's beside them
    "ALTER TABLE metric_points ADD COLUMN knn_auroc REAL; ALTER TABLE metric_points ADD COLUMN knn_acc REAL; "
    "ALTER TABLE metric_points ADD COLUMN knn_base_auroc REAL; ALTER TABLE metric_points ADD COLUMN knn_base_acc REAL;",
]
SCHEMA_VERSION = len(MIGRATIONS)
TABLES = frozenset({"runs", "tasks", "run_tasks", "attempts", "metric_points"})
POINT_FIELDS = ("loss", "val_loss", "val_acc", "lr", "tau", "proj_std", "img_per_s", "knn_auroc", "knn_acc", "knn_base_auroc",
                "knn_base_acc")


@dataclass
class TaskRow:
    id: str
    kind: str
    dataset: str
    method: str
    seed: int
    budget: str | None
    deps: list[str]
    status: str
    epoch: int | None
    step: int | None
    loss: float | None
    img_per_s: float | None
    error: str | None
    attempts: int = 0
    slot: str | None = None  # of the latest attempt (filled by readers that need it)
    started: float | None = None
    total: int | None = None  # the steps of its training, once its first progress event said
    ended: float | None = None  # of the latest attempt, when it has ended


class StoreDamaged(UserError):
    """runner.db cannot be read as a database; the task folders still hold every finished result."""

    def __init__(self, path: Path, e: BaseException) -> None:
        super().__init__(f"{path} is damaged ({e}): `byol-runner run MANIFEST --rebuild-store` moves it aside and "
                         "rebuilds it from the task folders (no finished task is lost; the attempt history is)")


class Store:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                self.db = _open_readonly(self.path)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                existed = self.path.is_file() and self.path.stat().st_size > 0
                self.db = sqlite3.connect(self.path, timeout=10)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            check = self.db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(check[0] if check else "no answer to quick_check")
            if not readonly:
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise self._newer(version)
                if existed and not self.db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
                    # a runner.db with no table is not a new one: its history would be replaced without a word
                    raise sqlite3.DatabaseError("it holds no tables (copied without its -wal file?)")
                self._migrate()
            self._check_schema()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and not _damage(e):
                raise
            raise StoreDamaged(self.path, e) from None
        self.db.row_factory = sqlite3.Row

    def _newer(self, version: int) -> UserError:
        return UserError(f"{self.path} was written by a newer byol-runner (store schema {version}; this one reads up to "
                         f"{SCHEMA_VERSION}): upgrade byol-runner, or use another --results")

    def _check_schema(self) -> None:
        """The schema this version reads: every table there (a file copied without its -wal can hold none),
        at this version (an older one is upgraded by `run`; a newer one is not read)."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise self._newer(version)
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = sorted(TABLES - tables)
        if missing:
            raise sqlite3.DatabaseError(f"its table{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                        f"{'are' if len(missing) > 1 else 'is'} missing (copied without its -wal file?)")
        if version < SCHEMA_VERSION:
            raise UserError(f"{self.path} was written by an older byol-runner (store schema {version} of {SCHEMA_VERSION}): "
                            "`byol-runner run MANIFEST` on it upgrades it, keeping everything")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise self._newer(version)
        for v in range(version, SCHEMA_VERSION):
            with self.db:
                self.db.executescript(MIGRATIONS[v])
                self.db.execute(f"PRAGMA user_version = {v + 1}")

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def move_aside(path: Path) -> Path:
        """A damaged runner.db (and its WAL files) renamed to runner.db.damaged-<time>: kept for a look, out
        of the way of the new one `run` builds from the task folders."""
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        for side in ("-wal", "-shm"):
            Path(f"{path}{side}").unlink(missing_ok=True)
        return aside

    # ---- writer (the scheduler) ----------------------------------------------------------

    def begin_run(self, name: str, manifest_yaml: str, manifest_path: str, pid: int, executor: str) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs (name, manifest, manifest_path, started, status, pid, executor) VALUES (?,?,?,?,?,?,?)",
                (name, manifest_yaml, manifest_path, time.time(), "running", pid, executor),
            )
        return int(cur.lastrowid)

    def end_stale_runs(self) -> int:
        """Runs still marked running when a runner starts were left by a runner that was killed (the lock
        lets one runner at a time work on a results dir): they are marked interrupted."""
        with self.db:
            cur = self.db.execute("UPDATE runs SET status='interrupted', ended=? WHERE status='running'", (time.time(),))
        return cur.rowcount

    def end_run(self, run_id: int, status: str, exit_code: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET ended=?, status=?, exit_code=? WHERE id=?", (time.time(), status, exit_code, run_id))

    def add_tasks(self, run_id: int, tasks: list, done: set[str]) -> None:
        """Register a run's tasks; a task done on disk is marked done whatever the store said."""
        with self.db:
            for pos, t in enumerate(tasks):
                self.db.execute(
                    "INSERT INTO tasks (id, kind, dataset, method, seed, budget, deps, status, updated) VALUES (?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(id) DO NOTHING",
                    (t.id, t.kind, t.dataset, t.method, t.seed, t.budget, json.dumps(t.deps), "pending", time.time()),
                )
                if t.id in done:
                    self.db.execute("UPDATE tasks SET status='done', error=NULL WHERE id=?", (t.id,))
                self.db.execute("INSERT OR IGNORE INTO run_tasks (run_id, task_id, position) VALUES (?,?,?)", (run_id, t.id, pos))

    def set_status(self, task_id: str, status: str, error: str | None = None) -> None:
        self.db.execute("UPDATE tasks SET status=?, error=?, updated=? WHERE id=?", (status, error, time.time(), task_id))

    def start_attempt(self, task_id: str, run_id: int, number: int, executor: str, slot: str, pid: int | None, node: str) -> int:
        cur = self.db.execute(
            "INSERT INTO attempts (task_id, run_id, number, started, status, executor, slot, pid, node) VALUES (?,?,?,?,?,?,?,?,?)",
            (task_id, run_id, number, time.time(), "running", executor, slot, pid, node),
        )
        self.set_status(task_id, "running")
        return int(cur.lastrowid)

    def end_attempt(self, attempt_id: int, status: str, exit_code: int | None, error: str | None) -> None:
        self.db.execute("UPDATE attempts SET ended=?, status=?, exit_code=?, error=? WHERE id=?",
                        (time.time(), status, exit_code, error, attempt_id))

    def set_attempt_process(self, attempt_id: int, pid: int | None, node: str) -> None:
        self.db.execute("UPDATE attempts SET pid=?, node=? WHERE id=?", (pid, node, attempt_id))

    def adopt_attempt(self, attempt_id: int, run_id: int) -> None:
        """An attempt a killed runner started, watched on by this run."""
        self.db.execute("UPDATE attempts SET run_id=? WHERE id=?", (run_id, attempt_id))

    def last_point_ts(self, attempt_id: int) -> float | None:
        return self.db.execute("SELECT MAX(ts) FROM metric_points WHERE attempt_id=?", (attempt_id,)).fetchone()[0]

    def set_attempt_node(self, attempt_id: int, node: str) -> None:
        self.db.execute("UPDATE attempts SET node=? WHERE id=?", (node, attempt_id))

    def add_points(self, task_id: str, attempt_id: int, events: list[dict]) -> None:
        rows = []
        last = None
        for e in events:
            if e.get("kind") in ("progress", "metric"):
                rows.append((task_id, attempt_id, e.get("ts"), e["kind"], e.get("epoch"), e.get("step"),
                             *(e.get(f) for f in POINT_FIELDS)))
                last = e
        if rows:
            self.db.executemany(f"INSERT INTO metric_points VALUES (?,?,?,?,?,?{',?' * len(POINT_FIELDS)})", rows)
        if last is not None:  # the latest of each value in the batch (a monitor's metric event carries no loss)
            latest = {k: next((e[k] for e in reversed(events) if e.get("kind") in ("progress", "metric") and e.get(k) is not None),
                              None) for k in ("loss", "img_per_s", "total")}
            self.db.execute(
                "UPDATE tasks SET epoch=?, step=?, loss=COALESCE(?, loss), img_per_s=COALESCE(?, img_per_s), "
                "total=COALESCE(?, total), updated=? WHERE id=?",
                (last.get("epoch"), last.get("step"), latest["loss"], latest["img_per_s"], latest["total"], time.time(), task_id),
            )

    def commit(self) -> None:
        self.db.commit()

    def stale_attempts(self) -> list[sqlite3.Row]:
        """Attempts still marked running: their runner died without recording how they ended."""
        return self.db.execute("SELECT * FROM attempts WHERE status='running'").fetchall()

    # ---- readers --------------------------------------------------------------------------

    def run(self, run_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()

    def latest_run(self, name: str | None = None) -> sqlite3.Row | None:
        if name:
            return self.db.execute("SELECT * FROM runs WHERE name=? ORDER BY id DESC LIMIT 1", (name,)).fetchone()
        return self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()

    def run_tasks(self, run_id: int) -> list[TaskRow]:
        rows = self.db.execute(
            "SELECT t.*, (SELECT COUNT(*) FROM attempts a WHERE a.task_id=t.id) AS n_attempts FROM tasks t "
            "JOIN run_tasks r ON r.task_id=t.id WHERE r.run_id=? ORDER BY r.position",
            (run_id,),
        ).fetchall()
        return [
            TaskRow(r["id"], r["kind"], r["dataset"], r["method"], r["seed"], r["budget"], json.loads(r["deps"]), r["status"],
                    r["epoch"], r["step"], r["loss"], r["img_per_s"], r["error"], r["n_attempts"],
                    total=r["total"] if "total" in r.keys() else None)  # (a read-only runner.db may predate it)
            for r in rows
        ]

    def attempt_span(self, task_ids: list[str]) -> tuple[float | None, float | None]:
        """When these tasks trained: their first attempt's start and last attempt's end, in any run
        (a later run that found them done trained nothing)."""
        if not task_ids:
            return None, None
        row = self.db.execute("SELECT MIN(started), MAX(ended) FROM attempts WHERE task_id IN (%s)" % ",".join("?" * len(task_ids)),
                              task_ids).fetchone()
        return row[0], row[1]

    def attempts(self, task_id: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM attempts WHERE task_id=? ORDER BY id", (task_id,)).fetchall()

    def open_attempts(self, run_id: int) -> list[sqlite3.Row]:
        """This run's attempts still marked running (id, task_id)."""
        return self.db.execute("SELECT id, task_id FROM attempts WHERE run_id=? AND status='running'", (run_id,)).fetchall()

    def latest_attempts(self, run_id: int) -> dict[str, sqlite3.Row]:
        """Per task of a run: its latest attempt's start and slot."""
        return {a["task_id"]: a for a in self.db.execute(
            "SELECT task_id, MAX(started) AS started, slot, ended FROM attempts WHERE run_id=? GROUP BY task_id", (run_id,))}

    def progress(self, task_ids: list[str]) -> dict[str, sqlite3.Row]:
        """Epoch, step (and total), loss and images/s of these tasks, as their last events left them."""
        if not task_ids:
            return {}
        rows = self.db.execute("SELECT * FROM tasks WHERE id IN (%s)" % ",".join("?" * len(task_ids)),
                               list(task_ids)).fetchall()
        return {r["id"]: r for r in rows}

    def latest_knn(self, task_ids: list[str]) -> dict[str, tuple[int, float, float | None]]:
        """The pretraining monitor's last score of these tasks: (step, kNN AUROC, the untrained network's)."""
        if not task_ids:
            return {}
        rows = self.db.execute(
            "SELECT task_id, step, knn_auroc, knn_base_auroc FROM metric_points WHERE knn_auroc IS NOT NULL AND task_id IN (%s) "
            "ORDER BY ts" % ",".join("?" * len(task_ids)), list(task_ids)).fetchall()
        return {r["task_id"]: (r["step"], r["knn_auroc"], r["knn_base_auroc"]) for r in rows}

    def points(self, task_id: str, kind: str | None = None) -> list[sqlite3.Row]:
        q = "SELECT * FROM metric_points WHERE task_id=?" + (" AND kind=?" if kind else "") + " ORDER BY ts"
        return self.db.execute(q, (task_id, kind) if kind else (task_id,)).fetchall()


def _damage(e: sqlite3.OperationalError) -> bool:
    text = str(e)
    return "malformed" in text or "not a database" in text or "disk image" in text


def _open_readonly(path: Path) -> sqlite3.Connection:
    """Read-only; on a read-only disk or folder (where SQLite cannot make the WAL's shared-memory file),
    as an immutable file: what a finished run left there is complete (its last close folded the WAL in)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError as e:
        if _damage(e):
            raise
        db.close()
        return sqlite3.connect(f"file:{path}?immutable=1", uri=True, timeout=5)


@contextmanager
def open_latest_run(results: Path, run_name: str | None = None) -> Iterator[tuple[Store, sqlite3.Row]]:
    """The store (read-only) and the latest run (of that name) of a results dir, or a UserError."""
    db = Path(results) / "runner.db"
    if not db.is_file():
        raise UserError(f"no runs in {results} (no runner.db): run a manifest first")
    store = Store(db, readonly=True)
    try:
        run = store.latest_run(run_name)
        if run is None:
            raise UserError(f"no run named {run_name!r} in {results}" if run_name else f"no runs in {results}")
        yield store, run
    finally:
        store.close()
