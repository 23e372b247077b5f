"""Fault injection on the failure paths, in-process and deterministic, on real parts: a real
association into a real StorageSCP over a real SQLite index and real files, the node's real
worker pool (spawned processes), a real start of the node over a store a crash left behind.

Faults are injected at a dependency, never in the code under test: the index's commit raises,
a worker process is killed with SIGKILL, files are left on disk as a crash leaves them.
SIGTERM during a running job is in tests/test_pipeline.py (it needs `dicomnode serve`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faultjob
import pydicom
import pytest
import testdata
from conftest import NodeFactory, free_port, store_study_with_a_job, wait_until, write_model_card
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicomnode.completion import AssociationActivity
from dicomnode.config import NodeConfig, PeerConfig, load_config
from dicomnode.jobs import child
from dicomnode.net.access import AccessPolicy
from dicomnode.node import Node
from dicomnode.receive.ingest import STATUS_INDEX_UNAVAILABLE, InstanceStore, StoreFailure
from dicomnode.receive.scp import StorageSCP
from dicomnode.store.db import Index, open_index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.tables import Instance, Job, JobState, Series, Study

# -- an index write failing after the file is stored (0xA701 and its rollback) ------------


@pytest.fixture
def scp(tmp_path: Path, pynetdicom_globals: None) -> Iterator[StorageSCP]:
    """A listening StorageSCP over a real store and SQLite index (fsync on, as deployed)."""
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")
    store = InstanceStore(InstanceFiles(tmp_path / "store"), index, min_free_bytes=0)
    node = NodeConfig(ae_title="DICOMNODE", host="127.0.0.1", port=free_port(),
                      network_timeout_seconds=10)
    peers = {"testscu": PeerConfig(ae_title="TESTSCU", host="127.0.0.1")}
    server = StorageSCP(node, store, AccessPolicy(node.ae_title, peers), AssociationActivity())
    server.start()
    yield server
    server.stop(2)
    index.dispose()


def _send(port: int, paths: list[Path]) -> list[int]:
    """C-STORE each file over one association; the statuses answered."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 20  # a silent peer fails
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        statuses = []
        for path in paths:
            rsp = assoc.send_c_store(path)
            assert "Status" in rsp, "no C-STORE response"
            statuses.append(int(rsp.Status))
        return statuses
    finally:
        assoc.release()


def _fail_index_commit_after_file(monkeypatch: pytest.MonkeyPatch, files: InstanceFiles,
                                  times: int = 1) -> list[Path]:
    """Make the index commit that follows a file's move into the store raise
    (``times`` times, in the thread that moved it): the crash window of an ingest.
    Returns the files moved in while armed."""
    original = files.commit
    armed = threading.local()
    moved: list[Path] = []
    left = [times]

    def commit_file(tmp_file: Path, relative: Path, **options: Any) -> Path:
        dest = original(tmp_file, relative, **options)
        if left[0] > 0:
            left[0] -= 1
            armed.on = True
            moved.append(dest)
        return dest

    real_commit = Session.commit

    def commit_index(self: Session) -> None:
        if getattr(armed, "on", False):
            armed.on = False
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        real_commit(self)

    monkeypatch.setattr(files, "commit", commit_file)
    monkeypatch.setattr(Session, "commit", commit_index)
    return moved


def _rows(index: Index) -> tuple[int, int, int]:
    with index.session() as session:
        return tuple(session.scalar(select(func.count()).select_from(table)) or 0
                     for table in (Study, Series, Instance))  # type: ignore[return-value]


def test_a_synchronous_ingest_whose_index_write_fails_answers_a701_and_keeps_nothing(
        scp: StorageSCP, small_ct: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """``InstanceStore.ingest`` (STOW-RS, C-GET pulls, folder import, recovery) answers
    only after the row is committed: a failing commit is 0xA701 and its rollback."""
    store = scp.store
    files, index = store.files, store.index
    moved = _fail_index_commit_after_file(monkeypatch, files)
    staged = files.tmp / "one.dcm"
    shutil.copyfile(small_ct[0], staged)
    with pytest.raises(StoreFailure) as failure:
        store.ingest(staged, calling_ae_title="TESTSCU")
    assert failure.value.status == STATUS_INDEX_UNAVAILABLE
    assert len(moved) == 1  # the fault hit after the file was in its final place...
    assert not moved[0].exists()  # ...and the rollback removed it
    assert list(files.walk()) == []
    assert _rows(index) == (0, 0, 0)  # the study and series rows were rolled back too

    # the store keeps serving: the same instance again, and the next ones, are stored
    for path in small_ct[:3]:
        staged = files.tmp / path.name
        shutil.copyfile(path, staged)
        store.ingest(staged, calling_ae_title="TESTSCU")
    assert len(list(files.walk())) == 3
    assert _rows(index) == (1, 1, 3)


def _fail_index_commits(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the next ``times`` index commits raise, in whatever thread (the SCP's index
    writer commits in its own). Returns the count of commits that raised."""
    raised = [0]
    real_commit = Session.commit

    def commit_index(self: Session) -> None:
        if raised[0] < times:
            raised[0] += 1
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        real_commit(self)

    monkeypatch.setattr(Session, "commit", commit_index)
    return raised


def test_index_writes_failing_after_success_are_retried_and_every_instance_indexed(
        scp: StorageSCP, small_ct: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the SCP, Success follows the instance being durable; a failing index write is
    the writer's to retry (docs/architecture.md): every acknowledged instance gets its row,
    every file its row and no row is without a file."""
    files, index = scp.store.files, scp.store.index
    assert _send(scp.node.port, small_ct[:2]) == [0, 0]
    raised = _fail_index_commits(monkeypatch, times=2)
    statuses = _send(scp.node.port, small_ct[2:5])
    # acknowledged (durable) or, while the writer holds instances it could not index,
    # refused before anything is stored (0xA701): never a third answer
    assert set(statuses) <= {0, STATUS_INDEX_UNAVAILABLE} and statuses[0] == 0
    acknowledged = 2 + statuses.count(0)

    def rows_reach(count: int) -> None:
        deadline = time.monotonic() + 30
        while _rows(index)[2] < count:
            assert time.monotonic() < deadline, f"rows {_rows(index)} after the retries"
            time.sleep(0.1)

    rows_reach(acknowledged)
    assert raised[0] == 2, "the fault must have hit the writer"
    assert len(list(files.walk())) == acknowledged  # a refused instance left nothing
    refused = [p for p, st in zip(small_ct[2:5], statuses, strict=True) if st != 0]
    assert _send(scp.node.port, refused) == [0] * len(refused)  # re-sent once it recovered
    rows_reach(5)
    assert _rows(index) == (1, 1, 5)
    with index.session() as session:
        indexed = set(session.scalars(select(Instance.file_path)).all())
    assert indexed == {p.as_posix() for p in files.walk()}
    assert not any(files.tmp.iterdir())


def test_a_failed_index_write_for_a_replacement_keeps_the_version_acknowledged_before(
        scp: StorageSCP, small_ct: list[Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    files, index = scp.store.files, scp.store.index
    assert _send(scp.node.port, small_ct[:1]) == [0]
    (stored,) = [files.root / p for p in files.walk()]
    before = stored.read_bytes()
    corrected = pydicom.dcmread(small_ct[0])  # a corrected re-send: same SOP Instance UID
    corrected.SeriesDescription = "corrected"
    corrected_path = tmp_path / "corrected.dcm"
    corrected.save_as(corrected_path)

    moved = _fail_index_commit_after_file(monkeypatch, files)
    assert _send(scp.node.port, [corrected_path]) == [STATUS_INDEX_UNAVAILABLE]
    assert moved == [stored]  # the new version had replaced the stored one...
    assert stored.read_bytes() == before  # ...and the rollback put the acknowledged one back
    with index.session() as session:
        (row,) = session.scalars(select(Instance)).all()
    assert (row.times_received, row.file_size) == (1, len(before))
    assert not any(files.tmp.iterdir())

    assert _send(scp.node.port, [corrected_path]) == [0]  # re-sent later: replaced
    assert pydicom.dcmread(stored).SeriesDescription == "corrected"
    assert scp.counters["replaced"] == 1


# -- a worker process dying mid-job ---------------------------------------------------------

RULES = """rules:
  - name: ct-now
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
"""


@pytest.fixture
def job_node(node_factory: NodeFactory, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    """An in-process node (not started: no SCP, no scheduler) whose rule makes a job per CT
    study; its real JobRunner hands jobs to spawned workers that run :func:`faultjob.work`."""
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "main.yaml").write_text(RULES)
    write_model_card(tmp_path / "models" / "body", [("CT", "CT")])
    jobs = tmp_path / "faultjob"
    jobs.mkdir()
    monkeypatch.setenv("DICOMNODE_FAULTJOB_DIR", str(jobs))  # inherited by spawned workers
    monkeypatch.setattr(child, "work", faultjob.work)  # what the pool runs; picklable by name
    running = node_factory(start=False, rules_dir=str(folder),
                           models_dir=str(tmp_path / "models"),
                           pipeline={"workers": 1, "max_attempts": 2})
    node = Node(load_config(running.config_path))
    yield node
    node.jobs.stop()
    node.index.dispose()


def _study_with_a_job(node: Node, folder: Path) -> int:
    return store_study_with_a_job(node, folder)


def _job(node: Node, job_id: int) -> Job:
    with node.index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_until(predicate, timeout, what, interval=0.05)


def _kill_attempt(node: Node, job_id: int, attempt: int) -> int:
    """Wait for attempt ``attempt`` of job ``job_id`` to run in a worker and SIGKILL that
    worker process; returns its pid."""
    pid_file = Path(os.environ["DICOMNODE_FAULTJOB_DIR"]) / f"{job_id}.{attempt}.pid"
    _wait(pid_file.exists, 60, f"attempt {attempt} of job {job_id} in a worker")
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    assert _job(node, job_id).state is JobState.RUNNING
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_worker_process_killed_mid_job_counts_the_attempt_and_the_pool_is_rebuilt(
        job_node: Node, tmp_path: Path) -> None:
    node = job_node
    folder = Path(os.environ["DICOMNODE_FAULTJOB_DIR"])
    (folder / "block-1").touch()  # job 1 blocks in its worker, as a long model run does
    first = _study_with_a_job(node, tmp_path / "a")
    second = _study_with_a_job(node, tmp_path / "b")
    assert (first, second) == (1, 2)
    node.jobs.dispatch()  # one worker: job 1 runs, job 2 waits
    assert _job(node, second).state is JobState.PENDING

    killed = _kill_attempt(node, first, 1)
    # the attempt is counted and the job goes back to pending (1 of 2 attempts used)
    job = _wait(lambda: (j := _job(node, first)).state is not JobState.RUNNING and j, 30,
                "the dead worker's job to be recorded")
    assert (job.state, job.attempts) == (JobState.PENDING, 1)
    assert job.error is not None and "BrokenProcessPool" in job.error
    assert node.jobs.busy() == 0

    # the next dispatch builds a new pool; the oldest pending job runs again, in a new process
    assert node.jobs.dispatch() == [first]
    again = _kill_attempt(node, first, 2)
    assert again != killed
    job = _wait(lambda: (j := _job(node, first)).state is not JobState.RUNNING and j, 30,
                "the second dead worker's job to be recorded")
    assert (job.state, job.attempts) == (JobState.FAILED, 2)  # pipeline.max_attempts is 2

    # and the pool keeps working: the next job runs to done, once
    assert node.jobs.dispatch() == [second]
    job = _wait(lambda: (j := _job(node, second)).state is JobState.DONE and j, 60,
                "the next job done")
    assert job.attempts == 1 and job.error is None
    assert sorted(p.name for p in folder.glob("*.pid")) == ["1.1.pid", "1.2.pid", "2.1.pid"]


# -- orphans a crash left in the store, recovered at start ----------------------------------


def test_start_indexes_stored_files_without_rows_and_removes_partial_files(
        node_factory: NodeFactory, tmp_path: Path, pynetdicom_globals: None,
        caplog: pytest.LogCaptureFixture) -> None:
    running = node_factory(start=False, web={"enabled": False})
    config = load_config(running.config_path)
    sources = testdata.synthetic_ct(tmp_path / "ct", slices=5, rows=16, columns=16)
    node = Node(config)
    for path in sources[:3]:
        staged = node.files.tmp / path.name
        shutil.copyfile(path, staged)
        node.store.ingest(staged, calling_ae_title="TESTSCU")
    # what a crash leaves: (1) a stored file whose index commit never happened (the rename
    # into instances/ done, the commit not); (2) a file in instances/ that is not DICOM at
    # all; (3) partial temporary files of interrupted transfers and of a recovery
    orphan = pydicom.dcmread(sources[3], stop_before_pixels=True)
    orphan_path = node.files.relative_path(orphan.StudyInstanceUID, orphan.SeriesInstanceUID,
                                           orphan.SOPInstanceUID)
    staged = node.files.tmp / "orphan.dcm"
    shutil.copyfile(sources[3], staged)
    node.files.commit(staged, orphan_path)
    junk = node.files.instances / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"truncated")
    (node.files.tmp / "17.dcm").write_bytes(sources[4].read_bytes()[:1000])
    (node.files.tmp / "recover-1.2.3.dcm").write_bytes(b"partial")
    node.index.dispose()  # the crash: nothing else runs

    with caplog.at_level(logging.INFO):
        restarted = Node(config)
        restarted.start()
        try:
            with restarted.index.session() as session:
                rows = {i.file_path: i.calling_ae_title for i in session.scalars(select(Instance))}
                study = session.scalars(select(Study)).one()
                instances = session.scalar(select(func.count()).select_from(Instance))
            tmp_left = list(restarted.files.tmp.iterdir())  # before stop() cleans it too
        finally:
            restarted.stop()
    assert rows[orphan_path.as_posix()] == ""  # indexed, with no calling AE title known
    assert len(rows) == instances == 4
    assert study.study_instance_uid == orphan.StudyInstanceUID
    assert {p.as_posix() for p in restarted.files.walk()} == set(rows)  # junk moved aside
    assert not junk.exists()
    assert (config.storage.path / "unindexable" / junk.name).is_file()
    assert tmp_left == []
    messages = [r.getMessage() for r in caplog.records]
    assert "removed 2 partial file(s) left by an interrupted transfer" in messages
    assert "indexed 1 stored file(s) whose index row was lost in a crash" in messages
