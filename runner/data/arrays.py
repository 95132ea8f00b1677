"""Sources whose images are arrays, not files: MedMNIST-style .npz and the synthetic generator."""

from __future__ import annotations

import zipfile

import numpy as np

from runner.errors import DataError, first_line

SYNTHETIC_VERSION = 2  # bump when the generator's pixels change


def _open_npz(path: str) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)  # never unpickle from disk
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, ValueError) and "pickle" in str(e) or isinstance(e, (zipfile.BadZipFile, EOFError)):
            # numpy reads a file that is no zip as a pickle, and says so: what it is not is the point
            raise DataError(f"{path}: not an npz archive (a zip of .npy arrays, as np.savez writes)") from None
        raise DataError(f"{path}: not a readable .npz file ({first_line(e)})") from None


def _member(z, path: str, name: str) -> np.ndarray:  # noqa: ANN001 - an NpzFile
    """One array of the file, read without unpickling: an object array (or a damaged member) is a DataError."""
    try:
        return np.asarray(z[name])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: {name} cannot be read as a plain array ({first_line(e, 120)}); "
                        "save numbers, not Python objects (np.savez with uint8 images and integer labels)") from None


def load_npz_labels(path: str) -> dict[str, np.ndarray]:
    """`{split}_labels` for each split present, as 1-D int arrays; checks the image arrays match."""
    with _open_npz(path) as z:
        out: dict[str, np.ndarray] = {}
        for split in ("train", "val", "test"):
            if f"{split}_images" not in z.files and f"{split}_labels" not in z.files:
                continue
            if f"{split}_images" not in z.files or f"{split}_labels" not in z.files:
                raise DataError(f"{path}: has one of {split}_images / {split}_labels but not the other")
            labels = _member(z, path, f"{split}_labels")
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: {split}_labels must be integers of shape (N,) or (N, 1), got {labels.dtype} {labels.shape}")
            n_images = _member(z, path, f"{split}_images").shape[0]
            if n_images != len(labels):
                raise DataError(f"{path}: {split}_images has {n_images} images but {split}_labels has {len(labels)}")
            out[split] = labels.astype(np.int64)
        if not out:
            held = ", ".join(z.files) if z.files else "nothing: it holds no arrays"
            raise DataError(f"{path}: no train_images/train_labels (MedMNIST layout) in {held}")
        return out


def load_npz_images(path: str) -> dict[str, np.ndarray]:
    """`{split}_images` as uint8 arrays (N, H, W) or (N, H, W, C)."""
    with _open_npz(path) as z:
        out = {}
        for split in ("train", "val", "test"):
            if f"{split}_images" in z.files:
                imgs = _member(z, path, f"{split}_images")
                if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[3] not in (1, 3, 4)):
                    raise DataError(f"{path}: {split}_images must be uint8 (N,H,W) or (N,H,W,C), got {imgs.dtype} {imgs.shape}")
                out[split] = imgs
        return out


def synthetic_images(num_classes: int, per_class: int, size: int, seed: int) -> np.ndarray:
    """Grayscale 'scan-like' images, (num_classes * per_class, size, size) uint8, class-major order.

    Every image is an elliptical body of noisy tissue on a dark background, with a random pose and
    brightness. Class 0 has no finding; class c > 0 has c small bright round lesions at random places
    inside the body, a little brighter than the tissue and blurred at the edge: a structure that a
    network has to find (not a global intensity shift), like a hemorrhage on a head CT.
    Deterministic for (num_classes, per_class, size, seed); made here, never real data.
    """
    labels = np.repeat(np.arange(num_classes), per_class)
    out = np.empty((len(labels), size, size), np.uint8)
    for start in range(0, len(labels), _CHUNK):  # fixed chunks: bounded memory, same pixels
        rng = np.random.default_rng([SYNTHETIC_VERSION, seed, num_classes, size, start])
        out[start : start + _CHUNK] = _synthetic_chunk(labels[start : start + _CHUNK], size, rng)
    return out


_CHUNK = 256


def _synthetic_chunk(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    num_classes = int(labels.max()) + 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1  # [-1, 1]
    cx, cy = rng.uniform(-0.12, 0.12, (2, n, 1, 1)).astype(np.float32)
    ax, ay = rng.uniform(0.6, 0.85, (2, n, 1, 1)).astype(np.float32)
    theta = rng.uniform(-0.5, 0.5, (n, 1, 1)).astype(np.float32)
    xr = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    yr = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    r = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2)
    body = 1.0 / (1.0 + np.exp((r - 1.0) * 40.0))  # soft-edged ellipse
    skull = np.exp(-(((r - 0.97) / 0.035) ** 2))  # a bright rim
    tissue = rng.uniform(0.35, 0.5, (n, 1, 1)).astype(np.float32)
    img = body * tissue + 0.35 * skull
    # low-frequency texture: a few random cosines per image
    for _ in range(3):
        f = rng.uniform(1.0, 4.0, (2, n, 1, 1)).astype(np.float32)
        ph = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        img += body * 0.04 * np.cos(np.pi * (f[0] * xx + f[1] * yy) + ph)
    for k in range(1, num_classes):
        has = labels >= k  # class c carries c lesions
        m = int(has.sum())
        if m == 0:
            continue
        rad = rng.uniform(0.6, 0.9, (m, 1, 1)).astype(np.float32)
        ang = rng.uniform(0, 2 * np.pi, (m, 1, 1)).astype(np.float32)
        pos_r = rng.uniform(0.0, 0.55, (m, 1, 1)).astype(np.float32)
        lx = cx[has] + pos_r * np.cos(ang) * ax[has]
        ly = cy[has] + pos_r * np.sin(ang) * ay[has]
        sigma = rad * rng.uniform(0.11, 0.16, (m, 1, 1)).astype(np.float32)
        blob = np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * sigma**2)))
        img[has] += 0.4 * blob * body[has]
    img += rng.normal(0.0, 0.035, img.shape).astype(np.float32)
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)
