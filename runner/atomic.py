"""Files that mark a state are written to a temporary name, flushed to disk and renamed: a crash at
any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


_TEMP = re.compile(r"^\..+\.tmp-([0-9]+)$")


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `.<name>.tmp-<pid>`, so that what a
    killed process left is known by its pid (`stale_temp_files`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stale_temp_files(folders: list[Path], alive) -> list[Path]:  # noqa: ANN001 - alive(pid) -> bool
    """The temporary files and folders (see `temp_path`) directly in `folders` whose writing process is
    no longer alive: a killed worker's half checkpoint, a half-decoded cache entry."""
    out = []
    for folder in folders:
        for p in folder.iterdir() if folder.is_dir() else []:
            m = _TEMP.match(p.name)
            if m and not alive(int(m.group(1))):
                out.append(p)
    return out


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal mid-write: no partial file is left behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


class NotRegularFile(ValueError):
    """A path that is a FIFO, a device or a folder where a file was expected."""


class FileTooLarge(ValueError):
    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


def open_regular(path: str | Path, limit: int | None = None):  # noqa: ANN201 - a binary file object
    """A regular file opened for reading, or NotRegularFile: opened without waiting (a FIFO's open
    blocks until a writer comes: a damaged results dir hung `status`), then checked on the descriptor
    itself, so a file swapped for a FIFO, a device or a folder is never read. FileTooLarge past `limit`
    bytes; FileNotFoundError and other OSErrors as they come."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(str(path))
        if limit is not None and st.st_size > limit:
            raise FileTooLarge(st.st_size)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a FIFO would block, /dev/zero never ends):
    NotRegularFile or FileTooLarge otherwise; FileNotFoundError and other OSErrors as they come."""
    with open_regular(path, limit) as f:
        return f.read()


def read_json(path: str | Path, limit: int = 256 << 20) -> Any:
    """A JSON file the runner wrote (metrics, results, indexes), read as read_regular_file reads."""
    return json.loads(read_regular_file(Path(path), limit))
