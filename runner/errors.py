"""Errors a user can act on. The CLI prints them as one line and exits 2; anything else is a bug."""

from __future__ import annotations

import errno
from pathlib import Path


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's first line of text, for a one-line message: its type when it has no text (str() of
    some of torch's and numpy's is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def described(e: BaseException, limit: int = 160) -> str:
    """`Type: first line`, or the type alone when the exception has no text."""
    text = first_line(e, limit)
    return type(e).__name__ if text == type(e).__name__ else f"{type(e).__name__}: {text}"


class UserError(Exception):
    """Bad input (manifest, data, usage): the message says what is wrong and where."""


class ManifestError(UserError):
    """The manifest is not valid; the message names the YAML path (and line) of each problem."""


class DataError(UserError):
    """The data a manifest points at cannot be used as asked (missing files, one class left, ...)."""


class StartError(UserError):
    """A task cannot start (a bad task.json, a missing encoder, no GPU for a GPU task): the worker exits 2
    with an error event that says why; a command that meets it (bench, predict) prints it as one line."""


# ---- the disk, in one line ------------------------------------------------------------------

UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
DISK_FULL = "no space left on the disk"  # how a full disk's message begins (a task failed so is run again by `run`)


def os_error_line(e: OSError) -> str | None:
    """One line for what a user can fix about the disk: full, read-only, not theirs (else None)."""
    where = e.filename or "the results dir"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_space(where)
        return f"{DISK_FULL} of {where} ({free} free): free some space and run again (finished tasks are kept)"
    if e.errno in UNWRITABLE:
        return (f"cannot write {where}: {e.strerror} (the results dir is read-only or not yours): give one you can "
                "write with --results DIR; status, report and plan read a read-only one")
    return None


def free_space(path: str) -> str:
    """The free space of the disk holding `path` (or its nearest existing parent), e.g. "12.3 MB"."""
    import shutil

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.1f} MB"
    except OSError:
        return "unknown space"
