"""`python -m runner.worker TASK_JSON`: a fresh worker process (the local executor's start without its preloader)."""

import sys

from runner.worker.entry import main

sys.exit(main())
