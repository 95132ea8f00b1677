"""The report's pages: its figures (results/<run>/figures/) and the self-contained HTML page; the
README's section and the manual's study page are `runner.docpages`'s. The tables and numbers are
`runner.report`'s."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from runner import arms as A
from runner.atomic import atomic_write_text, read_json, read_regular_file
from runner.contracts import read_events
from runner.report import budget_order, shown
from runner.tables import PRIMARY as PRIMARY_NAME
from runner.tables import NUMBER, extended_markdown, to_csv, to_markdown
from runner.store import TaskRow


def _events(results: Path, tid: str) -> list[dict]:
    return read_events(results / "tasks" / tid / "events.jsonl")[0]


FIGURE_MEMO = ".drawn.json"  # in figures/: what each figure was drawn from, so an unchanged one is not drawn again


def _figure_code() -> str:
    """What the figures look like besides their data: the drawing code, the arms' labels and colours,
    matplotlib's version (read without importing matplotlib)."""
    import hashlib
    import importlib.metadata
    import importlib.util

    h = hashlib.sha256(importlib.metadata.version("matplotlib").encode())
    for module in ("runner.figures", "runner.arms"):
        h.update(Path(importlib.util.find_spec(module).origin).read_bytes())
    return h.hexdigest()


class _Drawer:
    """Draws a figure only when its data or the drawing code changed since it was drawn into `out`: a
    rerun of a finished study (or `report` again) then skips matplotlib, which is most of a small
    report's time. A figure whose file is missing or differs from what was drawn is drawn again."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.code = _figure_code()
        try:
            memo = read_json(out / FIGURE_MEMO)
            self.memo = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            self.memo = {}
        self.used: dict[str, dict] = {}

    def __call__(self, name: str, *args) -> Path:  # noqa: ANN002
        import hashlib
        import pickle

        from runner.data.cache import file_sha  # a missing or unreadable file matches no recorded digest

        key = hashlib.sha256(pickle.dumps((self.code, name, args), protocol=4)).hexdigest()
        seen = self.memo.get(key)
        if isinstance(seen, dict) and isinstance(seen.get("file"), str) and "/" not in seen["file"]:
            path = self.out / seen["file"]
            if file_sha(path) == seen.get("sha256"):
                self.used[key] = seen
                return path
        from runner import figures as F

        path = getattr(F, name)(self.out, *args)
        self.used[key] = {"file": path.name, "sha256": file_sha(path)}
        return path

    def save(self) -> None:
        if self.used != self.memo and self.out.is_dir():
            atomic_write_text(self.out / FIGURE_MEMO, json.dumps(self.used, indent=1, sort_keys=True) + "\n")


def publish(results: Path, report: dict, tasks: list[TaskRow]) -> Path:
    """Draw the report's figures (report["figures"]) and write results.md, .csv, .json and .html under
    results/<run>/; that folder."""
    report["figures"] = make_figures(results, report, tasks)
    out = results / report["run"]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.md", to_markdown(report) + "\n" + extended_markdown(report)), ("results.csv", to_csv(report)),
                       ("results.json", json.dumps(report, indent=1)), ("results.html", to_html(report, results))):
        atomic_write_text(out / name, text)
    return out


def html_page(results: Path, report: dict, tasks: list[TaskRow]) -> str:
    """The self-contained page, its figures drawn in a scratch folder: for a results dir that cannot be
    written (a finished run on a shared or archived disk), to be printed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="byol-report-") as tmp:
        report["figures"] = make_figures(results, report, tasks, root=Path(tmp))
        return to_html(report, results, root=Path(tmp))


def make_figures(results: Path, report: dict, tasks: list[TaskRow], root: Path | None = None) -> list[str]:
    """Draw the run's figures under <root>/<run>/figures (root: the results dir); their paths there."""
    out = (root or results) / report["run"] / "figures"
    draw = _Drawer(out)
    paths: list[Path] = []
    external = report.get("external", {})
    tasks = [dataclasses.replace(t, dataset=shown(t.dataset, external)) for t in tasks]  # as the tables name them
    datasets = sorted({t.dataset for t in tasks})
    for ds in datasets:
        pre = [t for t in tasks if t.dataset == ds and t.kind == "pretrain"]
        events = {t.id: _events(results, t.id) for t in pre}
        curves = {(t.method.removesuffix("-pretrain"), t.seed):
                  [(e["step"], e["loss"]) for e in events[t.id] if e.get("kind") in ("progress", "metric") and "loss" in e
                   and "val_loss" not in e and e.get("step") is not None] for t in pre}
        monitor = {(t.method.removesuffix("-pretrain"), t.seed):
                   [(e["step"], e["knn_auroc"], e.get("knn_base_auroc")) for e in events[t.id]
                    if e.get("kind") == "metric" and e.get("knn_auroc") is not None] for t in pre}
        if any(curves.values()):
            paths.append(draw("pretrain_loss", ds, {k: sorted(set(v)) for k, v in curves.items()}, monitor))
        budgets = sorted({t.budget for t in tasks if t.dataset == ds and t.budget}, key=budget_order)
        for budget in budgets:
            mats, names = {}, None
            for c in report.get("confusion", []):
                if c["dataset"] == ds and c["labels"] == budget:
                    mats[c["method"]] = np.asarray(c["matrix"])
                    names = c["class_names"]
            if mats:
                paths.append(draw("confusion", ds, budget, mats, names))
            ft = defaultdict(dict)
            for t in tasks:
                if t.dataset == ds and t.budget == budget and t.kind in A.CLASSIFIER_KINDS:
                    pts = [(e["step"], e.get("loss"), e.get("val_loss")) for e in _events(results, t.id) if e.get("kind") == "metric"]
                    if pts:
                        ft[t.method][t.seed] = pts
            if ft:
                paths.append(draw("finetune_loss", ds, budget, ft))
        series = defaultdict(dict)
        for e in report["extended"]:
            if e["dataset"] == ds:
                series[e["method"]][e["labels"]] = e
        if series:
            paths.append(draw("label_efficiency", ds, budgets, dict(sorted(series.items()))))
    draw.save()
    return [str(p.relative_to((root or results) / report["run"])) for p in paths]


FIGURE_ORDER = ("label_efficiency", "confusion", "finetune_loss", "pretrain_loss")
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:1440px;margin:0 auto;padding:28px 32px 60px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
.sub{color:#5b6472;margin:0 0 18px}
table{border-collapse:collapse;margin:10px 0 6px;font-size:13px}
th,td{padding:4px 9px;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top;white-space:nowrap}
td:last-child{white-space:normal;min-width:14em}
table.wide{font-size:12px}table.wide th,table.wide td{padding:3px 6px}table.wide td:last-child{white-space:nowrap;min-width:0}
th{background:#eef1f5;font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}
tr.external td:first-child{color:#6a3d9a}
ul.notes{font-size:13.5px;color:#3b4350;padding-left:20px}ul.notes li{margin:3px 0}
p.explain{font-size:13.5px;color:#3b4350;max-width:980px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;font-size:13.5px;margin:0}
dl.meta dt{color:#5b6472}dl.meta dd{margin:0}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #e3e6ea}
figcaption{font-size:13px;color:#5b6472}
details pre{font-size:12.5px;background:#f3f4f6;padding:10px;overflow:auto}
.scroll{overflow-x:auto}
"""


def _caption(path: str) -> str:
    """A figure's file name in words: `confusion_syn_10pct.png` -> "Confusion matrices: syn, 10% labels"."""
    stem = Path(path).stem
    kind = next((k for k in FIGURE_ORDER if stem.startswith(k)), stem)
    rest = stem[len(kind):].strip("_").replace("pct", "%").replace("_", ", ")
    what = {"label_efficiency": "Label efficiency (accuracy and AUROC by label budget, 95% intervals)",
            "confusion": "Test confusion matrices, all seeds summed", "finetune_loss": "Fine-tuning and supervised training loss",
            "pretrain_loss": "Pretraining loss"}.get(kind, kind)
    return f"{what}: {rest.replace('-', ' ')}" if rest else what


def _html_table(md: str, external: set[str]) -> str:
    """A markdown table as HTML: numbers right-aligned, the rows of external test sets marked."""
    import html

    esc = html.escape
    rows = [r for r in md.splitlines() if r.startswith("|") and not r.startswith("|---")]
    if not rows:
        return ""
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    head = "".join(f"<th>{esc(c)}</th>" for c in cells[0])
    body = []
    for r in cells[1:]:
        ext = any(r[0].startswith(e) for e in external)
        tds = "".join(f'<td class="num">{esc(c)}</td>' if NUMBER.match(c) else f"<td>{esc(c)}</td>" for c in r)
        body.append(f'<tr class="external">{tds}</tr>' if ext else f"<tr>{tds}</tr>")
    wide = ' class="wide"' if len(cells[0]) > 9 else ""
    return f'<div class="scroll"><table{wide}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_prose(md: str) -> str:
    """The text lines of a markdown block as paragraphs, its `- ` lines as a list."""
    import html

    out, items = [], []
    for line in md.splitlines():
        if line.startswith("|") or not line.strip():
            continue
        if line.startswith("- "):
            items.append(f"<li>{html.escape(line[2:])}</li>")
        else:
            out.append(f'<p class="explain">{html.escape(line)}</p>')
    return "".join(out) + (f'<ul class="notes">{"".join(items)}</ul>' if items else "")


def _facts(report: dict) -> list[tuple[str, str]]:
    """Where the numbers come from, for the page's header."""
    import time

    meta = report.get("meta") or {}
    when = lambda t: time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if t else "—"  # noqa: E731
    return [("run", f"{report['run']} ({meta.get('run_status', '?')})"),
            ("this run", f"{when(meta.get('run_started'))} to {when(meta.get('run_ended'))}"),
            ("tasks trained", f"{when(meta.get('trained_from'))} to {when(meta.get('trained_to'))} (their attempts, in "
                              "whichever run)"),
            ("manifest", meta.get("manifest_path") or "—"), ("executor", meta.get("executor") or "—"),
            ("devices", ", ".join(meta.get("devices", [])) or "—"), ("PyTorch", ", ".join(meta.get("torchs", [])) or "—"),
            ("precision", ", ".join(meta.get("precisions", [])) or "—"),
            ("CPU threads per task", ", ".join(map(str, meta.get("cpu_threads", []))) or "—"),
            ("engine version", str(meta.get("engine_version", "—"))),
            ("tasks", f"{report['tasks_done']} of {report['tasks']} done"),
            ("verdict metric", str(report.get("primary", PRIMARY_NAME))),
            ("bootstrap replicates", str(meta.get("bootstrap", "—"))), ("report written", when(time.time()))]


def _html_figures(report: dict, results: Path) -> list[str]:
    """The run's figures inlined (label efficiency first), each with its caption."""
    import base64
    import html

    esc = html.escape
    figs = sorted(report.get("figures", []), key=lambda f: next((i for i, k in enumerate(FIGURE_ORDER) if Path(f).stem.startswith(k)), 9))
    imgs = []
    for f in figs:
        try:
            data = base64.b64encode(read_regular_file(results / report["run"] / f, 64 << 20)).decode()
        except (OSError, ValueError):  # drawn a moment ago; gone or replaced since: the page goes without it
            continue
        imgs.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(_caption(f))}"><figcaption>{esc(_caption(f))} '
                    f'<span style="color:#9aa1ab">({esc(f)})</span></figcaption></figure>')
    return imgs


def _not_used_html(report: dict) -> str:
    """Each data set's files that were found and not used, by name and reason (the Data line counts them)."""
    import html

    out = []
    for name, acc in (report.get("data") or {}).items():
        files = acc.get("not_used_files") or []
        if not files:
            continue
        total = acc.get("not_used_files_total", len(files))
        rows = "".join(f"<tr><td>{html.escape(f['file'])}</td><td>{html.escape(f['reason'])}</td></tr>" for f in files)
        more = f" (the first {len(files)} of {total})" if total > len(files) else ""
        out.append(f"<details><summary>{html.escape(name)}: {total} files not used{more}</summary>"
                   f"<div class='scroll'><table><thead><tr><th>file</th><th>why</th></tr></thead><tbody>{rows}</tbody></table></div></details>")
    return "<h2>Images not used</h2>" + "".join(out) if out else ""


def to_html(report: dict, results: Path, root: Path | None = None) -> str:
    """One self-contained page (figures inlined, read from <root>/<run>; root: the results dir):
    provenance, the README table with its notes, the verdicts, every arm with intervals, the figures
    (label efficiency first), the manifest."""
    import html

    esc = html.escape
    external = set(report.get("external", {}).values())
    table = lambda md: _html_table(md, external)  # noqa: E731
    prose = _html_prose
    main_md, ext_md = to_markdown(report), extended_markdown(report)
    parts = ext_md.split("\n\n")
    arms_html = "".join(table(p) for p in parts if p.lstrip().startswith("| Dataset | Labels | Method"))  # discrimination, calibration
    delta_md = next((p for p in parts if p.lstrip().startswith("| Dataset | Labels | Seeds | Δ")), "")
    ext_prose = "\n".join(p for p in parts if not p.lstrip().startswith("|"))
    meta = report.get("meta") or {}
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _facts(report))
    imgs = _html_figures(report, root or results)
    manifest = meta.get("manifest")
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>byol-runner: {esc(report['run'])}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(report['run'])}</h1><p class='sub'>byol-runner report: BYOL pretraining (Model 1) against supervised "
        "training (Model 2), test split of each data set and external test sets</p>"
        f"<dl class='meta'>{dl}</dl>"
        f"<h2>Results</h2>{table(main_md)}{prose(main_md)}"
        + (f"<h2>Model 1 − Model 2: verdicts</h2>{table(delta_md)}" if delta_md else "")
        + (f"<h2>Every arm, with 95% intervals</h2>{arms_html}{prose(ext_prose)}" if arms_html else "")
        + ("<h2>Figures</h2>" + "".join(imgs) if imgs else "")
        + _not_used_html(report)
        + (f"<h2>Manifest</h2><details><summary>{esc(meta.get('manifest_path') or 'the manifest of this run')}</summary>"
           f"<pre>{esc(manifest)}</pre></details>" if manifest else "")
        + "</main></body></html>"
    )
