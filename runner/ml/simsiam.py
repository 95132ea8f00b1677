"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021), as a method of
the pretraining loop (`runner.ml.pretrain`).

BYOL without the momentum encoder: both views go through the same encoder f (backbone + 3-layer
projector); a predictor h maps one view's projection to the other's, whose gradient is stopped:

    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -cos(p, z),   p = h(z), z = f(x)

so L lies in [-1, 1] and -1 is perfect agreement. Plain SGD with momentum (base rate 0.05 for a batch
of 256, weight decay 1e-4, no warm-up) under the loop's cosine schedule, the predictor at a fixed
rate (the paper's section 4.2). Unlike the paper, the two views are the project's pretraining
presets (BYOL's, or the X-ray ones for gray images), not MoCo v2's: one set of views for both methods. Arms `simsiam-finetune` and `simsiam-linear` (`runner.arms`) ask whether
BYOL's momentum encoder matters on small medical data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runner.ml.config import TrainSettings
from runner.ml.models import Backbone, projection_std
from runner.ml.optim import scaled_lr


def projector(in_dim: int, dim: int) -> nn.Sequential:
    """fc-BN-ReLU, fc-BN-ReLU, fc-BN (the output BN without affine parameters), as in the paper."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
    )


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """The bottleneck fc-BN-ReLU, then fc (no BN on the output)."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, sg(z)) = -cos(p, z), averaged over the batch; no gradient reaches z."""
    return -F.cosine_similarity(p.float(), z.float().detach(), dim=-1).mean()


class SimSiam(nn.Module):
    def __init__(self, backbone: Backbone, proj_dim: int = 2048, pred_hidden: int = 512) -> None:
        super().__init__()
        self.encoder = backbone
        self.projector = projector(backbone.dim, proj_dim)
        self.predictor = predictor(proj_dim, pred_hidden)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the symmetric loss, the projections of view 1 for the collapse monitor)."""
        z1 = self.projector(self.encoder(v1))
        z2 = self.projector(self.encoder(v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2, z1.detach()


class SimSiamMethod:
    name = "simsiam"

    def __init__(self, backbone: Backbone, settings: TrainSettings, batch: int, ctx) -> None:  # noqa: ANN001 - a train.Context
        spec = settings.simsiam
        self.warmup_epochs = spec.warmup_epochs
        self.model = ctx.place(SimSiam(backbone, spec.proj_dim, spec.pred_hidden))
        self.peak_lr = scaled_lr(spec.base_lr, batch)
        pred = {"params": list(self.model.predictor.parameters())}
        if spec.fix_pred_lr:
            pred["fixed_lr"] = self.peak_lr
        self.optimizer = torch.optim.SGD(
            [{"params": [*self.model.encoder.parameters(), *self.model.projector.parameters()]}, pred],
            lr=self.peak_lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
        )

    def encoder(self) -> Backbone:
        return self.model.encoder

    def after_step(self, step: int, total: int) -> dict[str, float]:
        return {}  # no target network: nothing moves after the step

    def monitor(self, z: torch.Tensor) -> torch.Tensor:
        return projection_std(z)


make = SimSiamMethod
