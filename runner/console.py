"""Terminal output for the headless commands: rich when stdout/stderr is a terminal, plain otherwise."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

# piped (a CI log, a file): tables as wide as their content, not cut to 80 columns with "…"
_PIPED_WIDTH = 400
out = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPED_WIDTH)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPED_WIDTH)


@contextmanager
def progress_reporter(label: str) -> Iterator:
    """A `progress(done, total, what)` callback: a rich bar on a terminal, a line per 10% otherwise."""
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=f"{label}: {what}")

            yield update
        return
    import time

    last = {"decile": -1, "start": time.monotonic()}

    def plain(done: int, total: int, what: str) -> None:
        # quiet for work that ends within a second; then a line per tenth
        decile = done * 10 // max(total, 1)
        if decile != last["decile"] and time.monotonic() - last["start"] > 1.0:
            last["decile"] = decile
            print(f"{label}: {what} {done}/{total}", file=sys.stderr, flush=True)

    yield plain


def print_audit(report: dict) -> None:
    """The audit as rich tables: one block per data set, defects in red, then a verdict line."""
    from rich.markup import escape
    from rich.table import Table

    for name, d in report["datasets"].items():
        counts = d["counts"]
        t = Table(title=f"{name} ({d['source']}, {d['channels']} channel{'s' if d['channels'] > 1 else ''}, {d['image_size']} px)", title_justify="left")
        t.add_column("class")
        for split in counts:
            t.add_column(split, justify="right")
        t.add_column("total", justify="right")
        for c in d["classes"]:
            row = [counts[s][c] for s in counts]
            t.add_row(c + (" (positive)" if c == d["positive"] else ""), *map(str, row), str(sum(row)))
        totals = [sum(counts[s].values()) for s in counts]
        t.add_row("[bold]all[/]", *map(str, totals), str(sum(totals)))
        out.print(t)
        labeled = d["labeled"]
        if d.get("external_test_of"):
            out.print(f"an external test set of {d['external_test_of']}: all of it is test, scored by each of its classifiers")
        elif labeled:
            first_seed = next(iter(labeled))
            out.print("labeled train images (seed " + first_seed + "): " + ", ".join(f"{b} -> {n}" for b, n in labeled[first_seed].items()))
        if d.get("table"):
            tb = d["table"]
            how = f" ({' and '.join(tb['detected'])} detected)" if tb["detected"] else ""
            out.print(f"label file {escape(tb['file'])}: {tb['encoding']}, {tb['delimiter']}-separated{how}", soft_wrap=True)
        if d.get("medical"):
            out.print(medical_line(d["medical"]), soft_wrap=True)
        if d.get("near_duplicates"):
            out.print(near_line(d["near_duplicates"]), soft_wrap=True)
        out.print(
            f"scanned {d['n_items']} images; exact duplicate groups {d['n_duplicate_groups']}, "
            f"label conflicts {d['n_label_conflicts']}, source split leaks {d['n_split_leaks']}, "
            f"unreadable {len(d['unreadable'])}"
        )
        if d["dropped_by_reason"]:
            out.print("dropped: " + ", ".join(f"{n} ({r})" for r, n in d["dropped_by_reason"].items()))
        for s in d["skipped"][:5]:
            out.print(f"  skipped {escape(s['key'])}: {escape(s['detail'])}", soft_wrap=True)
        if len(d["skipped"]) > 5:
            out.print(f"  ... and {len(d['skipped']) - 5} more skipped (--json lists them all)")
        if d.get("kept_by_setting"):
            out.print("kept by the manifest's settings: " + ", ".join(f"{n} {r}" for r, n in d["kept_by_setting"].items()))
        if d["kept_in_test"]:
            out.print("kept in the published test split: " + ", ".join(f"{len(k)} ({r})" for r, k in d["kept_in_test"].items()))
        out.print(f"{d['used']} of {d['found']} images used")
        if d["not_selected"]:
            out.print("not selected: " + ", ".join(f"{c} ({n})" for c, n in d["not_selected"].items()))
        for g in [g for g in d["duplicate_groups"] if g["conflicting"]][:5]:
            out.print("  [red]conflict[/] " + escape(", ".join(f"{k} [{lab}]" for k, lab in zip(g["keys"], g["labels"]))))
        if d["n_label_conflicts"] > 5:
            out.print(f"  ... and {d['n_label_conflicts'] - 5} more conflicts (--json lists all)")
        for w in d["warnings"][:10]:
            out.print(f"[yellow]warning:[/] {escape(w)}")
        cache = "read from cache" if d["cache"]["from_cache"] else "decoded and cached"
        out.print(f"{_verdict(d)}  (images {cache} in {d['cache']['seconds']:.1f} s; fingerprint {d['fingerprint']})\n")


def _verdict(d: dict) -> str:
    """An audited data set's last line: its defects, or clean; and the source classes it left unmapped."""
    verdict = "[red]defects: " + "; ".join(d["defects"]) + "[/]" if d["defects"] else "[green]clean[/]"
    if d["not_selected"]:  # a label the manifest does not map may be a typo as well as a choice
        n = sum(d["not_selected"].values())
        verdict += (f" [yellow]({n} images of {len(d['not_selected'])} source classes not selected, listed above: "
                    "name them under `exclude:` if that is meant)[/]")
    return verdict


def near_line(n: dict) -> str:
    """The near-duplicate pairs `data audit` found, and what the split did with them, in one line."""
    if not n["pairs"]:
        return "near-duplicates: none found"
    found = (f"near-duplicates: {n['pairs']} pair{'s' if n['pairs'] != 1 else ''} of images that look like copies "
             f"(groups: {n['groups']}, the largest {n['largest']} images)")
    if n["grouped"]:
        was = n.get("pairs_across_splits_ungrouped")
        moved = f"; without grouping, {was} pair{'s' if was != 1 else ''} would have crossed splits" if was is not None else ""
        across = f"; {n['pairs_across_splits']} still across splits (the published split)" if n["pairs_across_splits"] else ""
        return found + f": each group kept in one split{moved}{across}"
    if n["largest"] > n.get("limit", n["largest"]):
        return found + (f"; {n['pairs_across_splits']} across train/val/test. A group of {n['largest']} images: these images "
                        "are alike rather than copies, and the test cannot tell copies apart here (not grouped)")
    return found + f"; {n['pairs_across_splits']} across train/val/test; not grouped (split.near_duplicates: true keeps each " \
                   "group in one split; `--json` lists examples to look at)"


def medical_line(m: dict) -> str:
    """How a data set's DICOM files and NIfTI volumes were read, in one line."""
    from rich.markup import escape

    parts = []
    if "DICOM" in m["files"]:
        n, k = m["files"]["DICOM"], m["images"]["DICOM"]
        parts.append(f"{n} DICOM file{'s' if n != 1 else ''}" + (f" ({k} frames)" if k != n else ""))
    if "NIfTI" in m["files"]:
        n, k = m["files"]["NIfTI"], m["images"]["NIfTI"]
        parts.append(f"{n} NIfTI volume{'s' if n != 1 else ''} ({k} {m['slice_axis']} slices, each volume one group)")
    window = (f"window {', '.join(m['window'])} (level/width)" if m["window"] else
              "no window set: a DICOM file's own window or VOI LUT, else each image's range (a volume's range)")
    line = "read " + " and ".join(parts) + "; " + window
    if m["group_tag"]:
        line += f"; grouped by DICOM {m['group_tag']} ({m['groups']} groups)"
    return escape(line)


def duration(seconds: float) -> str:
    """12s, 4m05s, 2h03m."""
    s = int(round(max(seconds, 0)))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(spent: float, step: int | None, total: int | None) -> float | None:
    """The seconds a training has left at its pace so far (steps done over the time taken); None
    before its first step or without a known total."""
    return spent * (total - step) / step if total and step and total > step else None


def eta(spent: float, step: int | None, total: int | None) -> str:
    left = eta_seconds(spent, step, total)
    return "" if left is None else duration(left)


def print_markdown(text: str) -> None:
    """Tables a person reads on a terminal; piped (CI logs, files), the markdown itself."""
    if out.is_terminal:
        out.print(rich_markdown(text))
    else:
        print(text, flush=True)


def rich_markdown(text: str, wrap: int | None = None):  # noqa: ANN201 - a rich renderable
    """The report's markdown as a terminal shows it: each pipe table a table sized to its content
    (numbers right-aligned, never stretched across a wide screen, wrapped on a narrow one), every
    other line as text. `run` prints this on a terminal (markdown when piped); the TUI's Results tab
    shows it. `wrap`: the prose is wrapped at this width and a table's cells never are (the TUI's
    Results tab scrolls sideways to a wide table instead of cutting its columns)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from runner.tables import NUMBER

    parts: list = []
    rows: list[list[str]] = []

    def table() -> None:
        separator = len(rows) > 1 and all(re.fullmatch(r":?-+:?", c) for c in rows[1])
        header, body = rows[0], rows[2:] if separator else rows[1:]
        t = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False)
        for i, name in enumerate(header):
            cells = [r[i] for r in body if i < len(r)]
            numeric = i > 0 and cells and all(NUMBER.match(c) for c in cells)
            # words stay whole: a cell wraps at its spaces ("0.708 [0.583, 0.833]" over two lines)
            longest = max((len(w) for c in cells for w in c.split()), default=4)
            if wrap:  # whole cells: as wide as the widest (or the header)
                t.add_column(Text(name), justify="right" if numeric else "left", no_wrap=True,
                             min_width=max([len(c) for c in cells] + [len(name)]))
            else:
                t.add_column(Text(name), justify="right" if numeric else "left", min_width=min(longest, 24))
        for r in body:
            t.add_row(*(Text(c) for c in r))  # a cell's "[...]" is text (an interval), never rich markup
        parts.append(t)
        rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if rows:
            table()
        line = line.replace("**", "")
        if wrap and len(line) > wrap:
            import textwrap

            line = "\n".join(textwrap.wrap(line, wrap, subsequent_indent="  " if line.startswith("- ") else ""))
        parts.append(Text(line))
    if rows:
        table()
    return Group(*parts)


def knn_text(auroc: float, base: float | None, short: bool = False) -> str:
    """The pretraining monitor's score beside the untrained network's: "0.712 (untrained 0.640)"."""
    if base is None:
        return f"{auroc:.3f}"
    return f"{auroc:.3f} ({base:.3f})" if short else f"kNN AUROC {auroc:.3f} (untrained network {base:.3f}, {auroc - base:+.3f})"


class RunDisplay:
    """What `run` shows while it works: a live rich table of the running tasks and the counts on a
    terminal (refreshed at most 4 times a second), one plain line per state change otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.live = None
        self.last: dict[str, str] = {}
        self.last_draw = 0.0
        self.summary = ""

    def __enter__(self) -> "RunDisplay":
        if out.is_terminal:
            from rich.live import Live

            self.live = Live(console=out, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __call__(self, sched, changed: bool) -> None:  # noqa: ANN001 - a Scheduler
        import time as _time

        now = _time.monotonic()
        if self.live is None:
            if changed:
                self._plain(sched)
            if now - self.last_draw > 1.0:  # the pretraining monitor's new scores, at most once a second
                self.last_draw = now
                self._monitor_lines(sched)
            return
        if changed or now - self.last_draw > 0.5:
            self.last_draw = now
            self.live.update(self._table(sched))

    def _counts(self, sched) -> str:  # noqa: ANN001
        counts: dict[str, int] = {}
        for s in sched.status.values():
            counts[s] = counts.get(s, 0) + 1
        order = ("done", "running", "pending", "failed", "blocked", "interrupted")
        return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k))

    def note(self, text: str) -> None:
        """A line about a task or the run (a resume, a restart from step 0, stopping): printed above the
        live table on a terminal, as a stamped line otherwise."""
        import time as _time

        line = f"[{_time.strftime('%H:%M:%S')}] {text}"
        if self.live is not None:
            from rich.markup import escape

            self.live.console.print(escape(line), soft_wrap=True)
        else:
            print(line, flush=True)

    def _plain(self, sched) -> None:  # noqa: ANN001
        import time as _time

        by_id = sched.plan.by_id()
        if not self.last:  # the first look: what earlier runs finished is counted, not listed with today's time
            done = [tid for tid, st in sched.status.items() if st == "done"]
            if done:
                print(f"{len(done)} of {self.total} tasks already done (earlier runs)", flush=True)
            self.last.update({tid: st for tid, st in sched.status.items() if st == "done"})
        for tid, st in sched.status.items():
            if self.last.get(tid) != st:
                if tid in self.last or st != "pending":
                    stamp = _time.strftime("%H:%M:%S")
                    print(f"[{stamp}] {st:<8} {by_id[tid].label} ({by_id[tid].kind}, {tid})", flush=True)
                self.last[tid] = st
        done = sum(1 for s in sched.status.values() if s == "done")
        summary = f"{done}/{self.total} done: {self._counts(sched)}"
        if summary != self.summary:
            self.summary = summary
            print(summary, flush=True)

    def _monitor_lines(self, sched) -> None:  # noqa: ANN001
        import time as _time

        by_id = sched.plan.by_id()
        for tid, (step, auroc, base) in sched.store.latest_knn(list(sched.running)).items():
            if self.last.get(f"knn:{tid}") != str(step):
                self.last[f"knn:{tid}"] = str(step)
                print(f"[{_time.strftime('%H:%M:%S')}] monitor  {by_id[tid].label} step {step}: {knn_text(auroc, base)}", flush=True)

    def _table(self, sched):  # noqa: ANN001
        from rich.console import Group
        from rich.table import Table

        info = sched.store.progress(list(sched.running))
        knn = sched.store.latest_knn(list(sched.running))
        t = Table(title=None, expand=False)
        for col in ("task", "kind", "slot", "epoch", "step", "loss", "kNN AUROC", "img/s", "elapsed", "ETA"):
            t.add_column(col, justify="right" if col not in ("task", "kind") else "left")
        import time as _time

        for tid, r in sched.running.items():
            i = info.get(tid)
            step, total = (i["step"], i["total"] if "total" in i.keys() else None) if i else (None, None)
            spent = _time.time() - r.handle.started
            t.add_row(r.task.label, r.task.kind, r.handle.slot.name,
                      str(i["epoch"]) if i and i["epoch"] is not None else "",
                      "" if step is None else (f"{step}/{total}" if total else str(step)),
                      f"{i['loss']:.4f}" if i and i["loss"] is not None else "",
                      knn_text(*knn[tid][1:], short=True) if tid in knn else "",
                      f"{i['img_per_s']:.0f}" if i and i["img_per_s"] else "",
                      duration(spent), eta(spent, step, total))
        done = sum(1 for s in sched.status.values() if s == "done")
        head = f"[bold]{sched.plan.name}[/]: {done}/{self.total} tasks done ({self._counts(sched)})"
        return Group(head, t) if sched.running else head


def print_plan(view: dict) -> None:
    """The tasks one aligned line each (never cut), a dependency named by its method and seed, then the
    counts, the invalidated tasks and the warnings."""
    from rich.markup import escape

    name = {t["id"]: f"{t['method']} (seed {t['seed']})" for t in view["tasks"]}
    heads = ["DATASET", "METHOD", "LABELS", "SEED", "NEEDS", "STATE", "ID"]
    rows = [[t["dataset"], t["method"], t["budget"] or "", str(t["seed"]), ", ".join(name.get(d, d[:8]) for d in t["deps"]),
             t["state"], t["id"][:8]] for t in view["tasks"]]
    keep = [i for i, h in enumerate(heads) if h in ("DATASET", "METHOD", "STATE", "ID") or any(r[i] for r in rows)]
    heads, rows = [heads[i] for i in keep], [[r[i] for i in keep] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    out.print(f"{view['name']}: {len(view['tasks'])} tasks", soft_wrap=True, highlight=False)
    out.print("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(), soft_wrap=True, highlight=False)
    state_at = heads.index("STATE")
    for r in rows:
        cells = [escape(c.ljust(w)) for c, w in zip(r, widths)]
        cells[state_at] = f"[{'green' if r[state_at] == 'done' else 'yellow'}]{cells[state_at]}[/]"
        out.print("  ".join(cells).rstrip(), soft_wrap=True, highlight=False)
    done = sum(1 for task in view["tasks"] if task["state"] == "done")
    out.print(f"{done} done, {len(view['tasks']) - done} to run")
    cost = view.get("cost")
    if cost:
        free = f"; {cost['free_mb']:,.0f} MB free on its disk" if cost["free_mb"] is not None else ""
        out.print(escape(f"data: {cost['images']:,} images, {cost['cache_mb']:,.1f} MB decoded in {cost['cache']}{free}"),
                  soft_wrap=True, highlight=False)
    if view["invalidated"]:
        out.print(f"[yellow]{len(view['invalidated'])} tasks of the previous run are invalidated by a changed setting:[/]")
        for task in view["invalidated"]:
            out.print(f"  {task['id']} {task['kind']} {task['dataset']} {task['method']} {task['budget'] or ''} seed {task['seed']}")
    for line in view.get("warnings", []):
        out.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


STATUS_COLOURS = {"done": "green", "running": "cyan", "pending": "white", "failed": "red", "blocked": "red", "interrupted": "yellow",
                  "damaged": "red"}


def status_rows(st: dict) -> tuple[list[str], list[list[str]]]:
    """`status` as kubectl prints a list: the columns that have something to say (an empty one is left
    out), names and numbers whole, the short id last; errors and flags go below the table."""
    heads = ["DATASET", "METHOD", "LABELS", "SEED", "STATUS", "FLAGS", "STEP", "LOSS", "TRIES", "ID"]
    rows = []
    for t in st["tasks"]:
        flags = "".join(dict.fromkeys(r.split(" ")[0] for r in t.get("degenerate") or []))  # ‡ untrained, † miscalibrated
        step = "" if t["step"] is None else (f"{t['step']}/{t['total']}" if t.get("total") else str(t["step"]))
        rows.append([t["dataset"], t["method"], t["budget"] or "", str(t["seed"]), t["status"], flags, step,
                     "" if t["loss"] is None else f"{t['loss']:.4f}", str(t["attempts"]), t["id"][:8]])
    keep = [i for i, h in enumerate(heads) if h in ("DATASET", "METHOD", "STATUS", "ID") or any(r[i] for r in rows)]
    return [heads[i] for i in keep], [[r[i] for i in keep] for r in rows]


def print_status(st: dict) -> None:
    """The run's tasks, one aligned line each (never cut: a line longer than the terminal wraps), then
    each failed task's error and each flagged classifier's reasons. Coloured on a terminal only."""
    from rich.markup import escape

    run = st["run"]
    heads, rows = status_rows(st)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    out.print(f"run {run['name']} (#{run['id']}, {run['status']}, pid {run['pid']})", soft_wrap=True, highlight=False)
    out.print("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(), soft_wrap=True, highlight=False)
    status_at = heads.index("STATUS")
    for r in rows:
        cells = [escape(c.ljust(w)) for c, w in zip(r, widths)]
        colour = STATUS_COLOURS.get(r[status_at], "white")
        cells[status_at] = f"[{colour}]{cells[status_at]}[/]"
        out.print("  ".join(cells).rstrip(), soft_wrap=True, highlight=False)
    for t in st["tasks"]:
        label = f"{t['dataset']} {t['method']} {t['budget'] or ''} seed {t['seed']}".replace("  ", " ")
        if t.get("error") and t["status"] in ("failed", "blocked", "interrupted", "damaged"):
            out.print(f"{t['status']}: {escape(label)} ({t['id'][:8]}): {escape(t['error'])}", soft_wrap=True, highlight=False)
        if t.get("degenerate"):
            out.print(f"{escape(label)} ({t['id'][:8]}): " + escape("; ".join(t["degenerate"])), soft_wrap=True, highlight=False)
    if st.get("disk"):
        out.print(disk_line(st["disk"]), soft_wrap=True, highlight=False)


def disk_line(disk: dict) -> str:
    """"disk: 216.4 MB in the task folders; networks: 1 encoder.pt 44.8 MB, 4 model.pt 179.0 MB"."""
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    nets = ", ".join(f"{n} {name} {mb(b)}" for name, (n, b) in sorted(disk["networks"].items()))
    kept = {"bf16": "weights kept in bf16, compressed (run.weights)",
            "fp32": "weights kept in fp32; run.weights: bf16 keeps a third of it"}.get(disk.get("weights", ""), "")
    return f"disk: {mb(disk['bytes'])} in the task folders" + (f"; networks: {nets}" if nets else "") + (
        f" ({kept + '; ' if kept and nets else ''}a linear probe's model.pt names its encoder and a control's says how to "
        "build its network again: a few KB each)")


def print_doctor(checks: list[dict]) -> None:
    """One line per check, its fix on the next line when it is not ok."""
    from rich.markup import escape

    marks = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "skip": "[dim]skip[/]"}
    width = max(len(c["name"]) for c in checks)
    for c in checks:
        out.print(f"{marks[c['status']]}  {c['name']:<{width}}  {escape(c['detail'])}", soft_wrap=True)
        if c["fix"] and c["status"] in ("warn", "fail"):
            out.print(f"      {'':<{width}}  [bold]fix:[/] {escape(c['fix'])}", soft_wrap=True)
