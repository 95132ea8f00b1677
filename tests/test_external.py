"""External test sets and `predict` (#15): every classifier keeps a model.pt; an external test set is
scored by `evaluate` tasks that train nothing; `predict` gives a task's own probabilities."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from runner.errors import DataError, ManifestError
from runner.manifest import parse_manifest
from tests.conftest import cli_here, copy_results, run_cli

EXTERNAL = """\
  shifted:
    source: synthetic
    per_class: 12
    size: 40
    seed: 7
    classes: {normal: [class0], finding: [class1]}
    external_test_of: syn
"""


def _with_external(manifest: Path, to: Path, entry: str = EXTERNAL) -> Path:
    text = manifest.read_text()
    out = to / manifest.name
    out.write_text(text.replace("methods:", entry + "methods:", 1))
    return out


def _metrics(results: Path, tid: str) -> dict:
    return json.loads((results / "tasks" / tid / "metrics.json").read_text())


def _tasks(results: Path, kind: str | None = None) -> dict[str, dict]:
    out = {}
    for d in (results / "tasks").iterdir():
        if (d / "metrics.json").is_file():
            m = json.loads((d / "metrics.json").read_text())
            if kind is None or m["kind"] == kind:
                out[d.name] = m
    return out


@pytest.mark.e2e
def test_an_external_set_added_to_a_finished_study_scores_each_saved_classifier_and_trains_nothing(tiny_reference, tmp_path):
    """The finished reference run (1 pretraining, 4 classifiers) gets an external test set: the next
    run starts one evaluate task per classifier and nothing else, except the classifiers whose
    model.pt cannot serve (one scored before classifiers were kept, one whose model.pt is damaged),
    which are trained again to the same numbers. A third run starts nothing."""
    manifest, ref_results, _ = tiny_reference
    results = copy_results(ref_results, tmp_path / "results")
    classifiers = {tid: m for tid, m in _tasks(results).items() if m["kind"] != "pretrain"}
    assert len(classifiers) == 4
    for tid, m in classifiers.items():  # every classifier kept its model.pt, with its checksum
        assert (results / "tasks" / tid / "model.pt").is_file() and "model.pt" in m["artifacts"]
    old, damaged = sorted(classifiers)[:2]
    m = _metrics(results, old)
    del m["artifacts"]  # as a classifier finished before model.pt was kept
    (results / "tasks" / old / "metrics.json").write_text(json.dumps(m))
    (results / "tasks" / old / "model.pt").unlink()
    (results / "tasks" / damaged / "model.pt").write_bytes(b"not a model")

    r = run_cli("run", str(_with_external(manifest, tmp_path)), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 workers started" in r.stdout  # 4 evaluate tasks + the 2 classifiers that had no usable model.pt
    assert f"({old}): it has no model.pt" in r.stderr and f"({damaged}): its model.pt is missing or does not match" in r.stderr
    for tid in (old, damaged):  # trained again: the same numbers
        assert _metrics(results, tid)["test"] == classifiers[tid]["test"]
    evaluations = _tasks(results, "evaluate")
    assert sorted(m["classifier"] for m in evaluations.values()) == sorted(classifiers)
    for m in evaluations.values():
        assert m["external_test_of"] == "syn" and len(m["predictions"]["test_labels"]) == 24  # all of it is test
        assert m["predictions"]["test_labels"].count(1) == 12 and m["temperature"] == classifiers[m["classifier"]]["temperature"]
    # the tables: the external rows beside the internal ones, and the Δ Model 1 − Model 2 on them
    assert re.search(r"\| syn → shifted \(external\) \(25% labels\) \| [0-9.]+", r.stdout)
    report = json.loads((results / "tiny" / "results.json").read_text())
    assert {(d["dataset"], d["family"]) for d in report["differences"]} == {("syn", "internal"), ("syn → shifted (external)", "external")}
    before = json.loads((ref_results / "tiny" / "results.json").read_text())
    assert [d for d in report["differences"] if d["family"] == "internal"] == [{**d, "family": "internal"} for d in before["differences"]]
    assert all(d["dataset"] == "syn" for d in report["pretraining_learned"])  # asked of the internal split only
    assert any("syn-shifted-external" in f and "confusion" in f for f in report["figures"])
    assert "shifted: 24 of 24 images used; all of them an external test set of syn" in r.stdout

    again = run_cli("run", str(_with_external(manifest, tmp_path)), "--results", str(results))
    assert again.returncode == 0 and "0 workers started" in again.stdout, again.stdout + again.stderr
    # a classifier trained again (here: its model.pt replaced) makes the external results it gave stale
    scored_by = {m["classifier"]: tid for tid, m in evaluations.items()}
    (results / "tasks" / old / "model.pt").write_bytes((results / "tasks" / damaged / "model.pt").read_bytes())
    third = run_cli("run", str(_with_external(manifest, tmp_path)), "--results", str(results))
    assert third.returncode == 0 and "2 workers started" in third.stdout, third.stdout + third.stderr  # the classifier + its evaluate
    assert f"({scored_by[old]}): the classifier it scored (tasks/{old}/model.pt) has changed since" in third.stderr
    _the_tuis_results_screen_shows_the_external_rows(results)


def _the_tuis_results_screen_shows_the_external_rows(results: Path) -> None:
    import asyncio

    from runner.tui.app import RunnerApp

    app = RunnerApp(results, poll_s=0.2)

    async def scenario() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            for _ in range(50):
                if getattr(app, "snapshot", None) is not None and app.snapshot.tasks:
                    break
                await pilot.pause(0.1)
            await pilot.press("3")
            await pilot.pause(0.5)
            text = app.results_markdown
            assert "| syn (25% labels) |" in text and "| syn → shifted (external) (25% labels) |" in text
            await pilot.press("q")

    asyncio.run(scenario())


def test_external_sets_are_checked_against_the_data_set_they_test(tmp_path):
    base = """\
name: x
datasets:
  syn: {source: synthetic, per_class: 20, size: 32, image_size: 24, classes: {normal: [class0], finding: [class1]}, positive: finding}
  ext: %s
labels: {fractions: [1.0]}
"""

    def refused(entry: str) -> str:
        with pytest.raises(ManifestError) as e:
            parse_manifest(base % entry, "m.yaml")
        return str(e.value)

    assert "'nope' is not another data set of this manifest (syn)" in refused("{source: synthetic, external_test_of: nope}")
    assert "only split.group_pattern" in refused("{source: synthetic, external_test_of: syn, split: {test: 0.5}}")
    assert "image_size: 64, but its images are prepared as those of syn (image_size 24); leave image_size out" in refused(
        "{source: synthetic, external_test_of: syn, image_size: 64}")
    assert "missing: finding; not a class of syn: lesion" in refused(
        "{source: synthetic, external_test_of: syn, classes: {normal: [class0], lesion: [class1]}}")
    assert "positive class is syn's" in refused("{source: synthetic, external_test_of: syn, positive: normal}")
    ok = parse_manifest(base % "{source: synthetic, external_test_of: syn, split: {group_pattern: 'x'}}", "m.yaml")
    assert ok.datasets["ext"].split.group_pattern == "x"  # its patients: the units of its intervals

    from runner.plan import make_plan

    def planned(entry: str):  # noqa: ANN202
        return make_plan(parse_manifest(base % entry, "m.yaml"), tmp_path / "results")

    with pytest.raises(DataError, match=r"datasets.ext: source classes 'class2' \(20 images\) are not mapped onto a class of syn"):
        planned("{source: synthetic, num_classes: 3, per_class: 20, external_test_of: syn, classes: {normal: [class0], finding: [class1]}}")
    with pytest.raises(DataError, match=r"datasets.ext: classes 'class0', 'class1' are not classes of syn"):
        planned("{source: synthetic, external_test_of: syn}")  # its own class names: nothing maps them onto syn's
    excluded = planned("{source: synthetic, num_classes: 3, per_class: 10, external_test_of: syn, exclude: [class2], "
                       "classes: {normal: [class0], finding: [class1]}}")
    assert excluded.data["ext"]["used"] == 20 and excluded.data["ext"]["not_used"] == {"class excluded": 10}
    with pytest.raises(DataError, match="classes and exclude both name 'class1'"):
        planned("{source: synthetic, external_test_of: syn, exclude: [class1], classes: {normal: [class0], finding: [class1]}}")
    same = planned("{source: synthetic, per_class: 20, size: 32, external_test_of: syn, classes: {normal: [class0], finding: [class1]}}")
    [shared] = same.data["ext"]["shared"]  # the very images syn is made of: counted, and said not to be independent
    assert re.match(r"40 images are also in syn \(\d+ of them in its train or val split\): this external test set is not "
                    r"independent of it", shared), shared
    plan = planned("{source: synthetic, num_classes: 3, per_class: 10, external_test_of: syn, "
                   "classes: {normal: [class0], finding: [class1, class2]}}")
    evaluate = [t for t in plan.tasks if t.kind == "evaluate"]
    classifiers = [t for t in plan.tasks if t.kind not in ("pretrain", "evaluate")]
    assert len(evaluate) == len(classifiers) == 4 * 5 and {t.deps[0] for t in evaluate} == {t.id for t in classifiers}  # 5 seeds, the default
    spec = evaluate[0].spec["data"]
    assert (spec["image_size"], spec["channels"], spec["positive"]) == (24, 1, "finding")  # prepared as syn's images
    assert plan.data["ext"]["used"] == 30 and plan.data["ext"]["external_test_of"] == "syn"


def _png_folder(root: Path, per_class: int = 16, size: int = 36) -> Path:
    from PIL import Image

    from runner.data.arrays import synthetic_images

    imgs = synthetic_images(2, per_class, size, seed=3)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(imgs[c * per_class + i]).save(root / f"class{c}" / f"{c}_{i:03d}.png")
    return root


@pytest.mark.e2e
def test_predict_gives_the_probabilities_the_task_scored_and_names_what_it_could_not_read(tmp_path):
    """A supervised classifier, a linear probe on a pretrained encoder (its model.pt names the encoder)
    and the random-init control (its model.pt holds how to build its network again), on a folder of PNGs: `predict` on their test split's
    files returns the calibrated probabilities their metrics.json holds, to its 6 decimals; an
    unreadable file gets its error line, the rest are scored, and the exit code says so."""
    data = _png_folder(tmp_path / "pngs")
    manifest = tmp_path / "p.yaml"
    manifest.write_text(f"""\
name: p
datasets:
  png: {{source: imagefolder, root: {data}, image_size: 24, split: {{val: 0.25, test: 0.25}}, positive: class1}}
methods: [supervised, byol-linear, random-linear]
labels: {{fractions: [1.0], validation: full, min_validation_per_class: 2}}
seeds: [0]
model: {{arch: resnet18}}
pretrain: {{epochs: 2, min_steps: 0, batch_size: 8, proj_hidden: 64, pred_hidden: 64, proj_dim: 16, warmup_epochs: 1}}
finetune: {{epochs: 2, min_steps: 4, batch_size: 8}}
run: {{device: cpu}}
""")
    results = tmp_path / "results"
    r = run_cli("run", str(manifest), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr

    from runner.data.dataset import prepare
    from runner.manifest import load_manifest

    ds = prepare("png", load_manifest(manifest).datasets["png"], results / "cache")
    files = [str(data / ds.keys[i]) for i in ds.splits["test"]]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    scored = {tid: m for tid, m in _tasks(results).items() if m["kind"] != "pretrain"}
    assert sorted(m["kind"] for m in scored.values()) == ["linear", "random-linear", "supervised"]
    for tid, m in scored.items():
        assert m["temperature"] is not None  # the calibration is part of what predict must reproduce
        if m["kind"] != "supervised":  # a probe keeps its head; its backbone is named (encoder.pt) or built again (control)
            assert (results / "tasks" / tid / "model.pt").stat().st_size < 200_000, m["kind"]
        out = cli_here("predict", tid[:8], *files, str(tmp_path / "broken.png"), "--results", str(results), "--json",
                      "--csv", str(tmp_path / f"{tid}.csv"))
        assert out.returncode == 1, out.stderr
        assert "1 of 9 images could not be scored" in out.stderr
        rows = json.loads(out.stdout)["rows"]
        assert rows[-1]["probs"] is None and rows[-1]["error"]
        from runner.ml.metrics import stored_probs

        probs = np.array([[r["probs"]["class0"], r["probs"]["class1"]] for r in rows[:-1]])
        assert stored_probs(probs) == m["predictions"]["test_probs"], m["kind"]  # as metrics.json stores them
        # and each stored probability names its image (relative to the data root), so that a user can join them
        assert m["predictions"]["test_images"] == [ds.keys[i] for i in ds.splits["test"]]
        assert (tmp_path / f"{tid}.csv").read_text().count("\n") == 10  # header + 9 rows
    plain = cli_here("predict", tid, files[0], "--results", str(results))
    assert plain.returncode == 0 and re.match(rf"{re.escape(files[0])}\tclass[01]\tp\(class1\) 0\.\d{{4}}$", plain.stdout.strip())
    unknown = cli_here("predict", "zzzz", files[0], "--results", str(results))
    assert unknown.returncode == 2 and "0 tasks under" in unknown.stderr and "start with 'zzzz'" in unknown.stderr


@pytest.mark.e2e
def test_weights_kept_in_bf16_make_a_third_of_the_files_and_predict_gives_what_was_scored(tmp_path):
    """run.weights: bf16 (what the demo uses to keep its results dir small): encoder.pt and the
    fine-tuned and supervised model.pt hold well under half the fp32 bytes, and `predict` with every
    classifier (fine-tune, supervised, the probe on the rounded encoder) returns the probabilities its
    metrics.json stores: the network kept is the network scored. The ids differ from fp32's."""
    import torch

    from runner.data.dataset import prepare
    from runner.manifest import load_manifest
    from runner.ml.metrics import stored_probs
    from runner.ml.models import Backbone, Classifier
    from runner.plan import make_plan

    data = _png_folder(tmp_path / "pngs")
    manifest = tmp_path / "w.yaml"
    manifest.write_text(f"""\
name: w
datasets:
  png: {{source: imagefolder, root: {data}, image_size: 24, split: {{val: 0.25, test: 0.25}}, positive: class1}}
methods: [byol-finetune, byol-linear, supervised]
labels: {{fractions: [1.0], validation: full, min_validation_per_class: 2}}
seeds: [0]
model: {{arch: resnet18}}
pretrain: {{epochs: 2, min_steps: 0, batch_size: 8, proj_hidden: 64, pred_hidden: 64, proj_dim: 16, warmup_epochs: 1}}
finetune: {{epochs: 2, min_steps: 4, batch_size: 8}}
run: {{device: cpu, weights: bf16}}
""")
    results = tmp_path / "results"
    r = run_cli("run", str(manifest), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    fp32_bytes = sum(t.numel() * 4 for t in Classifier(Backbone("resnet18", 3), 2).state_dict().values())
    tasks = _tasks(results)
    [pre] = [tid for tid, m in tasks.items() if m["kind"] == "pretrain"]
    assert (results / "tasks" / pre / "encoder.pt").stat().st_size < fp32_bytes / 2.5
    ds = prepare("png", load_manifest(manifest).datasets["png"], results / "cache")
    test_files = [str(data / ds.keys[i]) for i in ds.splits["test"]]
    scored = {tid: m for tid, m in tasks.items() if m["kind"] != "pretrain"}
    assert sorted(m["kind"] for m in scored.values()) == ["finetune", "linear", "supervised"]
    for tid, m in scored.items():
        if m["kind"] != "linear":  # (a probe keeps its head and names the encoder)
            size = (results / "tasks" / tid / "model.pt").stat().st_size
            assert size < fp32_bytes / 2.5, (m["kind"], size, fp32_bytes)
            state = torch.load(results / "tasks" / tid / "model.pt", weights_only=True)["state_dict"]
            assert state["codec"] == "bf16-planes-zlib-1"
        out = cli_here("predict", tid[:8], *test_files, "--results", str(results), "--json")
        assert out.returncode == 0, out.stderr
        probs = np.array([[row["probs"]["class0"], row["probs"]["class1"]] for row in json.loads(out.stdout)["rows"]])
        assert stored_probs(probs) == m["predictions"]["test_probs"], m["kind"]
    manifest.write_text(manifest.read_text().replace("weights: bf16", "weights: fp32"))
    fp32_ids = {t.id for t in make_plan(load_manifest(manifest), results).tasks}
    assert not fp32_ids & set(tasks), "fp32 and bf16 tasks share an id"
