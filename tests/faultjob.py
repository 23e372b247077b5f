"""A stand-in for :func:`dicomnode.jobs.child.work` that the fault-injection tests hand to the
node's real worker pool (spawned processes import it by name from ``tests/``).

It records each attempt as ``<folder>/<job id>.<attempt>.pid`` holding the worker's process
id (so a test can kill that process), then blocks for :data:`BLOCK_SECONDS` while the file
``<folder>/block-<job id>`` exists (a job "running a model"), else returns a successful outcome
at once. ``<folder>`` is the environment variable ``DICOMNODE_FAULTJOB_DIR``, set before the
pool spawns.
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
    if (folder / f"block-{job_id}").exists():
        time.sleep(BLOCK_SECONDS)
    return {"ok": True, "enqueued": 0, "timings": {"model": 0.0}, "results": []}
