"""The runner's own cost per task: 200 tasks whose worker returns at once (the test-only `noop` kind).

    python bench/scheduler_overhead.py [--tasks 200] [--parallel 2]

Times the plan (ids, task files), and the scheduler's loop (store writes, launches, event ingestion,
reaping) for tasks that do nothing, and reports per task: the runner's CPU time (its own work, not
the workers'), and the wall time (which includes starting a Python process per worker).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from runner.executors.registry import make_executor
from runner.executors.specs import LocalSpec
from runner.plan import Plan, PlannedTask, task_id
from runner.scheduler import Scheduler
from runner.store import Store


def noop_plan(n: int) -> Plan:
    data = {"source": "synthetic", "per_class": 4}
    tasks = []
    for i in range(n):
        tid = task_id({"bench": i, "time": time.time()})
        spec = {"id": tid, "kind": "noop", "dataset": "bench", "data": data, "seed": i, "settings": {}}
        tasks.append(PlannedTask(tid, "noop", "bench", "noop", i, None, [], spec))
    return Plan("bench", tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        t0, c0 = time.perf_counter(), time.process_time()
        plan = noop_plan(args.tasks)
        executor, slots = make_executor("local", LocalSpec(), args.parallel)
        store = Store(results / "runner.db")
        sched = Scheduler(plan, results, executor, slots, store, poll_s=0.01)
        plan_s = time.perf_counter() - t0
        outcome = sched.run("name: bench\n", "bench")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        store.close()
    assert outcome.counts == {"done": args.tasks}, outcome.counts
    print(json.dumps({
        "bench": "scheduler_overhead", "tasks": args.tasks, "parallel": args.parallel,
        "plan_ms_per_task": round(plan_s * 1000 / args.tasks, 3),
        "runner_cpu_ms_per_task": round(cpu * 1000 / args.tasks, 2),
        "wall_ms_per_task": round(wall * 1000 / args.tasks, 1),
        "wall_s": round(wall, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
