"""Augmentations made on the device, for a whole batch at once, each sample drawing its own parameters.

Input: a uint8 batch (B, C, H, W) already on the device. Geometry (random resized crop, flips,
rotation) is one affine matrix per sample and one `grid_sample` call for the batch; saturation, hue
and grayscale are each one per-sample 3x3 colour matrix (a batched matrix product, one pass over the
pixels), brightness and contrast one fused multiply-add each; Gaussian blur is one grouped separable
convolution over the samples that draw it. No Python loop runs per sample, and no CPU decoding runs
in the training loop. The random draws (`draw`) are kept apart from the pixel work (`apply`), so
that `run.compile` can compile the latter into a few fused kernels: under compilation the colour
matrices and the blur are written as pointwise sums (a batched matrix product or a convolution would
be a library call that nothing fuses with), and the view is written once, in the layout and dtype
the network reads. Nothing in the hot path waits for the device: constants are made once per device
(a tensor made from host values is a blocking copy on CUDA), and the blur's kernel size comes from
the preset, not from the drawn sigmas.

Colour jitter applies brightness, contrast, saturation and hue in that fixed order (torchvision's
ColorJitter shuffles the order; the fixed order keeps the batch vectorized). Hue is a rotation of
the chroma plane in YIQ space. Gray presets (X-ray, CT) jitter brightness, contrast and gamma and
never touch hue or saturation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# ImageNet statistics; gray images use their channel mean, so ImageNet-initialized stems see the
# same input scale either way.
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


@dataclass(frozen=True)
class ViewAug:
    """The random transformations of one view. Probabilities are per sample, except `blur_p`: the
    share of the batch that is blurred (exactly round(blur_p * batch) samples, chosen at random)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rotate_deg: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gamma: float = 0.0  # log-gamma drawn from [-gamma, gamma]
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # at 224 px; scaled with the output size
    solarize_p: float = 0.0


_BYOL_1 = ViewAug()
_GRAY_1 = ViewAug(rotate_deg=10.0, saturation=0.0, hue=0.0, gamma=0.25, grayscale_p=0.0)
_FINETUNE = ViewAug(crop_scale=(0.35, 1.0), rotate_deg=10.0, jitter_p=0.5, brightness=0.2, contrast=0.2,
                    saturation=0.1, hue=0.02, grayscale_p=0.0, blur_p=0.0)

PRESETS: dict[str, tuple[ViewAug, ViewAug]] = {
    # Grill et al. 2020, table 6: blur 1.0 / 0.1, solarize 0.0 / 0.2; the rest shared
    "byol": (_BYOL_1, replace(_BYOL_1, blur_p=0.1, solarize_p=0.2)),
    "xray": (_GRAY_1, replace(_GRAY_1, blur_p=0.1, solarize_p=0.2)),
    "ct": (replace(_GRAY_1, crop_scale=(0.2, 1.0)), replace(_GRAY_1, crop_scale=(0.2, 1.0), blur_p=0.1, solarize_p=0.2)),
    # fine-tuning and supervised training: milder crops, no blur or solarize; the same for both models
    "finetune": (_FINETUNE, _FINETUNE),
    "finetune-gray": (replace(_FINETUNE, saturation=0.0, hue=0.0, gamma=0.15),) * 2,
}


def preset_for(name: str, channels: int, purpose: str) -> tuple[ViewAug, ViewAug]:
    """`auto` picks the BYOL preset for colour images and the X-ray one for gray; purpose is
    'pretrain' or 'finetune'."""
    if name == "auto":
        if purpose == "finetune":
            name = "finetune" if channels == 3 else "finetune-gray"
        else:
            name = "byol" if channels == 3 else "xray"
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; one of auto, {', '.join(PRESETS)}")
    return PRESETS[name]


def _uniform(lo: float, hi: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _bernoulli(p: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


CROP_TRIES = 10  # as torchvision's RandomResizedCrop


def affine_params(aug: ViewAug, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output coordinates to input coordinates in [-1, 1].

    The crop is sampled as torchvision's RandomResizedCrop samples it: up to CROP_TRIES draws of
    (area, log aspect ratio), the first that fits inside the (square) image taken, else the whole
    image. All tries are drawn at once, so no sample waits for another and nothing reads back from
    the device. (Clamping an oversized crop instead would skew the areas towards the large end.)"""
    area = _uniform(*aug.crop_scale, n * CROP_TRIES, g, device).view(n, CROP_TRIES)
    log_r = _uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), n * CROP_TRIES, g, device)
    ratio = torch.exp(log_r).view(n, CROP_TRIES)
    w_try, h_try = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # fractions of the image's width and height
    fits = (w_try <= 1) & (h_try <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    w = torch.where(found, w_try.gather(1, first)[:, 0], torch.ones_like(found, dtype=w_try.dtype))
    h = torch.where(found, h_try.gather(1, first)[:, 0], torch.ones_like(found, dtype=h_try.dtype))
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
    fx = torch.where(_bernoulli(aug.hflip, n, g, device), -1.0, 1.0)
    fy = torch.where(_bernoulli(aug.vflip, n, g, device), -1.0, 1.0)
    angle = _uniform(-aug.rotate_deg, aug.rotate_deg, n, g, device) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * w * fx, -sin * h * fy, cx], -1), torch.stack([sin * w * fx, cos * h * fy, cy], -1)], 1
    )
    return theta


GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
# RGB -> YIQ (NTSC) and its inverse, computed once in float64 (no linalg call, which would wait for
# the device to report singular matrices, in the hot path)
TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
FROM_YIQ = tuple(tuple(row) for row in torch.linalg.inv(torch.tensor(TO_YIQ, dtype=torch.float64)).tolist())

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _const(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor on `like`'s device and dtype, made once: on CUDA, a tensor made from host
    values is a blocking copy, which would stall the queue of work on every call. Under compilation
    it is a graph constant."""
    if torch.compiler.is_compiling():
        return like.new_tensor(values)
    key = (values, like.device, like.dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = like.new_tensor(values)
    return t


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (n, 1, h, w): one pass over the image, not five."""
    if x.shape[1] == 1:
        return x
    if torch.compiler.is_compiling():
        return x[:, 0:1] * GRAY_WEIGHTS[0] + x[:, 1:2] * GRAY_WEIGHTS[1] + x[:, 2:3] * GRAY_WEIGHTS[2]
    n, _, h, w = x.shape
    return torch.matmul(_const(GRAY_WEIGHTS, x).view(1, 3), x.reshape(n, 3, h * w)).view(n, 1, h, w)


def _per_sample_matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each sample's colours through its own 3x3 matrix. Eager: one batched matrix product (one pass).
    Compiled: the same as a pointwise sum, which inductor fuses with the passes around it."""
    n, c, h, w = x.shape
    if torch.compiler.is_compiling():
        return sum(m[:, :, j].view(n, c, 1, 1) * x[:, j : j + 1] for j in range(c))
    return torch.matmul(m, x.reshape(n, c, h * w)).view(n, c, h, w)


def _towards_gray(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f * x + (1 - f) * gray(x) per sample, as the matrix f I + (1 - f) 1 w^T (f=1: unchanged, f=0: gray)."""
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    to_gray = _const(GRAY_WEIGHTS, x).view(1, 3).expand(3, 3)
    f = f.to(x.dtype).view(-1, 1, 1)
    return _per_sample_matrix(x, f * eye + (1 - f) * to_gray)


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by a per-sample angle (radians)."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c, -s], -1), torch.stack([zero, s, c], -1)], 1)
    return _per_sample_matrix(x, _const(FROM_YIQ, x) @ rot.to(x.dtype) @ _const(TO_YIQ, x))


def draw(aug: ViewAug, n: int, channels: int, size: int, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Every random number of one view of a batch, drawn in a fixed order: the parameters `apply`
    turns into pixels. Splitting the two keeps `apply` free of generators, so it can be compiled."""
    p = {"theta": affine_params(aug, n, g, device)}
    on = _bernoulli(aug.jitter_p, n, g, device)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(max(0.0, 1 - strength), 1 + strength, n, g, device)
        return torch.where(on, f, torch.ones_like(f))

    if aug.brightness:
        p["brightness"] = factor(aug.brightness)
    if aug.contrast:
        p["contrast"] = factor(aug.contrast)
    if channels == 3 and aug.saturation:
        p["saturation"] = factor(aug.saturation)
    if channels == 3 and aug.hue:
        p["hue"] = _uniform(-aug.hue, aug.hue, n, g, device) * 2 * math.pi * on
    if aug.gamma:
        gamma = torch.exp(_uniform(-aug.gamma, aug.gamma, n, g, device))
        p["gamma"] = torch.where(on, gamma, torch.ones_like(gamma))
    if channels == 3 and aug.grayscale_p:
        p["gray"] = _bernoulli(aug.grayscale_p, n, g, device)
    if aug.blur_p > 0:
        # Exactly round(p * n) samples, chosen at random, are blurred: the count is known without
        # asking the device, so nothing stalls, and a view that blurs 10% of its samples pays for
        # 10%. (Per-sample Bernoulli(p) would give that count only on average.)
        k = n if aug.blur_p >= 1 else int(round(aug.blur_p * n))
        if k > 0:
            p["blur_sigma"] = (_uniform(*aug.blur_sigma, k, g, device) * (size / 224)).clamp(min=1e-3)
            if k < n:
                p["blur_idx"] = torch.randperm(n, generator=g, device=device)[:k]
    if aug.solarize_p > 0:
        p["solarize"] = _bernoulli(aug.solarize_p, n, g, device)
    return p


def colour(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation, hue, gamma, grayscale (x in [0, 1])."""
    n = x.shape[0]

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, 1, 1, 1)

    if "brightness" in p:
        x = (x * per_sample(p["brightness"])).clamp_(0, 1)
    if "contrast" in p:  # f * x + (1 - f) * mean luma, in one pass after one reduction
        f = per_sample(p["contrast"])
        mean = _gray(x.mean(dim=(2, 3), keepdim=True))
        x = torch.addcmul((1 - f) * mean, x, f).clamp_(0, 1)
    if "saturation" in p:
        x = _towards_gray(x, p["saturation"]).clamp_(0, 1)
    if "hue" in p:
        x = _hue_rotate(x, p["hue"]).clamp_(0, 1)
    if "gamma" in p:
        x = x.clamp(min=1e-6) ** per_sample(p["gamma"])
    if "gray" in p:  # the chosen samples become gray (all three channels the luma), the rest unchanged
        x = _towards_gray(x, (~p["gray"]).to(x.dtype))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each sample with its own sigma (pixels), separably, with reflected borders. Eager: one
    grouped convolution per axis. Compiled: a sum of shifted copies per axis, which inductor turns
    into one kernel per axis, fused with the passes around it.

    The kernel radius comes from the largest sigma the preset can draw (a Python number), so
    nothing waits for the device."""
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * max_sigma)), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (n, 2r+1)
    if torch.compiler.is_compiling():
        taps = [k[:, i].view(n, 1, 1, 1) for i in range(2 * radius + 1)]
        y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
        y = sum(tap * y[..., i : i + w] for i, tap in enumerate(taps))
        y = F.pad(y, (0, 0, radius, radius), mode="reflect")
        return sum(tap * y[..., i : i + h, :] for i, tap in enumerate(taps))
    k = k.repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = (GRAY_MEAN, GRAY_STD) if x.shape[1] == 1 else (RGB_MEAN, RGB_STD)
    return (x - _const(mean, x).view(1, -1, 1, 1)) / _const(std, x).view(1, -1, 1, 1)


def to_format(x: torch.Tensor, channels_last: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """The layout and dtype the network reads (a no-op when x has them already)."""
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def apply(images: torch.Tensor, p: dict[str, torch.Tensor], aug: ViewAug, size: int,
          channels_last: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The view that parameters `p` (from `draw`) make of a uint8 batch: normalized floats (B, C, size,
    size), in channels_last layout and `dtype` when asked (compiled, the last fused kernel writes them
    so; eager, one more pass)."""
    n = images.shape[0]
    x = images.float().div_(255)
    grid = F.affine_grid(p["theta"], [n, x.shape[1], size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = colour(x, p)
    if "blur_sigma" in p:
        max_sigma = aug.blur_sigma[1] * size / 224
        if "blur_idx" in p:
            idx = p["blur_idx"]
            x = x.index_copy(0, idx, gaussian_blur(x.index_select(0, idx), p["blur_sigma"], max_sigma))
        else:
            x = gaussian_blur(x, p["blur_sigma"], max_sigma)
    if "solarize" in p:
        x = torch.where(p["solarize"].view(n, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return to_format(normalize(x), channels_last, dtype)


_compiled_apply = None


def augment(images: torch.Tensor, aug: ViewAug, size: int, g: torch.Generator, compiled: bool = False,
            channels_last: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One augmented, normalized float view (B, C, size, size) of a uint8 batch on the device.

    compiled: run `apply` through torch.compile, which fuses the dozen elementwise passes (uint8 to
    float, the sampling, the colour ops, the blur, solarize, normalize, the output layout) into a few
    kernels; the random draws stay eager, so the views are the same numbers up to float rounding.
    channels_last, dtype: the layout and dtype to write the view in (the network's input format)."""
    global _compiled_apply
    p = draw(aug, images.shape[0], images.shape[1], size, g, images.device)
    if not compiled:
        return apply(images, p, aug, size, channels_last, dtype)
    if _compiled_apply is None:
        _compiled_apply = torch.compile(apply, dynamic=False)
    try:
        return _compiled_apply(images, p, aug, size, channels_last, dtype)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # no compiler for this backend: the eager path gives the same view
        warnings.warn(f"compiling the augmentation failed, running it eagerly: {type(e).__name__}: {e}", stacklevel=2)
        _compiled_apply = apply
        return apply(images, p, aug, size, channels_last, dtype)


def eval_view(images: torch.Tensor, size: int, channels_last: bool = False) -> torch.Tensor:
    """The deterministic view for evaluation and feature extraction: the whole image, resized."""
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return to_format(normalize(x), channels_last, None)
