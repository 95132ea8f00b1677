"""The worker's command line, `TASK_JSON [--results DIR] [--data-root DIR]`: shared by `byol-runner
worker` (what a container or a Ray task runs), `python -m runner.worker` (a fresh local worker) and
the preloader's forked workers, so that all three read the same arguments."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_json", help="tasks/<id>/task.json, as the plan wrote it")
    p.add_argument("--results", help="results dir (default: the task folder's grandparent)")
    p.add_argument("--data-root", help="where this task's dataset is mounted, when not at the root in task.json")


def main(argv: list[str] | None = None) -> int:
    """Parse the worker's arguments and run its task; the worker's exit code."""
    from runner.worker.run import main as run_worker

    p = argparse.ArgumentParser(prog="python -m runner.worker", description="Train one task from its task.json.")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_worker(args.task_json, args.results, args.data_root)
