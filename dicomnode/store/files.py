"""The raw store: instances on disk exactly as received.

Layout under ``storage.path``::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/                       (files being received; emptied at start and stop)
    tmp/<node id>/             (the same, of each node sharing the root, when node.id is set)

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["InstanceFiles", "fsync_dir", "write_atomic", "write_temporary"]

LOG = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InstanceFiles:
    """Owns the on-disk layout of the raw store."""

    def __init__(self, root: Path, *, fsync: bool = True, node_id: str | None = None) -> None:
        """``node_id``: this node's own temporary folder ``tmp/<node_id>`` (several nodes
        mount one storage root: a node starting empties only its own)."""
        if node_id is not None and (not node_id or "/" in node_id or node_id.startswith(".")):
            raise ValueError(f"node id {node_id!r} cannot name a folder")
        self.root = root
        self.instances = root / "instances"
        self.tmp = root / "tmp" if node_id is None else root / "tmp" / node_id
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
            fsync_dir(dest.parent)
            if new_dirs:
                fsync_dir(dest.parent.parent)
                fsync_dir(dest.parent.parent.parent)
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


def fsync_dir(path: Path, *, missing_ok: bool = False) -> None:
    """Make the entries of folder ``path`` (new, renamed or removed files) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temporary(path: Path, write: Callable[[BinaryIO], object], *,
                    fsync: bool = True) -> Path:
    """Write a file with ``write(fp)`` under a hidden temporary name beside ``path``
    (folders created), fsynced unless ``fsync`` is false; returns the temporary name,
    for the caller to rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fp:
        write(fp)
        if fsync:
            fp.flush()
            os.fsync(fp.fileno())
    return tmp


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *,
                 fsync: bool = True) -> Path:
    """Write ``path`` with ``write(fp)`` so that it is either whole or absent: a temporary
    file (see :func:`write_temporary`) renamed over it. Returns ``path``."""
    os.replace(write_temporary(path, write, fsync=fsync), path)
    return path
