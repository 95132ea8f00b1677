"""The TUI's refresh cost on a big run: 1,000 tasks (20 running) and 100,000 metric points.

    python bench/tui_refresh.py

Builds such a runner.db, then times what one refresh does: read the snapshot (worker thread), read
the selected task's curve, and apply it to the screen (the queue table updated in place, 20 rows
changed, the curve redrawn), in a headless Textual app of 200x60.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from runner.plan import PlannedTask
from runner.store import Store
from runner.tui.app import RunnerApp
from runner.tui.state import curve, read_snapshot


def build(results: Path, n_tasks: int = 1000, n_running: int = 20, n_points: int = 100_000) -> list[str]:
    store = Store(results / "runner.db")
    run = store.begin_run("big", "name: big\n", "big.yaml", 0, "local")
    tasks = [PlannedTask(f"t{i:015d}", "finetune", f"ds{i % 3}", "byol-finetune", i % 5, f"{(i % 4 + 1) * 10}%", [], {})
             for i in range(n_tasks)]
    store.add_tasks(run, tasks, set())
    per = n_points // n_tasks
    for i, t in enumerate(tasks):
        a = store.start_attempt(t.id, run, 1, "local", f"gpu{i % 8}", None, "host")
        store.add_points(t.id, a, [{"kind": "progress", "ts": float(k), "epoch": k // 10, "step": k, "loss": 2.0 / (k + 1)}
                                   for k in range(per)])
        if i >= n_running:
            store.end_attempt(a, "done", 0, None)
            store.set_status(t.id, "done" if i % 7 else "pending")
    store.commit()
    store.close()
    return [t.id for t in tasks[:n_running]]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        running = build(results)
        reads = []
        for _ in range(10):
            t0 = time.perf_counter()
            snap = read_snapshot(results)
            reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        series = curve(results, running[0])
        curve_ms = (time.perf_counter() - t0) * 1000
        app = RunnerApp(results, poll_s=3600)
        applies: list[float] = []

        async def go() -> None:
            async with app.run_test(size=(200, 60)) as pilot:
                await pilot.pause(1.0)
                app.selected = running[0]
                for k in range(10):
                    snap2 = read_snapshot(results)
                    for t in snap2.tasks[: len(running)]:  # the running rows change every refresh
                        t.step, t.loss = 1000 + k, 0.1 / (k + 1)
                    t0 = time.perf_counter()
                    app.apply(snap2, series, {})
                    await pilot.pause(0)
                    applies.append(time.perf_counter() - t0)

        asyncio.run(go())
    print(json.dumps({
        "bench": "tui_refresh", "tasks": len(snap.tasks), "running": len(running), "points": 100_000,
        "read_snapshot_ms_median": round(statistics.median(reads) * 1000, 1),
        "read_curve_ms": round(curve_ms, 1),
        "apply_to_screen_ms_median": round(statistics.median(applies) * 1000, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
