"""What the headless commands do, one function each (the CLI only parses and prints)."""

from __future__ import annotations

import sys

from pathlib import Path

from runner.data.cache import Progress, no_progress
from runner.errors import UserError
from runner.manifest import Manifest, load_manifest
from runner.plan import Plan, make_plan, plan_state


def results_dir(cli_value: str | None, manifest: Manifest | None = None) -> Path:
    """The results dir: --results, else the manifest's `results:`, else results/. Something there that is
    not a directory (a file, /dev/null, a FIFO) is refused in one line before anything reads or writes it."""
    from runner.errors import UserError

    path = Path(cli_value or (manifest.results if manifest else None) or "results")
    where = "--results" if cli_value else ("the manifest's results:" if manifest and manifest.results else "the results dir")
    if path.exists() and not path.is_dir():
        raise UserError(f"{where} {path}: not a directory; name a directory (it is created if it is not there)")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{where} {path}: {above} is not a directory, so nothing can be created under it")
    if str(path.resolve()).startswith(("/proc/", "/sys/", "/dev/")) or str(path.resolve()) in ("/proc", "/sys", "/dev"):
        raise UserError(f"{where} {path}: a system folder, not a place for results; name a directory of your own")
    return path


def load_plan(manifest_path: str | Path, results_cli: str | None, progress: Progress = no_progress) -> tuple[Manifest, Path, Plan]:
    manifest = load_manifest(manifest_path)
    results = results_dir(results_cli, manifest)
    return manifest, results, make_plan(manifest, results, progress)


def execute_plan(manifest_path: str | Path, manifest: Manifest, results: Path, plan: Plan, executor: str | None = None,
                 max_parallel: int | None = None, retry_failed: bool = False, display_factory=None,  # noqa: ANN001
                 retry_ids: tuple[str, ...] = (), rebuild_store: bool = False):
    from runner.executors.registry import make_executor, spec_for

    kind = executor or manifest.executor.kind
    try:
        spec, dropped = spec_for(manifest.executor, kind)
        if dropped:
            print(f"note: --executor {kind}: the manifest's {manifest.executor.kind} settings {', '.join(dropped)} do not "
                  f"apply to {kind} and are not used", file=sys.stderr)
        ex, slots = make_executor(kind, spec, max_parallel)
    except ValueError as e:
        raise UserError(str(e)) from None
    from runner.watch import RunnerLock

    lock = RunnerLock(results)
    lock.acquire()  # before anything is written: a refused second runner changes nothing
    try:
        if rebuild_store and (results / "runner.db").exists():
            from runner.store import Store

            aside = Store.move_aside(results / "runner.db")
            print(f"note: moved the damaged runner.db aside ({aside.name}); rebuilding it from the task folders",
                  file=sys.stderr)
        _note_threads(results, plan, ex)
        return _execute(manifest_path, manifest, results, plan, ex, slots, retry_failed, display_factory, retry_ids, lock)
    finally:
        lock.release()


def _note_threads(results: Path, plan: Plan, ex) -> None:  # noqa: ANN001 - an Executor
    """On the CPU the thread count a task trains with changes its numbers in their last digits, and from
    there its results, so a results dir keeps the count its finished tasks recorded: a resume with another
    --max-parallel gives each new task that count too (said in one line), rather than mixing two. When the
    finished tasks already recorded several counts, say so and keep this run's."""
    from runner.plan import is_done
    from runner.report import load_metrics

    threads = getattr(ex, "cpu_threads", None)
    if threads is None:
        return
    done = [t for t in plan.tasks if is_done(results, t.id)]
    if len(done) == len(plan.tasks):
        return
    recorded = {}
    for t in done:
        env = (load_metrics(results, t.id) or {}).get("environment") or {}
        if str(env.get("device", "")).startswith("CPU") and env.get("threads"):
            recorded[t.id] = int(env["threads"])
    counts = sorted(set(recorded.values()))
    if counts == [threads] or not counts:
        return
    if len(counts) == 1:
        ex.cpu_threads = counts[0]
        busy = "; with --max-parallel's tasks side by side that is more threads than cores, so slower" \
            if counts[0] > threads else ""
        print(f"note: each task trains with {counts[0]} CPU thread(s), the count this results dir's {len(recorded)} "
              f"finished task(s) trained with (cores / max_parallel would give {threads}): the thread count changes "
              f"results in their last digits, so a results dir keeps one{busy}", file=sys.stderr)
        return
    print(f"note: this results dir's finished tasks trained on the CPU with {', '.join(map(str, counts))} threads "
          f"({len(recorded)} tasks); this run gives each task {threads} (cores / max_parallel). The thread count "
          "changes results in their last digits; the report lists the counts", file=sys.stderr)


def _execute(manifest_path, manifest: Manifest, results: Path, plan: Plan, ex, slots, retry_failed: bool,  # noqa: ANN001
             display_factory, retry_ids: tuple[str, ...], lock):  # noqa: ANN001
    from runner import report as R
    from runner.pages import publish
    from runner.scheduler import Scheduler
    from runner.store import Store
    from runner.watch import ReportInterrupted, stops_as_interrupt

    store = Store(results / "runner.db")
    run_dir = results / manifest.name
    run_dir.mkdir(parents=True, exist_ok=True)
    text = manifest._text if manifest._text is not None else Path(manifest_path).read_text()  # the copy that was planned
    import json

    from runner.atomic import atomic_write_text

    atomic_write_text(run_dir / "manifest.yaml", text, fsync=False)  # renamed into place: whatever was there is replaced, never opened

    atomic_write_text(run_dir / "data.json", json.dumps(plan.data, indent=1), fsync=False)  # every image accounted for
    sched = Scheduler(plan, results, ex, slots, store, retries=manifest.executor.retries, retry_failed=retry_failed,
                      timeout_s=manifest.executor.timeout_s, retry_ids=retry_ids)
    try:
        if display_factory is not None:
            with display_factory(len(plan.tasks)) as display:
                sched.display = display
                outcome = sched.run(text, str(Path(manifest_path).resolve()), lock)
        else:
            outcome = sched.run(text, str(Path(manifest_path).resolve()), lock)
        try:
            with stops_as_interrupt():  # a stop now: said, not a silent death (the run is recorded already)
                if sched.late_stop:  # it came as the run ended, while the executor shut down
                    raise KeyboardInterrupt
                tasks = store.run_tasks(outcome.run_id)
                rep = R.build(results, manifest.name, tasks, R.arch_of(text), **R.judging_of(text))
                rep["meta"] = R.provenance(results, store.run(outcome.run_id), tasks, 1000, store.attempt_span([t.id for t in tasks]))
                publish(results, rep, tasks)
        except KeyboardInterrupt:
            raise ReportInterrupted(f"stopped while the report was written; the run and its tasks are recorded: "
                                    f"`byol-runner report --results {results}` writes it") from None
    finally:
        store.close()
    return outcome, rep


def report(results_cli: str | None, run_name: str | None = None, bootstrap: int = 1000,
           need_files: bool = False, page: bool = False) -> tuple[Path, dict, Path | None]:
    """The results dir, the report of its latest (or named) run, and the folder its files and figures
    were written to; None there when the results dir is read-only (a finished run on a shared or
    archived disk: the report is still made, to be printed; with `page`, its self-contained HTML page
    too, as report["html"]) unless `need_files`."""
    from runner import report as R
    from runner.errors import UNWRITABLE
    from runner.pages import html_page, publish

    results = results_dir(results_cli)
    rep, tasks = R.report_for(results, run_name, bootstrap=bootstrap)
    try:
        return results, rep, publish(results, rep, tasks)
    except OSError as e:
        if e.errno not in UNWRITABLE or need_files:
            raise
        rep["figures"] = []
        if page:
            rep["html"] = html_page(results, rep, tasks)
        return results, rep, None


def power_warnings(manifest: Manifest, results: Path) -> list[str]:
    """What the manifest's seeds can decide, said before anything runs: one seed decides nothing; with
    compare.margin, whether a difference of that size is detectable (80% power, at the family's
    strictest Holm level) on each data set and budget, and how many seeds would make it so. The
    seed-to-seed SD of the difference is an earlier run's where this results dir holds one (its
    per-seed differences and test-sample SE), else compare.expected_sd."""
    from runner import stats
    from runner.arms import role_candidates

    seeds = len(manifest.seeds)
    m1_methods = [m for m in manifest.methods if m in role_candidates("model1")] if manifest.compare.model1 is None else [manifest.compare.model1]
    if not m1_methods:
        return []
    if seeds < 2:
        return [f"{seeds} seed: no Model 1 − Model 2 comparison can be decided (training and label-draw variation are "
                "not measured); give 3 or more seeds (the default is 5)"]
    margin = manifest.compare.margin
    if margin is None:
        return []
    cells = [(d, b.name) for d, spec in manifest.datasets.items() if spec.external_test_of is None for b in manifest.labels.budgets()]
    measured = _measured_spread(results / manifest.name / "results.json", manifest.report.primary)
    metric = {"auroc": "AUROC", "auprc": "AUPRC"}.get(manifest.report.primary, manifest.report.primary.replace("_", " "))
    groups: dict[tuple, list[str]] = {}
    for ds, budget in cells:  # cells that would print the same line are said once
        sd, test_se = measured.get((ds, budget), (manifest.compare.expected_sd, 0.0))
        var = sd ** 2 / seeds + test_se ** 2
        df = var ** 2 / ((sd ** 2 / seeds) ** 2 / (seeds - 1)) if sd > 0 else float("inf")
        mdd = stats.detectable(var ** 0.5, df, stats.ALPHA / len(cells))
        if mdd is not None and mdd > margin:
            need = stats.seeds_needed(margin, sd, test_se, len(cells))
            source = "measured by the last run" if (ds, budget) in measured else f"assumed: compare.expected_sd {sd:g}"
            groups.setdefault((round(mdd, 3), need, round(sd, 3), source), []).append(f"{ds} {budget}")
    out = []
    for (mdd, need, sd, source), where in groups.items():
        fix = (f"{need} seeds would" if need else "no number of seeds would: the test split's own variation is too large "
               "(a larger test split would help)")
        what = "every comparison" if len(where) == len(cells) > 1 else ", ".join(where)
        out.append(f"{what}: with {seeds} seeds and {len(cells)} comparisons the smallest detectable Δ {metric} is about "
                   f"{mdd:.3f} (seed SD {sd:.3f}, {source}), more than the margin {margin:g}; {fix}")
    return out


def _measured_spread(results_json: Path, primary: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(dataset, budget) -> (SD of the per-seed differences, test-sample SE) from an earlier report."""
    import statistics

    from runner.atomic import read_json

    try:
        rep = read_json(results_json)
    except (OSError, ValueError):
        return {}
    out = {}
    for d in rep.get("differences", []) if isinstance(rep, dict) else []:
        est = d.get(primary) or {}
        per_seed = [v for v in est.get("per_seed") or [] if isinstance(v, (int, float))]
        if d.get("family", "internal") == "internal" and len(per_seed) >= 2:
            out[(d["dataset"], d["labels"])] = (statistics.stdev(per_seed), est.get("se_test") or 0.0)
    return out


def plan_view(manifest_path: str | Path, results_cli: str | None = None, progress: Progress = no_progress) -> dict:
    """The DAG: every task with its dependencies and state (done / pending), and the tasks of the
    previous run of this manifest that the current settings no longer produce (invalidated)."""
    from runner.store import Store

    manifest, results, plan = load_plan(manifest_path, results_cli, progress)
    state = plan_state(plan, results)
    tasks = [{"id": t.id, "kind": t.kind, "dataset": t.dataset, "method": t.method, "seed": t.seed, "budget": t.budget,
              "deps": t.deps, "state": "done" if state[t.id][0] == "done" else "pending"} for t in plan.tasks]
    invalidated = []
    db = results / "runner.db"
    if db.is_file():
        from runner.store import StoreDamaged

        try:
            store = Store(db, readonly=True)
        except StoreDamaged as e:  # the plan needs no history: it is shown without the invalidated tasks
            print(f"note: {e}", file=sys.stderr)
            return {"name": manifest.name, "results": str(results), "tasks": tasks, "invalidated": [],
                    "warnings": power_warnings(manifest, results), "cost": _data_cost(plan, results)}
        try:
            prev = store.latest_run(manifest.name)
            if prev is not None:
                current = {t.id for t in plan.tasks}
                invalidated = [{"id": r.id, "kind": r.kind, "dataset": r.dataset, "method": r.method, "seed": r.seed,
                                "budget": r.budget} for r in store.run_tasks(prev["id"]) if r.id not in current]
        finally:
            store.close()
    return {"name": manifest.name, "results": str(results), "tasks": tasks, "invalidated": invalidated,
            "warnings": power_warnings(manifest, results), "cost": _data_cost(plan, results)}


def _data_cost(plan, results: Path) -> dict:  # noqa: ANN001 - a Plan
    """What the plan's data take: images decoded, the cache's size, and what its disk has free."""
    import shutil

    cache = results / "cache"
    try:
        free = shutil.disk_usage(cache if cache.exists() else results).free
    except OSError:
        free = None
    return {"images": sum(a.get("found", 0) for a in plan.data.values()),
            "cache_mb": round(sum(a.get("cache_mb", 0.0) for a in plan.data.values()), 1),
            "cache": str(cache), "free_mb": None if free is None else round(free / 2**20, 1)}


def status(results_cli: str | None, run_name: str | None = None) -> dict:
    from runner.system import pid_alive
    from runner.store import open_latest_run

    results = results_dir(results_cli)
    with open_latest_run(results, run_name) as (store, run):
        tasks = store.run_tasks(run["id"])
    # a run marked running whose runner is gone was killed: say so
    state = "stopped" if run["status"] == "running" and not pid_alive(run["pid"]) else run["status"]
    from runner.report import foreign_metrics, weights_of

    not_own = set(foreign_metrics(results, tasks))
    return {
        "run": {"id": run["id"], "name": run["name"], "status": state, "started": run["started"], "ended": run["ended"],
                "pid": run["pid"], "executor": run["executor"]},
        "tasks": [{"id": t.id, "kind": t.kind, "dataset": t.dataset, "method": t.method, "seed": t.seed, "budget": t.budget,
                   "status": "damaged" if t.id in not_own else t.status, "epoch": t.epoch, "step": t.step, "total": t.total,
                   "loss": t.loss, "img_per_s": t.img_per_s, "attempts": t.attempts,
                   "error": NOT_OWN if t.id in not_own else t.error, "degenerate": _degenerate(results, t)} for t in tasks],
        "disk": task_disk(results, [t.id for t in tasks]) | {"weights": weights_of(run["manifest"])},
    }


NOT_OWN = ("its metrics.json is missing, unreadable or another task's: left out of the report; `byol-runner run` with the "
           "same manifest computes it again")


def task_disk(results: Path, ids: list[str]) -> dict:
    """What the run's task folders hold on disk: all of it, and the network files (checkpoint.pt,
    encoder.pt, model.pt) by name, with their count and size. Read with lstat: a link is not followed."""
    out = {"bytes": 0, "networks": {}}
    for tid in ids:
        folder = results / "tasks" / tid
        try:
            entries = list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
        except OSError:
            continue
        for f in entries:
            try:
                st = f.lstat()
            except OSError:
                continue
            out["bytes"] += st.st_size
            if f.name in ("checkpoint.pt", "encoder.pt", "model.pt"):
                n, b = out["networks"].get(f.name, (0, 0))
                out["networks"][f.name] = (n + 1, b + st.st_size)
    return out


def _degenerate(results: Path, t) -> list[str]:  # noqa: ANN001 - a TaskRow
    """Why a finished classifier is no result (empty when it is one, or is not a finished classifier)."""
    from runner.report import degenerate_reasons, load_metrics

    if t.status != "done" or t.budget is None:
        return []
    m = load_metrics(results, t.id)  # only its own
    return degenerate_reasons(m) if m else []


def request(results: Path, action: str, task: str) -> Path:
    """Ask the running scheduler to act on a task ("cancel" or "retry"): a file in <results>/control/."""
    from runner.contracts import ControlRequest

    return ControlRequest(action=action, task=task).send(results)


DOCKER_CHECKS = ("docker SDK", "Docker daemon", "image", "GPU runtime")


def doctor(manifest_path: Path | None, image: str | None, gpu: bool = True) -> tuple[str, list[dict]]:
    """The image `run --executor docker` would use, and every check of this machine (`runner.doctor`);
    with a manifest, what its executor does not use is a warning, not a failure."""
    from runner.doctor import as_dicts, run_checks
    from runner.executors.docker_spec import task_image
    from runner.executors.registry import EXECUTORS, executor_class, spec_for
    from runner.executors.specs import LocalSpec

    # as `run --executor docker` would: the manifest's image unless BYOL_RUNNER_IMAGE overrides it; --image over both
    given = load_manifest(manifest_path).executor if manifest_path is not None else None
    spec, _ = spec_for(given or LocalSpec(), "docker")
    asked_image = image is not None
    image = image or task_image(spec)
    checks = as_dicts(run_checks(image, gpu=gpu))
    # no manifest: what the default (local) executor needs, unless an image to check was named
    kind = given.kind if given is not None else ("docker" if asked_image else "local")
    for backend in EXECUTORS:  # each backend's own checks (the slurm executor's commands and partition)
        for name, status, detail, fix in executor_class(backend).checks(spec_for(given or LocalSpec(), backend)[0]):
            if status == "fail" and kind != backend:
                status, detail = "warn", detail + (f" (not needed: {manifest_path} runs on the {kind} executor)" if given is not None
                                                   else f" (needed only for --executor {backend})")
            checks.append({"name": name, "status": status, "detail": detail, "fix": fix})
    for c in checks:  # what the executor does not use cannot fail it
        if c["status"] == "fail" and (c["name"] in DOCKER_CHECKS and kind != "docker" or c["name"] == "Ray" and kind != "ray"):
            c["status"] = "warn"
            needed = "docker" if c["name"] in DOCKER_CHECKS else "ray"
            c["detail"] += (f" (not needed: {manifest_path} runs on the {kind} executor)" if given is not None else
                            f" (needed only for --executor {needed}; the local executor, the default, runs without it)")
    return image, checks
