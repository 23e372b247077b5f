"""Temporary files of datasets being received, kept within the disk reserve.

pynetdicom (``STORE_RECV_CHUNKED_DATASET``) writes each received C-STORE dataset,
fragment by fragment, to a file it opens with ``tempfile.NamedTemporaryFile``.
:class:`ReceiveFiles` replaces that factory (:meth:`ReceiveFiles.install`) with one
that creates :class:`ReceiveFile` objects in the store's ``tmp/`` folder, which
check the free space of that file system before every write:

* when a write would leave less than ``min_free_bytes`` free (or there is already
  less before the first byte), the file is closed and deleted at once, the rest of
  the dataset is read from the network and discarded, and the C-STORE handler
  answers ``0xA700`` (out of resources) once the request is complete: pynetdicom
  can only answer a C-STORE after its last fragment;
* when the association ends before a dataset is complete (A-ABORT, a closed
  connection, a network timeout), its temporary file is deleted at once
  (:meth:`ReceiveFiles.discard_unclaimed`).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages

__all__ = ["ReceiveFile", "ReceiveFiles"]

LOG = logging.getLogger(__name__)


class ReceiveFile:
    """One dataset being received: a file-like object standing in for pynetdicom's
    ``NamedTemporaryFile`` (``write``, ``file.flush``, ``close``, ``name``)."""

    def __init__(self, owner: ReceiveFiles) -> None:
        self._owner = owner
        fd, name = owner.create()
        self._fp = os.fdopen(fd, "wb")
        self.name = name
        self.file = self  # pynetdicom flushes ``file``
        self.thread = threading.current_thread()  # the association's DUL thread
        self.refused: str | None = None
        self.claimed = False
        self.written = 0
        if owner.free_bytes() < owner.min_free_bytes:
            self._refuse("less free disk than storage.min_free_bytes before the transfer")

    def write(self, data: bytes) -> int:
        if self.refused is not None:
            return len(data)  # read from the network, not kept
        if self._owner.free_bytes() - len(data) < self._owner.min_free_bytes:
            self._refuse("the transfer would cross storage.min_free_bytes")
            return len(data)
        written = self._fp.write(data)
        self.written += written
        return written

    def flush(self) -> None:
        if self.refused is None and not self._fp.closed:
            self._fp.flush()

    def close(self) -> None:
        if not self._fp.closed:
            self._fp.close()
        self._owner._forget(self)

    def discard(self) -> None:
        """Close and delete the file."""
        try:
            self._fp.close()
        except OSError:
            pass
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOG.warning("could not remove a temporary file: %s", type(exc).__name__)
        self._owner._forget(self)

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self.discard()
        self._owner._keep(self)  # until the handler claims the refusal


class ReceiveFiles:
    """The temporary files of the datasets being received (thread-safe).

    Args:
        folder: where temporary files are created (the store's ``tmp/``).
        min_free_bytes: the disk reserve on ``folder``'s file system.
    """

    def __init__(self, folder: Path, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")
        self.folder = folder
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._open: dict[str, ReceiveFile] = {}
        self._serial = itertools.count(1)  # next() is atomic under the GIL

    def create(self) -> tuple[int, str]:
        """A new, empty temporary file in :attr:`folder`, opened for writing: its
        descriptor and path. Names are this process's id and a counter (created with
        ``O_EXCL``: a name left by an earlier process with the same id is skipped), which
        is cheaper than :func:`tempfile.mkstemp`'s random names (about 0.1 ms each)."""
        prefix = f"rx-{os.getpid()}-"
        while True:
            name = os.path.join(self.folder, f"{prefix}{next(self._serial)}.dcm")
            try:
                return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), name
            except FileExistsError:
                continue

    def free_bytes(self) -> int:
        """Free bytes on the file system holding :attr:`folder`."""
        return shutil.disk_usage(self.folder).free

    def install(self) -> None:
        """Make pynetdicom create its received-dataset files through this object."""
        setattr(dimse_messages, "NamedTemporaryFile", self._factory)  # noqa: B010

    def _factory(self, *args: Any, **kwargs: Any) -> ReceiveFile:
        received = ReceiveFile(self)
        self._keep(received)
        return received

    def _keep(self, received: ReceiveFile) -> None:
        with self._lock:
            self._open[received.name] = received

    def _forget(self, received: ReceiveFile) -> None:
        if received.refused is not None and not received.claimed:
            return
        with self._lock:
            self._open.pop(received.name, None)

    def claim(self, path: Path | str) -> ReceiveFile | None:
        """The handler takes over the file of a complete dataset: it is no longer deleted
        when its association ends. Returns it (``refused`` says whether it was refused)."""
        with self._lock:
            received = self._open.pop(str(path), None)
        if received is not None:
            received.claimed = True
        return received

    def discard_unclaimed(self, thread: threading.Thread | None) -> int:
        """Delete the files of unfinished transfers received by ``thread`` (an
        association's DUL thread); returns how many were deleted."""
        with self._lock:
            mine = [r for r in self._open.values() if r.thread is thread]
            for received in mine:
                del self._open[received.name]
        for received in mine:
            received.claimed = True
            received.discard()
        return len(mine)

    def pending(self) -> int:
        """How many transfers are in progress (or refused and not yet answered)."""
        with self._lock:
            return len(self._open)
