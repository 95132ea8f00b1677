"""Near-duplicate images where no ids say which images are one: a resized, re-encoded or lightly
edited copy of an image, found by a perceptual hash and joined into one group.

The hash is the DCT hash ("pHash") as Zauner benchmarked it (C. Zauner, "Implementation and
Benchmarking of Perceptual Image Hash Functions", Master's thesis, Hagenberg, 2010): the image in
grey, averaged down to 32 x 32, its 2-D DCT-II, the 8 x 8 lowest frequencies, one bit each for
whether a coefficient is above their median. Copies that differ by resizing, JPEG re-encoding, a
small shift in brightness or contrast differ in a few of the 64 bits; unrelated images in about 32.
It is computed from the decoded images the cache holds (no file is read again), so it sees what
the network sees, after the window and the fit.

A close hash alone also pairs different lesions that share a layout (a dark blob amid even skin), so
a pair is confirmed by the Pearson correlation of the two images' 16 x 16 colour thumbnails.
Set on the skin set (ISIC, 2,045 images after exact duplicates, at 64 px) by looking at pairs: within
8 bits and at a correlation of at least 0.92 (the defaults) it confirms 16 pairs, of which about 13
look like the same lesion (another photograph, exposure or crop) and 3 like different lesions; most
pairs it turns down are different lesions (`bench/results/near-duplicates-skin-2026-12-04.txt`). Joined images chain
(union-find): a group is a connected component. A rotation, a mirror image or the same lesion at a
very different zoom is not found: such copies look unrelated to both tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

HASH_SIDE = 32  # the image is averaged down to this side before the DCT
LOW = 8  # the LOW x LOW lowest frequencies make the 64 bits
CHUNK = 2048  # rows of the pairwise comparison at a time (CHUNK x N bytes of distances)


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: (D @ x) is the DCT of a length-n signal x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def _grey_32(images: np.ndarray) -> np.ndarray:
    """(N, C, S, S) or (N, S, S) uint8 to (N, 32, 32) float64 grey, each output pixel the mean of its
    area of the input (an area average, so that downscaled copies give nearly the same values)."""
    x = images.astype(np.float64)
    if x.ndim == 4:
        x = x.mean(axis=1)
    n, h, w = x.shape
    rows = np.minimum((np.arange(h) * HASH_SIDE) // h, HASH_SIDE - 1)
    cols = np.minimum((np.arange(w) * HASH_SIDE) // w, HASH_SIDE - 1)
    if h < HASH_SIDE or w < HASH_SIDE:  # a small image: each of the 32 x 32 takes its nearest pixel
        return x[:, (np.arange(HASH_SIDE) * h) // HASH_SIDE][:, :, (np.arange(HASH_SIDE) * w) // HASH_SIDE]
    # sums by area with two matrix products (fast, exact): R (32 x h) @ x @ C (w x 32)
    r = np.zeros((HASH_SIDE, h))
    r[rows, np.arange(h)] = 1.0
    c = np.zeros((w, HASH_SIDE))
    c[np.arange(w), cols] = 1.0
    sums = np.einsum("ah,nhw,wb->nab", r, x, c, optimize=True)
    return sums / np.outer(r.sum(axis=1), c.sum(axis=0))


def phash(images: np.ndarray, batch: int = 256) -> np.ndarray:
    """The 64-bit DCT hash of each image, (N,) uint64."""
    d = _dct_matrix(HASH_SIDE)
    weights = (np.uint64(1) << np.arange(LOW * LOW, dtype=np.uint64)[::-1]).astype(np.uint64)
    out = np.zeros(len(images), dtype=np.uint64)
    for s in range(0, len(images), batch):
        g = _grey_32(np.asarray(images[s:s + batch]))
        coeffs = np.einsum("ai,nij,bj->nab", d, g, d, optimize=True)[:, :LOW, :LOW].reshape(len(g), -1)
        med = np.median(coeffs[:, 1:], axis=1, keepdims=True)  # the AC coefficients' median (the DC term sets brightness)
        bits = (coeffs > med).astype(np.uint64)
        out[s:s + batch] = (bits * weights).sum(axis=1, dtype=np.uint64)
    return out


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POP8[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """Every pair (i < j) whose hashes differ in at most `max_bits` bits, with that count: all pairs,
    compared CHUNK rows at a time (N = 100,000 is 5e9 comparisons: about a minute on two cores)."""
    h = np.asarray(hashes, dtype=np.uint64)
    out: list[tuple[int, int, int]] = []
    for s in range(0, len(h), CHUNK):
        block = _popcount(h[s:s + CHUNK, None] ^ h[None, :])
        i, j = np.nonzero(block <= max_bits)
        i = i + s
        keep = j > i
        out += list(zip(i[keep].tolist(), j[keep].tolist(), block[i[keep] - s, j[keep]].tolist()))
    return out


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, C*16*16) float64: each image averaged to 16 x 16 a channel, mean removed, unit length (so
    that a dot product is the Pearson correlation of the two thumbnails)."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    side = 16
    r = np.zeros((side, h))
    r[np.minimum((np.arange(h) * side) // h, side - 1), np.arange(h)] = 1.0
    cm = np.zeros((w, side))
    cm[np.arange(w), np.minimum((np.arange(w) * side) // w, side - 1)] = 1.0
    t = np.einsum("ah,nchw,wb->ncab", r, x, cm, optimize=True) / np.outer(r.sum(axis=1), cm.sum(axis=0))
    t = t.reshape(n, -1)
    t -= t.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    return np.divide(t, norm, out=np.zeros_like(t), where=norm > 0)


def find(images: np.ndarray, max_bits: int, min_correlation: float, batch: int = 256) -> list[tuple[int, int, int, float]]:
    """Near-duplicate pairs (i, j, bits, correlation): hashes within max_bits, thumbnails correlated at
    least min_correlation."""
    hashes = phash(images, batch)
    pairs = near_pairs(hashes, max_bits)
    if not pairs:
        return []
    out = []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        idx = sorted({i for p in chunk for i in p[:2]})
        pos = {i: k for k, i in enumerate(idx)}
        th = thumbnails(np.asarray(images[idx]))
        for i, j, d in chunk:
            corr = float(th[pos[i]] @ th[pos[j]])
            if corr >= min_correlation:
                out.append((i, j, d, round(corr, 4)))
    return out


def join(groups: Sequence[str], pairs: Sequence[tuple[int, int, int]]) -> list[str]:
    """The given groups (a patient, a volume, or each image its own) joined through the near pairs:
    each connected component named by its first member's group, in the items' order."""
    names = list(groups)
    parent = list(range(len(names)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, g in enumerate(names):
        if g in first:
            union(first[g], i)
        else:
            first[g] = i
    for i, j, *_ in pairs:
        union(i, j)
    return [names[find(i)] for i in range(len(names))]


def group_limit(n: int) -> int:
    """The most images a group joined by near pairs may hold, of n: more, and the images are alike
    rather than copies (chest X-rays of different children chain into one group of thousands)."""
    return max(20, n // 50)


def summary(keys: Sequence[str], before: Sequence[str], after: Sequence[str], pairs: Sequence[tuple],
            splits: dict[str, np.ndarray] | None) -> dict:
    """What the near-duplicate groups are and change, for `data audit`: pairs found, groups formed
    (those holding more than one of the former groups), the largest, examples, and how many pairs
    `splits` puts in two different splits."""
    grown = Counter(after[i] for i in range(len(after)) if after[i] != before[i])
    merged = {g for g in after if g in grown}
    sizes = Counter(after)
    where = {}
    for s, idx in (splits or {}).items():
        for i in idx:
            where[int(i)] = s
    crossing = [(i, j) for i, j, *_ in pairs if i in where and j in where and where[i] != where[j]]
    examples = [{"a": keys[p[0]], "b": keys[p[1]], "bits": p[2], "correlation": p[3]}
                for p in sorted(pairs, key=lambda p: (p[2], -p[3], p[0], p[1]))[:10]]
    return {
        "pairs": len(pairs),
        "groups": len(merged),
        "images_in_groups": sum(sizes[g] for g in merged),
        "largest": max((sizes[g] for g in merged), default=0),
        "pairs_across_splits": len(crossing),
        "examples": examples,
    }
