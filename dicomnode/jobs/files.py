"""Where a job's files are: its working folder and the console's picture of its result."""

from __future__ import annotations

from pathlib import Path

from dicomnode.config import Config

__all__ = ["job_dir", "job_overlay"]


def job_dir(config: Config, job_id: int) -> Path:
    """The working folder of a job (no identity in its name)."""
    return config.storage.path / "jobs" / str(job_id)


def job_overlay(config: Config, job_id: int) -> Path:
    """The console's picture of a job's result."""
    return job_dir(config, job_id) / "overlay.png"
