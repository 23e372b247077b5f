"""The raw store: instances on disk exactly as received.

Layout under ``storage.path``::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/                       (files being received; emptied at start and stop)

A file enters ``instances/`` only by an atomic rename of a complete, fsynced
temporary file, followed by an fsync of the directory, so a crash leaves
either the whole file or nothing there. This is the only place where file
names carry DICOM identifiers (UIDs, never names or patient IDs).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["InstanceFiles"]

LOG = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InstanceFiles:
    """Owns the on-disk layout of the raw store."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.instances = root / "instances"
        self.tmp = root / "tmp"
        self.fsync = fsync
        self.instances.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        """Free bytes on the file system holding the store."""
        return shutil.disk_usage(self.root).free

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives, relative to the store root.

        Raises:
            ValueError: a UID is not a valid DICOM UID (digits and dots), so it
                cannot be used safely as a file name.
        """
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_uid)):
            if len(uid) > 64 or not _UID.match(uid):
                raise ValueError(f"{name} is not a valid UID (digits and dots, at most 64)")
        return Path("instances") / study_uid / series_uid / f"{sop_uid}.dcm"

    def commit(self, tmp_file: Path, relative: Path) -> Path:
        """Durably move a complete temporary file to its place in the store.

        The file is fsynced, renamed over any previous version atomically, and
        the directory entry is fsynced. Returns the absolute destination.
        """
        dest = self.root / relative
        new_dirs = not dest.parent.is_dir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            fd = os.open(tmp_file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp_file, dest)
        if self.fsync:
            _fsync_dir(dest.parent)
            if new_dirs:
                _fsync_dir(dest.parent.parent)
                _fsync_dir(dest.parent.parent.parent)
        return dest

    def remove(self, relative: Path) -> None:
        """Delete a stored instance (used when its index row could not be written)."""
        try:
            (self.root / relative).unlink()
        except FileNotFoundError:
            pass

    def clean_tmp(self) -> int:
        """Delete every leftover temporary file; returns how many were removed."""
        count = 0
        for entry in self.tmp.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                count += 1
        return count

    def walk(self) -> Iterator[Path]:
        """Every stored instance file, relative to the store root."""
        for path in self.instances.rglob("*.dcm"):
            yield path.relative_to(self.root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
