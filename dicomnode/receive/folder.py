"""A folder of DICOM files received as if sent: ``dicomnode rules test`` on files."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from dicomnode.completion import AssociationActivity, CompletionMonitor
from dicomnode.receive.ingest import InstanceStore, StoreFailure
from dicomnode.store.db import Index, open_index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.tables import Study

__all__ = ["index_folder"]


def index_folder(folder: Path, work: Path) -> tuple[Index, list[int]]:
    """Index a folder of DICOM files into a scratch store, as if received; returns the studies.

    Files that are not DICOM or lack UIDs are skipped. Geometry verdicts are
    computed exactly as for received series.
    """
    files = InstanceFiles(work, fsync=False)
    index = open_index(f"sqlite:///{(work / 'index.sqlite').as_posix()}")
    store = InstanceStore(files, index, min_free_bytes=0)
    for number, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        staged = files.tmp / f"{number}.dcm"
        shutil.copyfile(path, staged)
        try:
            store.ingest(staged, calling_ae_title="")
        except StoreFailure:
            staged.unlink(missing_ok=True)
    CompletionMonitor(index, AssociationActivity(), quiet_seconds=0,
                      series_quiet_seconds=0).update_geometry()
    with index.session() as session:
        studies = list(session.scalars(select(Study.id).order_by(Study.id)).all())
    return index, studies
