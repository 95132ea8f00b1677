"""The report's pages: its figures (results/<run>/figures/), the README's results section between two
marker lines, and the self-contained HTML page. The tables and numbers are `runner.report`'s."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from runner import arms as A
from runner.atomic import atomic_write_text
from runner.contracts import read_events
from runner.report import _budget_order, shown
from runner.tables import extended_markdown, to_markdown
from runner.store import TaskRow


def _events(results: Path, tid: str) -> list[dict]:
    return read_events(results / "tasks" / tid / "events.jsonl")[0]


def make_figures(results: Path, report: dict, tasks: list[TaskRow], preds: dict) -> list[str]:
    from runner import figures as F

    out = results / report["run"] / "figures"
    paths: list[Path] = []
    external = report.get("external", {})
    tasks = [dataclasses.replace(t, dataset=shown(t.dataset, external)) for t in tasks]  # as the tables name them
    datasets = sorted({t.dataset for t in tasks})
    for ds in datasets:
        curves = {(t.method.removesuffix("-pretrain"), t.seed):
                  [(e["epoch"], e["loss"]) for e in _events(results, t.id) if e.get("kind") == "metric" and "loss" in e]
                  for t in tasks if t.dataset == ds and t.kind == "pretrain"}
        if any(curves.values()):
            paths.append(F.pretrain_loss(out, ds, curves))
        budgets = sorted({t.budget for t in tasks if t.dataset == ds and t.budget}, key=_budget_order)
        for budget in budgets:
            mats, names = {}, None
            for (d, b_, method), entries in sorted(preds.items()):
                if d == ds and b_ == budget:
                    mats[method] = np.sum([np.asarray(e["confusion"]) for e in entries], axis=0)
                    names = entries[0]["class_names"]
            if mats:
                paths.append(F.confusion(out, ds, budget, mats, names))
            ft = defaultdict(dict)
            for t in tasks:
                if t.dataset == ds and t.budget == budget and t.kind in A.CLASSIFIER_KINDS:
                    pts = [(e["step"], e.get("loss"), e.get("val_loss")) for e in _events(results, t.id) if e.get("kind") == "metric"]
                    if pts:
                        ft[t.method][t.seed] = pts
            if ft:
                paths.append(F.finetune_loss(out, ds, budget, ft))
        series = defaultdict(dict)
        for e in report["extended"]:
            if e["dataset"] == ds:
                series[e["method"]][e["labels"]] = e
        if series:
            paths.append(F.label_efficiency(out, ds, budgets, dict(sorted(series.items()))))
    return [str(p.relative_to(results / report["run"])) for p in paths]


MARK_START = "<!-- byol-runner results start -->"
MARK_END = "<!-- byol-runner results end -->"


def readme_markers(readme: Path, lines: list[str] | None = None) -> tuple[list[int], list[int]]:
    """The lines of a README's two markers; a UserError when it has not exactly one pair (`run
    --readme` checks this before it runs anything)."""
    from runner.errors import UserError

    try:
        lines = readme.read_text().splitlines(keepends=True) if lines is None else lines
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{readme}: cannot read it ({e})") from None
    # a marker counts only on a line of its own: a README that quotes the markers in its prose or a
    # table (this project's own does) must not have its text spliced there
    starts = [i for i, line in enumerate(lines) if line.strip() == MARK_START]
    ends = [i for i, line in enumerate(lines) if line.strip() == MARK_END]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise UserError(f"{readme}: needs exactly one pair of marker lines, {MARK_START} then {MARK_END}, each on a "
                        f"line of its own, where the results go (found {len(starts)} and {len(ends)})")
    return starts, ends


def rewrite_readme(readme: Path, report: dict, results: Path) -> bool:
    """Replace what stands between the two marker lines of a README with the report; nothing else
    changes. Returns whether the file changed."""
    text = readme.read_text()
    lines = text.splitlines(keepends=True)
    starts, ends = readme_markers(readme, lines)
    run_dir = os.path.relpath(results / report["run"], readme.parent)
    figs = "".join(f"- [{Path(f).stem}]({run_dir}/{f})\n" for f in report.get("figures", []))
    body = to_markdown(report) + "\n" + extended_markdown(report) + ("\nFigures:\n\n" + figs if figs else "")
    new = "".join(lines[: starts[0] + 1]) + body + "".join(lines[ends[0]:])
    if new != text:
        atomic_write_text(readme, new)
    return new != text


def to_html(report: dict, results: Path) -> str:
    import base64
    import html

    def table(md: str) -> str:
        rows = [r for r in md.splitlines() if r.startswith("|") and not r.startswith("|---")]
        if not rows:
            return ""
        cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
        head = "".join(f"<th>{c}</th>" for c in cells[0])
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    imgs = []
    for f in report.get("figures", []):
        data = base64.b64encode((results / report["run"] / f).read_bytes()).decode()
        imgs.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(f)}"><figcaption>{html.escape(f)}</figcaption></figure>')
    notes = [html.escape(line) for line in to_markdown(report).splitlines() if line and not line.startswith("|")]
    ext = extended_markdown(report)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>byol-runner: " + html.escape(report["run"]) + "</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(report['run'])}</h1>{table(to_markdown(report))}" + "".join(f"<p>{n}</p>" for n in notes)
        + "<h2>Every arm, with intervals</h2>" + "".join(table(part) for part in ext.split("\n\n") if part.strip().startswith("|"))
        + "<h2>Figures</h2>" + "".join(imgs) + "</body></html>"
    )
