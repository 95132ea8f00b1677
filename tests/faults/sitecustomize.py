"""Fault injection for the runner's tests, kept out of the product.

A Python process started with this folder on PYTHONPATH and BYOL_RUNNER_TEST_FAULT=<kind> makes the
worker fail every task of that kind, as a training error would (an exception: exit 1, an error
event, a traceback in the log). The local executor's workers inherit the environment; a container
gets it through the manifest's `executor.docker.env` (the host virtualenv mounts this checkout).
"""

import os

_KIND = os.environ.get("BYOL_RUNNER_TEST_FAULT")

if _KIND:
    import runner.worker.run as _worker

    _real = _worker.run_task

    def _failing(task, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if task.kind == _KIND:
            raise RuntimeError(f"injected failure for kind {_KIND} (BYOL_RUNNER_TEST_FAULT)")
        return _real(task, *args, **kwargs)

    _worker.run_task = _failing
