"""The `byol-runner` command. Thin: parse arguments, call one function, print, return the exit code.

Exit codes: 0 success; 1 the command ran and found problems (failed tasks, data defects); 2 bad
input or usage (printed as `error: ...`, never a traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from runner import __version__
from runner.errors import UserError, os_error_line
from runner.executors.specs import SPECS
from runner.ml.config import ARCHS

DEFAULT_RESULTS = "results"


def _results_dir(args: argparse.Namespace, manifest_results: str | None = None) -> Path:
    from runner.commands import results_dir

    return results_dir(args.results or manifest_results or DEFAULT_RESULTS)


def _max_parallel(text: str) -> int:
    from runner.executors.specs import MAX_PARALLEL

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"{n}: between 1 and {MAX_PARALLEL}")
    return n


def cmd_schema(args: argparse.Namespace) -> int:
    if args.format == "md":
        from runner.reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    from runner.manifest import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_data_audit(args: argparse.Namespace) -> int:
    from runner.console import progress_reporter
    from runner.data.dataset import audit_report, external_spec, prepare
    from runner.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    cache_dir = _results_dir(args, manifest.results) / "cache"
    report: dict = {"manifest": str(args.manifest), "datasets": {}}
    prepared = {}
    # the trained data sets first: an external test set is prepared as the one it tests
    for name, spec in sorted(manifest.datasets.items(), key=lambda kv: kv[1].external_test_of is not None):
        of = prepared.get(spec.external_test_of)
        with progress_reporter(name) as progress:
            ds = prepared[name] = (prepare(name, external_spec(spec, of), cache_dir, progress, of.class_names, of) if of
                                   else prepare(name, spec, cache_dir, progress))
        report["datasets"][name] = audit_report(ds, manifest.labels.budgets(), manifest.seeds)
    report["clean"] = not any(d["defects"] for d in report["datasets"].values())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from runner.console import print_audit

        print_audit(report)
    return 0 if report["clean"] else 1


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from runner.data.fetch import DATASETS, default_dest, fetch

    unknown = [n for n in args.names if n not in DATASETS]
    if unknown:
        raise UserError(f"data fetch: unknown data set {unknown[0]!r}: one of {', '.join(DATASETS)}")
    dest = args.to or default_dest()
    for name in args.names or list(DATASETS):
        fetch(name, dest)
    if dest != Path("data") and not os.environ.get("BYOL_DATA"):
        print(f"point the study at it: BYOL_DATA={dest} byol-runner run experiments/matrix.yaml")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from runner.commands import execute_plan, load_plan, power_warnings
    from runner.console import RunDisplay, progress_reporter

    with progress_reporter("data") as progress:
        manifest, results, plan = load_plan(args.manifest, args.results, progress)
    if manifest.compare.margin is not None:  # before anything runs (`plan` says it of one seed too)
        for line in power_warnings(manifest, results):
            print(f"warning: {line}", file=sys.stderr)
    if args.readme:  # a README without its marker lines: said now, not after an hour of training
        from runner.docpages import readme_markers

        readme_markers(Path(args.readme), run=manifest.name)
    outcome, rep = execute_plan(args.manifest, manifest, results, plan, args.executor, args.max_parallel, args.retry_failed,
                                display_factory=RunDisplay, retry_ids=tuple(args.retry or ()), rebuild_store=args.rebuild_store)
    _print_outcome(args, outcome, rep, results / manifest.name)
    if args.readme and outcome.exit_code != 130:
        from runner.docpages import publish_readme

        print(publish_readme(Path(args.readme), rep, results))
    if outcome.exit_code == 1:
        for label, error in list(outcome.failed.items())[:5]:
            print(f"failed: {label}: {error}", file=sys.stderr)
        more = f" ({len(outcome.failed) - 5} more)" if len(outcome.failed) > 5 else ""
        from runner.errors import DISK_FULL, free_space

        if any(str(error).startswith(DISK_FULL) for error in outcome.failed.values()):  # one true line, exit 2
            print(f"error: {DISK_FULL} of {results} ({free_space(str(results))} free): free some space, then "
                  f"`byol-runner run {args.manifest}` runs the failed tasks again from their last checkpoint", file=sys.stderr)
            return 2
        print(f"some tasks failed{more}: `byol-runner status` shows them all; `run --retry-failed` tries them again",
              file=sys.stderr)
    if outcome.exit_code == 130:
        readme = " (the README was not rewritten)" if args.readme else ""
        print(f"interrupted{readme}: finished tasks are kept; resume with: {_resume_command(args)}", file=sys.stderr)
    return outcome.exit_code


def _print_outcome(args: argparse.Namespace, outcome, rep: dict, run_dir: Path) -> None:  # noqa: ANN001 - a RunOutcome
    """The results table and verdicts (not when a stop left nothing finished), then the counts."""
    from runner.console import print_markdown
    from runner.tables import to_markdown, verdict_lines

    print()
    if outcome.exit_code != 130 or outcome.counts.get("done"):
        print_markdown(to_markdown(rep))
        for line in verdict_lines(rep):
            print(line)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(outcome.counts.items()))
    adopted = f", {outcome.adopted} adopted from a previous runner" if outcome.adopted else ""
    n, size = outcome.removed_temp
    removed = f"; removed {n} temporary file(s) ({size / 2**20:.1f} MB) that killed processes left" if n else ""
    print(f"{counts}; {outcome.started_workers} workers started{adopted} in {outcome.seconds:.1f} s{removed}")
    print(f"results: {run_dir / 'results.md'} (also .csv, .json, .html; figures in {run_dir / 'figures'})")


def _resume_command(args: argparse.Namespace) -> str:
    """The command that picks this run up where it stopped: the same one (its `--retry` and `--readme` aside)."""
    import shlex

    parts = ["byol-runner", "run", str(args.manifest)]
    for flag, value in (("--results", args.results), ("--executor", args.executor), ("--max-parallel", args.max_parallel)):
        if value is not None:
            parts += [flag, str(value)]
    if args.readme:
        parts += ["--readme", args.readme]
    return shlex.join(parts)


def cmd_plan(args: argparse.Namespace) -> int:
    from runner.commands import plan_view
    from runner.console import print_plan, progress_reporter

    with progress_reporter("data") as progress:
        view = plan_view(args.manifest, args.results, progress)
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print_plan(view)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from runner.commands import status
    from runner.console import print_status

    st = status(args.results, args.run)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print_status(st)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from runner.commands import report
    from runner.tables import extended_markdown, to_csv, to_markdown

    results, rep, out = report(args.results, args.run, args.bootstrap, need_files=bool(args.readme) or bool(args.docs),
                               page=args.format == "html")
    if out is None:
        what = "the page itself is printed (save it with > report.html)" if args.format == "html" else "the report is printed only"
        print(f"note: the report files and figures were not written (the results dir is read-only); {what}", file=sys.stderr)
    if args.readme:
        from runner.docpages import publish_readme

        print(publish_readme(Path(args.readme), rep, results), file=sys.stderr)
    if args.docs:
        from runner.docpages import write_docs

        print(f"full report: {write_docs(Path(args.docs), rep, results)}", file=sys.stderr)
    if args.format == "html":
        print(out / "results.html" if out is not None else rep.pop("html"))
    elif args.format == "json" or args.json:
        print(json.dumps(rep, indent=2))
    elif args.format == "csv":
        print(to_csv(rep), end="")
    else:
        print(to_markdown(rep) + "\n" + extended_markdown(rep), end="")
        if out is not None:
            print(f"\n(written to {out}/results.md, .csv, .json)", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from runner import predict as P
    from runner.commands import results_dir

    result = P.predict(results_dir(args.results), args.task, args.images, args.device)
    if args.csv:
        from runner.atomic import atomic_write_text

        atomic_write_text(Path(args.csv), P.to_csv(result))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(P.lines(result)))
    bad = P.failed(result)
    if bad:
        print(f"{bad} of {len(result['rows'])} images could not be scored (their error is on their line)", file=sys.stderr)
    return 1 if bad else 0


def cmd_tui(args: argparse.Namespace) -> int:
    from runner.commands import results_dir


    manifest = None
    if args.manifest is not None:
        from runner.manifest import load_manifest

        manifest = load_manifest(args.manifest)  # a bad manifest fails here, before the screen opens
    try:
        from runner.tui.app import RunnerApp
    except ImportError as e:
        raise UserError(f"the TUI needs textual and textual-plotext ({e}): pip install textual textual-plotext") from None
    results = results_dir(args.results, manifest)
    run_name = manifest.name if manifest else args.run
    if manifest is None and not (results / "runner.db").is_file():
        raise UserError(f"no runs in {results} to attach to: give a manifest to start one")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):  # a Textual app without a terminal would wait for keys forever
        raise UserError("the TUI needs a terminal (stdin and stdout a tty): without one, `byol-runner run MANIFEST` runs "
                        "headless and `byol-runner status` shows the queue")
    RunnerApp(results, args.manifest, run_name).run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from runner.worker.run import main as worker_main

    return worker_main(args.task_json, args.results, args.data_root)


def cmd_bench(args: argparse.Namespace) -> int:
    from runner.bench import run_bench

    result = run_bench(args.arch, args.size, args.batch, args.precision, args.device, args.steps, args.warmup,
                       args.compile, args.channels, tuple(args.parts.split(",")))  # no GPU for cuda: a StartError, one line
    print(json.dumps(result, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from runner.commands import doctor
    from runner.console import print_doctor

    image, checks = doctor(args.manifest, args.image, gpu=not args.no_gpu)
    if args.json:
        print(json.dumps({"image": image, "checks": checks}, indent=2))
    else:
        print_doctor(checks)
    return 1 if any(c["status"] == "fail" for c in checks) else 0


RESULTS_HELP = f"results dir (default: the manifest's, or {DEFAULT_RESULTS}/)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-runner", description="BYOL vs supervised training on medical images.")
    p.add_argument("--version", action="version", version=f"byol-runner {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_plan, _add_status, _add_report, _add_predict, _add_tui, _add_schema, _add_data, _add_bench,
                _add_doctor, _add_worker):
        add(sub)
    return p


def _add_run(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    r = sub.add_parser("run", help="run a manifest's whole matrix headless, resuming where it stopped")
    r.add_argument("manifest", type=Path, help="the YAML manifest, e.g. experiments/demo.yaml (`byol-runner schema` lists its keys)")
    r.add_argument("--executor", choices=tuple(SPECS), help="overrides the manifest's executor.kind")
    r.add_argument("--results", help=RESULTS_HELP)
    r.add_argument("--max-parallel", type=_max_parallel, help="tasks at once (default: one per GPU, 1 on the CPU)")
    r.add_argument("--retry-failed", action="store_true", help="run again the tasks an earlier run gave up on")
    r.add_argument("--rebuild-store", action="store_true",
                   help="a damaged runner.db: move it aside and rebuild it from the task folders (finished tasks are kept)")
    r.add_argument("--retry", action="append", metavar="TASK_ID", help="run again this one failed task (repeatable)")
    r.add_argument("--readme", metavar="FILE", help="at the end, write the run's compact results section into FILE between "
                   "its marker lines, and its full report at docs/studies/<run>.md beside FILE (as `report --readme`)")
    r.set_defaults(func=cmd_run)


def _add_plan(sub) -> None:  # noqa: ANN001
    pl = sub.add_parser("plan", help="show the tasks, their dependencies and which are done; runs nothing")
    pl.add_argument("manifest", type=Path, help="the YAML manifest whose tasks to show")
    pl.add_argument("--results", help=RESULTS_HELP)
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=cmd_plan)


def _add_status(sub) -> None:  # noqa: ANN001
    st = sub.add_parser("status", help="the queue of the latest (or named) run")
    st.add_argument("--results", help=f"results dir (default: {DEFAULT_RESULTS}/)")
    st.add_argument("--run", help="a run name (default: the latest run)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)


def _add_report(sub) -> None:  # noqa: ANN001
    rp = sub.add_parser("report", help="the results table of a run, rebuilt from what is on disk")
    rp.add_argument("--results", help=f"results dir (default: {DEFAULT_RESULTS}/)")
    rp.add_argument("--run", help="a run name (default: the latest run)")
    rp.add_argument("--format", choices=("md", "csv", "json", "html"), default="md",
                    help="what to print; all four files are written under results/<run>/ (html: prints its path)")
    rp.add_argument("--readme", help="rewrite the run's compact section of this README, between its marker comments, and "
                    "write its full report page at docs/studies/<run>.md beside the README")
    rp.add_argument("--docs", metavar="DIR", help="write the run's full report page at DIR/<run>.md (the manual's study pages: "
                    "docs/studies), its figures in DIR/<run>/")
    rp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the intervals")
    rp.add_argument("--json", action="store_true", help="same as --format json")
    rp.set_defaults(func=cmd_report)


def _add_predict(sub) -> None:  # noqa: ANN001
    pr = sub.add_parser("predict", help="a finished classifier task's calibrated probabilities for new images",
                        description="Score image files, folders of them, or CSV files of paths (a path column) with the "
                        "model.pt of a finished fine-tune, supervised or linear-probe task, prepared and calibrated as its "
                        "test split was. Example: byol-runner predict 3f2a9c images/ --csv predictions.csv")
    pr.add_argument("task", metavar="TASK_ID", help="the classifier task (its id, or its first characters; `status` lists them)")
    pr.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders of them, or CSV files with a path column")
    pr.add_argument("--results", help=f"results dir (default: {DEFAULT_RESULTS}/)")
    pr.add_argument("--csv", metavar="OUT", help="also write one row per image (path, a probability per class, predicted, error)")
    pr.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="where to score (default: cpu)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_predict)


def _add_tui(sub) -> None:  # noqa: ANN001
    tu = sub.add_parser("tui", help="the terminal UI: start MANIFEST's run and show it, or attach to the latest run")
    tu.add_argument("manifest", type=Path, nargs="?", help="start this manifest's run and show it (absent: attach to the latest run)")
    tu.add_argument("--results", help=RESULTS_HELP)
    tu.add_argument("--run", help="attach to this run name (default: the latest run)")
    tu.set_defaults(func=cmd_tui)


def _add_schema(sub) -> None:  # noqa: ANN001
    sc = sub.add_parser("schema", help="the manifest's keys: its JSON schema, or the reference page (--format md)")
    sc.add_argument("--format", choices=("json", "md"), default="json",
                    help="json: the JSON Schema; md: the manifest reference (docs/manifest.md), every key with its type, "
                    "default and description")
    sc.set_defaults(func=cmd_schema)


def _add_data(sub) -> None:  # noqa: ANN001
    data = sub.add_parser("data", help="fetch the study's data sets; inspect the data sets of a manifest")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    a = data_sub.add_parser(
        "audit",
        help="counts per class and split, duplicates, label conflicts, leaks (exit 1 when defects are found)",
    )
    a.add_argument("manifest", type=Path, help="the YAML manifest whose data sets to audit")
    a.add_argument("--results", help=f"results dir, holds the image cache (default: the manifest's, or {DEFAULT_RESULTS}/)")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_data_audit)
    f = data_sub.add_parser(
        "fetch",
        help="download the study's published data sets through kagglehub and lay them out where experiments/matrix.yaml looks",
        description="Download chest_xray, head_ct and skin_isic (all by default) through kagglehub (its cache and Kaggle "
        "credentials), and link them into DIR/<name> (nothing copied), checked against the published counts. "
        "Example: byol-runner data fetch && byol-runner data audit experiments/matrix.yaml",
    )
    f.add_argument("names", nargs="*", metavar="NAME", help="chest_xray, head_ct, skin_isic (default: all three)")
    f.add_argument("--to", type=Path, help="where the data sets go (default: $BYOL_DATA, else data/)")
    f.set_defaults(func=cmd_data_fetch)


def _add_bench(sub) -> None:  # noqa: ANN001
    b = sub.add_parser("bench", help="images/s of the BYOL and supervised training steps and of the augmentation (JSON)")
    b.add_argument("--arch", default="resnet50", choices=ARCHS, help="the backbone")
    b.add_argument("--size", type=int, default=224, help="image side in pixels")
    b.add_argument("--batch", type=int, default=256, help="images per step")
    b.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on cuda, fp32 on cpu")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when there is a GPU")
    b.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    b.add_argument("--compile", action="store_true", help="torch.compile the networks")
    b.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels (1: grayscale scans)")
    b.add_argument("--parts", default="byol,supervised,augment", help="comma-separated subset of byol,supervised,augment")
    b.set_defaults(func=cmd_bench)


def _add_doctor(sub) -> None:  # noqa: ANN001
    d = sub.add_parser("doctor", help="check the Docker daemon, the image, the GPU runtime, Ray, Slurm and PyTorch; says how to fix each")
    d.add_argument("manifest", type=Path, nargs="?", help="take the image from this manifest's executor.image")
    d.add_argument("--image", help="the task image to check (default: BYOL_RUNNER_IMAGE, else the manifest's, else byol-runner:latest)")
    d.add_argument("--no-gpu", action="store_true", help="skip the GPU-runtime container")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)


def _add_worker(sub) -> None:  # noqa: ANN001
    from runner.worker.entry import add_arguments

    w = sub.add_parser("worker", help="internal: train one task from its task.json (what a container or Ray task runs)")
    add_arguments(w)
    w.set_defaults(func=cmd_worker)


def _nearly_full(path: Path) -> bool:
    import shutil

    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < 64 << 20
    except OSError:
        return False


def _forget_interrupt() -> None:
    """CPython ends the process by SIGINT, whatever its exit code, when a KeyboardInterrupt once left
    code run through PyRun_* (as a C extension does), even one caught further up, as here: a SIGTERM
    during the report then read as a death by SIGINT (exit -2, found by bench/damage.py). Running an
    empty statement that way resets that flag (_Py_UnhandledKeyboardInterrupt), so the exit is 130."""
    try:
        import ctypes

        ctypes.pythonapi.PyRun_SimpleString(b"pass")
    except (ImportError, OSError, AttributeError):  # no ctypes (a bare image): the exit reads as SIGINT's
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OSError as e:
        if e.filename is None:  # the free space of the results dir's disk, not of the working directory's
            e.filename = str(getattr(args, "results", None) or "results")
        line = os_error_line(e)
        if line is None or args.func is cmd_worker:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except UserError as e:
        lines = str(e).splitlines() or [type(e).__name__]
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        _forget_interrupt()
        return 130
    except Exception as e:  # runner.db could not be written: a full disk, a read-only one
        sqlite3 = sys.modules.get("sqlite3")  # (not imported here: a bare container image has no libsqlite3)
        if sqlite3 is None or not isinstance(e, sqlite3.OperationalError) or \
                not any(w in str(e) for w in ("full", "readonly", "disk I/O error")):
            raise
        db = Path(getattr(args, "results", None) or "results") / "runner.db"
        # SQLite says "disk I/O error" when a write fails for want of space (its journal, its WAL)
        full = "full" in str(e) or ("disk I/O error" in str(e) and _nearly_full(db))
        if "disk I/O error" in str(e) and not full:
            print(f"error: {db}: the disk failed a write (SQLite: {e}); check the disk, then run again", file=sys.stderr)
            return 2
        line = os_error_line(OSError(errno.ENOSPC if full else errno.EROFS, str(e), str(db)))
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
