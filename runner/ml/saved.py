"""A finished classifier as a file: tasks/<id>/model.pt, everything scoring an image needs.

Every labeled task (fine-tune, supervised, linear probe and its controls) writes one, atomically,
beside its metrics.json, which records its sha256: a damaged model.pt makes its task run again. It
holds only tensors, numbers, strings, lists and dicts, and is read with weights_only=True:

- the network: a classifier's backbone + head (`state_dict`), or a probe's backbone and the logistic
  regression with its feature standardization (`probe`). A probe keeps no copy of a backbone it can
  name: a `linear` probe names its pretraining's encoder.pt and that file's sha256 (`encoder`); the
  controls (`rebuild`) keep the random generator's state their network was initialised from (and,
  for the ImageNet control, which weights file and its sha256), with a digest of the weights that
  came out, so that scoring builds the same network again and checks it is the same to the bit;
- how images reach it: the data set's image size, fit and channel count (the cache's decoding) and
  the network's input size; the run settings of the evaluation view (channels_last, precision);
- what its probabilities mean: the class names in output order, the positive class, the temperature
  fitted on the budget's validation labels (None when none was), the selection it was kept by.

`Scorer` turns uint8 images into calibrated probabilities exactly as the task scored its test split
(`byol-runner predict` and the `evaluate` tasks of an external test set use it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runner.errors import described
from runner.ml.checkpoint import atomic_save, safe_load
from runner.ml.weights import unpack

FORMAT = 1


def probe_state(scaler, clf, c: float, max_iter: int) -> dict:  # noqa: ANN001 - sklearn's StandardScaler, LogisticRegression
    t = lambda a: torch.from_numpy(np.array(a, copy=True))  # noqa: E731 - each array in its own dtype: the fitted values, bit for bit
    return {"mean": t(scaler.mean_), "scale": t(scaler.scale_), "var": t(scaler.var_),
            "n_samples_seen": int(scaler.n_samples_seen_), "coef": t(clf.coef_), "intercept": t(clf.intercept_),
            "classes": torch.from_numpy(np.asarray(clf.classes_, dtype=np.int64).copy()), "C": float(c), "max_iter": int(max_iter),
            "n_iter": torch.from_numpy(np.asarray(clf.n_iter_, dtype=np.int64).copy())}


def probe_from_state(state: dict):  # noqa: ANN201 - (StandardScaler, LogisticRegression), fitted
    """The fitted standardization and logistic regression, rebuilt from their arrays: the same
    predict_proba as the task's, to the bit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = (state[k].numpy() for k in ("mean", "scale", "var"))
    scaler.n_samples_seen_ = state["n_samples_seen"]
    scaler.n_features_in_ = scaler.mean_.shape[0]
    clf = LogisticRegression(C=state["C"], max_iter=state["max_iter"])
    clf.coef_, clf.intercept_, clf.classes_ = state["coef"].numpy(), state["intercept"].numpy(), state["classes"].numpy()
    clf.n_iter_ = state["n_iter"].numpy()
    clf.n_features_in_ = clf.coef_.shape[1]
    return scaler, clf


def save(path: Path, *, task_id: str, kind: str, arch: str, channels: int, class_names: list[str], positive: int | None,
         image: dict, input_size: int, run: dict, temperature: float | None, selection: dict, train_counts: list[int],
         state_dict: dict | None = None, backbone: dict | None = None, encoder: dict | None = None,
         probe: dict | None = None, rebuild: dict | None = None) -> None:
    """`run`: the evaluation view's settings as the task used them (`precision` resolved to bf16 or
    fp32, so that a task scored in bf16 on a GPU is scored in bf16 again anywhere); `train_counts`:
    its training labels per class (the constant guess an external set's loss is held against)."""
    atomic_save({"format": FORMAT, "task": task_id, "kind": kind, "arch": arch, "in_channels": int(channels),
                 "class_names": list(class_names), "positive": positive, "image": dict(image), "input_size": int(input_size),
                 "run": dict(run), "temperature": None if temperature is None else float(temperature), "selection": selection,
                 "train_counts": [int(c) for c in train_counts], "state_dict": state_dict, "backbone": backbone,
                 "encoder": encoder, "probe": probe, "rebuild": rebuild}, path)


def scoring_run(saved: dict, device: str):  # noqa: ANN201 - a RunSpec
    """The run settings to score with: the task's own evaluation view and precision, on `device`."""
    from runner.ml.config import RunSpec

    return RunSpec.model_validate({**saved["run"], "device": device, "compile": False})


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values, in its order."""
    import hashlib

    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rebuild_recipe(rng_state: torch.Tensor, weights: str | None, weights_sha256: str | None, state: dict) -> dict:
    """What builds a control's backbone again: the CPU generator's state before it was built, its
    weights file (None: random init), and the digest of the weights it had when it was scored."""
    return {"rng_state": rng_state.clone(), "weights": weights, "weights_sha256": weights_sha256, "digest": state_digest(state),
            "torch": str(torch.__version__)}


def rebuilt_backbone(saved: dict):  # noqa: ANN201 - a models.Backbone
    """The control's backbone built again from its recipe, checked against the digest it was scored with."""
    from runner.ml.models import Backbone

    r = saved["rebuild"]
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(r["rng_state"])
        try:
            backbone = Backbone(saved["arch"], saved["in_channels"], weights=r["weights"], weights_sha256=r["weights_sha256"])
        except Exception as e:  # noqa: BLE001 - the ImageNet file missing or changed: say which and why
            raise ModelFileError(f"the {saved['kind']} control's backbone cannot be built again: {e}") from None
    if state_digest(backbone.state_dict()) != r["digest"]:
        raise ModelFileError(f"the {saved['kind']} control's backbone, built again from its initialisation (PyTorch "
                             f"{torch.__version__}; the task ran on {r.get('torch')}), is not the network the task scored: "
                             f"rerun the task with this PyTorch (byol-runner run MANIFEST --retry {saved['task'][:8]})")
    return backbone


class ModelFileError(Exception):
    """model.pt cannot be read or does not describe a classifier this version scores."""


def load(path: Path, task: str | None = None) -> dict:
    """A saved classifier; with `task`, it must be that task's (a model.pt copied or swapped from
    another task's folder, of this run or another, is refused: predict scored with it silently)."""
    try:
        saved = safe_load(path, "cpu")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file (the classifier task has not finished, or its folder was removed)") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: torch raises several kinds
        raise ModelFileError(f"{path}: not a readable model file ({described(e)})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a byol-runner model file of format {FORMAT}")
    if task is not None and saved.get("task") != task:
        raise ModelFileError(f"{path} is the classifier of task {str(saved.get('task'))[:16]}, not of task {task} (copied or "
                             "swapped from another folder): `byol-runner run` with the same manifest trains it again")
    return saved


class Scorer:
    """A saved classifier, ready to score uint8 images (N, C, S, S) as its task scored its test split."""

    def __init__(self, saved: dict, results: Path, device: torch.device, ctx) -> None:  # noqa: ANN001 - a train.Context
        from runner.ml.models import Backbone, Classifier

        self.saved, self.ctx = saved, ctx
        self.class_names: list[str] = saved["class_names"]
        # none was fitted (too few validation labels under the budget): the probabilities as they are
        self.temperature: float = 1.0 if saved["temperature"] is None else saved["temperature"]
        k = len(self.class_names)
        if saved["probe"] is None:
            self.model = Classifier(Backbone(saved["arch"], saved["in_channels"]), k)
            self.model.load_state_dict(unpack(saved["state_dict"]))
            self.model = ctx.place(self.model)
        else:
            state = saved["backbone"]
            if saved.get("rebuild"):  # a control: built again from its initialisation, checked by digest
                self.backbone = rebuilt_backbone(saved)
            else:
                if state is None:  # a linear probe: its pretraining's encoder, checked against the sha256 it was scored with
                    from runner.data.cache import file_sha256

                    enc = results / saved["encoder"]["path"]
                    if file_sha256(enc) != saved["encoder"]["sha256"]:
                        raise ModelFileError(f"{enc}: missing or not the encoder this probe was fitted on (sha256 differs)")
                    state = unpack(safe_load(enc, "cpu")["state_dict"])
                self.backbone = Backbone(saved["arch"], saved["in_channels"])
                self.backbone.load_state_dict(state)
            self.backbone = self.backbone.to(device)
            self.scaler, self.clf = probe_from_state(saved["probe"])

    def raw(self, pixels: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities (N, K), in the order of `class_names`."""
        from runner.ml import train as T

        size = self.saved["input_size"]
        if self.saved["probe"] is None:
            return T.predict(self.model, T.to_device_images(pixels, self.ctx.device), size, self.ctx).numpy()
        feats = T.extract_features(self.backbone, pixels, size, self.ctx)
        return T.full_proba(self.clf, self.scaler.transform(feats), len(self.class_names))

    def probs(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: the temperature fitted on the budget's validation labels applied."""
        from runner.ml.metrics import apply_temperature

        return apply_temperature(self.raw(pixels), self.temperature)
