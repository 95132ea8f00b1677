"""Pretraining methods and the arms that use them: SimSiam's loss, stop-gradient and symmetry; the
pretraining loop with each method; BYOL continued from ImageNet weights, from a generated weights
file, end to end through `byol-runner run` on the CPU; the arm registry as the plan and report see it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from runner import arms
from runner.ml.config import PretrainSpec, RunSpec, SimSiamSpec, TrainSettings
from runner.ml.models import Backbone
from runner.ml.optim import set_lr, warmup_cosine
from runner.ml.pretrain import make_method, pretrain
from runner.ml.simsiam import SimSiam, negative_cosine
from runner.ml.train import Context
from tests.conftest import fake_imagenet_weights, run_cli, torchvision_weights_path


def small_simsiam(channels: int = 1) -> SimSiam:
    return SimSiam(Backbone("resnet18", channels), proj_dim=32, pred_hidden=8)


def cpu_context(tmp_path: Path, seed: int = 0) -> tuple[Context, list[dict]]:
    events: list[dict] = []
    run = RunSpec(device="cpu", progress_every_s=1e-9, checkpoint_every_steps=10_000)
    return Context(torch.device("cpu"), run, tmp_path, seed, lambda kind, **v: events.append({"kind": kind, **v})), events


# ---- SimSiam (Chen & He 2021) ---------------------------------------------------------------------


def test_simsiam_loss_is_the_symmetric_negative_cosine_of_prediction_and_the_other_projection():
    torch.manual_seed(0)
    model = small_simsiam()
    v1, v2 = torch.rand(6, 1, 32, 32), torch.rand(6, 1, 32, 32)
    loss, z1_out = model(v1, v2)
    loss = loss.detach()
    # the same forward by hand (train mode: BatchNorm per view, as the model runs each view alone)
    z1, z2 = model.projector(model.encoder(v1)), model.projector(model.encoder(v2))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    by_hand = -0.5 * (F.cosine_similarity(p1, z2, dim=-1).mean() + F.cosine_similarity(p2, z1, dim=-1).mean())
    assert float(loss) == pytest.approx(float(by_hand.detach()), abs=1e-6)
    assert -1.0 <= float(loss) <= 1.0
    assert torch.allclose(z1_out, z1.detach(), atol=1e-6)
    # pairing: p1 meets z2 (not z1); the same-view pairing gives another number
    same_view = -0.5 * (F.cosine_similarity(p1, z1, dim=-1).mean() + F.cosine_similarity(p2, z2, dim=-1).mean()).detach()
    assert abs(float(same_view) - float(loss)) > 1e-4
    # D is -cos: identical vectors score -1, opposite ones +1
    x = torch.randn(4, 8)
    assert float(negative_cosine(x, x)) == pytest.approx(-1.0) and float(negative_cosine(x, -x)) == pytest.approx(1.0)


def test_simsiam_is_symmetric_in_its_two_views():
    torch.manual_seed(1)
    model = small_simsiam()
    v1, v2 = torch.rand(6, 1, 32, 32), torch.rand(6, 1, 32, 32)
    a, _ = model(v1, v2)
    b, _ = model(v2, v1)
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-6)


def test_simsiam_stops_the_gradient_at_the_projection_it_predicts():
    """The gradient reaches the encoder only through the predictor's branch: the same loss with the
    projections not detached gives other gradients (the stop-gradient is what prevents collapse)."""
    torch.manual_seed(2)
    model = small_simsiam()
    v1, v2 = torch.rand(6, 1, 32, 32), torch.rand(6, 1, 32, 32)
    z = torch.randn(4, 8, requires_grad=True)
    negative_cosine(torch.randn(4, 8, requires_grad=True), z).backward()
    assert z.grad is None  # nothing flows into the target side

    def grads(stop: bool) -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(3)
        if stop:
            loss, _ = model(v1, v2)
        else:
            z1, z2 = model.projector(model.encoder(v1)), model.projector(model.encoder(v2))
            p1, p2 = model.predictor(z1), model.predictor(z2)
            loss = -0.5 * (F.cosine_similarity(p1, z2, dim=-1).mean() + F.cosine_similarity(p2, z1, dim=-1).mean())
        loss.backward()
        return [p.grad.clone() for p in model.encoder.parameters() if p.grad is not None]

    with_stop, without = grads(True), grads(False)
    assert len(with_stop) == len(without) > 0
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(with_stop, without))


def test_simsiam_heads_and_optimizer_follow_the_paper():
    model = SimSiam(Backbone("resnet50", 3))
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert model.projector[0].in_features == 2048 and model.projector[6].out_features == 2048
    assert not model.projector[7].affine  # the output BN has no learned scale and shift
    assert (model.predictor[0].out_features, model.predictor[3].out_features) == (512, 2048)  # the bottleneck
    ctx, _ = cpu_context(Path("."))
    method = make_method("simsiam", Backbone("resnet18", 1), TrainSettings(simsiam=SimSiamSpec(proj_dim=32, pred_hidden=8)), 128, ctx)
    opt = method.optimizer
    assert isinstance(opt, torch.optim.SGD) and method.peak_lr == pytest.approx(0.05 * 128 / 256)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    set_lr(opt, 0.001)  # the schedule moves the encoder's rate; the predictor keeps the peak
    assert opt.param_groups[0]["lr"] == 0.001 and opt.param_groups[1]["lr"] == pytest.approx(method.peak_lr)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in method.model.predictor.parameters()}
    assert method.after_step(0, 10) == {}  # no target network to move
    assert SimSiamSpec().warmup_epochs == 0  # the paper warms up only at batch 1024 and more


def test_the_pretraining_loop_runs_simsiam_and_saves_its_encoder(tmp_path):
    ctx, events = cpu_context(tmp_path, seed=4)
    # pretrain's warm-up is BYOL's; SimSiam has its own (none by default, as the paper at batch 256)
    settings = TrainSettings(pretrain=PretrainSpec(epochs=3, min_steps=0, batch_size=8, warmup_epochs=0),
                             simsiam=SimSiamSpec(proj_dim=32, pred_hidden=8, warmup_epochs=1))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)
    seen = []
    real = torch.optim.SGD.step

    def spy(self, *a, **k):  # the rate each step ran at
        seen.append([g["lr"] for g in self.param_groups])
        return real(self, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.optim.SGD, "step", spy)
    try:
        summary = pretrain(pixels, settings, "simsiam", "random", "resnet18", 16, ctx)
    finally:
        mp.undo()
    total, peak = 6, 0.05 * 8 / 256
    assert summary["steps"] == total and summary["method"] == "simsiam" and summary["init"] == "random"
    assert [g[0] for g in seen] == pytest.approx([warmup_cosine(k, total, 2, peak) for k in range(total)])
    assert all(g[1] == pytest.approx(peak) for g in seen)  # the predictor's rate stays fixed
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress and all(-1 <= e["loss"] <= 1 and "tau" not in e and e["proj_std"] > 0 for e in progress)
    assert any("simsiam resnet18 from random init" in e.get("message", "") for e in events if e["kind"] == "log")
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert saved["arch"] == "resnet18" and saved["in_channels"] == 1
    assert any(not torch.equal(saved["state_dict"][k], v) for k, v in Backbone("resnet18", 1).state_dict().items()
               if k.endswith("weight"))


# ---- BYOL continued from ImageNet weights --------------------------------------------------------


def test_imagenet_initialised_pretraining_starts_from_the_weights_file(tmp_path, monkeypatch):
    from runner.ml.config import ModelSpec

    path, weights = fake_imagenet_weights(tmp_path / "torch_home")
    ctx, events = cpu_context(tmp_path)
    # a rate so small that the weights after two steps are the ones the run started from
    settings = TrainSettings(model=ModelSpec(arch="resnet18", imagenet_weights=str(path)),
                             pretrain=PretrainSpec(epochs=1, min_steps=2, batch_size=8, base_lr=1e-12, warmup_epochs=0,
                                                   proj_hidden=16, proj_dim=8, pred_hidden=16))
    pixels = np.random.default_rng(0).integers(0, 256, (8, 1, 16, 16), dtype=np.uint8)
    summary = pretrain(pixels, settings, "byol", "imagenet", "resnet18", 16, ctx)
    assert summary["init"] == "imagenet" and summary["steps"] == 2
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)["state_dict"]
    # a gray image sees conv1 summed over RGB; every other weight is the file's
    assert torch.allclose(saved["net.conv1.weight"], weights["conv1.weight"].sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(saved["net.layer4.1.conv2.weight"], weights["layer4.1.conv2.weight"], atol=1e-6)
    random = Backbone("resnet18", 1).state_dict()["net.layer4.1.conv2.weight"]
    assert not torch.allclose(saved["net.layer4.1.conv2.weight"], random, atol=1e-3)
    assert any("from ImageNet weights" in e.get("message", "") for e in events if e["kind"] == "log")


IMAGENET_MANIFEST = """\
name: inet
datasets:
  syn:
    source: synthetic
    num_classes: 2
    per_class: 24
    size: 16
    image_size: 16
    classes: {normal: [class0], finding: [class1]}
    positive: finding
methods: [byol-imagenet-finetune, byol-imagenet-linear]
labels: {fractions: [1.0], min_validation_per_class: 2}
seeds: [0]
model: {arch: resnet18}
run: {device: cpu, progress_every_s: 60, checkpoint_every_steps: 10000}
pretrain: {epochs: 2, min_steps: 0, batch_size: 8, proj_hidden: 32, pred_hidden: 32, proj_dim: 16, warmup_epochs: 0.5}
finetune: {epochs: 1, min_steps: 6, batch_size: 8, eval_every_steps: 3}
probe: {c_grid: [0.01, 1.0], max_iter: 200}
executor: {max_parallel: 1}
"""


@pytest.mark.e2e
def test_byol_from_imagenet_weights_runs_end_to_end_and_is_model1_when_chosen(tmp_path):
    """Its pretrain task reads the generated weights, its two arms read that encoder, the report names it."""
    home = tmp_path / "torch_home"
    (tmp_path / "inet.yaml").write_text(IMAGENET_MANIFEST)
    results = tmp_path / "results"
    # without the weights: the plan stops before anything runs, naming the arms, the file and the place
    r = run_cli("run", str(tmp_path / "inet.yaml"), "--results", str(results), env={"TORCH_HOME": str(home)})
    assert r.returncode != 0
    assert "byol-imagenet-finetune, byol-imagenet-linear" in r.stderr and "resnet18-" in r.stderr and str(home) in r.stderr
    assert not (results / "tasks").exists() or not any((results / "tasks").glob("*/metrics.json"))

    # a file at torchvision's place that is not torchvision's: refused in one line, before anything runs
    bogus = torchvision_weights_path(home)
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"random bytes, not weights")
    r = run_cli("run", str(tmp_path / "inet.yaml"), "--results", str(results), env={"TORCH_HOME": str(home)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not the ImageNet weights file torchvision publishes" in r.stderr
    assert not (results / "tasks").exists() or not any((results / "tasks").glob("*/metrics.json"))

    path, _ = fake_imagenet_weights(home)  # a file of the user's own, named in the manifest
    (tmp_path / "inet.yaml").write_text(IMAGENET_MANIFEST.replace("model: {arch: resnet18}",
                                                                  f"model: {{arch: resnet18, imagenet_weights: {path}}}"))
    r = run_cli("run", str(tmp_path / "inet.yaml"), "--results", str(results), env={"TORCH_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr
    tasks = {json.loads(p.read_text())["id"]: json.loads(p.read_text()) for p in results.glob("tasks/*/task.json")}
    pre = [t for t in tasks.values() if t["kind"] == "pretrain"]
    assert len(pre) == 1 and pre[0]["pretraining"] == "byol-imagenet"
    metrics = json.loads((results / "tasks" / pre[0]["id"] / "metrics.json").read_text())
    assert metrics["pretrain"]["init"] == "imagenet" and metrics["pretrain"]["method"] == "byol"
    deps = [t for t in tasks.values() if t["encoder"]]
    assert {t["kind"] for t in deps} == {"finetune", "linear"} and all(pre[0]["id"] in t["encoder"] for t in deps)
    report = json.loads((results / "inet" / "results.json").read_text())
    assert {a["method"] for a in report["arms"]} == {"byol-imagenet-finetune", "byol-imagenet-linear"}
    assert all(a["accuracy"]["n"] == 1 for a in report["arms"])
    # with no arm of the default roles, the one named by `compare` is Model 1, under its own name
    (tmp_path / "inet.yaml").write_text(IMAGENET_MANIFEST.replace("model: {arch: resnet18}", f"model: {{arch: resnet18, imagenet_weights: {path}}}")
                                        + "compare: {model1: byol-imagenet-finetune}\n")
    r = run_cli("run", str(tmp_path / "inet.yaml"), "--results", str(results), env={"TORCH_HOME": str(home)})
    assert r.returncode == 0 and "0 workers started" in r.stdout, r.stdout + r.stderr  # `compare` changes no task
    report = json.loads((results / "inet" / "results.json").read_text())
    assert report["model1_method"] == "byol-imagenet-finetune" and report["model2_method"] is None
    assert report["legend"]["model1"] == "BYOL + ResNet18 continued from ImageNet weights, fine-tuned"


# ---- the registry, as the plan sees it -----------------------------------------------------------


def test_every_arm_is_complete_and_each_pretraining_is_planned_once_per_seed(tmp_path, monkeypatch):
    from runner.manifest import parse_manifest
    from runner.plan import make_plan

    for arm in arms.ARMS.values():
        assert arm.kind in arms.KINDS and arm.label and arm.colour.startswith("#")
        assert arm.pretraining is None or arm.pretraining in arms.PRETRAININGS
    for p in arms.PRETRAININGS.values():
        assert (Path(__file__).parents[1] / "runner" / "ml" / f"{p.method}.py").is_file()
    path, _ = fake_imagenet_weights(tmp_path / "torch_home", loadable=False)
    manifest = yaml.safe_load(IMAGENET_MANIFEST) | {"methods": list(arms.METHODS), "seeds": [0, 1], "compare": {},
                                                    "model": {"arch": "resnet18", "imagenet_weights": str(path)}}
    plan = make_plan(parse_manifest(yaml.safe_dump(manifest)), tmp_path / "results")
    pre = [t for t in plan.tasks if t.kind == "pretrain"]
    assert sorted((t.method, t.seed) for t in pre) == sorted((f"{p}-pretrain", s) for p in arms.PRETRAININGS for s in (0, 1))
    assert len({t.id for t in pre}) == len(pre)
    by_id = plan.by_id()
    for t in plan.tasks:
        p = arms.pretraining_of(t.method)
        if p:  # a pretraining's arms read its encoder, of their own seed
            (dep,) = t.deps
            assert by_id[dep].method == f"{p.name}-pretrain" and by_id[dep].seed == t.seed
    assert math.prod([len(arms.METHODS), 2]) == len([t for t in plan.tasks if t.kind != "pretrain"])


# ---- a diverging run fails, it is never a result -------------------------------------------------


@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_a_pretraining_whose_loss_diverges_fails_with_the_step_and_a_hint(tmp_path, method):
    ctx, events = cpu_context(tmp_path)
    settings = TrainSettings(pretrain=PretrainSpec(epochs=4, min_steps=0, batch_size=8, base_lr=1e30, warmup_epochs=0,
                                                   proj_hidden=16, proj_dim=8, pred_hidden=16),
                             simsiam=SimSiamSpec(base_lr=1e30, proj_dim=16, pred_hidden=8))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)
    with pytest.raises(RuntimeError, match=r"loss is (nan|inf|-inf) at step \d+ of 8 \(training diverged\): lower the learning rate"):
        pretrain(pixels, settings, method, "random", "resnet18", 16, ctx)
    assert not (tmp_path / "encoder.pt").exists()


def test_a_fine_tune_whose_loss_diverges_fails(tmp_path):
    from runner.ml.config import FinetuneSpec
    from runner.ml.train import train_classifier

    ctx, _ = cpu_context(tmp_path)
    x = np.random.default_rng(0).integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)
    y = np.r_[np.zeros(8, int), np.ones(8, int)]
    spec = FinetuneSpec(epochs=1, min_steps=12, batch_size=8, lr=1e30, eval_every_steps=4, warmup_frac=0.0)
    with pytest.raises(RuntimeError, match=r"training loss is (nan|inf) at step \d+ of 12 \(training diverged\): lower finetune\.lr"):
        train_classifier(Backbone("resnet18", 1), False, (x, y), None, 2, spec, 16, ctx)


def test_a_task_json_pointing_outside_the_results_dir_cannot_start(tmp_path):
    from runner.contracts import TaskSpec
    from runner.errors import StartError
    from runner.worker.run import EventLog, run_task

    for field_, value in (("cache_dir", "../../outside"), ("encoder", "../elsewhere/encoder.pt")):
        spec = TaskSpec.model_validate({"id": "t", "kind": "finetune" if field_ == "encoder" else "supervised", "dataset": "d",
                                        "data": {"source": "synthetic"}, "budget": {"fraction": 1.0},
                                        "settings": {"run": {"device": "cpu"}}, field_: value})
        (tmp_path / "tasks" / "t").mkdir(parents=True, exist_ok=True)
        log = EventLog(tmp_path / "tasks" / "t" / "events.jsonl", "t")
        try:
            with pytest.raises(StartError, match=f"{field_} .* points outside the results dir"):
                run_task(spec, tmp_path / "tasks" / "t", tmp_path, log)
        finally:
            log.close()
    assert not (tmp_path.parent / "outside").exists()


def test_the_manifest_knows_every_augmentation_preset():
    from runner.ml.augment import PRESETS
    from runner.ml.config import AUGMENT_PRESETS

    assert set(AUGMENT_PRESETS) == {"auto", *PRESETS}


# ---- the pretraining monitor ------------------------------------------------------------------------


def test_the_pretraining_monitor_changes_no_weight_and_scores_against_the_untrained_network(tmp_path):
    """The same pretraining with and without the kNN monitor: bit-identical encoders (it reads no
    random number and updates no BatchNorm statistic); with it, metric events every 2 steps carry the
    kNN AUROC and accuracy beside the untrained network's, which is the same at every score."""
    import dataclasses

    from runner.ml.monitor import KnnData

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8)
    labels = np.tile([0, 1], 12)
    data = KnnData(pixels[:16], labels[:16], pixels[16:], labels[16:], positive=1, classes=2)
    settings = TrainSettings(pretrain=PretrainSpec(epochs=2, min_steps=6, batch_size=8, warmup_epochs=0,
                                                   proj_hidden=16, proj_dim=8, pred_hidden=16))
    encoders, monitored = [], []
    for with_monitor in (False, True):
        folder = tmp_path / str(with_monitor)
        folder.mkdir()
        ctx, events = cpu_context(folder)
        ctx = dataclasses.replace(ctx, run=ctx.run.model_copy(update={"monitor_every_steps": 2}))
        torch.manual_seed(0)
        summary = pretrain(pixels, settings, "byol", "random", "resnet18", 16, ctx, monitor=data if with_monitor else None)
        encoders.append(torch.load(folder / "encoder.pt", weights_only=True)["state_dict"])
        monitored.append([e for e in events if e["kind"] == "metric" and "knn_auroc" in e])
    a, b = encoders
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert monitored[0] == [] and [e["step"] for e in monitored[1]] == [2, 4, 6]
    assert all(0 <= e["knn_auroc"] <= 1 and 0 <= e["knn_acc"] <= 1 and e["knn_bank"] == 16 and e["knn_queries"] == 8
               for e in monitored[1])
    assert len({e["knn_base_auroc"] for e in monitored[1]}) == 1 and monitored[1][0]["knn_base_auroc"] is not None
    assert summary["monitor"]["every_steps"] == 2 and summary["monitor"]["seconds"] > 0
    assert summary["monitor"]["labels"] == {"bank": 16, "queries": 8, "query_classes": [4, 4]}


def test_the_report_says_where_the_monitor_ended_or_that_it_scored_too_few_images():
    """A reader sees the monitor's gain over the untrained network per data set, and is told, not shown
    a number, when it scored too few labelled images for its AUROC to mean anything."""
    from runner.docpages import monitor_compact
    from runner.scoring import too_few
    from runner.tables import monitor_lines

    seeds = [{"seed": i, "step": 1000, "auroc": a, "untrained": b} for i, (a, b) in enumerate([(0.98, 0.96), (0.93, 0.92), (0.90, 0.95)])]
    report = {"monitor": [{"dataset": "chest", "method": "byol", "seeds": seeds, "queries": 78, "query_classes": [20, 58]},
                          {"dataset": "ct", "method": "byol", "seeds": seeds, "queries": 4, "query_classes": [2, 2]},
                          {"dataset": "skin", "method": "simsiam", "seeds": seeds, "queries": 40, "query_classes": [5, 35]}]}
    chest, ct, skin = monitor_lines(report)
    assert "chest BYOL" in chest and "78 labelled validation images, 20 in the rarer class" in chest
    assert "at step 1000, -0.007 against the untrained network on average, higher in 2 of 3 seeds" in chest
    for line in (ct, skin):
        assert "too few images to tell" in line and "against the untrained" not in line
    assert "SimSiam" in skin
    assert monitor_compact(report).endswith("chest -0.007 (higher in 2 of 3 seeds); ct: too few labelled images to tell; "
                                            "skin: too few labelled images to tell.")
    # old runs recorded no class counts: the number of images alone decides
    assert too_few(29, None) and not too_few(30, None) and too_few(100, [9, 91]) and not too_few(100, [10, 90])
    assert monitor_lines({}) == [] and monitor_compact({}) is None


def test_knn_scores_follow_the_nearest_labeled_neighbours():
    """Queries next to the bank's class-1 points score 1 (AUROC 1, accuracy 1); far from both, the vote splits."""
    from runner.ml.monitor import knn_scores

    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    bank_labels = np.array([0, 0, 1, 1])
    queries = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.2, 1.0]])
    out = knn_scores(bank, bank_labels, queries, np.array([0, 1, 1]), positive=1, classes=2, k=2)
    assert out == {"acc": 1.0, "auroc": 1.0}
    assert knn_scores(bank, bank_labels, queries, np.array([1, 1, 1]), 1, 2, k=2)["auroc"] is None  # one class: no AUROC


# ---- checkpoints carry their task ----------------------------------------------------------------


def test_a_checkpoint_is_resumed_only_by_the_task_that_wrote_it(tmp_path):
    """Another task's checkpoint.pt in a task's folder (copied, or two swapped by hand) would otherwise
    train on from someone else's weights and publish them under this task's name: it is moved aside as
    checkpoint.pt.foreign and the task starts from step 0, with a line naming whose it was. Its own
    checkpoint resumes (weights, optimizer, step); one that names no task is not trusted either."""
    from runner.ml.checkpoint import atomic_save
    from runner.ml.checkpoint import rng_state as rng_of
    from runner.ml.train import resume

    def state(owner: str | None, w: float) -> dict:
        model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(model.weight, w)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "rng": rng_of(torch.Generator())}
        return out | ({"task": owner} if owner else {})

    for owner, resumed in (("aaaa000000000000", True), ("bbbb000000000000", False), (None, False)):
        folder = tmp_path / str(owner) / "aaaa000000000000"
        folder.mkdir(parents=True)
        atomic_save(state(owner, 0.5), folder / "checkpoint.pt")
        ctx, events = cpu_context(folder)
        model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(model.weight, 0.0)
        got = resume(folder / "checkpoint.pt", model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator(), ctx, 1, 10)
        if resumed:
            assert got["step"] == 7 and torch.all(model.weight == 0.5)
            assert "resumed from checkpoint at step 7 of 10" in events[-1]["message"]
        else:
            assert got is None and torch.all(model.weight == 0.0)  # nothing of it was loaded
            assert not (folder / "checkpoint.pt").exists() and (folder / "checkpoint.pt.foreign").is_file()
            assert "not this task's (aaaa000000000000)" in events[-1]["message"] and "starts from step 0" in events[-1]["message"]
            assert (owner or "names no task") in events[-1]["message"]


def test_a_pretraining_whose_loss_did_not_fall_is_named_in_the_report(tmp_path):
    """A pretraining that ends 'done' with its loss rising (base_lr: 1e6 took BYOL's from 3.27 to 5.12) is
    named in the report's notes with its first and last epoch loss; one whose loss fell is not, and
    neither are the monitor's events (which carry no loss)."""
    from runner.contracts import event_line
    from runner.report import loss_not_falling
    from runner.store import TaskRow
    from runner.tables import rising_lines

    rows = []
    for tid, losses in (("up", [3.27, 4.1, 5.12]), ("down", [3.9, 2.0, 1.4])):
        folder = tmp_path / "tasks" / tid
        folder.mkdir(parents=True)
        lines = [event_line(tid, "metric", epoch=i, step=i, loss=v) for i, v in enumerate(losses)]
        lines.append(event_line(tid, "metric", epoch=3, step=3, knn_auroc=0.7, knn_base_auroc=0.6))
        (folder / "events.jsonl").write_text("".join(lines))
        rows.append(TaskRow(tid, "pretrain", "chest", "byol-pretrain", 0, None, [], "done", 2, 3, losses[-1], None, None))
    found = loss_not_falling(tmp_path, rows)
    assert found == [{"dataset": "chest", "method": "byol", "seed": 0, "first": 3.27, "last": 5.12}]
    [line] = rising_lines({"loss_not_falling": found})
    assert "chest byol seed 0 (3.270 → 5.120)" in line and "pretrain.base_lr" in line
    assert rising_lines({}) == []
