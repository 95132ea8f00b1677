"""A run's results where people read them: a compact section of a README (between two marker lines),
and a full report page of the manual (docs/studies/<run>.md, its figures beside it).

- `--readme FILE` (`run`, `report`): FILE's section for the run becomes the README table, one verdict
  line per data set and budget, the "did pretraining learn?" count and a link to the full page, which
  is written too, at docs/studies/<run>.md beside FILE. Nothing else of FILE changes.
- `--docs DIR` (`report`): the full page alone, at DIR/<run>.md: provenance, the tables with their
  notes, every arm with intervals, the verdicts, the figures (copied into DIR/<run>/: images the
  manual shows, not links into results/, which is never committed).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from runner.atomic import atomic_write_text
from runner.errors import UserError
from runner.report import budget_order
from runner.tables import NAMES, _over_seeds, extended_markdown, to_markdown, verdict_lines

MARK_START = "<!-- byol-runner results start -->"
MARK_END = "<!-- byol-runner results end -->"
PAGE_FIGURES = ("label_efficiency", "pretrain_loss", "confusion")  # copied beside the page and shown there
STUDIES = Path("docs") / "studies"


def run_marks(run: str) -> tuple[str, str]:
    """The marker lines of one run's section, for a README that holds several (the demo's and a study's)."""
    return f"<!-- byol-runner results start: {run} -->", f"<!-- byol-runner results end: {run} -->"


def readme_markers(readme: Path, lines: list[str] | None = None, run: str | None = None) -> tuple[int, int]:
    """The lines of the README's marker pair for this run: the pair named for it if it has one, else
    its one plain pair; a UserError otherwise (`run --readme` checks this before it trains anything).
    A marker counts only on a line of its own: a README that quotes the markers in its prose must not
    have its text spliced there."""
    try:
        lines = readme.read_text().splitlines(keepends=True) if lines is None else lines
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{readme}: cannot read it ({e})") from None

    def pair(start: str, end: str) -> tuple[list[int], list[int]]:
        return ([i for i, line in enumerate(lines) if line.strip() == start],
                [i for i, line in enumerate(lines) if line.strip() == end])

    if run is not None:
        named_start, named_end = run_marks(run)
        starts, ends = pair(named_start, named_end)
        if len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0]:
            return starts[0], ends[0]
        if starts or ends:
            order = "; the start line must come before the end line" if len(starts) == len(ends) == 1 else ""
            raise UserError(f"{readme}: needs exactly one pair of marker lines for run {run}, {named_start} then "
                            f"{named_end}, each on a line of its own (found {len(starts)} and {len(ends)}{order})")
    starts, ends = pair(MARK_START, MARK_END)
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        named = "" if run is None else f" (or {run_marks(run)[0]} then {run_marks(run)[1]}, for a README with several runs)"
        order = "; the start line must come before the end line" if len(starts) == len(ends) == 1 else ""
        raise UserError(f"{readme}: needs exactly one pair of marker lines, {MARK_START} then {MARK_END}{named}, each on a "
                        f"line of its own, where the results go (found {len(starts)} and {len(ends)}{order})")
    return starts[0], ends[0]


def _figures(report: dict) -> list[str]:
    """The page's figures, in reading order: per data set its label efficiency, its pretraining (loss and
    monitor), and the confusion matrices at the largest budget (the others are in results.html)."""
    from runner.figures import slug

    have = {Path(f).name for f in report.get("figures", [])}
    budgets = sorted({e["labels"] for e in report.get("extended", [])}, key=budget_order)
    out = []
    for ds in dict.fromkeys(e["dataset"] for e in report.get("extended", [])):
        s = slug(ds)
        out += [n for n in (f"label_efficiency_{s}.png", f"pretrain_loss_{s}.png") if n in have]
        out += [n for n in (f"confusion_{s}_{slug(b)}.png" for b in budgets) if n in have][-1:]
    return out


def _copy_figures(report: dict, results: Path, folder: Path, names: list[str]) -> None:
    """The figures into `folder`, replacing those an earlier report put there (other files are left alone)."""
    if folder.is_dir():
        for stale in folder.glob("*.png"):
            if stale.name.startswith(PAGE_FIGURES) and stale.name not in names:
                stale.unlink()
    if names:
        folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(results / report["run"] / "figures" / name, folder / name)


def study_page(report: dict, figure_dir: str) -> str:
    """The full report as a manual page (markdown): provenance, the README table and its notes, every arm,
    the verdicts, the figures (`figure_dir`: where they are, relative to the page)."""
    meta = report.get("meta") or {}
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + " UTC" if t else "—"  # noqa: E731
    lines = [f"# {report['run']}", "",
             f"Written by byol-runner from the run's own files (`byol-runner report --run {report['run']} --docs DIR`). "
             f"{report['tasks_done']} of {report['tasks']} tasks done; trained {when(meta.get('trained_from'))} to "
             f"{when(meta.get('trained_to'))} on {', '.join(meta.get('devices', [])) or '—'} "
             f"({', '.join(meta.get('precisions', [])) or 'precision not recorded'}{_threads_said(meta)}; PyTorch {', '.join(meta.get('torchs', [])) or '—'}); "
             f"engine {meta.get('engine_version', '—')}; manifest `{_shown_path(meta.get('manifest_path'))}`.", "",
             "## Results", "", to_markdown(report).rstrip(), ""]
    verdicts = verdict_lines(report)
    if verdicts:
        lines += ["## Model 1 − Model 2", "", *(f"- {v}" for v in verdicts), ""]
    ext = extended_markdown(report)
    if ext:
        lines += ["## Every arm, with 95% intervals", "", ext.rstrip(), ""]
    figs = _figures(report)
    if figs:
        lines += ["## Figures", ""]
        for name in figs:
            lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({figure_dir}/{name})", ""]
    return "\n".join(lines)


def _shown_path(path: str | None) -> str:
    """A manifest's path as a reader of the checkout knows it: relative to the working directory when under it."""
    if not path:
        return "—"
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd())) if p.is_absolute() else path
    except ValueError:
        return path


def _delta(d: dict) -> str:
    """" (Δ −0.011 [−0.020, −0.001])": the primary metric's difference and interval, as the verdict read it."""
    r = d.get(d.get("primary") or "auroc") or {}
    if r.get("value") is None:
        return ""
    ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r.get("ci") else ""
    return f" (Δ {r['value']:+.3f}{ci})"


def readme_section(report: dict, page: str) -> str:
    """The README's compact section: the table, a verdict per data set and budget, the pretraining check
    counted, the flags' meaning, and the link to the full page (`page`, relative to the README)."""
    lg = report["legend"]
    table = [line for line in to_markdown(report).splitlines() if line.startswith("|")]
    primary = NAMES.get(report.get("primary", "auroc"), report.get("primary"))
    out = [f"Model 1 = {lg['model1'] or 'not in this run'}; Model 2 = {lg['model2'] or 'not in this run'}; "
           f"{report['tasks_done']} of {report['tasks']} tasks done. Test split; "
           + ("mean ± SD over seeds." if "mean ± std" in _over_seeds(report) else "one seed (no ± SD)."), "", *table, ""]
    diffs = [d for d in report.get("differences", []) if "verdict" in d]
    if diffs:
        margin = f", margin ±{report['margin']:g}" if report.get("margin") else ""
        out += [f"Verdicts on {primary} (Model 1 − Model 2 with its 95% interval, Holm over the run's comparisons{margin}):", ""]
        out += [f"- {d['dataset']} {d['labels']}: {d['verdict']}" + _delta(d) for d in diffs] + [""]
    learned = report.get("pretraining_learned", [])
    if learned:
        won = [f"{d['dataset']} {d['labels']}" for d in learned if d.get("decision") == "model1"]
        tested = [d for d in learned if d.get("decision") != "not_decided"]
        held = len(learned) - len(tested)
        if tested:
            out += [f"Did pretraining learn? Its linear probe was shown to beat the same probe on an untrained network in "
                    f"{len(won)} of the {len(tested)} cells that could be tested" + (f" ({', '.join(won)})" if won else "")
                    + (f"; {held} not decided (a side untrained ‡, or one seed)" if held else "") + ".", ""]
        else:
            out += ["Did pretraining learn? Not decided in any cell (a side untrained ‡, or one seed).", ""]
    mon = monitor_compact(report)
    if mon:
        out += [mon, ""]
    marks = "‡ untrained, † miscalibrated, ° loss without a temperature" if report.get("flags") or report.get("fixed_schedule") else ""
    out += [(f"{marks}: which cells and why, every arm with 95% intervals and the figures are in the " if marks else
             "Every arm with 95% intervals, the notes and the figures are in the ") + f"[full report]({page}).", ""]
    return "\n".join(out)


def monitor_compact(report: dict) -> str | None:
    """One line: each data set's monitor gain at the end of pretraining, or that it had too few images."""
    from runner.scoring import too_few
    from runner.tables import monitor_gain

    parts = []
    for g in report.get("monitor", []):
        gain = monitor_gain(g)
        if too_few(g.get("queries") or 0, g.get("query_classes")):
            parts.append(f"{g['dataset']}: too few labelled images to tell")
        elif gain is not None:
            parts.append(f"{g['dataset']} {gain[0]:+.3f} (higher in {gain[1]} of {gain[2]} seeds)")
    if not parts:
        return None
    return ("Pretraining monitor (kNN AUROC of the frozen features at the end, minus the untrained network's; no interval, a "
            "rough sign only): " + "; ".join(parts) + ".")


def write_docs(docs: Path, report: dict, results: Path) -> Path:
    """The run's full page at docs/<run>.md and its figures in docs/<run>/; the page."""
    names = _figures(report)
    _copy_figures(report, results, docs / report["run"], names)
    page = docs / f"{report['run']}.md"
    text = study_page(report, report["run"])
    if not page.is_file() or page.read_text() != text:
        atomic_write_text(page, text)
    return page


def rewrite_readme(readme: Path, report: dict, results: Path) -> tuple[bool, Path]:
    """Replace what stands between the README's marker lines for this run with its compact section, and
    write its full page at docs/studies/<run>.md beside the README; whether the README changed, and the page."""
    text = readme.read_text()
    lines = text.splitlines(keepends=True)
    start, end = readme_markers(readme, lines, report["run"])
    page = write_docs(readme.parent / STUDIES, report, results)
    link = Path(os.path.relpath(page, readme.parent)).as_posix()
    new = "".join(lines[: start + 1]) + readme_section(report, link) + "".join(lines[end:])
    if new != text:
        atomic_write_text(readme, new)
    return new != text, page


def publish_readme(readme: Path, report: dict, results: Path) -> str:
    """`--readme`: rewrite the run's section and its page; the line that says what happened."""
    changed, page = rewrite_readme(readme, report, results)
    return f"{readme}: results section {'rewritten' if changed else 'already up to date'}; full report: {page}"


def _threads_said(meta: dict) -> str:
    """The CPU thread counts the tasks trained with (they change results in their last digits)."""
    counts = meta.get("cpu_threads") or []
    if not counts:
        return ""
    if len(counts) == 1:
        return f"; {counts[0]} CPU thread(s) per task"
    return f"; CPU threads per task differ: {', '.join(map(str, counts))}"
