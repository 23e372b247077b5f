"""Several nodes on one index, at the level of the queues, on SQLite and on a real
PostgreSQL: no job or outbox item is claimed twice by competing threads and processes,
claims carry an owner and a lease, recovery takes only lapsed leases (never a live peer's
work), only the owner records an outcome, the node table, outbox paths relative to the
storage root, and two nodes ingesting the same instance at once."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from dicomnode.jobs.queue import claim, claim_next, finish, recover, renew, requeue
from dicomnode.receive.ingest import InstanceStore
from dicomnode.send.outbox import Outbox, relative_outbox_paths
from dicomnode.states import IngestOutcome, JobState, JobTrigger, NodeRole, OutboxState
from dicomnode.store.db import Index, open_index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.leases import beat_node, nodes_report, register_node, stop_node
from dicomnode.store.tables import Instance, Job, OutboxItem, Patient, Study, utcnow

DONE = {"ok": True, "timings": {}, "results": []}
FAILED = {"ok": False, "error": "boom", "permanent": False}


def _jobs(index: Index, count: int) -> list[int]:
    with index.session() as session:
        study = Study(study_instance_uid="1.2.3", patient=Patient(patient_id="P"))
        jobs = [Job(rule_name="rule", model="model", study=study, inputs_key=f"k{i}",
                    bindings=[], trigger=JobTrigger.COMPLETE) for i in range(count)]
        session.add_all(jobs)
        session.commit()
        return [job.id for job in jobs]


def _job(index: Index, job_id: int) -> Job:
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _claim_all(url: str, owner: str, out: Any) -> None:
    """A competing process: claims jobs two at a time until none is left."""
    index = open_index(url)
    try:
        while ids := claim_next(index, 2, owner=owner, lease_seconds=60):
            out.extend(ids)
    finally:
        index.dispose()


def test_competing_threads_never_claim_a_job_twice(index: Index) -> None:
    ids = _jobs(index, 60)
    claimed: dict[str, list[int]] = {f"node{i}": [] for i in range(6)}
    start = threading.Barrier(len(claimed))

    def work(owner: str) -> None:
        start.wait()
        while got := claim_next(index, 3, owner=owner, lease_seconds=60):
            claimed[owner].extend(got)

    threads = [threading.Thread(target=work, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = Counter(i for got in claimed.values() for i in got)
    assert sorted(every) == ids and set(every.values()) == {1}
    for owner, got in claimed.items():
        for job_id in got:
            job = _job(index, job_id)
            assert job.state is JobState.RUNNING and job.owner == owner and job.attempts == 1
            assert job.lease_expires_at is not None and job.lease_expires_at > utcnow()


@pytest.mark.slow
def test_competing_processes_never_claim_a_job_twice(index: Index, index_url: str) -> None:
    ids = _jobs(index, 40)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        out = manager.list()
        processes = [context.Process(target=_claim_all, args=(index_url, f"p{i}", out))
                     for i in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(120)
            assert process.exitcode == 0
        claimed = list(out)
    assert sorted(claimed) == ids  # each exactly once


def test_recovery_takes_lapsed_leases_only_never_a_live_peers(index: Index) -> None:
    live, dead, mine = _jobs(index, 3)
    assert claim(index, live, owner="peer", lease_seconds=60)
    assert claim(index, dead, owner="gone", lease_seconds=60)
    assert claim(index, mine, owner="me", lease_seconds=600)
    assert recover(index) == 0  # every lease holds: nothing is taken
    assert recover(index, now=utcnow() + dt.timedelta(seconds=30)) == 0
    # "gone" stopped renewing; "peer" renews
    assert renew(index, [live], owner="peer", lease_seconds=120) == []
    assert recover(index, now=utcnow() + dt.timedelta(seconds=90)) == 1
    assert _job(index, dead).state is JobState.PENDING and _job(index, dead).owner is None
    assert _job(index, live).state is JobState.RUNNING
    # a node starting again under its id takes back its own, and only its own, at once
    assert recover(index, owner="me") == 1
    assert _job(index, mine).state is JobState.PENDING
    assert _job(index, live).owner == "peer"


def test_only_the_owner_records_an_outcome(index: Index) -> None:
    (job_id,) = _jobs(index, 1)
    assert claim(index, job_id, owner="slow", lease_seconds=60)
    assert recover(index, now=utcnow() + dt.timedelta(seconds=61)) == 1  # its lease lapsed
    assert claim_next(index, 5, owner="fast", lease_seconds=60) == [job_id]
    assert renew(index, [job_id], owner="slow", lease_seconds=60) == [job_id]  # lost it
    assert finish(index, job_id, FAILED, 3, owner="slow") is JobState.RUNNING
    job = _job(index, job_id)
    assert job.owner == "fast" and job.error is None and job.attempts == 2
    assert finish(index, job_id, DONE, 3, owner="fast") is JobState.DONE
    job = _job(index, job_id)
    assert job.state is JobState.DONE and job.owner is None and job.lease_expires_at is None
    requeue(index, [job_id], owner="fast")  # done: untouched
    assert _job(index, job_id).state is JobState.DONE


def test_the_node_table_lists_nodes_with_role_and_heartbeat(index: Index) -> None:
    register_node(index, "rx-1", NodeRole.SERVE)
    register_node(index, "gpu-1", NodeRole.WORKER)
    beat_node(index, "gpu-1")
    stop_node(index, "rx-1")
    later = utcnow() + dt.timedelta(seconds=120)
    report = nodes_report(index, lease_seconds=60)
    nodes = {n["id"]: n for n in report["nodes"]}
    assert nodes["gpu-1"]["role"] == "worker" and nodes["gpu-1"]["alive"]
    assert nodes["rx-1"]["role"] == "serve" and not nodes["rx-1"]["alive"]
    assert nodes["rx-1"]["stopped_at"]
    assert not nodes_report(index, lease_seconds=60, now=later)["nodes"][0]["alive"]
    register_node(index, "rx-1", NodeRole.SERVE)  # started again: one row, alive
    nodes = {n["id"]: n for n in nodes_report(index, lease_seconds=60)["nodes"]}
    assert len(nodes) == 2 and nodes["rx-1"]["alive"] and nodes["rx-1"]["stopped_at"] is None


def _outbox(index: Index, root: Path, owner: str) -> Outbox:
    from dicomnode.config import PeerConfig

    peers = {"dest": PeerConfig(ae_title="DEST", host="127.0.0.1", port=1)}
    return Outbox(index, peers, ae_title="DICOMNODE", owner=owner, root=root,
                  lease_seconds=60, heartbeat_seconds=10)


def test_outbox_claims_have_an_owner_and_recovery_leaves_a_live_peers(
        index: Index, tmp_path: Path, small_ct: list[Path]) -> None:
    root = tmp_path / "store"
    (root / "results").mkdir(parents=True)
    files = [Path(shutil.copy(p, root / "results")) for p in small_ct[:12]]
    peer, me = _outbox(index, root, "peer"), _outbox(index, root, "me")
    ids = peer.enqueue(files, ["dest"])
    with index.session() as session:  # recorded relative to the storage root
        paths = session.scalars(select(OutboxItem.file_path).order_by(OutboxItem.id)).all()
    assert paths == [f"results/{p.name}" for p in files]
    now = utcnow()
    claimed: dict[str, list[int]] = {"peer": [], "me": []}
    start = threading.Barrier(2)

    def grab(outbox: Outbox) -> None:
        start.wait()
        claimed[outbox.owner].extend(c.id for c in outbox._claim("dest", now))

    threads = [threading.Thread(target=grab, args=(o,)) for o in (peer, me)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed["peer"] + claimed["me"]) == ids  # each item claimed once
    assert me.recover() == len(claimed["me"])  # "me" restarts: its own claims, not the peer's
    with index.session() as session:
        rows = session.execute(select(OutboxItem.id, OutboxItem.state, OutboxItem.owner)).all()
    for item_id, state, owner in rows:
        if item_id in claimed["peer"]:
            assert (state, owner) == (OutboxState.SENDING, "peer")
        else:
            assert (state, owner) == (OutboxState.PENDING, None)
    assert peer.renew() == len(claimed["peer"])  # the peer's heartbeat holds them


def test_absolute_outbox_paths_under_the_root_become_relative(index: Index,
                                                              tmp_path: Path) -> None:
    root = (tmp_path / "store").resolve()
    with index.session() as session:
        for i, path in enumerate([root / "jobs" / "1" / "a.dcm", Path("/elsewhere/b.dcm"),
                                  Path("jobs/1/c.dcm")]):
            session.add(OutboxItem(sop_instance_uid=f"1.2.{i}", sop_class_uid="1.2",
                                   file_path=str(path), destination="dest"))
        session.commit()
    assert relative_outbox_paths(index, root) == 1
    assert relative_outbox_paths(index, root) == 0
    with index.session() as session:
        paths = session.scalars(select(OutboxItem.file_path).order_by(OutboxItem.id)).all()
    assert paths == ["jobs/1/a.dcm", "/elsewhere/b.dcm", "jobs/1/c.dcm"]


def test_two_nodes_ingesting_the_same_instances_at_once(index_url: str, tmp_path: Path,
                                                       small_ct: list[Path]) -> None:
    """Two nodes (own index connections, own locks, one storage root) receive the same
    instances at the same moment: each is indexed once and both answer Success."""
    root = tmp_path / "store"
    nodes = [InstanceStore(InstanceFiles(root, fsync=False, node_id=f"n{i}"),
                           open_index(index_url), min_free_bytes=0) for i in range(2)]
    outcomes: list[IngestOutcome] = []
    errors: list[BaseException] = []
    for path in small_ct[:8]:
        start = threading.Barrier(2)

        def receive(store: InstanceStore, source: Path = path,
                    barrier: threading.Barrier = start) -> None:
            staged = store.files.tmp / source.name
            shutil.copy(source, staged)
            barrier.wait()
            try:
                outcomes.append(store.ingest(staged, calling_ae_title="MODALITY").outcome)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=receive, args=(store,)) for store in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    try:
        assert not errors, errors
        counts = Counter(outcomes)
        assert counts[IngestOutcome.STORED] == 8 and counts[IngestOutcome.DUPLICATE] == 8
        with nodes[0].index.session() as session:
            rows = session.execute(select(Instance.sop_instance_uid, Instance.file_path,
                                          Instance.times_received)).all()
            studies = session.scalars(select(Study.id)).all()
        assert len(rows) == 8 and len(studies) == 1
        for _uid, file_path, times in rows:
            assert times == 2 and not Path(file_path).is_absolute()
            assert (root / file_path).is_file()
    finally:
        for store in nodes:
            store.index.dispose()


def test_jobs_of_an_earlier_release_left_running_have_no_lease(index: Index) -> None:
    """Rows migrated from before leases: running, no owner, no lease: any node takes them."""
    (job_id,) = _jobs(index, 1)
    with index.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING))
        session.commit()
    assert recover(index) == 1
    assert _job(index, job_id).state is JobState.PENDING


def test_the_migrations_run_on_postgresql_as_on_sqlite(pg_url: str) -> None:
    """Every revision from an empty PostgreSQL database gives the models' tables, and back
    down to the baseline and up again."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from dicomnode.store.schema import alembic_config, head_revision
    from dicomnode.store.tables import Base

    engine = create_engine(pg_url)
    try:
        for target in ("head", "0001", "head"):
            with engine.begin() as connection:
                if target == "head":
                    command.upgrade(alembic_config(connection), target)
                else:
                    command.downgrade(alembic_config(connection), target)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert context.get_current_revision() == head_revision()
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_a_dead_nodes_deliveries_go_out_once_its_lease_lapses(
        index: Index, tmp_path: Path, small_ct: list[Path]) -> None:
    """Node "dead" claimed items and was killed before sending them: the live node leaves
    them while the lease holds, sends each exactly once after it lapsed."""
    from conftest import DcmtkStoreSCP

    from dicomnode.config import PeerConfig

    scp = DcmtkStoreSCP(tmp_path / "received")
    try:
        root = tmp_path / "store"
        (root / "results").mkdir(parents=True)
        files = [Path(shutil.copy(p, root / "results")) for p in small_ct[:4]]
        peers = {"dest": PeerConfig(ae_title="DEST", host="127.0.0.1", port=scp.port)}
        dead, live = (Outbox(index, peers, ae_title="DICOMNODE", owner=owner, root=root,
                             lease_seconds=30, heartbeat_seconds=5) for owner in ("dead", "live"))
        dead.enqueue(files, ["dest"])
        now = utcnow()
        assert len(dead._claim("dest", now)) == 4  # then kill -9: nothing recorded
        assert live.deliver_due(now + dt.timedelta(seconds=10)).sent == 0  # lease holds
        assert not scp.received()
        report = live.deliver_due(now + dt.timedelta(seconds=31))  # lapsed: taken over
        assert report.sent == 4
        with index.session() as session:
            rows = session.execute(select(OutboxItem.state, OutboxItem.owner)).all()
        assert set(rows) == {(OutboxState.SENT, None)}
        import time

        deadline = time.monotonic() + 10
        while len(scp.received()) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(scp.received().values()) == {1} and len(scp.received()) == 4
    finally:
        scp.close()


@pytest.mark.slow
def test_a_runner_renews_its_running_jobs_until_it_stops(index: Index, index_url: str,
                                                         tmp_path: Path) -> None:
    """The heartbeat keeps a long job's lease alive; once it stops (the node is gone) the
    lease lapses and recovery takes the job."""
    import time
    from concurrent.futures import Future

    from dicomnode.config import Config
    from dicomnode.jobs.runner import JobRunner

    config = Config.model_validate({
        "node": {"id": "n1", "lease_seconds": 2, "heartbeat_seconds": 0.4},
        "storage": {"path": str(tmp_path), "database_url": index_url}})
    runner = JobRunner(config, index)
    (job_id,) = _jobs(index, 1)
    assert claim_next(index, 1, owner="n1", lease_seconds=2) == [job_id]
    runner._running[job_id] = Future()  # as if a worker process ran it
    runner._start_heartbeat()
    try:
        time.sleep(3.5)  # longer than the lease
        assert recover(index) == 0  # renewed: a live node's job is not taken
        assert _job(index, job_id).owner == "n1"
    finally:
        assert runner._heartbeat is not None
        runner._heartbeat.stop()
    time.sleep(2.5)
    assert recover(index) == 1  # no more heartbeats: lapsed, taken over
    assert _job(index, job_id).state is JobState.PENDING


def test_lease_settings_are_checked() -> None:
    from pydantic import ValidationError

    from dicomnode.config import Config, NodeConfig

    with pytest.raises(ValidationError, match="at most half of lease_seconds"):
        NodeConfig(lease_seconds=10, heartbeat_seconds=6)
    with pytest.raises(ValidationError, match="id"):
        NodeConfig(id="../escape")
    assert Config.model_validate({"pipeline": {"workers": 0}}).pipeline.workers == 0
    assert NodeConfig(id="gpu-1").node_id == "gpu-1" and NodeConfig().node_id
