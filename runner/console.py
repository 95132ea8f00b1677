"""Terminal output for the headless commands: rich when stdout/stderr is a terminal, plain otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


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
    last = {"decile": -1}

    def plain(done: int, total: int, what: str) -> None:
        decile = done * 10 // max(total, 1)
        if decile != last["decile"]:
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
        first_seed = next(iter(labeled))
        out.print("labeled train images (seed " + first_seed + "): " + ", ".join(f"{b} -> {n}" for b, n in labeled[first_seed].items()))
        out.print(
            f"scanned {d['n_items']} images; exact duplicate groups {d['n_duplicate_groups']}, "
            f"label conflicts {d['n_label_conflicts']}, source split leaks {d['n_split_leaks']}, "
            f"unreadable {len(d['unreadable'])}"
        )
        if d["dropped_by_reason"]:
            out.print("dropped: " + ", ".join(f"{n} ({r})" for r, n in d["dropped_by_reason"].items()))
        if d["not_selected"]:
            out.print("not selected: " + ", ".join(f"{c} ({n})" for c, n in d["not_selected"].items()))
        for g in [g for g in d["duplicate_groups"] if g["conflicting"]][:5]:
            out.print("  [red]conflict[/] " + escape(", ".join(f"{k} [{lab}]" for k, lab in zip(g["keys"], g["labels"]))))
        if d["n_label_conflicts"] > 5:
            out.print(f"  ... and {d['n_label_conflicts'] - 5} more conflicts (--json lists all)")
        for w in d["warnings"][:10]:
            out.print(f"[yellow]warning:[/] {escape(w)}")
        verdict = "[red]defects: " + "; ".join(d["defects"]) + "[/]" if d["defects"] else "[green]clean[/]"
        cache = "read from cache" if d["cache"]["from_cache"] else "decoded and cached"
        out.print(f"{verdict}  (images {cache} in {d['cache']['seconds']:.1f} s; fingerprint {d['fingerprint']})\n")
