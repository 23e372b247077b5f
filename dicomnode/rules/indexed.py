"""Series views over the index, for evaluating rules on received studies.

Attributes come from the header of one representative instance of each series
(the lowest InstanceNumber), read from the raw store; the derived fields come
from the index: ``NumImages`` is the number of frames (instances times their
NumberOfFrames), ``Orientation``, ``SliceSpacing`` and ``IsVolume`` are the
series' geometry verdict.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.store.tables import Instance, Series

from .series import DictSeries

__all__ = ["series_view", "study_series_views"]


def series_view(session: Session, series: Series, store_root: Path) -> DictSeries:
    """The :class:`SeriesView` of one indexed series."""
    instances = session.scalars(
        select(Instance).where(Instance.series_pk == series.id)
    ).all()
    frames = sum(i.number_of_frames or 1 for i in instances)
    attributes: dict[str, object] = {}
    if instances:
        first = min(instances, key=lambda i: (i.instance_number is None,
                                              i.instance_number or 0, i.id))
        ds = pydicom.dcmread(store_root / first.file_path, stop_before_pixels=True)
        attributes = dict(DictSeries.from_datasets([ds], key=series.series_instance_uid)
                          .attributes)
    return DictSeries(
        key=series.series_instance_uid,
        attributes=attributes,
        num_images=frames,
        orientation=series.orientation,
        slice_spacing=series.slice_spacing,
        is_volume=None if series.geometry_dirty else series.geometry_whole,
        series_number=series.series_number,
    )


def study_series_views(session: Session, study_pk: int, store_root: Path) -> list[DictSeries]:
    """Views of every series of a study."""
    series = session.scalars(select(Series).where(Series.study_pk == study_pk)
                             .order_by(Series.id)).all()
    return [series_view(session, s, store_root) for s in series]
