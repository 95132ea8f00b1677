"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020), built from small blocks.

- `MLPHead`: Linear -> BatchNorm -> ReLU -> Linear (projector 2048->4096->256, predictor 256->4096->256).
- `byol_loss`: 2 - 2 cos(p, z), per pair; the model sums the two directions (view 1 -> 2, 2 -> 1).
- `tau_at`: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, per optimizer step.
- `BYOL.update_target`: target <- tau target + (1 - tau) online, one fused foreach op.
- `make`: BYOL as a method of the pretraining loop (`runner.ml.pretrain`): LARS, the EMA after each step.
Each view goes through the networks separately, so BatchNorm statistics are per view as in the paper.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from runner.ml.config import TrainSettings
from runner.ml.models import Backbone, projection_std
from runner.ml.optim import lars_for, scaled_lr


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 2 - 2 cos(p, z); z is the target's projection (no gradient)."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=-1).mean()


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """The target's EMA rate at optimizer step `step` of `total_steps`: tau_base at 0, 1 at the end."""
    k = min(max(step, 0), total_steps)
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1) / 2


class BYOL(nn.Module):
    def __init__(self, backbone: Backbone, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096) -> None:
        super().__init__()
        self.online_encoder = backbone
        self.online_projector = MLPHead(backbone.dim, proj_hidden, proj_dim)
        self.predictor = MLPHead(proj_dim, pred_hidden, proj_dim)
        self.target_encoder = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.online_encoder.parameters(), *self.online_projector.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    def trainable_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.online_encoder, self.online_projector, self.predictor])

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over both directions, target projection of view 1 for the collapse monitor)."""
        p1 = self.predictor(self.online_projector(self.online_encoder(v1)))
        p2 = self.predictor(self.online_projector(self.online_encoder(v2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(v1))
            z2 = self.target_projector(self.target_encoder(v2))
        return byol_loss(p1, z2) + byol_loss(p2, z1), z1

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        online, target = self.online_parameters(), self.target_parameters()
        torch._foreach_lerp_(target, online, 1.0 - tau)
        # BatchNorm running statistics follow the online network (they are not learned)
        src = [*self.online_encoder.buffers(), *self.online_projector.buffers()]
        dst = [*self.target_encoder.buffers(), *self.target_projector.buffers()]
        torch._foreach_copy_(dst, src)


class BYOLMethod:
    """BYOL in the pretraining loop: LARS over the online networks; after each step the target moves
    by that step's tau."""

    name = "byol"

    def __init__(self, backbone: Backbone, settings: TrainSettings, batch: int, ctx) -> None:  # noqa: ANN001 - a train.Context
        spec = settings.pretrain
        self.model = ctx.place(BYOL(backbone, spec.proj_hidden, spec.proj_dim, spec.pred_hidden))
        self.peak_lr = scaled_lr(spec.base_lr, batch)
        self.optimizer = lars_for(self.model.trainable_modules(), lr=self.peak_lr, weight_decay=spec.weight_decay)
        self.tau_base = spec.tau_base

    def encoder(self) -> Backbone:
        return self.model.online_encoder

    def after_step(self, step: int, total: int) -> dict[str, float]:
        tau = tau_at(step, total, self.tau_base)
        self.model.update_target(tau)
        return {"tau": tau}

    def monitor(self, z: torch.Tensor) -> torch.Tensor:
        return projection_std(z)


make = BYOLMethod
