"""Backbones: ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) with a
1- or 3-channel input and no classifier.

Written here rather than imported from torchvision: importing torchvision costs a worker 2-4 s at
start-up (it loads torch._dynamo), for one class. The networks are built module by module in the
order torchvision builds its `resnet18/34/50/101` (stride on the 3x3 convolution of a bottleneck,
"ResNet v1.5"), with its parameter names and its initialization, so the same seed gives the same
weights, ImageNet weights files load as they are, and a test holds the two to equality.

ImageNet weights come from the torch hub cache, where torchvision downloads them
(`$TORCH_HOME/hub/checkpoints/<file>`, `IMAGENET_URLS`); nothing is downloaded here.

One-channel input: conv1's weights are summed over the RGB axis: the stem a gray image would see
if it were repeated to three channels, at a third of the cost of repeating it. With ImageNet weights
this equals repeating the gray channel under one normalization for all three (this project's gray
one), not torchvision's per-channel RGB normalization; with random init it is just a 1-channel conv.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runner.ml.config import ARCHS

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# torchvision's DEFAULT weights of each architecture (IMAGENET1K_V1 for 18/34, IMAGENET1K_V2 for 50/101)
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
}
_LAYOUT = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of `arch` once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_URLS[arch]).name


class WeightsError(ValueError):
    """The ImageNet weights file is missing or not the one torchvision publishes."""


def verify_imagenet_weights(arch: str, file: str | None = None) -> str:
    """The sha256 of `arch`'s ImageNet weights file. torchvision's (file None) must be the file it
    publishes: its name carries the first hex digits of its sha256 (`resnet18-f37072fd.pth`), which
    torch.hub checks on download; a file put there by other means is checked here the same way. A
    file of the user's own (`model.imagenet_weights`) is only hashed: its digest is what identifies it."""
    import hashlib
    import re

    path = Path(file).expanduser() if file else imagenet_weights_path(arch)
    if not path.is_file():
        where = "" if file else f": fetch {IMAGENET_URLS[arch]} there"
        raise WeightsError(f"the ImageNet weights of {arch} are not at {path}{where}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if file:
        return digest
    prefix = re.search(r"-([a-f0-9]+)\.", path.name).group(1)
    if not digest.startswith(prefix):
        raise WeightsError(f"{path} is not the ImageNet weights file torchvision publishes (its sha256 starts {digest[:8]}, "
                           f"its name says {prefix}): delete it and fetch {IMAGENET_URLS[arch]} again")
    return digest


SMALL_MAP = 4  # output pixels (2x2) at or below which a CPU convolution is one matrix product


class SmallMapConv2d(nn.Conv2d):
    """A Conv2d that, on the CPU and where its output map has at most `SMALL_MAP` pixels (a ResNet's
    last stage on 32-64 px images: 2x2 or 1x1), computes as one matrix product of the unfolded input
    (im2col, in channels_last order: rows are (image, output pixel), columns (kernel tap, channel))
    with the kernel. The same sums in another order; elsewhere, and on a GPU, PyTorch's convolution.

    Why: oneDNN's convolution kernels are built for large maps. On a 2x2 map with 512 channels its
    backward ran at ~110 GFLOP/s in bf16 on this project's 2-core AMX CPU, against ~800 for a matrix
    product of the same size; the last stage took 38% of a BYOL step at 64 px (bench/cpu_path.py's
    profile). A plain subclass: its parameters, state_dict and checkpoints are a Conv2d's."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if input.device.type != "cpu" or input.dim() != 4 or not self._plain():
            return super()._conv_forward(input, weight, bias)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        b, c, h, w = input.shape
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho * wo > SMALL_MAP or ho < 1 or wo < 1:
            return super()._conv_forward(input, weight, bias)
        if torch.is_autocast_enabled("cpu"):  # cast before unfolding: the unfolded input is kh*kw times larger
            dtype = torch.get_autocast_dtype("cpu")
            input, weight = input.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        x = input.permute(0, 2, 3, 1)  # B, H, W, C: a view of a channels_last tensor
        if ph or pw:
            x = nn.functional.pad(x, (0, 0, pw, pw, ph, ph))
        cols = torch.cat([x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                          for i in range(kh) for j in range(kw)], dim=-1).reshape(b * ho * wo, kh * kw * c)
        kernel = weight.permute(2, 3, 1, 0).reshape(kh * kw * c, self.out_channels)
        out = cols @ kernel if bias is None else torch.addmm(bias, cols, kernel)
        out = out.reshape(b, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # channels_last strides
        return out if input.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    def _plain(self) -> bool:
        return (self.groups == 1 and self.padding_mode == "zeros" and self.dilation == (1, 1)
                and not isinstance(self.padding, str) and self.kernel_size != (1, 1))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return SmallMapConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """The ImageNet ResNet: 7x7 stem, max-pool, four stages, global average pool, fc."""

    def __init__(self, arch: str, num_classes: int = 1000) -> None:
        super().__init__()
        kind, depths = _LAYOUT[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, depths[0])
        self.layer2 = self._stage(block, 128, depths[1], stride=2)
        self.layer3 = self._stage(block, 256, depths[2], stride=2)
        self.layer4 = self._stage(block, 512, depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stage(self, block: type, planes: int, depth: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Backbone(nn.Module):
    """A ResNet without its fc layer: images (B, C, H, W) -> features (B, D)."""

    def __init__(self, arch: str = "resnet50", in_channels: int = 3, weights: str | None = None,
                 weights_sha256: str | None = None) -> None:
        """`weights`: "DEFAULT" for torchvision's ImageNet weights from the torch hub cache (checked
        against the hash their file name carries), or the path of a weights file; when given, the file
        must have the sha256 `weights_sha256` (what the task was planned with)."""
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; one of {', '.join(ARCHS)}")
        net = ResNet(arch)
        if weights is not None:
            file = None if weights == "DEFAULT" else weights
            digest = verify_imagenet_weights(arch, file)
            if weights_sha256 is not None and digest != weights_sha256:
                raise WeightsError(f"the ImageNet weights file of {arch} changed since this task was planned (sha256 "
                                   f"{digest[:12]}…, planned with {weights_sha256[:12]}…): run `byol-runner run` again to plan "
                                   "with the file there now")
            path = Path(file).expanduser() if file else imagenet_weights_path(arch)
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if in_channels == 1:
            old = net.conv1
            conv = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
            with torch.no_grad():
                conv.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            net.conv1 = conv
        elif in_channels != 3:
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        net.fc = nn.Identity()
        self.net = net
        self.arch = arch
        self.in_channels = in_channels
        self.dim = FEATURE_DIMS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Classifier(nn.Module):
    """Backbone + linear head: what fine-tuning and supervised training train."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def projection_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the mean per-dimension std, across the batch, of the L2-normalized
    projections. About 1/sqrt(d) for a healthy representation spread over d dimensions, 0 for a
    collapsed one (Chen & He 2021, section 4.1)."""
    return torch.nn.functional.normalize(z.float(), dim=-1).std(dim=0).mean()
