"""The raw store: instances on disk exactly as received.

Layout under ``storage.path``::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/                       (files being received; emptied at start and stop)
    tmp/<node id>/             (the same, of each node sharing the root, when node.id is set)

A file enters ``instances/`` by an atomic rename of a complete temporary file,
fsynced before the rename (or, for a new file, right after it: see
:meth:`InstanceFiles.commit`), followed by an fsync of the directory (not needed
after a new file's fsync on ext4, XFS and Btrfs); it is acknowledged only once
they returned, so a crash loses nothing
acknowledged, and leaves at most an incomplete, never acknowledged new file,
which recovery moves aside. This is the only place where file
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

__all__ = ["RENAME_DURABLE_WITH_FILE", "InstanceFiles", "file_fsync_commits_rename",
           "fsync_dir", "mount_type", "write_atomic", "write_temporary"]

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
        #: whether fsync of a file renamed just before also makes the rename (and the
        #: folders made before it) durable: see :func:`file_fsync_commits_rename`
        self.rename_durable_with_file = file_fsync_commits_rename(self.instances)

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

    def commit(self, tmp_file: Path, relative: Path, *, new: bool = False) -> Path:
        """Durably move a complete temporary file to its place in the store.

        The file is fsynced, renamed over any previous version atomically, and
        the directory entry is fsynced. Returns the absolute destination.

        With ``new`` (the caller has checked that nothing is stored at ``relative``) the
        file is renamed first and fsynced in its place, then its folder: on a journaling
        file system the rename, the file's blocks and its inode then go in one journal
        commit (the folder's fsync finds nothing left to write) instead of two. The file
        is durable once this returns, as in the other order (on ext4, XFS and Btrfs the
        file's fsync also commits its rename and new folders, so the folders are not
        fsynced again: see :func:`file_fsync_commits_rename`); a crash before that can
        leave an incomplete file at ``relative``, which was never acknowledged: recovery
        at start finds that it does not parse and moves it aside. Never used to replace
        a file (a crash could then lose the previous, acknowledged version).
        """
        dest = self.root / relative
        new_dirs = not dest.parent.is_dir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.fsync and not new:
            _fsync_file(tmp_file)
        os.replace(tmp_file, dest)
        if self.fsync:
            if new:
                _fsync_file(dest)
                if self.rename_durable_with_file:
                    return dest  # that fsync committed the rename and new folders too
            fsync_dir(dest.parent)
            if new_dirs:
                fsync_dir(dest.parent.parent)
                fsync_dir(dest.parent.parent.parent)
        return dest

    def keep(self, relative: Path) -> Path | None:
        """Keep the stored file at ``relative`` (if any) under a second name in ``tmp/`` (a
        hard link: no copy), so that :meth:`restore` can put it back after :meth:`commit`
        replaced it; returns that name, or None when nothing is stored there. The caller
        deletes the kept name when it is no longer needed."""
        dest = self.root / relative
        if not dest.is_file():
            return None
        kept = self.tmp / f"kept-{relative.name}"
        kept.unlink(missing_ok=True)
        os.link(dest, kept)
        return kept

    def restore(self, kept: Path, relative: Path) -> None:
        """Put a file kept by :meth:`keep` back at ``relative`` (atomically, made durable)."""
        dest = self.root / relative
        os.replace(kept, dest)
        if self.fsync:
            fsync_dir(dest.parent)

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


#: File systems on which fsync of a file commits every metadata change made before it
#: that touched the file, its rename included: ext4 (jbd2 commits its transactions in
#: order; the rename updates the renamed inode, so the file's fsync waits for the rename's
#: transaction), XFS (the log is forced up to the inode's last change, the rename's), Btrfs
#: (its fsync log records the inode's new name).
RENAME_DURABLE_WITH_FILE = frozenset({"ext4", "xfs", "btrfs"})


def mount_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding ``path`` (from ``/proc/self/mounts``, or
    ``mounts`` in that format); None when unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fields[2])
    return None if best is None else best[1]


def file_fsync_commits_rename(path: Path, mounts: str | None = None) -> bool:
    """Whether the file system holding ``path`` is one of
    :data:`RENAME_DURABLE_WITH_FILE` (elsewhere folders are fsynced after renames)."""
    return mount_type(path, mounts) in RENAME_DURABLE_WITH_FILE


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
