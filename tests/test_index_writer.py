"""The acknowledgement contract in the store itself: an instance is durable when
`InstanceStore.receive` returns, and its index row follows from the single background writer
(real files, real SQLite; a failing index is a real SQLite write lock held by another
connection)."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import event, func, select

from dicomnode.receive import indexer
from dicomnode.receive.ingest import InstanceStore, StoreFailure
from dicomnode.receive.recovery import recover_orphans
from dicomnode.store import files as files_module
from dicomnode.store.db import Index, open_index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.tables import Instance, Series, Study, StudyState

BUSY_MS = 100  # how long the writer waits for the index's write lock here


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InstanceStore]:
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")

    @event.listens_for(index.engine, "connect")
    def _short_busy_timeout(conn: sqlite3.Connection, record: object) -> None:
        conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")

    index.engine.dispose()
    store = InstanceStore(InstanceFiles(tmp_path / "store"), index, min_free_bytes=0)
    yield store
    store.writer.stop()
    index.engine.dispose()


def _staged(store: InstanceStore, path: Path) -> Path:
    staged = store.files.tmp / f"rx-{path.name}"
    shutil.copyfile(path, staged)
    return staged


def _rows(index: Index) -> int:
    with index.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_received_instance_is_durable_at_once_and_indexed_within_the_bound(
        store: InstanceStore, small_ct: list[Path]) -> None:
    outcomes = [store.receive(_staged(store, p), calling_ae_title="TESTSCU")
                for p in small_ct]
    assert outcomes == ["stored"] * len(small_ct)
    assert len(list(store.files.walk())) == len(small_ct)  # durable before any row
    started = time.monotonic()
    _wait(lambda: _rows(store.index) == len(small_ct), 2.0, "the rows")
    assert time.monotonic() - started < 0.5, "rows follow within about a batch"
    with store.index.session() as session:
        series = session.scalars(select(Series)).one()
        assert series.geometry_dirty and series.modality == "CT"
        study = session.scalars(select(Study)).one()
        assert study.last_received_at is not None


def test_a_re_send_while_in_flight_is_a_duplicate_not_a_second_row(
        store: InstanceStore, small_ct: list[Path]) -> None:
    first = store.receive(_staged(store, small_ct[0]), calling_ae_title="TESTSCU")
    again = store.receive(_staged(store, small_ct[0]), calling_ae_title="TESTSCU")
    assert (first, again) == ("stored", "duplicate")
    with store.index.session() as session:
        rows = session.scalars(select(Instance)).all()
        assert [r.times_received for r in rows] == [2]


def test_a_late_instance_re_opens_a_completed_study_through_the_cached_keys(
        store: InstanceStore, small_ct: list[Path]) -> None:
    for path in small_ct[:3]:
        store.receive(_staged(store, path), calling_ae_title="TESTSCU")
    assert store.writer.flush()
    with store.index.session() as session:
        study = session.scalars(select(Study)).one()
        study.state = StudyState.COMPLETE
        session.commit()
    store.receive(_staged(store, small_ct[3]), calling_ae_title="TESTSCU")
    assert store.writer.flush()
    with store.index.session() as session:
        study = session.scalars(select(Study)).one()
        assert study.state is StudyState.RECEIVING and study.reopened_count == 1


def test_a_failing_index_write_keeps_the_instances_and_refuses_new_ones_with_0xA701(
        store: InstanceStore, small_ct: list[Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexer, "RETRY_SECONDS", 0.1)
    lock = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the index's write lock: every write fails
    try:
        for path in small_ct[:3]:
            assert store.receive(_staged(store, path), calling_ae_title="TESTSCU") == "stored"
        assert len(list(store.files.walk())) == 3
        _wait(lambda: store.writer.failing, 5.0, "the first failed write")
        refused = _staged(store, small_ct[3])
        with pytest.raises(StoreFailure) as raised:
            store.receive(refused, calling_ae_title="TESTSCU")
        assert raised.value.status == 0xA701
        assert refused.exists() and len(list(store.files.walk())) == 3  # nothing stored
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert store.writer.flush()
    assert _rows(store.index) == 3, "the writer retried and wrote the acknowledged rows"
    assert not store.writer.failing
    assert store.receive(refused, calling_ae_title="TESTSCU") == "stored"


def test_an_instance_the_writer_gives_up_on_is_indexed_by_recovery_at_start(
        store: InstanceStore, small_ct: list[Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexer, "RETRY_SECONDS", 0.05)
    lock = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        for path in small_ct[:2]:
            store.receive(_staged(store, path), calling_ae_title="TESTSCU")
        _wait(lambda: store.writer.given_up == 2, 10.0, "the writer to give up")
        assert not store.writer.failing
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert _rows(store.index) == 0
    assert recover_orphans(store.files, store) == 2
    assert _rows(store.index) == 2
    with store.index.session() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
    assert uids == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in small_ct[:2]}


def test_the_file_system_type_is_read_from_the_longest_mount_point() -> None:
    mounts = ("/dev/vda / ext4 rw 0 0\n"
              "tmpfs /srv/dicom tmpfs rw 0 0\n"
              "/dev/vdb /srv/dicom/store\\040x xfs rw 0 0\n")
    assert files_module.mount_type(Path("/var/lib/x"), mounts) == "ext4"
    assert files_module.mount_type(Path("/srv/dicom/a"), mounts) == "tmpfs"
    assert files_module.mount_type(Path("/srv/dicom/store x/i"), mounts) == "xfs"
    assert not files_module.file_fsync_commits_rename(Path("/srv/dicom/a"), mounts)
    assert files_module.file_fsync_commits_rename(Path("/srv/dicom/store x"), mounts)


@pytest.mark.parametrize("commits_rename", [True, False])
def test_a_new_file_is_renamed_then_fsynced_and_its_folder_only_where_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, commits_rename: bool) -> None:
    synced: list[str] = []
    monkeypatch.setattr(files_module, "fsync_dir",
                        lambda path, missing_ok=False: synced.append(Path(path).name))
    files = InstanceFiles(tmp_path / "store")
    files.rename_durable_with_file = commits_rename
    for n, new in ((1, True), (2, False)):
        tmp = files.tmp / f"t{n}"
        tmp.write_bytes(b"x" * n)
        files.commit(tmp, Path("instances/1.2/3.4") / f"5.{n}.dcm", new=new)
    assert (files.root / "instances/1.2/3.4/5.1.dcm").read_bytes() == b"x"
    # a replacement (new=False) always fsyncs its folder; a new file only where the file
    # system does not commit the rename with the file's own fsync
    assert synced == ([] if commits_rename else ["3.4", "1.2", "instances"]) + ["3.4"]
