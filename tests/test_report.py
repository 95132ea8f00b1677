"""Results people can read: tables, bootstrap intervals, figures, the README section, HTML."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner import report as R
from runner.stats import bootstrap_metrics, paired_difference
from tests.conftest import REPO, TINY, cli_here, run_cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-seed run of the tiny synthetic matrix."""
    tmp = tmp_path_factory.mktemp("report")
    manifest = tmp / "tiny.yaml"
    manifest.write_text(TINY.format(pre_epochs=2, ft_steps=5).replace("seeds: [0]", "seeds: [0, 1]"))
    results = tmp / "results"
    r = run_cli("run", str(manifest), "--results", str(results), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return results


@pytest.mark.e2e
def test_a_rerun_that_trains_nothing_keeps_when_the_tasks_trained(finished, tmp_path):
    """A second `run` of a finished study starts no worker; its report's provenance still says when the
    tasks trained (their attempts), not only when this run started and ended."""
    copy = tmp_path / "results"
    shutil.copytree(finished, copy)
    r = run_cli("run", str(finished.parent / "tiny.yaml"), "--results", str(copy))
    assert r.returncode == 0 and "0 workers started" in r.stdout, r.stdout + r.stderr
    meta = json.loads((copy / "tiny" / "results.json").read_text())["meta"]
    assert meta["trained_from"] < meta["trained_to"] <= meta["run_started"] <= meta["run_ended"]
    page = (copy / "tiny" / "results.html").read_text()
    assert "<dt>tasks trained</dt>" in page and "<dt>this run</dt>" in page


def test_hand_made_predictions_give_the_known_metrics_and_intervals():
    labels = np.array([0] * 50 + [1] * 50)
    # model A: right on 45 of each class; model B: right on 40 of each class, on a subset of A's
    a_pred = np.r_[np.zeros(45), np.ones(5), np.ones(45), np.zeros(5)].astype(int)
    b_pred = np.r_[np.zeros(40), np.ones(10), np.ones(40), np.zeros(10)].astype(int)
    pa, pb = np.eye(2)[a_pred] * 0.8 + 0.1, np.eye(2)[b_pred] * 0.8 + 0.1
    ra = bootstrap_metrics([(pa, labels)], positive=1, b=2000)
    assert ra["accuracy"]["value"] == pytest.approx(0.9)
    assert ra["sensitivity"]["value"] == pytest.approx(0.9) and ra["specificity"]["value"] == pytest.approx(0.9)
    assert ra["balanced_accuracy"]["value"] == pytest.approx(0.9)
    assert ra["auroc"]["value"] == pytest.approx(0.9)  # two score levels: (0.9·0.9 + 0.5·(0.9·0.1 + 0.1·0.9)) = 0.9
    assert ra["loss"]["value"] == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))
    lo, hi = ra["accuracy"]["ci"]
    # binomial standard error of 0.9 on 100 images is 0.03: the interval is about ± 0.06
    assert lo < 0.9 < hi and 0.04 < 0.9 - lo < 0.08 and 0.03 < hi - 0.9 < 0.08
    d = paired_difference([(pa, labels)], [(pb, labels)], positive=1, b=2000)
    assert d["accuracy"]["value"] == pytest.approx(0.1)
    lo, hi = d["accuracy"]["ci"]
    # B is wrong on every image A is wrong on, plus 10 more: the paired difference is 10 discordant
    # images out of 100 and its interval stays above 0, narrower than the unpaired one would be
    assert 0.0 < lo < 0.1 < hi and hi - lo < 0.13
    # two seeds pool image by image: the same predictions twice leave the point estimate alone
    two = bootstrap_metrics([(pa, labels), (pa, labels)], positive=1, b=200)
    assert two["accuracy"]["value"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="test splits differ"):
        bootstrap_metrics([(pa, labels), (pa[:90], labels[:90])], positive=1, b=10)


@pytest.mark.e2e
def test_finished_run_has_every_table_row_and_figure(finished):
    rep = json.loads((finished / "tiny" / "results.json").read_text())
    assert [(r["dataset"], r["labels"]) for r in rep["rows"]] == [("syn", "25%"), ("syn", "100%")]
    for row in rep["rows"]:
        assert row["model1_accuracy"]["n"] == 2 and row["model1_accuracy"]["std"] is not None
    assert len(rep["extended"]) == 8 and {e["seeds"] for e in rep["extended"]} == {2}
    assert len(rep["differences"]) == 2
    for e in rep["extended"] + rep["differences"]:
        for m in ("accuracy", "auroc", "balanced_accuracy", "sensitivity", "specificity", "loss"):
            r = e[m]
            if r["ci"] is not None and r["value"] is not None:
                assert r["ci"][0] - 1e-9 <= r["value"] <= r["ci"][1] + 1e-9, (e["method"] if "method" in e else "diff", m, r)
    figs = rep["figures"]
    expected = {"pretrain_loss_syn.png", "label_efficiency_syn.png", "confusion_syn_25pct.png", "confusion_syn_100pct.png",
                "finetune_loss_syn_25pct.png", "finetune_loss_syn_100pct.png"}
    assert {Path(f).name for f in figs} == expected
    for f in figs:
        path = finished / "tiny" / f
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    md = (finished / "tiny" / "results.md").read_text()
    assert md.count("| syn (") == 2 and "Δ accuracy" in md
    # every image accounted for, and a verdict per budget on the primary metric
    assert rep["data"]["syn"]["found"] == rep["data"]["syn"]["used"] > 0 and "Data: syn: " in md
    # a verdict per budget (or why there is none: an untrained cell); the family counts every comparison
    # with an estimate, one a flag blocks included (flags read test results)
    counted = sum(d["seeds"] >= 2 for d in rep["differences"])
    assert len(rep["differences"]) == 2 and all(d["verdict"] and d["primary"] == "auroc" and d["comparisons"] == counted
                                                 for d in rep["differences"])
    assert all(d["detectable"] is not None for d in rep["differences"] if d["decision"] != "not_decided")
    assert "| Verdict |" in md and "Holm" in md
    page = (finished / "tiny" / "results.html").read_text()
    assert page.count("data:image/png;base64,") == len(figs) and "<table>" in page
    # the page a reader opens: where the numbers come from, the verdicts under their own heading, the
    # notes, the label-efficiency figure first, captions in words, the manifest
    assert "<dt>devices</dt><dd>CPU (" in page and "<dt>engine version</dt><dd>4</dd>" in page and "(done)" in page
    assert "<h2>Model 1 − Model 2: verdicts</h2>" in page and "<li>Data: syn: " in page and "Holm" in page
    assert page.index("Label efficiency (accuracy and AUROC") < page.index("Test confusion matrices")
    assert "<details><summary>" in page and "name: tiny" in page
    assert '<td class="num">0.' in page  # numbers right-aligned, text left


@pytest.mark.e2e
def test_a_figure_is_drawn_again_only_when_what_it_shows_or_its_file_changed(finished, tmp_path, monkeypatch):
    """`report` (and every `run`) draws the figures; one whose data, drawing code and file are as they
    were drawn is kept, not drawn again (matplotlib is most of a small report's time)."""
    from runner import pages

    results = shutil.copytree(finished, tmp_path / "results")
    figures = results / "tiny" / "figures"

    def stamps() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in figures.glob("*.png")}

    from runner.commands import report

    first = report(str(results))[1]["figures"]
    before = stamps()
    assert len(before) == 6 and json.loads((figures / pages.FIGURE_MEMO).read_text())
    assert report(str(results))[1]["figures"] == first and stamps() == before  # nothing drawn
    (figures / "label_efficiency_syn.png").write_bytes(b"damaged")  # a file changed since: drawn again
    (figures / "pretrain_loss_syn.png").unlink()  # a file gone: drawn again
    report(str(results))
    after = stamps()
    assert {k for k in after if after[k] != before.get(k)} == {"label_efficiency_syn.png", "pretrain_loss_syn.png"}
    with Image.open(figures / "label_efficiency_syn.png") as im:
        im.verify()
    # what a figure shows changed (here: one task's recorded pretraining losses): that figure only
    pre = next(d for d in (results / "tasks").iterdir() if json.loads((d / "task.json").read_text())["kind"] == "pretrain")
    lines = (pre / "events.jsonl").read_text().splitlines()
    changed = [json.dumps({**e, "loss": e["loss"] + 1.0}) if e.get("kind") == "metric" and "loss" in e else json.dumps(e)
               for e in map(json.loads, lines)]
    (pre / "events.jsonl").write_text("\n".join(changed) + "\n")
    report(str(results))
    again = stamps()
    assert {k for k in again if again[k] != after[k]} == {"pretrain_loss_syn.png"}
    # new drawing code (or matplotlib): every figure drawn again
    monkeypatch.setattr(pages, "_figure_code", lambda: "another version")
    report(str(results))
    assert all(v != again[k] for k, v in stamps().items())


@pytest.mark.e2e
def test_readme_rewrite_touches_only_the_marked_section_and_is_idempotent(finished, tmp_path):
    before = "# My study\n\nIntro text.\n\n<!-- byol-runner results start -->\nold table\n<!-- byol-runner results end -->\n\nOutro: keep me.\n"
    readme = tmp_path / "README.md"
    readme.write_text(before)
    r = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert r.returncode == 0, r.stderr
    once = readme.read_text()
    head, tail = before.split("<!-- byol-runner results start -->")[0], before.split("<!-- byol-runner results end -->")[1]
    assert once.startswith(head) and once.endswith(tail)
    assert "old table" not in once and "| Dataset | Model 1 accuracy |" in once
    # the README gets the compact section and a link; the full report is a page of its own beside it,
    # its figures copied there (results/ is never committed): per data set the label efficiency, the
    # pretraining, the confusion matrices at the largest budget (the rest stays in the HTML page)
    assert "[full report](docs/studies/tiny.md)" in once and "<img" not in once and "| Dataset | Labels | Method" not in once
    page = (readme.parent / "docs" / "studies" / "tiny.md").read_text()
    assert "| Dataset | Labels | Method | Seeds | Units | Accuracy | AUROC |" in page and "## Figures" in page
    shown = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", page)
    assert sorted(Path(s).name for s in shown) == ["confusion_syn_100pct.png", "label_efficiency_syn.png", "pretrain_loss_syn.png"]
    assert all(s.startswith("tiny/") and (readme.parent / "docs" / "studies" / s).is_file() for s in shown)
    assert sorted(p.name for p in (readme.parent / "docs" / "studies" / "tiny").iterdir()) == sorted(Path(s).name for s in shown)
    r2 = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert "already up to date" in r2.stderr and readme.read_text() == once
    readme.write_text("no markers here\n")
    r3 = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert r3.returncode == 2 and "marker lines" in r3.stderr


@pytest.mark.e2e
def test_a_readme_with_several_runs_gets_each_run_in_its_own_named_section(finished, tmp_path):
    """The project's README holds the study's section and the demo's: each run's report goes between
    the marker lines named for it, the other section and its figures stay as they were, and a stale
    figure of an earlier report of the same run is removed."""
    other = "<!-- byol-runner results start: demo -->\ndemo table\n<!-- byol-runner results end: demo -->\n"
    before = ("# Study\n\n<!-- byol-runner results start: tiny -->\nnot run yet\n<!-- byol-runner results end: tiny -->\n\n"
              + other + "\nEnd.\n")
    readme = tmp_path / "README.md"
    readme.write_text(before)
    studies = tmp_path / "docs" / "studies"
    (studies / "demo").mkdir(parents=True)
    (studies / "demo" / "keep.png").write_bytes(b"demo's")
    (studies / "tiny").mkdir()
    (studies / "tiny" / "confusion_gone_1pct.png").write_bytes(b"stale")
    (studies / "tiny" / "screenshot.png").write_bytes(b"the user's")
    r = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert r.returncode == 0, r.stderr
    text = readme.read_text()
    assert "not run yet" not in text and text.endswith("\n" + other + "\nEnd.\n") and "demo table" in text
    section = text.split("<!-- byol-runner results start: tiny -->\n")[1].split("<!-- byol-runner results end: tiny -->")[0]
    assert "| Dataset | Model 1 accuracy |" in section and "(docs/studies/tiny.md)" in section
    assert "](tiny/label_efficiency_syn.png)" in (studies / "tiny.md").read_text()
    assert (studies / "demo" / "keep.png").read_bytes() == b"demo's"
    assert not (studies / "tiny" / "confusion_gone_1pct.png").exists()
    assert (studies / "tiny" / "screenshot.png").read_bytes() == b"the user's"  # not a figure of a report
    # named sections for other runs only, and no plain pair: refused, naming the pair this run needs
    readme.write_text(other)
    r = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert r.returncode == 2 and "<!-- byol-runner results start: tiny -->" in r.stderr, r.stderr
    assert readme.read_text() == other


def _section(text: str, run: str) -> str:
    return text.split(f"<!-- byol-runner results start: {run} -->\n")[1].split(f"<!-- byol-runner results end: {run} -->")[0]


@pytest.mark.e2e
def test_the_readme_study_section_is_what_the_product_writes(finished, tmp_path):
    """experiments/study-cpu.yaml is the README's study: matrix.yaml's data sets (at 64 px). The README's
    section is the compact one a report writes today (its table's header re-rendered here from a tiny
    finished run), a row per data set and budget, a verdict per row, the link to its page; the page
    (docs/studies/study-cpu.md) has every arm over the manifest's seeds and the figures it shows (per
    data set: label efficiency, the pretraining, the confusion matrices at 100%) beside it."""
    import yaml

    study_text = (REPO / "experiments" / "study-cpu.yaml").read_text()
    study, matrix = yaml.safe_load(study_text), yaml.safe_load((REPO / "experiments" / "matrix.yaml").read_text())
    assert {n: {k: v for k, v in d.items() if k != "image_size"} for n, d in study["datasets"].items()} == matrix["datasets"]
    assert {d["image_size"] for d in study["datasets"].values()} == {64}
    command = "byol-runner run experiments/study-cpu.yaml --readme README.md"
    readme = (REPO / "README.md").read_text()
    assert command in study_text and command in readme
    section = _section(readme, "study-cpu")
    fresh_readme = tmp_path / "README.md"
    fresh_readme.write_text("<!-- byol-runner results start: tiny -->\n<!-- byol-runner results end: tiny -->\n")
    r = cli_here("report", "--results", str(finished), "--readme", str(fresh_readme))
    assert r.returncode == 0, r.stderr
    fresh = _section(fresh_readme.read_text(), "tiny")

    def headers(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| Dataset |")]

    assert headers(section) == headers(fresh) and len(headers(section)) == 1
    pct = [f"{f * 100:g}%" for f in study["labels"]["fractions"]]
    rows = [line.split(" | ")[0] for line in section.splitlines()[2:] if line.startswith("| ") and line.split(" | ")[0].endswith(" labels)")]
    assert sorted(rows) == sorted(f"| {ds} ({b} labels)" for ds in study["datasets"] for b in pct)
    verdicts = [line for line in section.splitlines() if line.startswith("- ") and line[2:].split(" ")[0] in study["datasets"]]
    assert len(verdicts) == len(rows)
    assert "(docs/studies/study-cpu.md)" in section
    page = (REPO / "docs" / "studies" / "study-cpu.md").read_text()
    extended = [line.split(" | ") for line in page.splitlines() if re.match(r"\| \w+ \| \d+% \| [a-z-]+ \| \d+ \| ", line)]
    assert len(extended) == 2 * len(study["datasets"]) * len(pct) * len(study["methods"])  # two tables of every arm
    assert {cells[3] for cells in extended} == {str(len(study["seeds"]))}  # every arm over every seed
    shown = re.findall(r"!\[[^]]*\]\(([^)]+)\)", page)
    expected = {f"study-cpu/{kind}_{ds}.png" for ds in study["datasets"] for kind in ("label_efficiency", "pretrain_loss")}
    expected |= {f"study-cpu/confusion_{ds}_{pct[-1].replace('%', 'pct')}.png" for ds in study["datasets"]}
    assert set(shown) == expected and all((REPO / "docs" / "studies" / s).is_file() for s in shown)
    assert {p.name for p in (REPO / "docs" / "studies" / "study-cpu").iterdir()} == {Path(s).name for s in shown}


@pytest.mark.e2e
def test_markers_quoted_inline_are_not_markers(finished, tmp_path):
    quoting = ("| `report --readme` | rewrites what stands between `<!-- byol-runner results start -->` and "
               "`<!-- byol-runner results end -->` | 0 |\n\nNo results yet.\n")
    readme = tmp_path / "README.md"
    readme.write_text(quoting)
    r = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert r.returncode == 2 and "line of its own" in r.stderr
    assert readme.read_text() == quoting  # nothing spliced into the table row
    both = quoting + "\n<!-- byol-runner results start -->\nold\n<!-- byol-runner results end -->\nAfter.\n"
    readme.write_text(both)
    r = cli_here("report", "--results", str(finished), "--readme", str(readme))
    assert r.returncode == 0, r.stderr
    text = readme.read_text()
    assert text.startswith(quoting) and text.endswith("<!-- byol-runner results end -->\nAfter.\n")
    assert "old\n" not in text and "| Dataset | Model 1 accuracy |" in text


@pytest.mark.e2e
def test_partial_run_reports_what_is_finished_and_marks_the_rest(finished, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    rep = json.loads((partial / "tiny" / "results.json").read_text())
    victims = [p for p in (partial / "tasks").glob("*/metrics.json")
               if json.loads((p.parent / "task.json").read_text())["kind"] == "supervised"
               and json.loads((p.parent / "task.json").read_text())["seed"] == 1]
    assert len(victims) == 2
    for v in victims:
        v.unlink()
    r = cli_here("report", "--results", str(partial))
    assert r.returncode == 0, r.stderr
    assert "(1/2 seeds)" in r.stdout
    data, _ = R.report_for(partial, bootstrap=50)
    sup = [e for e in data["extended"] if e["method"] == "supervised"]
    assert all(e["seeds"] == 1 for e in sup)
    assert all(d["seeds"] == 1 for d in data["differences"])  # paired on the seed both models have
    assert rep["rows"][0]["model2_accuracy"]["n"] == 2
