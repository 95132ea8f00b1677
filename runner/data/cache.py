"""The decoded-image cache: every image decoded once, stored as one uint8 array file.

An entry is `<cache_dir>/<key>/` with `images.npy` (N, C, S, S) uint8 and `index.json` (one record
per item: key, file and pixel hashes, gray, native mode and size, decode error). The key hashes the
source's content fingerprint (the bytes of its files, not their names or dates), the image settings
and DECODE_VERSION, so a changed file or setting makes a new entry and an unchanged source is never
decoded twice. Entries are written in a temporary folder and renamed into place: a crash leaves no
half entry. Training reads `images.npy` (memory-mapped), never the original files.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.atomic import atomic_write_text, open_regular, read_json, temp_path
from runner.data.arrays import SYNTHETIC_VERSION, load_npz_images, synthetic_images
from runner.data.decode import DECODE_VERSION, Decoded, ImageSettings, decode_array, decode_file
from runner.data.sources import DatasetBase, Item, NpzSource, RootedSource, SyntheticSource, expand_path
from runner.system import cpu_count

Progress = Callable[[int, int, str], None]
GRAY_DATASET_SHARE = 0.75  # channels: auto -> 1 when at least this share of the images is grayscale content
_PARALLEL_MIN = 64  # below this many files, decoding in-process beats starting workers


def no_progress(done: int, total: int, what: str) -> None:
    return None


@dataclass
class ImageTable:
    """A source's decoded images, in the order of its items. Unreadable images are all-zero rows."""

    keys: list[str]
    images: np.ndarray  # (N, C, S, S) uint8, memory-mapped from the cache
    records: list[dict]  # per item: file_sha, pixel_sha, gray, mode, native_size, error
    channels: int
    cache_key: str
    from_cache: bool
    seconds: float = 0.0

    @property
    def errors(self) -> dict[str, str]:
        return {k: r["error"] for k, r in zip(self.keys, self.records) if r["error"]}


def content_fingerprint(spec: DatasetBase, items: Sequence[Item], cache_dir: Path | None = None) -> str:
    """A hash of what the source's images are: file bytes (or array bytes, or generator settings)."""
    h = hashlib.sha256()
    if isinstance(spec, RootedSource):
        for key, sha in zip((it.key for it in items), FileHashes(spec.root_path, cache_dir).hashes([it.key for it in items])):
            h.update(key.encode() + b"\0" + sha.encode() + b"\n")
    elif isinstance(spec, NpzSource):
        h.update(file_sha(Path(expand_path(spec.path))).encode())
    elif isinstance(spec, SyntheticSource):
        h.update(json.dumps(["synthetic", SYNTHETIC_VERSION, spec.num_classes, spec.per_class, spec.size, spec.seed]).encode())
    return h.hexdigest()


class FileHashes:
    """sha256 of files, remembered by (size, mtime_ns) as git's index does, so that a cache hit
    does not read every file again. A file rewritten with the same size within the same
    nanosecond would be missed; that is the whole of the trade."""

    def __init__(self, root: Path, cache_dir: Path | None) -> None:
        self.root = root
        self.memo_path = None
        if cache_dir is not None:
            name = hashlib.sha256(str(root).encode()).hexdigest()[:16]
            self.memo_path = Path(cache_dir) / "file-hashes" / f"{name}.json"

    def hashes(self, keys: Sequence[str]) -> list[str]:
        """The files' hashes, one a key; a slice of a volume (`file#0042`) has its file's hash and its index."""
        from runner.data.medical import split_key

        files, index = [], []
        for key in keys:
            f, i = split_key(key)
            files.append(f)
            index.append(i)
        by_file = dict(zip(dict.fromkeys(files), self._hashes(list(dict.fromkeys(files)))))
        return [by_file[f] if i is None else f"{by_file[f]}#{i}" for f, i in zip(files, index)]

    def _hashes(self, keys: Sequence[str]) -> list[str]:
        memo: dict[str, list] = {}
        if self.memo_path is not None and self.memo_path.is_file():
            try:
                memo = read_json(self.memo_path)
            except (OSError, ValueError):
                memo = {}
        out, fresh, changed = [], {}, False
        root = str(self.root)
        for key in keys:
            path = os.path.join(root, key)
            try:
                st = os.stat(path)
                stamp = [st.st_size, st.st_mtime_ns]
            except OSError:
                stamp = None
            known = memo.get(key)
            if stamp is not None and known is not None and known[:2] == stamp:
                sha = known[2]
            else:
                sha, changed = file_sha(Path(path)), True
            if stamp is not None:
                fresh[key] = stamp + [sha]
            out.append(sha)
        if self.memo_path is not None and (changed or len(fresh) != len(memo)):
            atomic_write_text(self.memo_path, json.dumps(fresh), fsync=False)
        return out


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open_regular(path) as f:  # a FIFO in place of a file would block for ever
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        h.update(f"unreadable:{e.errno}".encode())
    except ValueError:  # NotRegularFile
        h.update(b"not a regular file")  # decoding will name the file and the reason
    return h.hexdigest()


_SHA_MEMO: dict[tuple, str | None] = {}


def file_sha256(path: Path) -> str | None:
    """sha256 of a file (None if it is not there), remembered by (path, size, mtime) within a process."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha(path)
    return _SHA_MEMO[key]


def image_settings(spec: DatasetBase) -> ImageSettings:
    """How a data set's files are decoded: size and fit, and for DICOM and NIfTI the window and slice axis."""
    windows = getattr(spec, "windows", None)
    return ImageSettings(spec.image_size, spec.fit, windows, getattr(spec, "slice_axis", "axial"))


def cache_key(fingerprint: str, settings: ImageSettings, channels: str | int) -> str:
    blob = json.dumps([fingerprint, *settings.key_parts(), str(channels), DECODE_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class OlderEntry(Exception):
    """A cache entry an earlier byol-runner wrote, without the digest this one checks."""


def load_images(
    spec: DatasetBase,
    items: Sequence[Item],
    cache_dir: Path,
    progress: Progress = no_progress,
    workers: int | None = None,
) -> ImageTable:
    """The decoded images of `items`, from the cache, or decoded now (on all cores) and cached."""
    t0 = time.perf_counter()
    settings = image_settings(spec)
    key = cache_key(content_fingerprint(spec, items, cache_dir), settings, spec.channels)
    entry = Path(cache_dir) / key
    keys = [it.key for it in items]
    if (entry / "index.json").is_file() or entry.is_dir():
        try:
            table = _read_entry(entry, key)
        except OlderEntry as e:
            print(f"note: cache entry {entry} {e}: decoded again, once", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)
        except (OSError, ValueError, KeyError, TypeError) as e:  # damaged (a crash, a disk error, a hand): decode again
            print(f"note: damaged cache entry {entry} ({type(e).__name__}: {str(e)[:120]}): decoded again", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            if table.keys == keys:
                table.seconds = time.perf_counter() - t0
                return table
    _check_room(entry.parent, len(items), settings.size, spec.channels)
    _write_entry(spec, items, settings, entry, progress, workers or cpu_count())
    table = _read_entry(entry, key)
    table.from_cache = False
    table.seconds = time.perf_counter() - t0
    return table


ROOM_MARGIN = 8 << 20  # bytes the disk keeps free beyond a new cache entry (runner.db, task folders, logs)


def entry_bytes(n: int, size: int, channels: str | int) -> int:
    """What a cache entry of n images at `size` px takes on the disk: its gray layout, and for a colour
    (or `auto`) data set the RGB one, both written while decoding (the RGB one is sparse until used)."""
    return n * size * size * (1 if channels == 1 else 4)


MAX_IMAGES = 2_000_000  # images one data set decodes (CheXpert, the largest chest X-ray set in use, has 224k)


def _check_room(cache_dir: Path, n: int, size: int, channels: str | int) -> None:
    """Refuse, before decoding, an entry the disk cannot hold: said with what it needs and what is free
    on the cache's own disk (decoding 200k images into a full disk took minutes, then failed); and a data
    set of more images than MAX_IMAGES."""
    from runner.errors import DISK_FULL, DataError

    if n > MAX_IMAGES:
        raise DataError(f"{n:,} images to decode; a data set holds at most {MAX_IMAGES:,} (select classes, or split the "
                        "data set into several)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    need = entry_bytes(n, size, channels) if channels != "auto" else n * size * size  # auto: gray at least, RGB if colour
    if need + ROOM_MARGIN > free:
        raise DataError(f"{DISK_FULL} of {cache_dir} for the image cache: {n} images at {size} px need "
                        f"{need / 2**20:.0f} MB and {free / 2**20:.0f} MB are free; free some space, lower image_size, "
                        "or give another --results")


def _read_entry(entry: Path, key: str) -> ImageTable:
    """An entry as written: its index names this key, and images.npy has the sha256 the index recorded
    (random bytes, another entry's file of the same shape, or an entry from before entries carried a
    digest are decoded again, never trained on)."""
    index = read_json(entry / "index.json")
    if "images_sha256" not in index:
        raise OlderEntry("written before cache entries carried their digest")
    if index.get("key") != key:
        raise ValueError(f"its index names another entry ({str(index.get('key'))[:24]})")
    if file_sha256(entry / "images.npy") != index["images_sha256"]:
        raise ValueError("images.npy is not the file its index recorded (sha256 differs)")
    images = np.load(entry / "images.npy", mmap_mode="r")
    if images.ndim != 4 or images.shape[0] != len(index["items"]) or images.dtype != np.uint8:
        raise ValueError(f"images.npy holds {images.shape} {images.dtype} for {len(index['items'])} items")
    return ImageTable(
        keys=[r["key"] for r in index["items"]],
        images=images,
        records=index["items"],
        channels=int(index["channels"]),
        cache_key=key,
        from_cache=True,
    )


def _decoded_stream(spec: DatasetBase, items: Sequence[Item], s: ImageSettings, workers: int):
    if isinstance(spec, RootedSource):
        paths = [str(spec.root_path / it.key) for it in items]
        if workers <= 1 or len(paths) < _PARALLEL_MIN:
            yield from (decode_file(p, s) for p in paths)
            return
        # forkserver: never fork a process that may run threads (rich's refresh, torch's pools).
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            yield from pool.map(decode_file, paths, [s] * len(paths), chunksize=16)
    elif isinstance(spec, NpzSource):
        arrays = load_npz_images(expand_path(spec.path))
        for it in items:
            split, index = it.key.split("/")
            yield decode_array(arrays[split][int(index)], s)
    elif isinstance(spec, SyntheticSource):
        imgs = synthetic_images(spec.num_classes, spec.per_class, spec.size, spec.seed)
        order = {f"synthetic/{c}/{i:06d}": c * spec.per_class + i for c in range(spec.num_classes) for i in range(spec.per_class)}
        for it in items:
            yield decode_array(imgs[order[it.key]], s)
    else:  # pragma: no cover
        raise TypeError(type(spec))


def _write_entry(
    spec: DatasetBase,
    items: Sequence[Item],
    s: ImageSettings,
    entry: Path,
    progress: Progress,
    workers: int,
) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(entry)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _fill_entry(spec, items, s, entry, tmp, progress, workers)
    except BaseException as e:  # a full disk, a stop: no half entry is left to keep the disk full
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # said of the cache's disk, not of the working directory's
            e.filename = str(entry.parent)
        raise


class _Rows:
    """An .npy file of (n, C, S, S) uint8 written a row at a time with plain writes: a write to a full
    disk raises ENOSPC (through a memory map it was a SIGBUS that killed the process unsaid). The file
    is sparse until written."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # the header, the size (sparse)
        self.offset, self.row = m.offset, int(np.prod(shape[1:]))
        del m
        self.f = open(path, "r+b")  # noqa: SIM115 - closed in close()

    def __setitem__(self, i: int, value: np.ndarray) -> None:
        self.f.seek(self.offset + i * self.row)
        self.f.write(np.ascontiguousarray(value, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.f.close()


def _fill_entry(spec: DatasetBase, items: Sequence[Item], s: ImageSettings, entry: Path, tmp: Path, progress: Progress,
                workers: int) -> None:
    n, size = len(items), s.size
    # Both layouts are written as we go; the RGB file is sparse until a colour image arrives, and
    # only the one the channel decision keeps survives.
    gray, rgb = _Rows(tmp / "gray.npy", (n, 1, size, size)), _Rows(tmp / "rgb.npy", (n, 3, size, size))
    records: list[dict] = []
    colour_rows: list[int] = []
    step = max(1, n // 200)
    for i, (it, d) in enumerate(zip(items, _decoded_stream(spec, items, s, workers))):
        records.append(_record(it, d))
        if d.pixels is not None:
            if d.gray:
                gray[i] = d.pixels[None]
            else:
                rgb[i] = d.pixels.transpose(2, 0, 1)
                gray[i] = _luma(d.pixels)[None]
                colour_rows.append(i)
        if (i + 1) % step == 0 or i + 1 == n:
            progress(i + 1, n, "decoding")
    gray.close()
    readable = sum(1 for r in records if r["error"] is None)
    if spec.channels == "auto":
        channels = 1 if readable == 0 or (readable - len(colour_rows)) / readable >= GRAY_DATASET_SHARE else 3
    else:
        channels = int(spec.channels)
    if channels == 3:
        colour = np.zeros(n, bool)
        colour[colour_rows] = True
        grays = np.load(tmp / "gray.npy", mmap_mode="r")  # read through a map, written with plain writes
        for i in np.flatnonzero(~colour):  # replicate the gray images into RGB
            rgb[int(i)] = np.repeat(grays[i], 3, axis=0)
        del grays
        keep, drop = "rgb.npy", "gray.npy"
    else:
        keep, drop = "gray.npy", "rgb.npy"
    rgb.close()
    (tmp / drop).unlink()
    (tmp / keep).rename(tmp / "images.npy")
    index = {"version": DECODE_VERSION, "key": entry.name, "images_sha256": file_sha(tmp / "images.npy"), "channels": channels,
             "size": size, "fit": s.fit, "items": records}
    (tmp / "index.json").write_text(json.dumps(index))  # inside the temporary entry, renamed below
    _sync(tmp)
    try:
        tmp.rename(entry)
    except OSError:  # another process finished the same entry first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def _sync(folder: Path) -> None:
    """The entry's files on the disk before it is renamed into place: after a power loss an entry is
    whole or absent (a 0-byte images.npy was caught by the digest, and decoded again; now it is not made)."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def as_channels(d: Decoded, channels: int) -> np.ndarray:
    """One decoded image as the cache stores it in a data set of `channels`: (C, S, S) uint8 (a gray
    image repeated into RGB, a colour one reduced to its luma), as `_write_entry` writes its row."""
    if d.gray:
        return np.repeat(d.pixels[None], channels, axis=0)
    return d.pixels.transpose(2, 0, 1).copy() if channels == 3 else _luma(d.pixels)[None]


def _luma(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601-2 luma, as PIL's convert("L")
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _record(it: Item, d: Decoded) -> dict:
    return {
        "key": it.key,
        "file_sha": d.file_sha,
        "pixel_sha": d.pixel_sha,
        "gray": d.gray,
        "mode": d.mode,
        "native_size": list(d.native_size) if d.native_size else None,
        "error": d.error,
    }
