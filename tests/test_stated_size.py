"""What instances state about the size of their series (dicomnode.completion.stated_size), read
from real files by the header reader; and an index made before job versions is upgraded."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata

from dicomnode.completion import StatedSize, stated_size
from dicomnode.store.db import IndexSchemaError, open_index
from dicomnode.store.header import read_header
from dicomnode.store.tables import Instance, Job, Patient, Study

CT = "1.2.840.10008.5.1.4.1.1.2"


def _instance(hints: dict[str, Any] | None, *, frames: int = 1,
              sop_class: str = CT) -> Instance:
    return Instance(sop_class_uid=sop_class, rows=8, columns=8, number_of_frames=frames,
                    size_hints=hints)


def _series(n: int, **hints: Any) -> list[Instance]:
    return [_instance(dict(hints)) for _ in range(n)]


def test_images_in_acquisition_per_acquisition_number() -> None:
    assert stated_size(_series(10, images_in_acquisition=10)) == StatedSize(10, 10)
    assert stated_size(_series(9, images_in_acquisition=10)) == StatedSize(10, 9)
    assert not StatedSize(10, 9).complete and StatedSize(10, 10).complete
    two = (_series(4, acquisition=1, images_in_acquisition=4)
           + _series(3, acquisition=2, images_in_acquisition=5))
    assert stated_size(two) == StatedSize(9, 7)


@pytest.mark.parametrize("series", [
    _series(11, images_in_acquisition=10),  # more arrived than stated
    _series(3, images_in_acquisition=5) + _series(2, images_in_acquisition=4),  # disagree
    _series(3, images_in_acquisition=0),  # absurd
    _series(3, images_in_acquisition=5) + _series(1),  # one instance says nothing
    _series(4),  # nothing stated
    [],
])
def test_contradicting_or_missing_statements_count_as_not_stated(
        series: list[Instance]) -> None:
    assert stated_size(series) is None


def test_pet_slices_times_time_slices_and_temporal_positions() -> None:
    assert stated_size(_series(6, number_of_slices=3, number_of_time_slices=2)) == \
        StatedSize(6, 6)
    assert stated_size(_series(5, number_of_slices=3, number_of_time_slices=2)) == \
        StatedSize(6, 5)
    dynamic = [_instance({"temporal_positions": 3, "temporal_position": t})
               for t in (1, 1, 2, 2, 3)]
    assert stated_size(dynamic) == StatedSize(6, 5)  # position 3 lacks a slice
    assert stated_size(dynamic[:4]) == StatedSize(6, 4)  # position 3 not there yet


def test_multi_frame_images_and_concatenations() -> None:
    assert stated_size([_instance(None, frames=30)]) == StatedSize(1, 1)
    parts = [_instance({"concatenation_uid": "1.2.3", "concatenation_total": 3}, frames=10)
             for _ in range(2)]
    assert stated_size(parts) == StatedSize(3, 2)
    seg = _instance(None, frames=30, sop_class="1.2.840.10008.5.1.4.1.1.66.4")
    assert stated_size([seg]) is None  # a result, not an image to count


def test_the_header_reader_keeps_what_the_files_state(tmp_path: Path) -> None:
    files = testdata.synthetic_ct(tmp_path, slices=3, rows=16, columns=16)
    ds = pydicom.dcmread(files[0])
    ds.AcquisitionNumber = 7
    ds.ImagesInAcquisition = 3
    ds.NumberOfTemporalPositions = 2
    ds.TemporalPositionIdentifier = 1
    ds.save_as(files[0])
    assert read_header(files[0]).instance["size_hints"] == {
        "acquisition": 7, "images_in_acquisition": 3, "temporal_positions": 2,
        "temporal_position": 1}
    assert read_header(files[1]).instance["size_hints"] == {"acquisition": 1}


OLD_JOB_TABLE = """CREATE TABLE job (
    id INTEGER NOT NULL, rule_name VARCHAR(64) NOT NULL, model VARCHAR(64) NOT NULL,
    study_pk INTEGER NOT NULL, inputs_key VARCHAR(64) NOT NULL, bindings JSON NOT NULL,
    alternatives JSON, "trigger" VARCHAR(16) NOT NULL, state VARCHAR(16) NOT NULL,
    created_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME,
    attempts INTEGER NOT NULL, error TEXT, timings JSON, results JSON, PRIMARY KEY (id),
    FOREIGN KEY(study_pk) REFERENCES study (id));
CREATE UNIQUE INDEX ux_job_rule_inputs ON job (rule_name, inputs_key);
INSERT INTO job VALUES (1, 'r', 'm', 1, 'k', '[]', NULL, 'complete', 'DONE',
    '2026-01-01 00:00:00', NULL, NULL, 1, NULL, NULL, NULL);
"""


def test_an_index_made_before_job_versions_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript(OLD_JOB_TABLE)
    with pytest.raises(IndexSchemaError, match="dicomnode db upgrade"):
        open_index(f"sqlite:///{path}")  # older: refused unless told to upgrade
    index = open_index(f"sqlite:///{path}", upgrade=True)
    try:
        with index.session() as session:
            old = session.get(Job, 1)
            assert old is not None and old.version == 1 and old.content_key is None
            session.add(Patient(id=1))
            session.add(Study(id=1, study_instance_uid="1.2", patient_pk=1))
            # the old unique index (rule, inputs) is gone: a second version can be recorded
            session.add(Job(rule_name="r", model="m", study_pk=1, inputs_key="k",
                            bindings=[], trigger="complete", version=2))
            session.commit()
            assert session.query(Job).count() == 2
    finally:
        index.dispose()
    with sqlite3.connect(path) as connection:
        indexes = {row[1] for row in connection.execute("PRAGMA index_list('job')")}
    assert "ux_job_rule_inputs" not in indexes and "ux_job_rule_inputs_version" in indexes
