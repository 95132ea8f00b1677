"""Decode one image (any PIL mode) to a fixed-size uint8 array, with its content hashes.

Runs in worker processes (see `cache.py`), so everything here is a plain top-level function of
picklable arguments. The canonical form of an image is 8-bit L when its content is grayscale and
8-bit RGB otherwise:
- RGBA / LA / palette-with-alpha are composited over black (the background of a scan);
- 16- and 32-bit modes (I;16, I, F) are min-max scaled to 0..255 per image;
- RGB whose channels differ by at most `GRAY_CHROMA` on average is grayscale content (X-rays saved
  as RGB JPEGs; CT films with a faint tint) and becomes L.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DECODE_VERSION = 1  # bump when the pixels this module produces change
GRAY_CHROMA = 3.0  # mean |R-G|, |G-B| (0..255) below which an RGB image counts as grayscale content


@dataclass(frozen=True)
class ImageSettings:
    size: int
    fit: str  # pad | crop | squash
    windows: tuple[tuple[float, float], ...] | None = None  # (level, width) a channel, for DICOM and NIfTI (medical.py)
    axis: str = "axial"  # along which a NIfTI volume is sliced

    def key_parts(self) -> list:
        """What of these settings names a decode cache entry: the medical ones only when set, so that the
        entries of image files made before them keep their keys."""
        parts: list = [self.size, self.fit]
        if self.windows is not None or self.axis != "axial":
            parts.append({"windows": [list(w) for w in self.windows or ()], "axis": self.axis})
        return parts


@dataclass
class Decoded:
    """One decoded image: the resized pixels (H, W) or (H, W, 3), or the reason it could not be read."""

    pixels: np.ndarray | None
    file_sha: str | None
    pixel_sha: str | None
    gray: bool
    mode: str
    native_size: tuple[int, int] | None
    error: str | None = None


def _to_canonical(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, im.convert("RGBA")).convert("L" if mode in ("LA", "La") else "RGB")
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def chroma(rgb: np.ndarray) -> float:
    """Mean channel disagreement of an (H, W, 3) uint8 array, 0 for perfectly gray content."""
    a = rgb.astype(np.int16)
    return float((np.abs(a[..., 0] - a[..., 1]).mean() + np.abs(a[..., 1] - a[..., 2]).mean()) / 2)


def _fit(im: Image.Image, s: ImageSettings) -> Image.Image:
    w, h = im.size
    n = s.size
    if s.fit == "squash":
        return im.resize((n, n), Image.Resampling.BICUBIC, reducing_gap=3.0)
    scale = (n / max(w, h)) if s.fit == "pad" else (n / min(w, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0) if (nw, nh) != (w, h) else im
    if s.fit == "pad":
        canvas = Image.new(im.mode, (n, n))
        canvas.paste(im, ((n - nw) // 2, (n - nh) // 2))
        return canvas
    left, top = (nw - n) // 2, (nh - n) // 2
    return im.crop((left, top, left + n, top + n))


def decode_image(im: Image.Image, s: ImageSettings, several_windows: bool = False) -> tuple[np.ndarray, str, bool]:
    """(resized pixels, pixel hash, gray) of an opened PIL image. An image of several CT windows (one a
    channel) stays three channels even where they agree."""
    im = ImageOps.exif_transpose(im) or im
    im = _to_canonical(im)
    gray = im.mode == "L"
    if not gray and not several_windows and chroma(np.asarray(im)) <= GRAY_CHROMA:
        im, gray = im.convert("L"), True
    a = np.asarray(im)
    # The pixel hash identifies the decoded content whatever the file format or name.
    h = hashlib.sha256(f"{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return np.asarray(_fit(im, s)), h.hexdigest(), gray


_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")


MAX_IMAGE_BYTES = 1 << 30


def _read_bounded(path: str) -> bytes | str:
    """A regular file's bytes, of a bounded size (a FIFO would block, /dev/zero never ends), or why not."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file (a FIFO, a device or a folder)"
            if st.st_size > MAX_IMAGE_BYTES:
                return f"{st.st_size} bytes: larger than an image file may be ({MAX_IMAGE_BYTES >> 20} MiB)"
            return f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"


def _decode_medical(path: str, kind: str, index: int | None, s: ImageSettings) -> Decoded:
    """A DICOM file or one slice of a volume (`medical.py`); the parsed file is kept for its next slice."""
    from runner.data import medical

    try:
        st = os.stat(path)
        stamp = (path, st.st_size, st.st_mtime_ns)
    except OSError as e:
        return Decoded(None, None, None, False, "", None, f"cannot read: {e.strerror or e}")
    known = medical.remembered(stamp)
    file_sha = known[0] if known else None
    try:
        if known:
            parsed = known[1]
        else:
            data = _read_bounded(path)
            if isinstance(data, str):
                return Decoded(None, None, None, False, "", None, data)
            file_sha = hashlib.sha256(data).hexdigest()
            if kind == "nifti":
                parsed = medical.nifti_volume(data)
            else:  # a .dcm by name, or a file whose preamble said DICOM (medical.file_kind)
                parsed = medical.parse_dicom(data)
            del data
            if index is not None:
                medical.remember(stamp, file_sha, parsed)
        sl = (medical.decode_nifti(parsed, index, s.axis, s.windows) if kind == "nifti"
              else medical.decode_dicom(parsed, index, s.windows))
    except medical.MedicalError as e:
        return Decoded(None, file_sha, None, False, "", None, f"not a readable image: {e}")
    im = Image.fromarray(sl.pixels, "L" if sl.pixels.ndim == 2 else "RGB")
    pixels, pixel_sha, gray = decode_image(im, s, several_windows=sl.several_windows)
    # a slice's own identity: slices of one file share its bytes, not their content
    return Decoded(pixels, file_sha if index is None else f"{file_sha}#{index}", pixel_sha, gray, sl.mode, sl.native_size)


def decode_file(path: str, s: ImageSettings) -> Decoded:
    """Read, hash and decode one file, or one slice of a volume (`path#index`, see medical.py); never
    raises for a bad image (the caller decides)."""
    from runner.data import medical

    base, index = medical.split_key(path)
    kind = medical.file_kind(base) or ("dicom" if index is not None else None)  # a frame of an extensionless DICOM
    if kind is not None:
        return _decode_medical(base, kind, index, s)
    data = _read_bounded(path)
    if isinstance(data, str):
        return Decoded(None, None, None, False, "", None, data)
    file_sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                mode, size = im.mode, im.size
                im.load()  # a truncated file fails here, not later
                pixels, pixel_sha, gray = decode_image(im, s)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL names the in-memory buffer it read ("<_io.BytesIO object at 0x...>"): the caller names the file
        msg = _OBJECT_REPR.sub("it", str(e)) or type(e).__name__
        if msg.startswith("cannot identify image file"):
            msg = "not in an image format Pillow reads (PNG, JPEG, TIFF, BMP, ...)"
        return Decoded(None, file_sha, None, False, "", None, f"not a readable image: {msg}")
    return Decoded(pixels, file_sha, pixel_sha, gray, mode, size)


def decode_array(a: np.ndarray, s: ImageSettings) -> Decoded:
    """An image given as an array (npz, synthetic): (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    mode = "L" if a.ndim == 2 else {3: "RGB", 4: "RGBA"}[a.shape[2]]
    im = Image.fromarray(np.ascontiguousarray(a), mode)
    pixels, pixel_sha, gray = decode_image(im, s)
    return Decoded(pixels, None, pixel_sha, gray, mode, (a.shape[1], a.shape[0]))
