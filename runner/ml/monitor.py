"""The pretraining monitor: is the encoder's frozen feature space getting better at telling the classes
apart than the untrained network it started from?

Every `every` optimizer steps (and at the first and last), the online encoder embeds a labeled
memory bank and a set of labeled queries in eval mode (the evaluation view: no augmentation, no
gradient; BatchNorm reads its running statistics and updates nothing). Each query's k = 20 nearest
bank images by cosine similarity vote, weighted by their similarity: the classic kNN monitor of
self-supervised learning (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR; used by BYOL's and SimSiam's reference code). Its accuracy, and the AUROC of
the positive class's share of the vote, are emitted beside the same scores of the untrained network
(computed once, from the weights before any step, so a resumed run shows the same level).

The labels are the smallest label budget's (its train part the bank, its validation part the
queries), drawn as that budget's tasks draw them: the monitor reads no label the study's smallest
arm does not, makes no choice and touches no weight (the worker's test holds the encoder bit-identical
with it on and off). It draws no random number: the training's generators see the same sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

K = 20


@dataclass
class KnnData:
    """The monitor's labeled images (uint8, N C S S) and labels; `positive` is the class AUROC scores."""

    bank: np.ndarray
    bank_labels: np.ndarray
    queries: np.ndarray
    query_labels: np.ndarray
    positive: int
    classes: int

    def counts(self) -> dict:
        """How many images the bank and the queries hold, and the queries of each class."""
        return {"bank": len(self.bank_labels), "queries": len(self.query_labels),
                "query_classes": np.bincount(self.query_labels, minlength=self.classes).tolist()}


def knn_scores(bank: torch.Tensor, bank_labels: np.ndarray, queries: torch.Tensor, query_labels: np.ndarray,
               positive: int, classes: int, k: int = K) -> dict[str, float | None]:
    """Accuracy and AUROC of a similarity-weighted kNN vote (cosine, k neighbours) of each query."""
    from runner.scoring import auroc_weighted

    b = torch.nn.functional.normalize(bank.float(), dim=1)
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    sim = q @ b.T
    k = min(k, b.shape[0])
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(q.shape[0], classes)
    votes.scatter_add_(1, torch.from_numpy(bank_labels)[idx].long(), top.clamp(min=0) + 1e-6)
    share = (votes / votes.sum(1, keepdim=True)).numpy()
    acc = float((share.argmax(1) == query_labels).mean())
    is_pos = query_labels == positive
    auroc = None
    if is_pos.any() and not is_pos.all():
        auroc = float(auroc_weighted(share[:, positive].astype(np.float64), is_pos, np.ones((1, len(is_pos))))[0])
    return {"acc": acc, "auroc": auroc}


class KnnMonitor:
    """Scores an encoder every `every` steps; `baseline` once, on the untrained network."""

    def __init__(self, data: KnnData, size: int, ctx, every: int, k: int = K) -> None:  # noqa: ANN001 - a train.Context
        self.data, self.size, self.ctx, self.every, self.k = data, size, ctx, every, k
        self.base: dict[str, float | None] = {}
        self.seconds = 0.0

    @staticmethod
    def interval(total: int, requested: int | None) -> int:
        """Steps between two scores: the requested number, else about ten times a run."""
        return requested if requested else max(1, math.ceil(total / 10))

    def due(self, step: int, total: int) -> bool:
        return step == total or step % self.every == 0

    def _score(self, encoder: torch.nn.Module) -> dict[str, float | None]:
        import time

        from runner.ml.train import extract_features

        t0 = time.perf_counter()
        was_training = encoder.training
        with torch.no_grad():
            bank = torch.from_numpy(extract_features(encoder, self.data.bank, self.size, self.ctx))
            queries = torch.from_numpy(extract_features(encoder, self.data.queries, self.size, self.ctx))
        encoder.train(was_training)
        d = self.data
        out = knn_scores(bank, d.bank_labels, queries, d.query_labels, d.positive, d.classes, self.k)
        self.seconds += time.perf_counter() - t0
        return out

    def baseline(self, encoder: torch.nn.Module) -> None:
        """The untrained network's scores (call before any step and before a checkpoint is loaded)."""
        self.base = self._score(encoder)

    def __call__(self, encoder: torch.nn.Module, step: int, epoch: int) -> dict[str, float | None]:
        """Score the encoder now and emit it as a metric event beside the untrained network's level."""
        s = self._score(encoder)
        values = {"knn_acc": s["acc"], "knn_auroc": s["auroc"], "knn_base_acc": self.base.get("acc"),
                  "knn_base_auroc": self.base.get("auroc"), "knn_bank": len(self.data.bank_labels),
                  "knn_queries": len(self.data.query_labels)}
        self.ctx.emit("metric", epoch=epoch, step=step, **values)
        return values
