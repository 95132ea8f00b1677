"""LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks") as BYOL uses it,
and the learning-rate schedule: linear scaling with batch size, linear warm-up, then cosine.

Biases and normalization parameters (every 1-D parameter) are excluded from weight decay and from
the trust-ratio adaptation, as in the BYOL paper's appendix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def split_decay_groups(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights that get decay and adaptation, biases and norm parameters that do not)."""
    regular, excluded = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (excluded if p.ndim <= 1 else regular).append(p)
    return regular, excluded


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer step is scaled by eta * ||w|| / ||g + wd w|| (the trust ratio).

    A group with `exclude=True` gets neither weight decay nor the trust ratio: plain momentum SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1.5e-6, eta: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def lars_for(modules: Iterable[nn.Module], lr: float, weight_decay: float, momentum: float = 0.9) -> LARS:
    regular, excluded = split_decay_groups(modules)
    return LARS(
        [{"params": regular}, {"params": excluded, "exclude": True, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: the base rate is for a batch of 256."""
    return base_lr * batch_size / 256


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its `lr_scale`; a group with a `fixed_lr` keeps that rate."""
    for group in opt.param_groups:
        group["lr"] = group["fixed_lr"] if "fixed_lr" in group else lr * group.get("lr_scale", 1.0)
