"""Runs a plan on an executor: slots, dependencies, retries, resume, timeouts, Ctrl-C.

The scheduler is runner.db's only writer. It loops: reap ended workers (done when metrics.json is
there, else a failed attempt, retried up to `executor.retries`), read new event lines of running
tasks into the store, block tasks whose dependency failed, start ready tasks on free slots. A task
whose metrics.json exists is never run again; one that was interrupted restarts and its worker
resumes from its checkpoint. A lock file keeps a second runner off the same results dir.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner.contracts import AttemptStatus as A
from runner.contracts import TaskStatus as S
from runner.contracts import ControlRequest
from runner.errors import DISK_FULL, UserError
from runner.executors.base import Executor, Handle, Slot
from runner.executors.registry import recover
from runner.plan import Plan, PlannedTask, is_done, plan_state, write_task_files
from runner.store import Store
from runner.watch import OUTSIDE_KILLS, EventTail, RunnerLock, StopSignals, killed_from_outside, signal_text



@dataclass
class Running:
    task: PlannedTask
    handle: Handle
    attempt_id: int
    tail: EventTail


@dataclass
class RunOutcome:
    run_id: int
    exit_code: int
    counts: dict[str, int]
    started_workers: int
    seconds: float
    adopted: int = 0  # attempts a killed runner started that this run watched to their end
    removed_temp: tuple[int, int] = (0, 0)  # temporary files killed processes left (count, bytes), removed at start
    failed: dict[str, str] = field(default_factory=dict)  # failed task's label -> its error


class Scheduler:
    def __init__(self, plan: Plan, results: Path, executor: Executor, slots: list[Slot], store: Store,
                 retries: int = 1, retry_failed: bool = False, timeout_s: float | None = None, retry_ids: tuple[str, ...] = (),
                 display=None, poll_s: float = 0.2, grace_s: float = 10.0) -> None:  # noqa: ANN001
        self.plan, self.results, self.executor, self.slots, self.store = plan, results, executor, slots, store
        self.retries, self.retry_failed, self.timeout_s, self.retry_ids = retries, retry_failed, timeout_s, set(retry_ids)
        self.display, self.poll_s, self.grace_s = display, poll_s, grace_s
        self.status: dict[str, str] = {}
        self.failures: dict[str, int] = {}
        self.errors: dict[str, str | None] = {}  # each task's last error, as runner.db has it
        self.kills: dict[str, int] = {}  # attempts killed from outside, per task (not counted against retries)
        self.running: dict[str, Running] = {}
        # (task, attempt, its handle once submitted) from the attempt's row until the task is in `running`:
        # a stop anywhere in between ends that attempt (and cancels its worker if it got one)
        self.starting: tuple[str, int, object] | None = None
        self.started_workers = 0
        self.late_stop: str | None = None  # a stop that came while the executor shut down (see StopSignals)
        self.adopted: dict[int, Handle] = {}
        self.taken_over = 0
        self.removed_temp = (0, 0)

    # ---- setup -----------------------------------------------------------------------------

    def transition(self, tid: str, status: S, error: str | None = None) -> None:
        """A task's new status (and its error, or none), in the scheduler's view and in runner.db at once."""
        self.status[tid] = S(status)
        self.errors[tid] = error
        self.store.set_status(tid, status, error)

    def _recover(self) -> None:
        """Attempts a dead runner left marked running: adopt those the executor still has (containers);
        every other one's leftovers are stopped by its backend and it is recorded as interrupted."""
        stale = self.store.stale_attempts()
        self.adopted = recover(self.executor, stale, self.results, self.grace_s)
        for a in stale:
            if a["id"] in self.adopted:
                continue
            if is_done(self.results, a["task_id"]):  # it wrote its result before the runner died: it is the one that did
                self.store.end_attempt(a["id"], A.DONE, None, None)
                self.store.set_status(a["task_id"], S.DONE)
            else:
                self.store.end_attempt(a["id"], A.INTERRUPTED, None, "the runner stopped while this attempt ran")
                self.store.set_status(a["task_id"], S.INTERRUPTED)
        self.store.end_stale_runs()  # runs whose runner was killed: no runner holds the lock but this one
        self.store.commit()
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        """What killed processes left half written (a checkpoint, a cache entry; tens of MB each, and on a
        full disk the reason the next run fails too): removed once their writer is gone. The folders of
        adopted attempts are left alone (their container's pids are not this machine's)."""
        from runner.atomic import stale_temp_files
        from runner.system import pid_alive

        busy = {h.task_id for h in self.adopted.values()}
        folders = [self.results / "tasks" / t.id for t in self.plan.tasks if t.id not in busy]
        folders.append(self.results / self.plan.name)
        if not busy:
            folders.append(self.results / "cache")
        n = size = 0
        for p in stale_temp_files(folders, pid_alive):
            if p.is_dir():
                size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                shutil.rmtree(p, ignore_errors=True)
            else:
                size += p.stat().st_size
                p.unlink(missing_ok=True)
            n += 1
        self.removed_temp = (n, size)

    def _take_over(self, run_id: int) -> None:
        """Adopted attempts of this plan's tasks are watched as if this runner had started them; those
        of tasks the manifest no longer has are stopped."""
        by_id = self.plan.by_id()
        for aid, handle in self.adopted.items():
            t = by_id.get(handle.task_id)
            if t is None or handle.task_id in self.running:
                self.executor.cancel(handle, self.grace_s)
                self.store.end_attempt(aid, A.INTERRUPTED, self.executor.poll(handle), "not in the current plan: stopped")
                continue
            after = self.store.last_point_ts(aid)
            tail = EventTail(self.results / "tasks" / t.id / "events.jsonl", after_ts=after if after is not None else handle.started)
            self.running[t.id] = Running(t, handle, aid, tail)
            self.store.adopt_attempt(aid, run_id)
            self.taken_over += 1
            self.transition(t.id, S.RUNNING, None)
        self.store.commit()

    def _initial_status(self, run_id: int) -> None:
        rows = {r.id: r for r in self.store.run_tasks(run_id)}
        states = plan_state(self.plan, self.results)
        for t in self.plan.tasks:
            state, why = states[t.id]
            if state == "done":
                self.status[t.id] = S.DONE
            elif state == "damaged":  # not a result: computed again, and said so
                self.transition(t.id, S.PENDING, f"{why}: computed again")
                print(f"note: {t.label} ({t.id}): {why}: computed again", file=sys.stderr)
            elif rows[t.id].status == S.FAILED and (rows[t.id].error or "").startswith(DISK_FULL):
                # not the task's fault: once space is freed a plain `run` resumes it, as its message says
                self.transition(t.id, S.PENDING, None)
                print(f"note: {t.label} ({t.id}) failed on a full disk: it runs again, from its last checkpoint", file=sys.stderr)
            elif rows[t.id].status == S.FAILED and not (self.retry_failed or t.id in self.retry_ids):
                self.status[t.id] = S.FAILED  # an earlier run gave up on it; --retry-failed runs it again
            else:
                self.transition(t.id, S.PENDING, None)
        self.store.commit()

    # ---- the loop --------------------------------------------------------------------------

    def run(self, manifest_yaml: str, manifest_path: str, lock: RunnerLock | None = None) -> RunOutcome:
        """Run the plan to its end. `lock`: the results dir's lock, already held by the caller (else
        taken here); released by whoever took it."""
        t0 = time.time()
        own = lock is None
        if own:
            lock = RunnerLock(self.results)
            lock.acquire()
        stopping = StopSignals()
        run_id = -1
        try:
            self.executor.bind(self.results, self.plan.name)
            self._recover()
            run_id = self.store.begin_run(self.plan.name, manifest_yaml, manifest_path, os.getpid(), self.executor.name)
            write_task_files(self.plan, self.results)
            self.store.add_tasks(run_id, self.plan.tasks, {t.id for t in self.plan.tasks if is_done(self.results, t.id)})
            self._initial_status(run_id)
            self._take_over(run_id)
            self._show(True)
            try:
                self._loop(run_id, stopping)
                stopping.check()  # a stop in the last round that a finalizer dropped
            except KeyboardInterrupt:
                stopping.stopping = True  # a second Ctrl-C now does not cut the cleanup short
                n = len(self.running)
                self._note(f"{stopping.name or 'Ctrl-C'}: stopping {n} running task{'s' if n != 1 else ''} (each keeps its last "
                           f"checkpoint; up to {self.grace_s:g} s each) and recording them…")
                self._stop_all(S.INTERRUPTED, f"stopped by {stopping.name or 'Ctrl-C'}", run_id)
                self.store.end_run(run_id, "interrupted", 130)
                return self._outcome(run_id, 130, t0)
            except UserError:  # the executor cannot start anything (no daemon, no image, no GPU runtime)
                self._stop_all(S.INTERRUPTED, "stopped: the executor failed")
                self.store.end_run(run_id, "failed", 2)
                raise
            code = 0 if all(s == S.DONE for s in self.status.values()) else 1
            self.store.end_run(run_id, "done" if code == 0 else "failed", code)
            return self._outcome(run_id, code, t0)
        finally:
            stopping.closing = True  # a stop from now on is kept for the caller (late_stop), not raised
            self.executor.close()
            stopping.restore()  # after the executor is closed: a late Ctrl-C cannot interrupt that
            self.late_stop = stopping.late
            if own:
                lock.release()

    def _outcome(self, run_id: int, code: int, t0: float) -> RunOutcome:
        counts: dict[str, int] = {}
        for s in self.status.values():
            counts[s] = counts.get(s, 0) + 1
        by_id = self.plan.by_id()
        failed = {by_id[t].label: self.errors.get(t) or "" for t, s in self.status.items() if s == S.FAILED}
        return RunOutcome(run_id, code, counts, self.started_workers, time.time() - t0, self.taken_over, self.removed_temp, failed)

    def _loop(self, run_id: int, stopping: StopSignals) -> None:
        by_id = self.plan.by_id()
        while True:
            stopping.check()
            changed = self._reap()
            for r in self.running.values():
                events = r.tail.read()
                if events:
                    self.store.add_points(r.task.id, r.attempt_id, events)
                    for e in events:  # a resume, or a checkpoint it could not use, said where the user looks
                        msg = str(e.get("message", "")) if e.get("kind") == "log" else ""
                        if msg.startswith("resumed from checkpoint") or "moved aside" in msg:
                            self._note(f"{r.task.label}: {msg}")
            changed |= self._control()
            changed |= self._block_orphans(by_id)
            changed |= self._launch(run_id, by_id)
            self.store.commit()
            self._show(changed)
            if not self.running and not any(s == S.PENDING for s in self.status.values()):
                return
            time.sleep(self.poll_s)

    def _ready(self, t: PlannedTask) -> bool:
        return self.status[t.id] == S.PENDING and all(self.status[d] == S.DONE for d in t.deps)

    def _launch(self, run_id: int, by_id: dict[str, PlannedTask]) -> bool:
        busy = {r.handle.slot for r in self.running.values()}
        free = [s for s in self.slots if s not in busy]
        launched = False
        for t in self.plan.tasks:
            if not free:
                break
            if not self._ready(t):
                continue
            slot = free.pop(0)
            task_json = self.results / "tasks" / t.id / "task.json"
            tail = EventTail(task_json.parent / "events.jsonl")
            number = len(self.store.attempts(t.id)) + 1
            if number > 1:
                self._note_restart(t)
            attempt = self.store.start_attempt(t.id, run_id, number, self.executor.name, slot.name, None, os.uname().nodename)
            self.starting = (t.id, attempt, None)  # Ctrl-C or SIGTERM from here on: _stop_all ends the attempt
            self.store.commit()  # the attempt exists before its container does: a restarted runner can adopt it
            try:
                handle = self.executor.submit(t.id, task_json, self.results, slot, attempt_id=attempt, number=number)
            except UserError as e:
                self.starting = None
                self.store.end_attempt(attempt, A.FAILED, None, str(e))
                self.transition(t.id, S.FAILED, str(e))
                raise
            self.starting = (t.id, attempt, handle)
            self.store.set_attempt_process(attempt, handle.pid, handle.node)
            self.running[t.id] = Running(t, handle, attempt, tail)
            self.starting = None
            self.status[t.id] = S.RUNNING  # runner.db says so since start_attempt (its row keeps its last error)
            self.started_workers += 1
            launched = True
        return launched

    def _reap(self) -> bool:
        changed = False
        for tid, r in list(self.running.items()):
            code = self.executor.poll(r.handle)
            reason = None
            if code is None and self.timeout_s and time.time() - r.handle.started > self.timeout_s:
                self.executor.cancel(r.handle, self.grace_s)
                code = self.executor.poll(r.handle)
                reason = f"wall-clock limit of {self.timeout_s:g} s reached (executor.timeout_s)"
            if code is None:
                continue
            self.store.add_points(tid, r.attempt_id, r.tail.read())
            r.tail.last_error = reason or r.tail.last_error  # the limit, not the worker's "stopped by SIGTERM"
            self.store.set_attempt_node(r.attempt_id, r.handle.node)  # a Ray task learns its node as it runs
            del self.running[tid]
            changed = True
            if is_done(self.results, tid):  # its metrics.json is whole and its own: the result is there, whatever
                self.store.end_attempt(r.attempt_id, A.DONE, code, None)  # ended the worker after it (a kill mid-cleanup)
                self.transition(tid, S.DONE, None)
                continue
            error = r.tail.last_error or f"worker exited with code {code} and no error event (see worker.log)"
            if code == 0:
                error = "worker exited 0 without writing metrics.json"
            if reason is None and killed_from_outside(code, r.tail.last_error_type):
                # the OOM killer, `docker kill`, a user: not the task's fault, so not one of its retries,
                # up to a limit (a task killed again and again is failed, saying so)
                self.kills[tid] = self.kills.get(tid, 0) + 1
                error = r.tail.last_error or f"{signal_text(code)} from outside byol-runner (the OOM killer? see dmesg)"
                if self.kills[tid] <= OUTSIDE_KILLS:
                    self.store.end_attempt(r.attempt_id, A.FAILED, code, error)
                    self.transition(tid, S.PENDING, f"{error}; not counted against executor.retries "
                                                    f"({self.kills[tid]} of {OUTSIDE_KILLS} such kills)")
                    continue
                error = f"killed from outside byol-runner {self.kills[tid]} times in this run, the last: {error}"
            self.store.end_attempt(r.attempt_id, A.FAILED, code, error)
            self.failures[tid] = self.failures.get(tid, 0) + 1
            if self.failures[tid] <= self.retries:
                self.transition(tid, S.PENDING, f"attempt {self.failures[tid]} failed: {error}")
            else:
                self.transition(tid, S.FAILED, error)
        return changed

    def _control(self) -> bool:
        """Requests from other processes (the TUI), as files in <results>/control/: the scheduler
        stays the only writer of runner.db."""
        changed = False
        for req in ControlRequest.receive(self.results):
            tid, action = req.task, req.action
            if tid not in self.status:
                continue
            if action == "cancel" and tid in self.running:
                r = self.running.pop(tid)
                self.executor.cancel(r.handle, self.grace_s)
                self.store.add_points(tid, r.attempt_id, r.tail.read())
                self.store.end_attempt(r.attempt_id, A.CANCELLED, self.executor.poll(r.handle), "cancelled by the user")
                self.transition(tid, S.FAILED, "cancelled by the user")
                changed = True
            elif action == "retry" and self.status[tid] in (S.FAILED, S.BLOCKED, S.INTERRUPTED):
                self._reopen(tid)
                changed = True
        return changed

    def _reopen(self, tid: str) -> None:
        """A failed task, and the tasks it blocked, go back to pending with a fresh retry budget."""
        self.failures[tid] = 0
        self.transition(tid, S.PENDING, None)
        for t in self.plan.tasks:
            if self.status[t.id] == S.BLOCKED and tid in t.deps:
                self._reopen(t.id)

    def _block_orphans(self, by_id: dict[str, PlannedTask]) -> bool:
        changed = False
        for t in self.plan.tasks:
            if self.status[t.id] == S.PENDING:
                bad = [d for d in t.deps if self.status[d] in (S.FAILED, S.BLOCKED)]
                if bad:
                    self.transition(t.id, S.BLOCKED, f"dependency {bad[0]} ({by_id[bad[0]].label}) failed")
                    changed = True
        return changed

    def _note(self, text: str) -> None:
        """One line for the person watching (`run`'s display prints it; nothing without a display)."""
        note = getattr(self.display, "note", None)
        if note is not None:
            note(text)

    def _note_restart(self, t: PlannedTask) -> None:
        """A task that ran before starts again: from its checkpoint (its worker says the step), or from
        step 0, said here, with what was lost, when it stopped before its first checkpoint."""
        if (self.results / "tasks" / t.id / "checkpoint.pt").is_file():
            return
        row = self.store.progress([t.id]).get(t.id)
        step = row["step"] if row is not None else None
        if step:
            self._note(f"{t.label}: starts again from step 0 (its last attempt reached step {step} before its first checkpoint)")

    def _stop_all(self, status: S, why: str = "stopped by Ctrl-C", run_id: int | None = None) -> None:
        if self.starting is not None and self.starting[0] not in self.running:  # stopped while its worker started
            tid, attempt, handle = self.starting
            code = None
            if handle is not None:  # submitted, not yet recorded: its worker is stopped like the others
                self.executor.cancel(handle, self.grace_s)
                code = self.executor.poll(handle)
            self.store.end_attempt(attempt, status, code, why)
            self.transition(tid, S.DONE if is_done(self.results, tid) else status)
        self.starting = None
        for tid, r in list(self.running.items()):
            self.executor.cancel(r.handle, self.grace_s)
            self.store.add_points(tid, r.attempt_id, r.tail.read())
            self.store.end_attempt(r.attempt_id, status, self.executor.poll(r.handle), why)
            self.transition(tid, S.DONE if is_done(self.results, tid) else status)
        self.running.clear()
        if run_id is not None:  # an attempt the stop caught before the scheduler held it (its row just written)
            for row in self.store.open_attempts(run_id):
                self.store.end_attempt(row["id"], status, None, why)
                self.transition(row["task_id"], S.DONE if is_done(self.results, row["task_id"]) else status)
        self.store.commit()

    def _show(self, changed: bool) -> None:
        if self.display is not None:
            self.display(self, changed)
