"""What passes between processes, typed in one place (DESIGN.md, "Files between processes").

- `TaskSpec`: tasks/<id>/task.json, built by `plan`, read by every executor and by the worker.
- `TaskStatus`: a task's state in runner.db and in `status --json`.
- `EventKind` and `event_line`: one line of tasks/<id>/events.jsonl.
- `read_events`: the one reader of an events.jsonl (whole, or the complete lines after an offset).
- `ENGINE_VERSION`: part of every task id.

Imports no torch: the runner, the TUI and the executors read it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field

from runner.arms import KINDS
from runner.choices import StrictModel, one_of
from runner.data.sources import DatasetSpec
from runner.errors import first_line
from runner.ml.config import TrainSettings

ENGINE_VERSION = 4  # bump when a code change alters results: it is part of every task id (4: RandomResizedCrop sampling)


class TaskStatus(StrEnum):
    """A task's state. Only the scheduler writes it; everything else reads it."""

    PENDING = "pending"  # waiting for its dependencies or a slot
    RUNNING = "running"
    DONE = "done"  # metrics.json is there
    FAILED = "failed"  # its attempts ran out; `run --retry-failed` tries again
    BLOCKED = "blocked"  # a dependency failed
    INTERRUPTED = "interrupted"  # the run stopped while it ran (Ctrl-C, a dead runner); the next run resumes it


class AttemptStatus(StrEnum):
    """How one attempt of a task ended (runner.db's attempts table)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"  # by the user (the TUI): its task is failed, "cancelled by the user"


class EventKind(StrEnum):
    LOG = "log"  # message
    PROGRESS = "progress"  # step, loss, lr, img_per_s, ...
    METRIC = "metric"  # per epoch / per evaluation: loss, val_loss, ...
    ERROR = "error"  # message, error_type
    DONE = "done"  # metrics.json written


def event_line(task: str, kind: EventKind | str, epoch: int | None = None, step: int | None = None, **values) -> str:
    """One events.jsonl line (with its newline)."""
    line = {"ts": round(time.time(), 3), "task": task, "kind": str(kind), "epoch": epoch, "step": step, **values}
    return json.dumps(line, default=float) + "\n"


EVENTS_READ_MAX = 64 << 20  # bytes read by one call: the rest on the next (a tail) or not at all (a file gone wild)


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The events of the complete lines of `path` from byte `offset` on, and the offset after the last
    complete line (a line being written is read next time). A line that is not JSON is skipped. Only a
    regular file is read, never through a link, and at most EVENTS_READ_MAX bytes a call: a FIFO, a
    device (/dev/zero) or a link put in its place reads as no events instead of hanging or filling memory."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # not there, a link (ELOOP), unreadable
        return [], offset
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return [], offset
        os.lseek(fd, offset, os.SEEK_SET)
        chunks, size = [], 0
        while size < EVENTS_READ_MAX:
            chunk = os.read(fd, min(1 << 20, EVENTS_READ_MAX - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError:
        return [], offset
    finally:
        os.close(fd)
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if isinstance(e, dict):
            events.append(e)
    return events, offset + end


TaskKind = one_of(KINDS, "task kind")


CONTROL_MAX_BYTES = 4096
_WARNED: dict[str, bool] = {}


class ControlRequest(StrictModel):
    """A request to the running scheduler from another process (the TUI): a file in <results>/control/,
    consumed when read. The scheduler stays runner.db's only writer."""

    action: Literal["cancel", "retry"]
    task: str

    def send(self, results: Path) -> Path:
        from runner.atomic import atomic_write_text

        path = Path(results) / "control" / f"{time.time_ns()}-{self.action}-{self.task}.json"
        atomic_write_text(path, self.model_dump_json(), fsync=False)
        return path

    @classmethod
    def receive(cls, results: Path) -> list["ControlRequest"]:
        """The waiting requests, oldest first; each file is removed (one that is not a request, too).
        Only regular files are read (a FIFO would block the scheduler); anything else is left alone."""
        import stat

        folder = Path(results) / "control"
        out = []
        if folder.is_symlink():  # its files are someone else's: never read or removed through the link
            if not _WARNED.get(str(folder)):
                _WARNED[str(folder)] = True
                print(f"note: {folder} is a link, not byol-runner's control folder: requests are not read (remove the link)",
                      file=sys.stderr)
            return out
        for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                st = f.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_size > CONTROL_MAX_BYTES:
                    raise ValueError(f"{st.st_size} bytes, more than a request's {CONTROL_MAX_BYTES}")
                data = f.read_bytes()
                f.unlink(missing_ok=True)
                out.append(cls.model_validate_json(data))
            except (OSError, ValueError) as e:
                f.unlink(missing_ok=True)
                print(f"note: ignored {f}: not a control request ({first_line(e, 120)})", file=sys.stderr)
        return out


class BudgetSpec(StrictModel):
    fraction: float | None = Field(None, gt=0, le=1)
    per_class: int | None = Field(None, ge=1)
    validation: Literal["budget", "full"] = "budget"  # the manifest's labels.validation
    min_validation_per_class: int = Field(5, ge=1)


class TaskSpec(StrictModel):
    """Everything that decides a task's result (the task id is a hash of it), and what the worker reports
    beside it (the monitor's labels)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: TaskKind
    dataset: str
    data: DatasetSpec
    seed: int = 0
    budget: BudgetSpec | None = None
    settings: TrainSettings
    pretraining: str | None = Field(None, description="a pretrain task's entry of runner.arms.PRETRAININGS (default byol)")
    encoder: str | None = Field(None, description="the pretrain task's encoder.pt, relative to the results dir")
    model: str | None = Field(None, description="an evaluate task: the classifier task's model.pt, relative to the results dir")
    monitor_labels: BudgetSpec | None = Field(None, description="a pretrain task: the smallest label budget of its study, "
                                              "whose labels the pretraining monitor scores the encoder with (not in the id: "
                                              "the monitor changes no weight)")
    imagenet_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="the sha256 of the ImageNet weights file "
                                        "a task that starts from them was planned with (part of its id); the worker loads no other")
    cache_dir: str = "cache"
    engine_version: int = ENGINE_VERSION

    @classmethod
    def read(cls, path: Path) -> "TaskSpec":
        """A task.json as the plan wrote it, for an executor (the worker checks it itself and says more)."""
        from runner.errors import UserError

        from runner.atomic import read_regular_file

        try:
            return cls.model_validate_json(read_regular_file(Path(path), 64 << 20))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise UserError(f"{path}: not a task spec byol-runner can read ({' '.join(first[:3])}); "
                            "`byol-runner run` writes it again from the manifest") from None
