"""The scheduler's rules, in process and in milliseconds, against a real runner.db and a scripted
executor: order and slots, retries, blocking of dependants, reopen, cancel, timeouts, a worker that
says nothing, crash recovery (a dead runner's worker stopped, a live attempt adopted), Ctrl-C and an
executor that cannot start anything. Real workers on real executors: test_runner, test_docker, test_ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runner.contracts import AttemptStatus, TaskStatus, event_line
from runner.errors import UserError
from runner.executors.base import Executor, Handle, Slot
from runner.plan import Plan, PlannedTask
from runner.scheduler import Scheduler
from runner.store import Store


@dataclass
class Script:
    """What one attempt does: end after `polls` polls with `code` (0 writes metrics.json unless
    `metrics` is False), saying `error` in an error event first; or never end (`hang`)."""

    code: int = 0
    polls: int = 1
    error: str | None = None
    metrics: bool = True
    hang: bool = False
    metrics_then_killed: bool = False  # metrics.json written, then the worker killed (`code`)
    error_type: str = "exception"


@dataclass
class FakeExecutor(Executor):
    """Each task's attempts follow its list of Scripts (the last one repeats); records every call."""

    scripts: dict[str, list[Script]] = field(default_factory=dict)
    on_poll: object = None  # called with the executor before every poll (a test's hand in the loop)
    name: str = "fake"

    def __post_init__(self) -> None:
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.live: set[str] = set()
        self.most_at_once = 0
        self.results: Path | None = None
        self.adoptable: dict[int, Handle] = {}

    @classmethod
    def from_spec(cls, spec, limit):  # noqa: ANN001, ANN206 - as a registered backend would be made
        return cls(), [Slot(f"cpu{i}") for i in range(limit or 1)]

    def bind(self, results: Path, run_name: str) -> None:
        self.results = results

    def adopt(self, attempts: list) -> dict[int, Handle]:
        return {a["id"]: self.adoptable[a["id"]] for a in attempts if a["id"] in self.adoptable}

    def submit(self, task_id, task_json, results, slot, attempt_id=0, number=1) -> Handle:  # noqa: ANN001
        assert task_json.is_file()
        n = sum(1 for t in self.submitted if t == task_id)
        plan = self.scripts.get(task_id, [Script()])
        self.submitted.append(task_id)
        self.live.add(task_id)
        self.most_at_once = max(self.most_at_once, len(self.live))
        return Handle(task_id, slot, time.time(), pid=None, state={"script": plan[min(n, len(plan) - 1)], "polls": 0})

    def poll(self, handle: Handle) -> int | None:
        if self.on_poll:
            self.on_poll(self)
        st = handle.state
        if st.get("ended") is not None:
            return st["ended"]
        script: Script = st["script"]
        st["polls"] += 1
        if script.hang or st["polls"] < script.polls:
            return None
        folder = self.results / "tasks" / handle.task_id
        if script.error:
            with open(folder / "events.jsonl", "a") as f:
                f.write(event_line(handle.task_id, "error", message=script.error, error_type=script.error_type))
        if (script.code == 0 or script.metrics_then_killed) and script.metrics:
            (folder / "metrics.json").write_text(json.dumps({"task": handle.task_id}))
        st["ended"] = script.code
        self.live.discard(handle.task_id)
        return script.code

    def cancel(self, handle: Handle, grace_s: float = 10.0) -> None:
        self.cancelled.append(handle.task_id)
        self.live.discard(handle.task_id)
        handle.state["ended"] = 143


def task(tid: str, kind: str, deps: tuple[str, ...] = ()) -> PlannedTask:
    method = {"pretrain": "byol-pretrain", "finetune": "byol-finetune", "linear": "byol-linear"}.get(kind, kind)
    budget = None if kind == "pretrain" else "10%"
    return PlannedTask(tid, kind, "syn", method, 0, budget, list(deps), {"id": tid, "kind": kind})


def plan() -> Plan:
    """A pretraining with its two evaluations, and a task that stands alone."""
    return Plan("t", [task("pre", "pretrain"), task("ft", "finetune", ("pre",)), task("lin", "linear", ("pre",)),
                      task("sup", "supervised")])


def run(results: Path, ex: FakeExecutor, p: Plan | None = None, slots: int = 2, **kw):  # noqa: ANN003
    store = Store(results / "runner.db")
    try:
        sched = Scheduler(p or plan(), results, ex, [Slot(f"cpu{i}") for i in range(slots)], store, poll_s=0.001, grace_s=0.1, **kw)
        out = sched.run("name: t\n", "t.yaml")
        return out, sched
    finally:
        store.close()


def attempts(results: Path) -> list[tuple]:
    store = Store(results / "runner.db", readonly=True)
    try:
        rows = store.db.execute("SELECT task_id, number, status, exit_code, error FROM attempts ORDER BY id").fetchall()
        return [tuple(r) for r in rows]
    finally:
        store.close()


def task_rows(results: Path) -> dict[str, tuple[str, str | None]]:
    store = Store(results / "runner.db", readonly=True)
    try:
        return {r["id"]: (r["status"], r["error"]) for r in store.db.execute("SELECT id, status, error FROM tasks")}
    finally:
        store.close()


def test_dependencies_run_first_and_no_slot_runs_two_tasks(tmp_path):
    ex = FakeExecutor({"pre": [Script(polls=5)]})
    out, sched = run(tmp_path, ex)
    assert out.exit_code == 0 and out.counts == {"done": 4} and out.started_workers == 4
    assert ex.submitted.index("pre") < ex.submitted.index("ft") and ex.submitted.index("pre") < ex.submitted.index("lin")
    assert ex.most_at_once <= 2
    assert all(s == (TaskStatus.DONE, None) for s in task_rows(tmp_path).values())
    # a task whose metrics.json is there never runs again
    again = FakeExecutor()
    out, _ = run(tmp_path, again)
    assert again.submitted == [] and out.started_workers == 0 and out.exit_code == 0


def test_a_failed_attempt_is_retried_and_its_error_recorded(tmp_path):
    ex = FakeExecutor({"sup": [Script(code=1, error="RuntimeError: boom"), Script()]})
    out, _ = run(tmp_path, ex, retries=1)
    assert out.exit_code == 0
    sup = [a for a in attempts(tmp_path) if a[0] == "sup"]
    assert sup == [("sup", 1, AttemptStatus.FAILED, 1, "RuntimeError: boom"), ("sup", 2, AttemptStatus.DONE, 0, None)]
    assert task_rows(tmp_path)["sup"] == ("done", None)


def test_a_task_out_of_retries_fails_and_blocks_only_its_dependants(tmp_path):
    ex = FakeExecutor({"pre": [Script(code=1, error="RuntimeError: boom")]})
    out, _ = run(tmp_path, ex, retries=2)
    assert out.exit_code == 1 and out.counts == {"failed": 1, "blocked": 2, "done": 1}
    assert ex.submitted.count("pre") == 3 and "ft" not in ex.submitted and "lin" not in ex.submitted
    rows = task_rows(tmp_path)
    assert rows["pre"] == ("failed", "RuntimeError: boom")
    assert rows["ft"][0] == "blocked" and rows["ft"][1] == "dependency pre (syn byol-pretrain seed 0) failed"
    # a plain rerun leaves it failed; retry_failed runs it (and so its dependants) again
    out, _ = run(tmp_path, FakeExecutor({"pre": [Script(code=1)]}), retries=0)
    assert out.counts == {"failed": 1, "blocked": 2, "done": 1} and len(attempts(tmp_path)) == 4
    fixed = FakeExecutor()
    out, _ = run(tmp_path, fixed, retry_failed=True)
    assert out.exit_code == 0 and sorted(fixed.submitted) == ["ft", "lin", "pre"]


def test_a_retry_request_reopens_the_task_and_the_tasks_it_blocked(tmp_path):
    control = tmp_path / "control"

    def hand(ex: FakeExecutor) -> None:  # once pre has failed for good, the TUI asks for a retry
        rows = task_rows(tmp_path) if (tmp_path / "runner.db").exists() else {}
        if rows.get("pre", ("",))[0] == "failed" and not getattr(ex, "asked", False):
            control.mkdir(exist_ok=True)
            (control / "1.json").write_text(json.dumps({"task": "pre", "action": "retry"}))
            ex.asked = True

    ex = FakeExecutor({"pre": [Script(code=1, error="E"), Script()], "sup": [Script(polls=400)]}, on_poll=hand)
    out, _ = run(tmp_path, ex, retries=0)
    assert out.exit_code == 0 and ex.submitted.count("pre") == 2 and {"ft", "lin"} <= set(ex.submitted)
    assert not list(control.glob("*.json"))  # the request was consumed


def test_a_cancel_request_stops_the_running_attempt(tmp_path):
    control = tmp_path / "control"
    control.mkdir()

    def hand(ex: FakeExecutor) -> None:
        if "pre" in ex.live and not getattr(ex, "asked", False):
            (control / "1.json").write_text(json.dumps({"task": "pre", "action": "cancel"}))
            ex.asked = True

    ex = FakeExecutor({"pre": [Script(hang=True)]}, on_poll=hand)
    out, _ = run(tmp_path, ex, retries=3)
    assert ex.cancelled == ["pre"] and ex.submitted.count("pre") == 1  # a cancel is not retried
    assert [a[2] for a in attempts(tmp_path) if a[0] == "pre"] == ["cancelled"]
    rows = task_rows(tmp_path)
    assert rows["pre"] == ("failed", "cancelled by the user") and rows["ft"][0] == "blocked"
    assert out.exit_code == 1


def test_junk_in_the_control_folder_is_ignored_and_never_blocks(tmp_path, capsys):
    control = tmp_path / "control"
    control.mkdir()
    for i, text in enumerate(("[]", '"x"', '{"task": ["pre"], "action": "retry"}', "{not json", '{"task": "pre", "action": "explode"}')):
        (control / f"{i}.json").write_text(text)
    (control / "big.json").write_text('{"task": "pre", "action": "retry", "pad": "' + "x" * 100_000 + '"}')  # bounded size
    (control / "e.json").mkdir()  # a directory
    os.mkfifo(control / "z.json")  # reading it would block forever
    out, _ = run(tmp_path, FakeExecutor())
    assert out.exit_code == 0 and out.counts == {"done": 4}
    assert sorted(p.name for p in control.iterdir()) == ["e.json", "z.json"]  # the junk files are consumed
    err = capsys.readouterr().err
    assert err.count("not a control request") == 6 and "more than a request's 4096" in err  # and each one is reported


def test_an_attempt_over_the_time_limit_is_stopped_and_counts_as_failed(tmp_path):
    ex = FakeExecutor({"sup": [Script(hang=True)]})
    out, _ = run(tmp_path, ex, retries=1, timeout_s=0.05)
    assert ex.cancelled == ["sup", "sup"]
    sup = [a for a in attempts(tmp_path) if a[0] == "sup"]
    assert [a[2] for a in sup] == ["failed", "failed"] and all("wall-clock limit of 0.05 s" in a[4] for a in sup)
    assert task_rows(tmp_path)["sup"][0] == "failed" and out.counts["done"] == 3


@pytest.mark.parametrize(("script", "message"), [
    (Script(code=0, metrics=False), "worker exited 0 without writing metrics.json"),
    (Script(code=3), "worker exited with code 3 and no error event (see worker.log)"),
])
def test_a_worker_that_ends_without_saying_why_is_failed_with_what_is_known(tmp_path, script, message):
    out, _ = run(tmp_path, FakeExecutor({"sup": [script]}), retries=0)
    assert task_rows(tmp_path)["sup"] == ("failed", message) and out.exit_code == 1


def _dead_runners_attempt(results: Path, pid: int | None, executor: str = "local") -> int:
    """What a SIGKILLed runner leaves: a run, its tasks, and an attempt still marked running."""
    store = Store(results / "runner.db")
    try:
        rid = store.begin_run("t", "", "t.yaml", 999_999, executor)
        store.add_tasks(rid, plan().tasks, set())
        aid = store.start_attempt("pre", rid, 1, executor, "cpu0", pid, os.uname().nodename)
        store.commit()
        return aid
    finally:
        store.close()


def test_a_dead_runners_worker_is_stopped_and_its_task_runs_again(tmp_path):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        aid = _dead_runners_attempt(tmp_path, orphan.pid)
        ex = FakeExecutor()
        out, _ = run(tmp_path, ex)
        assert orphan.wait(timeout=5) is not None  # stopped by the local backend's leftovers rule
    finally:
        orphan.kill()
    first = attempts(tmp_path)[0]
    assert first == ("pre", 1, "interrupted", None, "the runner stopped while this attempt ran") and aid
    assert "pre" in ex.submitted and out.exit_code == 0 and out.adopted == 0


def test_an_attempt_that_still_runs_is_adopted_not_started_again(tmp_path):
    aid = _dead_runners_attempt(tmp_path, None, executor="fake")
    ex = FakeExecutor()
    ex.adoptable[aid] = Handle("pre", Slot("cpu0"), time.time(), state={"script": Script(polls=3), "polls": 0})
    out, _ = run(tmp_path, ex)
    assert out.adopted == 1 and "pre" not in ex.submitted and out.exit_code == 0
    assert attempts(tmp_path)[0][:3] == ("pre", 1, "done")


def test_ctrl_c_stops_every_running_attempt_and_marks_them_interrupted(tmp_path):
    def hand(ex: FakeExecutor) -> None:
        if {"pre", "sup"} <= ex.live:
            raise KeyboardInterrupt

    ex = FakeExecutor({"pre": [Script(hang=True)], "sup": [Script(hang=True)]}, on_poll=hand)
    out, _ = run(tmp_path, ex)
    assert out.exit_code == 130 and sorted(ex.cancelled) == ["pre", "sup"]
    assert {a[0]: a[2] for a in attempts(tmp_path)} == {"pre": "interrupted", "sup": "interrupted"}
    assert task_rows(tmp_path)["pre"][0] == "interrupted" and task_rows(tmp_path)["ft"][0] == "pending"


def test_an_executor_that_cannot_start_ends_the_run_with_its_message(tmp_path):
    class NoDaemon(FakeExecutor):
        def submit(self, *a, **k):  # noqa: ANN002, ANN003
            raise UserError("cannot reach the docker daemon")

    with pytest.raises(UserError, match="cannot reach the docker daemon"):
        run(tmp_path, NoDaemon())
    assert attempts(tmp_path)[0][2:] == ("failed", None, "cannot reach the docker daemon")
    store = Store(tmp_path / "runner.db", readonly=True)
    try:
        assert tuple(store.db.execute("SELECT status, exit_code FROM runs").fetchone()) == ("failed", 2)
    finally:
        store.close()


@pytest.mark.parametrize("damage", [b"", b"\x00\xff" * 50, b'{"task": "som', b'{"task": "another-task"}'])
def test_a_damaged_metrics_json_is_not_a_result_and_its_task_runs_again(tmp_path, damage):
    run(tmp_path, FakeExecutor())
    (tmp_path / "tasks" / "sup" / "metrics.json").write_bytes(damage)
    again = FakeExecutor()
    out, _ = run(tmp_path, again)
    assert again.submitted == ["sup"] and out.exit_code == 0
    assert json.loads((tmp_path / "tasks" / "sup" / "metrics.json").read_text())["task"] == "sup"
    assert attempts(tmp_path)[-1][:3] == ("sup", 2, "done")


def test_kills_from_outside_are_not_counted_against_retries_up_to_a_limit(tmp_path):
    """SIGKILL from outside (the OOM killer, a user) twice, then the task runs: with `retries: 0` it ends
    done; each kill is recorded as such. A task killed again and again is failed, saying so."""
    ex = FakeExecutor({"sup": [Script(code=-9), Script(code=-9), Script()]})
    out, _ = run(tmp_path / "a", ex, retries=0)
    assert out.exit_code == 0 and ex.submitted.count("sup") == 3
    sup = [a for a in attempts(tmp_path / "a") if a[0] == "sup"]
    assert [a[2:4] for a in sup] == [("failed", -9), ("failed", -9), ("done", 0)]
    assert sup[0][4] == "killed (SIGKILL, exit -9) from outside byol-runner (the OOM killer? see dmesg)"

    ex = FakeExecutor({"sup": [Script(code=137)]})
    out, _ = run(tmp_path / "b", ex, retries=0)
    assert out.exit_code == 1 and ex.submitted.count("sup") == 4
    status, error = task_rows(tmp_path / "b")["sup"]
    assert status == "failed" and error.startswith("killed from outside byol-runner 4 times in this run, the last: killed (SIGKILL, exit 137)")
    # SIGINT sent to one worker by hand (it exits 130, saying it was interrupted): not its failure either
    ex = FakeExecutor({"sup": [Script(code=130, error="interrupted", error_type="interrupted"), Script()]})
    out, _ = run(tmp_path / "d", ex, retries=0)
    assert out.exit_code == 0 and ex.submitted.count("sup") == 2
    # a worker's own failure still counts: one attempt with retries: 0
    ex = FakeExecutor({"sup": [Script(code=1, error="boom")]})
    out, _ = run(tmp_path / "c", ex, retries=0)
    assert ex.submitted.count("sup") == 1 and task_rows(tmp_path / "c")["sup"] == ("failed", "boom")


def test_the_attempt_that_wrote_the_result_before_its_runner_died_is_done_and_stale_runs_are_closed(tmp_path):
    aid = _dead_runners_attempt(tmp_path, None)
    (tmp_path / "tasks" / "pre").mkdir(parents=True)
    (tmp_path / "tasks" / "pre" / "metrics.json").write_text(json.dumps({"task": "pre"}))
    ex = FakeExecutor()
    out, _ = run(tmp_path, ex)
    assert out.exit_code == 0 and "pre" not in ex.submitted
    assert attempts(tmp_path)[0][:3] == ("pre", 1, "done") and aid
    store = Store(tmp_path / "runner.db", readonly=True)
    try:
        runs = [tuple(r) for r in store.db.execute("SELECT pid, status FROM runs ORDER BY id")]
    finally:
        store.close()
    assert runs[0] == (999_999, "interrupted") and runs[1][1] == "done"  # the killed runner's run is not 'running'


def test_links_in_place_of_the_control_folder_and_the_lock_write_nothing_through_them(tmp_path, capsys):
    """control/ as a link to a folder of someone's .json files: the scheduler reads and removes none of
    them (said once). runner.lock as a link, a directory or a FIFO: run refuses in one line before it
    writes its pid anywhere; the file the link points at is untouched."""
    from runner.errors import UserError
    from runner.watch import RunnerLock

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "settings.json").write_text('{"task": "pre", "action": "retry"}')
    (tmp_path / "control").symlink_to(theirs)
    out, _ = run(tmp_path, FakeExecutor())
    assert out.exit_code == 0 and (theirs / "settings.json").read_text() == '{"task": "pre", "action": "retry"}'
    assert capsys.readouterr().err.count("is a link, not byol-runner's control folder") == 1

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    for i, make in enumerate((lambda p: p.symlink_to(precious), lambda p: p.mkdir(), lambda p: os.mkfifo(p))):
        results = tmp_path / f"r{i}"
        results.mkdir()
        make(results / "runner.lock")
        with pytest.raises(UserError, match=r"runner.lock is (a link|a directory|not a regular file).*remove it"):
            RunnerLock(results).acquire()
    assert precious.read_text() == "keep me"


def test_a_worker_killed_after_its_metrics_were_written_is_recorded_done(tmp_path):
    """metrics.json is the last thing a worker writes, atomically: a worker killed after it (SIGKILL while
    removing its checkpoint) has its result; the task is recorded done, not trained again."""
    ex = FakeExecutor({"sup": [Script(code=-9, metrics_then_killed=True)]})
    out, _ = run(tmp_path, ex)
    assert out.exit_code == 0 and task_rows(tmp_path)["sup"][0] == "done"
    assert [a[2] for a in attempts(tmp_path) if a[0] == "sup"] == ["done"]
    assert ex.submitted.count("sup") == 1


def test_a_task_failed_on_a_full_disk_runs_again_with_a_plain_run(tmp_path):
    """Its message says 'free some space, then byol-runner run resumes': so the next plain run does (a
    task failed for its own reasons still waits for --retry-failed)."""
    full = "no space left on the disk of /r/tasks/sup (0.0 MB free): free some space, then `byol-runner run` resumes"
    out, _ = run(tmp_path, FakeExecutor({"sup": [Script(code=1, error=full)], "lin": [Script(code=1, error="ValueError: mine")]}),
                 retries=0)
    assert task_rows(tmp_path)["sup"][0] == "failed" and task_rows(tmp_path)["lin"][0] == "failed"
    ex = FakeExecutor()
    out, _ = run(tmp_path, ex, retries=0)
    assert ex.submitted == ["sup"] and task_rows(tmp_path)["sup"][0] == "done" and task_rows(tmp_path)["lin"][0] == "failed"
