"""Fault injection for the runner's tests, kept out of the product.

A Python process started with this folder on PYTHONPATH and BYOL_RUNNER_TEST_FAULT=<kind> makes the
worker fail every task of that kind, as a training error would (an exception: exit 1, an error
event, a traceback in the log). The local executor's workers inherit the environment; a container
gets it through the manifest's `executor.docker.env` (the host virtualenv mounts this checkout).
`slow-report` instead makes the runner's final report wait 60 s after writing `report-starts` in the
results dir: a moment a test can send a signal into. `finalizer-stop-report` and `finalizer-stop-loop`
make the runner send itself SIGTERM from inside a finalizer (`__del__`, where Python drops an
exception: garbage collection can run one at any moment), once the report begins or in the
scheduler's first round.
"""

import os

_KIND = os.environ.get("BYOL_RUNNER_TEST_FAULT")

if _KIND == "slow-report":
    import time
    from pathlib import Path

    import runner.pages as _pages

    _publish = _pages.publish

    def _slow(results, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        (Path(results) / "report-starts").write_text("")
        time.sleep(60)
        return _publish(results, *args, **kwargs)

    _pages.publish = _slow
elif _KIND in ("finalizer-stop-report", "finalizer-stop-loop"):
    import signal
    from pathlib import Path

    class _StopsInFinalizer:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):  # the handler runs at the next bytecode: here, inside __del__
                pass

    def _stop_in_finalizer() -> None:
        _StopsInFinalizer()  # dropped at once: its __del__ runs now

    if _KIND == "finalizer-stop-report":
        import runner.pages as _pages

        _publish = _pages.publish

        def _stopping(results, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            _stop_in_finalizer()
            return _publish(results, *args, **kwargs)

        _pages.publish = _stopping
    else:
        import runner.scheduler as _scheduler

        _reap = _scheduler.Scheduler._reap
        _done: list[bool] = []

        def _reap_once(self):  # noqa: ANN001, ANN202
            if not _done and self.running:
                _done.append(True)
                _stop_in_finalizer()
            return _reap(self)

        _scheduler.Scheduler._reap = _reap_once
elif _KIND:
    import runner.worker.run as _worker

    _real = _worker.run_task

    def _failing(task, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if task.kind == _KIND:
            raise RuntimeError(f"injected failure for kind {_KIND} (BYOL_RUNNER_TEST_FAULT)")
        return _real(task, *args, **kwargs)

    _worker.run_task = _failing
