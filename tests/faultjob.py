"""A stand-in for :func:`dicomnode.jobs.child.work` that the fault-injection tests hand to the
node's real worker pool (spawned processes import it by name from ``tests/``).

It records each attempt as ``<folder>/<job id>.<attempt>.pid`` holding the worker's process
id (so a test can kill that process), then blocks while the file ``<folder>/block-<job id>``
exists, for :data:`BLOCK_SECONDS` at most (a job "running a model"; removing the file ends
it), then returns a successful outcome. ``<folder>`` is the environment variable
``DICOMNODE_FAULTJOB_DIR``, set before the pool spawns.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

BLOCK_SECONDS = 300.0


def work(job_id: int) -> dict[str, Any]:
    folder = Path(os.environ["DICOMNODE_FAULTJOB_DIR"])
    attempt = 1 + len(list(folder.glob(f"{job_id}.*.pid")))
    pid_file = folder / f"{job_id}.{attempt}.pid"
    staged = pid_file.with_suffix(".part")
    staged.write_text(str(os.getpid()))
    staged.replace(pid_file)  # whole or absent: the test reads it as soon as it appears
    deadline = time.monotonic() + BLOCK_SECONDS
    while (folder / f"block-{job_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"ok": True, "enqueued": 0, "timings": {"model": 0.0}, "results": []}
