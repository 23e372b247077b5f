"""Start-up recovery: index stored files whose index row was never committed.

Success is answered once an instance's file and folder entry are durable; its index row
follows from the background index writer (:mod:`dicomnode.receive.indexer`). A crash
(or kill -9, or power loss) between the two, or an index write the writer gave up on,
leaves a whole, acknowledged file without a row: it is indexed here, at every start,
so nothing acknowledged is lost. A new file is renamed into ``instances/`` just before
its fsync (see :meth:`dicomnode.store.files.InstanceFiles.commit`), so a crash can also
leave an incomplete file there that was never acknowledged: it does not parse, and is
moved aside to ``unindexable/``. The scan compares the store's file list with the index.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import select

from dicomnode.receive.ingest import InstanceStore, StoreFailure
from dicomnode.store.files import InstanceFiles
from dicomnode.store.tables import Instance

__all__ = ["recover_orphans"]

LOG = logging.getLogger(__name__)


def recover_orphans(files: InstanceFiles, store: InstanceStore) -> int:
    """Index every stored file the index does not know; returns how many were recovered."""
    with store.index.session() as session:
        known = set(session.scalars(select(Instance.file_path)).all())
    recovered = 0
    for relative in files.walk():
        if relative.as_posix() in known:
            continue
        staged = files.tmp / f"recover-{relative.name}"
        shutil.copyfile(files.root / relative, staged)
        try:
            store.ingest(staged, calling_ae_title="")
            recovered += 1
        except StoreFailure as exc:
            LOG.warning("stored file could not be indexed (%s); moved aside", exc)
            aside = files.root / "unindexable" / relative.name
            aside.parent.mkdir(parents=True, exist_ok=True)
            (files.root / relative).replace(aside)
        finally:
            Path(staged).unlink(missing_ok=True)
    return recovered
