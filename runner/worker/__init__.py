"""The worker side: everything that trains ONE task, and how a worker process starts.

- `run`: the worker proper (`main`: task.json in; events, artifacts and metrics.json out);
- `kinds`: what each kind of task does (pretrain, classifier, probe, score, evaluate);
- `entry`: the worker's command line (`byol-runner worker`, `python -m runner.worker`);
- `preload`: the fork server that has PyTorch loaded, the local executor's default start;
- `launch`: the one interface the executors use (start a worker for a task file, poll its exit);
  it imports none of the others.

This package's `__init__` imports nothing, so that reaching `launch` loads no training code.
"""
