"""Augmentations made on the device, for a whole batch at once, each sample drawing its own parameters.

Input: a uint8 batch (B, C, H, W) already on the device. Geometry (random resized crop, flips,
rotation) is one affine matrix per sample and one `grid_sample` call for the batch; colour is a few
per-sample broadcast ops; Gaussian blur is one grouped separable convolution over the samples that
draw it. No Python loop runs per sample, and no CPU decoding runs in the training loop.

Colour jitter applies brightness, contrast, saturation and hue in that fixed order (torchvision's
ColorJitter shuffles the order; the fixed order keeps the batch vectorized). Hue is a rotation of
the chroma plane in YIQ space. Gray presets (X-ray, CT) jitter brightness, contrast and gamma and
never touch hue or saturation.
"""

from __future__ import annotations

import math
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


def affine_params(aug: ViewAug, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output coordinates to input coordinates in [-1, 1]."""
    area = _uniform(*aug.crop_scale, n, g, device)
    log_r = _uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), n, g, device)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width as a fraction of the image width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
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


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by a per-sample angle (radians)."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    to_rgb = torch.linalg.inv(to_yiq)
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c, -s], -1), torch.stack([zero, s, c], -1)], 1)
    m = to_rgb @ rot @ to_yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, x)


def colour(x: torch.Tensor, aug: ViewAug, g: torch.Generator) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation, hue, gamma, grayscale. x in [0, 1]."""
    n, dev = x.shape[0], x.device
    on = _bernoulli(aug.jitter_p, n, g, dev).view(n, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(max(0.0, 1 - strength), 1 + strength, n, g, dev).view(n, 1, 1, 1)
        return torch.where(on, f, torch.ones_like(f))

    if aug.brightness:
        x = (x * factor(aug.brightness)).clamp_(0, 1)
    if aug.contrast:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor(aug.contrast) + mean).clamp_(0, 1)
    if x.shape[1] == 3 and aug.saturation:
        gray = _gray(x)
        x = ((x - gray) * factor(aug.saturation) + gray).clamp_(0, 1)
    if x.shape[1] == 3 and aug.hue:
        angle = _uniform(-aug.hue, aug.hue, n, g, dev) * 2 * math.pi * on.view(n)
        x = _hue_rotate(x, angle).clamp_(0, 1)
    if aug.gamma:
        gamma = torch.exp(_uniform(-aug.gamma, aug.gamma, n, g, dev)).view(n, 1, 1, 1)
        x = x.clamp(min=1e-6) ** torch.where(on, gamma, torch.ones_like(gamma))
    if x.shape[1] == 3 and aug.grayscale_p:
        to_gray = _bernoulli(aug.grayscale_p, n, g, dev).view(n, 1, 1, 1)
        x = torch.where(to_gray, _gray(x).expand_as(x), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each sample with its own sigma (pixels): one grouped separable convolution.

    The kernel radius comes from the largest sigma the preset can draw (a Python number), so
    nothing waits for the device."""
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * max_sigma)), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = (GRAY_MEAN, GRAY_STD) if x.shape[1] == 1 else (RGB_MEAN, RGB_STD)
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


def augment(images: torch.Tensor, aug: ViewAug, size: int, g: torch.Generator) -> torch.Tensor:
    """One augmented, normalized float view (B, C, size, size) of a uint8 batch on the device."""
    n, dev = images.shape[0], images.device
    x = images.float().div_(255)
    theta = affine_params(aug, n, g, dev)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = colour(x, aug, g)
    if aug.blur_p > 0:
        # Exactly round(p * n) samples, chosen at random, are blurred: the count is known without
        # asking the device, so nothing stalls, and a view that blurs 10% of its samples pays for
        # 10%. (Per-sample Bernoulli(p) would give that count only on average.)
        k = n if aug.blur_p >= 1 else int(round(aug.blur_p * n))
        if k > 0:
            scale = size / 224
            sigma = (_uniform(*aug.blur_sigma, k, g, dev) * scale).clamp(min=1e-3)
            if k == n:
                x = gaussian_blur(x, sigma, aug.blur_sigma[1] * scale)
            else:
                idx = torch.randperm(n, generator=g, device=dev)[:k]
                x = x.index_copy(0, idx, gaussian_blur(x.index_select(0, idx), sigma, aug.blur_sigma[1] * scale))
    if aug.solarize_p > 0:
        sol = _bernoulli(aug.solarize_p, n, g, dev).view(n, 1, 1, 1)
        x = torch.where(sol & (x >= 0.5), 1 - x, x)
    return normalize(x)


def eval_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """The deterministic view for evaluation and feature extraction: the whole image, resized."""
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x)
