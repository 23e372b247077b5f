"""The first code a spawned worker process runs: it ends the worker when the node is gone.

A worker is spawned (a fresh interpreter) and imports the pipeline's modules (ONNX
Runtime, highdicom...: about a second and 250 MB) before it runs anything of its own.
If the node is killed (``kill -9``) meanwhile, a watch started after those imports would
find the worker already adopted by another process and never notice. So the pool's
initializer lives in this module, which imports nothing heavy: it compares the parent
with the node's process id it was given, exits at once when they differ, starts the
watch, and only then imports the worker's modules.

``prctl(PR_SET_PDEATHSIG)`` is not used: on Linux it fires when the *thread* that
spawned the worker ends, and workers may be (re)spawned from short-lived threads.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

__all__ = ["init_worker", "watch_parent"]

#: How often a worker checks that the node is still its parent (seconds).
WATCH_SECONDS = 0.2


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def watch_parent(parent: int) -> None:
    """End this process now if ``parent`` is no longer its parent, and as soon as it
    stops being so (checked every :data:`WATCH_SECONDS` in a daemon thread).

    An orphan must not run on: it would finish its job alongside the re-run that the
    restarted node starts, and hold its memory for nothing.
    """
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()


def init_worker(parent: int, config_data: dict[str, Any]) -> None:
    """The worker pool's initializer: watch the node (process id ``parent``), then load
    the worker (:func:`dicomnode.jobs.child.init_worker_process`)."""
    watch_parent(parent)
    from dicomnode.jobs.child import init_worker_process

    init_worker_process(config_data)
