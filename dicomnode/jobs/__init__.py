"""Jobs: the queue in the index (claims, outcomes), the runner in the node's process (worker
pool), and the execution in the worker process (:mod:`dicomnode.jobs.child`, the only part
that imports ``inference/`` and ``outputs/``)."""
