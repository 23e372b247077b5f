"""Pull (query/retrieve): `dicomnode pull` and scheduled pulls against real peers.

Orthanc 1.10 (C-FIND, C-MOVE) and DCMTK's dcmqrscp (C-FIND, C-MOVE, C-GET) hold the studies;
a real `dicomnode serve` receives what is moved to it, completes the study and fires a rule
on it as on a pushed study.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata
from apscheduler.schedulers.background import BackgroundScheduler
from conftest import DCMTK, NodeFactory, RunningNode, free_port, write_model_card
from orthanc import OrthancServer, requires_orthanc
from sqlalchemy import func, select

from dicomnode.config import ConfigError, PullConfig, RetrieveMethod, load_config
from dicomnode.receive.pull import Puller, PullQuery
from dicomnode.scheduler import install_scheduled_pulls, last_pull_due, run_scheduled_pull
from dicomnode.store.db import Index, open_index
from dicomnode.store.tables import Instance, Job, PullRun, Study, StudyState, utcnow

requires_dcmqrscp = pytest.mark.skipif(
    not (DCMTK / "dcmqrscp").exists() or not (DCMTK / "dcmqridx").exists(),
    reason="DCMTK dcmqrscp/dcmqridx not installed (Debian package dcmtk)")

RULES = '''rules:
  - name: ct-any
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT" AND NumImages >= 10
    model: body
'''

TODAY = dt.datetime.now(dt.timezone.utc).date()
PATIENT_ID = "PULL-SECRET-ID"


def _study(folder: Path, *, date: dt.date, station: str = "CT1", slices: int = 12,
           accession: str = "", other_series: bool = False) -> tuple[str, list[Path]]:
    """A small CT study dated ``date``; with ``other_series`` a second series of modality OT
    (4 instances). Returns the Study Instance UID and the files."""
    study_uid = pydicom.uid.generate_uid()
    files = testdata.synthetic_ct(folder / "ct", slices=slices, rows=16, columns=16,
                                  study_uid=study_uid, patient_id=PATIENT_ID)
    if other_series:
        files += testdata.synthetic_ct(folder / "ot", slices=4, rows=16, columns=16,
                                       study_uid=study_uid, patient_id=PATIENT_ID,
                                       series_number=9)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyDate = date.strftime("%Y%m%d")
        ds.StationName = station
        ds.AccessionNumber = accession
        if "ot" in path.parent.name:
            ds.Modality = "OT"
        ds.save_as(path)
    return study_uid, files


class DcmQrScp:
    """DCMTK dcmqrscp (AE title QRSCP) on a free loopback port with its own database in
    ``folder``; ``destinations`` are the move destinations it knows, ``{AE: port}``."""

    ae_title = "QRSCP"

    def __init__(self, folder: Path, extra: Sequence[str] = ()) -> None:
        self.folder = folder
        self.db = folder / "db"
        self.db.mkdir(parents=True)
        self.port = free_port()
        self.destinations: dict[str, int] = {}
        self.config = folder / "dcmqrscp.cfg"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def load(self, files: Sequence[Path]) -> None:
        subprocess.run([str(DCMTK / "dcmqridx"), str(self.db), *map(str, files)], check=True,
                       capture_output=True, timeout=60)

    def peer(self, retrieve: str = "move") -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port,
                "query_retrieve": True, "retrieve": retrieve}

    def __enter__(self) -> DcmQrScp:
        hosts = "\n".join(f"dest{i} = ({ae}, 127.0.0.1, {port})"
                          for i, (ae, port) in enumerate(self.destinations.items()))
        self.config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\n{self.ae_title} {self.db} RW (200, 1024mb) ANY\nAETable END\n")
        log = (self.folder / "dcmqrscp.log").open("ab")
        self.proc = subprocess.Popen(
            [str(DCMTK / "dcmqrscp"), "-c", str(self.config), *self.extra, str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("dcmqrscp did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


def _rule_node(node_factory: NodeFactory, tmp_path: Path, peers: dict[str, Any],
               **overrides: Any) -> RunningNode:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "main.yaml").write_text(RULES)
    write_model_card(tmp_path / "models" / "body", [("CT", "CT")])
    return node_factory(rules_dir=str(rules), models_dir=str(tmp_path / "models"),
                        peers=peers, **overrides)


def _index(node: RunningNode) -> Index:
    return open_index(f"sqlite:///{node.store / 'index.sqlite'}")


def _study_row(node: RunningNode, study_uid: str) -> tuple[StudyState, int] | None:
    index = _index(node)
    try:
        with index.session() as session:
            study = session.scalars(select(Study).where(
                Study.study_instance_uid == study_uid)).one_or_none()
            if study is None:
                return None
            count = session.scalar(select(func.count(Instance.id)).where(
                Instance.series_pk.in_([s.id for s in study.series])))
            return study.state, int(count or 0)
    finally:
        index.dispose()


def _wait_complete(node: RunningNode, study_uid: str, instances: int,
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _study_row(node, study_uid)
        if row == (StudyState.COMPLETE, instances):
            return
        time.sleep(0.2)
    raise AssertionError(f"study not complete with {instances} instances: "
                         f"{_study_row(node, study_uid)}\n{node.log()[-3000:]}")


def _jobs(node: RunningNode, timeout: float = 20.0, count: int = 1) -> list[tuple[str, str]]:
    """(rule, StudyInstanceUID) of the node's jobs, once there are ``count``."""
    deadline = time.monotonic() + timeout
    found: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        index = _index(node)
        try:
            with index.session() as session:
                found = [(j.rule_name, s.study_instance_uid) for j, s in session.execute(
                    select(Job, Study).join(Study, Job.study_pk == Study.id)).all()]
        finally:
            index.dispose()
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"expected {count} job(s), got {found}\n{node.log()[-3000:]}")


def _pull(node: RunningNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "pull", *args, "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=120)


def _orthanc_node(node_factory: NodeFactory, tmp_path: Path,
                  **overrides: Any) -> tuple[RunningNode, OrthancServer]:
    """An Orthanc that knows the node as a move destination, and a node (not started) that
    knows Orthanc as a query/retrieve peer."""
    orthanc = OrthancServer(tmp_path / "orthanc")
    node = _rule_node(node_factory, tmp_path,
                      {"orthanc": {**orthanc.peer(), "query_retrieve": True}},
                      start=False, **overrides)
    orthanc.config["DicomModalities"] = {"dicomnode": ["DICOMNODE", "127.0.0.1", node.port]}
    return node, orthanc


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Peers to stop at teardown."""
    peers: list[Any] = []
    yield peers
    for peer in reversed(peers):
        peer.__exit__(None, None, None)


# --------------------------------------------------------------------------- Orthanc, C-MOVE


@pytest.mark.slow
@requires_orthanc
def test_pull_moves_a_study_from_orthanc_into_the_running_node_and_a_rule_fires(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    node, orthanc = _orthanc_node(node_factory, tmp_path)
    started.append(orthanc.start())
    node.start()
    wanted, files = _study(tmp_path / "a", date=TODAY, accession="ACC1")
    other, other_files = _study(tmp_path / "b", date=TODAY, accession="ACC2")
    for path in files + other_files:
        orthanc.upload(path)

    result = _pull(node, "--from", "orthanc", "--study", wanted)
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    assert f"study '{wanted}': 12 instance(s) retrieved" in result.stdout
    assert "1 study(ies) found, 12 instance(s) retrieved by move, 0 failure(s)" in result.stderr

    _wait_complete(node, wanted, 12)
    assert _study_row(node, other) is None  # only what was asked for
    assert _jobs(node) == [("ct-any", wanted)]  # routed like a pushed study
    assert "association from peer orthanc" in node.log()
    # by accession number too (the other study)
    result = _pull(node, "--from", "orthanc", "--accession", "ACC2")
    assert result.returncode == 0, result.stderr
    _wait_complete(node, other, 12)
    assert sorted(_jobs(node, count=2)) == sorted([("ct-any", wanted), ("ct-any", other)])
    assert PATIENT_ID not in node.log()


@pytest.mark.slow
@requires_orthanc
def test_orthanc_that_does_not_know_the_node_refuses_the_move_with_a_clear_error(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    node, orthanc = _orthanc_node(node_factory, tmp_path)
    # Orthanc knows the node's AE title for queries, but moves to a port nobody listens on
    orthanc.config["DicomModalities"] = {"dicomnode": ["DICOMNODE", "127.0.0.1", free_port()]}
    started.append(orthanc.start())
    node.start()
    wanted, files = _study(tmp_path / "a", date=TODAY)
    for path in files:
        orthanc.upload(path)
    result = _pull(node, "--from", "orthanc", "--study", wanted)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 study(ies) found, 0 instance(s) retrieved by move" in result.stderr
    assert re.search(r"status 0x[0-9A-F]{4} \(", result.stdout), result.stdout
    assert "the node's SCP must be running" in result.stdout
    assert _study_row(node, wanted) is None


# --------------------------------------------------------------------------- dcmqrscp


@pytest.mark.slow
@requires_dcmqrscp
def test_pull_filters_by_date_and_modality_and_moves_only_matching_series(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    yesterday = TODAY - dt.timedelta(days=1)
    qr = DcmQrScp(tmp_path / "qr")
    recent, recent_files = _study(tmp_path / "recent", date=yesterday, other_series=True)
    old, old_files = _study(tmp_path / "old", date=TODAY - dt.timedelta(days=10))
    qr.load(recent_files + old_files)
    node = _rule_node(node_factory, tmp_path, {"qr": qr.peer()})
    qr.destinations = {"DICOMNODE": node.port}
    started.append(qr.__enter__())

    result = _pull(node, "--from", "qr", "--since", "-1d", "--modality", "CT")
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    assert f"study '{recent}' (1 series): 12 instance(s) retrieved" in result.stdout
    assert "1 study(ies) found, 12 instance(s) retrieved by move, 0 failure(s)" in result.stderr
    _wait_complete(node, recent, 12)  # the CT series only: the OT series stays at the peer
    assert _study_row(node, old) is None
    assert _jobs(node) == [("ct-any", recent)]

    # a date range that matches nothing finds nothing, and says so
    result = _pull(node, "--from", "qr", "--since", "2001-01-01", "--until", "2001-12-31")
    assert result.returncode == 0, result.stderr
    assert "0 study(ies) found, 0 instance(s) retrieved" in result.stderr


@pytest.mark.slow
@requires_dcmqrscp
def test_pull_by_c_get_stores_through_ingest_and_the_running_node_completes_the_study(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    qr = DcmQrScp(tmp_path / "qr")  # no move destination: C-GET needs none
    wanted, files = _study(tmp_path / "a", date=TODAY, other_series=True)
    qr.load(files)
    node = _rule_node(node_factory, tmp_path, {"qr": qr.peer("get")})
    started.append(qr.__enter__())

    result = _pull(node, "--from", "qr", "--patient-id", PATIENT_ID)
    assert result.returncode == 0, result.stderr + node.log()[-2000:]
    assert "1 study(ies) found, 16 instance(s) retrieved by get, 0 failure(s)" in result.stderr
    _wait_complete(node, wanted, 16)
    assert _jobs(node) == [("ct-any", wanted)]
    index = _index(node)
    try:
        with index.session() as session:
            rows = session.scalars(select(Instance)).all()
            assert {r.calling_ae_title for r in rows} == {"QRSCP"}
            assert all((node.store / r.file_path).is_file() for r in rows)
    finally:
        index.dispose()
    # the bytes are stored as the peer sent them (here: as they were loaded)
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in files}
    assert len(sent) == 16
    assert list((node.store / "tmp").iterdir()) == []
    # pulled again: the same instances, counted as re-sends, nothing new
    result = _pull(node, "--from", "qr", "--study", wanted)
    assert result.returncode == 0, result.stderr
    assert _study_row(node, wanted) is not None
    assert _study_row(node, wanted)[1] == 16  # type: ignore[index]


@pytest.mark.slow
@requires_dcmqrscp
def test_a_peer_without_the_node_as_destination_refuses_the_move_exit_code_1(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    qr = DcmQrScp(tmp_path / "qr")  # knows no move destination
    wanted, files = _study(tmp_path / "a", date=TODAY)
    qr.load(files)
    node = _rule_node(node_factory, tmp_path, {"qr": qr.peer()})
    started.append(qr.__enter__())
    result = _pull(node, "--from", "qr", "--study", wanted)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not know the move destination 'DICOMNODE' (0xA801)" in result.stdout
    assert "1 study(ies) found, 0 instance(s) retrieved by move, 1 failure(s)" in result.stderr


@pytest.mark.slow
def test_unreachable_peer_and_bad_arguments_give_clear_errors_and_exit_codes(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    port = free_port()  # nobody listens
    node = node_factory(start=False, peers={
        "gone": {"ae_title": "GONE", "host": "127.0.0.1", "port": port, "query_retrieve": True},
        "plain": {"ae_title": "PLAIN", "host": "127.0.0.1", "port": port}})
    result = _pull(node, "--from", "gone", "--study", "1.2.3")
    assert result.returncode == 3, result.stderr
    assert f"pull: peer 'gone' (127.0.0.1:{port}) could not be reached" in result.stderr
    result = _pull(node, "--from", "plain", "--study", "1.2.3")
    assert result.returncode == 2
    assert "peer 'plain' is not a query/retrieve peer" in result.stderr
    result = _pull(node, "--from", "nobody", "--study", "1.2.3")
    assert result.returncode == 2 and "unknown peer 'nobody'" in result.stderr
    result = _pull(node, "--from", "gone")
    assert result.returncode == 2 and "a pull needs at least one of" in result.stderr
    result = _pull(node, "--from", "gone", "--since", "yesterday")
    assert result.returncode == 2 and "is not a date" in result.stderr
    result = _pull(node, "--from", "gone", "--study", "1.2.x")
    assert result.returncode == 2 and "is not a UID" in result.stderr
    result = _pull(node, "--from", "gone", "--since", "2024-02-02", "--until", "2024-02-01")
    assert result.returncode == 2 and "is after until" in result.stderr


# --------------------------------------------------------------------------- configuration


def test_configuration_of_query_retrieve_peers_and_pulls_is_validated(tmp_path: Path) -> None:
    def load(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        try:
            config = load_config(path)
        except ConfigError as exc:
            return str(exc)
        return repr(config)

    peer = "peers:\n  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104, query_retrieve: true}\n"
    ok = load(peer + "pulls:\n  nightly: {schedule: '0 22 * * *', peer: pacs, since: -1d,"
              " until: -1d, modality: CT, station: CT1}\n")
    assert "PullConfig" in ok
    config = load_config(tmp_path / "c.yaml")
    assert config.peers["pacs"].retrieve_method is RetrieveMethod.MOVE
    query = PullQuery.from_config(config.pulls["nightly"], dt.date(2026, 3, 1))
    assert (query.since, query.until, query.modality, query.station) == (
        dt.date(2026, 2, 28), dt.date(2026, 2, 28), "CT", "CT1")
    assert query.study_date() == "20260228"

    assert "retrieve applies to query/retrieve peers only" in load(
        "peers:\n  p: {ae_title: P, host: h, port: 1, retrieve: get}\n")
    assert "query_retrieve: true needs the peer's host and port" in load(
        "peers:\n  p: {ae_title: P, query_retrieve: true}\n")
    assert "Input should be 'move' or 'get'" in load(
        "peers:\n  p: {ae_title: P, host: h, port: 1, query_retrieve: true, retrieve: send}\n")
    assert "is not a crontab line" in load(
        peer + "pulls:\n  n: {schedule: 'nightly', peer: pacs, since: -1d}\n")
    assert "unknown peer 'other'" in load(
        peer + "pulls:\n  n: {schedule: '0 22 * * *', peer: other, since: -1d}\n")
    assert "is not a query/retrieve peer" in load(
        "peers:\n  p: {ae_title: P, host: h, port: 1}\n"
        "pulls:\n  n: {schedule: '0 22 * * *', peer: p, since: -1d}\n")
    assert "would otherwise pull the whole archive" in load(
        peer + "pulls:\n  n: {schedule: '0 22 * * *', peer: pacs, modality: CT}\n")
    assert "is not a date" in load(
        peer + "pulls:\n  n: {schedule: '0 22 * * *', peer: pacs, since: yesterday}\n")
    assert "is not a modality" in load(
        peer + "pulls:\n  n: {schedule: '0 22 * * *', peer: pacs, since: -1d, modality: ct}\n")


# --------------------------------------------------------------------------- scheduled pulls


def _latest_hour() -> dt.datetime:
    """The latest full hour (UTC, naive); waits past the hour when it is about to turn."""
    now = dt.datetime.now(dt.timezone.utc)
    if now.minute == 59 and now.second > 30:
        time.sleep(61 - now.second)
        now = dt.datetime.now(dt.timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0, tzinfo=None)


@pytest.mark.slow
@requires_orthanc
def test_scheduled_pull_runs_once_per_due_time_and_a_restart_does_not_repeat_it(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    yesterday = TODAY - dt.timedelta(days=1)
    pulls = {"nightly-ct": {"schedule": "0 * * * *", "peer": "orthanc", "since": "-1d",
                            "until": "-1d", "modality": "CT", "station": "CT1"}}
    node, orthanc = _orthanc_node(node_factory, tmp_path, pulls=pulls)
    started.append(orthanc.start())
    wanted, files = _study(tmp_path / "a", date=yesterday, station="CT1")
    other_station, other_files = _study(tmp_path / "b", date=yesterday, station="CT2")
    today_study, today_files = _study(tmp_path / "c", date=TODAY, station="CT1")
    for path in files + other_files + today_files:
        orthanc.upload(path)

    # the pull last ran an hour before its latest due time: the node was down since
    latest = _latest_hour()
    node.store.mkdir()
    index = _index(node)
    try:
        with index.session() as session:
            session.add(PullRun(pull_name="nightly-ct", peer="orthanc",
                                due_at=latest - dt.timedelta(hours=1), finished_at=utcnow()))
            session.commit()
    finally:
        index.dispose()
    node.start()  # makes up the missed run at once
    _wait_complete(node, wanted, 12)
    assert _jobs(node) == [("ct-any", wanted)]
    assert _study_row(node, other_station) is None and _study_row(node, today_study) is None
    log = node.log()
    assert "scheduled pull nightly-ct missed its run at" in log
    assert (f"scheduled pull nightly-ct (due {latest:%Y-%m-%d %H:%M} UTC) from orthanc: "
            "1 study(ies) found, 12 instance(s) retrieved, 0 failure(s)") in log
    assert PATIENT_ID not in log and wanted not in log

    # a restart does not repeat it (and the instances were received once)
    assert node.terminate() == 0
    node.start()
    time.sleep(2.0)
    assert node.log().count("scheduled pull nightly-ct missed its run") == 1
    index = _index(node)
    try:
        assert last_pull_due(index, "nightly-ct") == latest
        with index.session() as session:
            runs = session.scalars(select(PullRun).order_by(PullRun.due_at)).all()
            assert [(r.due_at, r.studies, r.instances, r.failed, r.error) for r in runs] == [
                (latest - dt.timedelta(hours=1), 0, 0, 0, None), (latest, 1, 12, 0, None)]
            assert runs[1].finished_at is not None
            assert set(session.scalars(select(Instance.times_received)).all()) == {1}
    finally:
        index.dispose()


@pytest.mark.slow
@requires_dcmqrscp
def test_run_scheduled_pull_serves_a_due_time_once_and_install_makes_up_only_missed_runs(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    qr = DcmQrScp(tmp_path / "qr")
    yesterday = TODAY - dt.timedelta(days=1)
    wanted, files = _study(tmp_path / "a", date=yesterday)
    qr.load(files)
    node = _rule_node(node_factory, tmp_path, {"qr": qr.peer()}, start=False)
    qr.destinations = {"DICOMNODE": node.port}
    node.start()
    started.append(qr.__enter__())
    # the pull as configured for another node (the running one has none of its own)
    pull = PullConfig(schedule="*/5 * * * *", peer="qr", since="-1d")
    config = load_config(node.config_path).model_copy(update={"pulls": {"daily": pull}})
    index = _index(node)
    try:
        puller = Puller("DICOMNODE", config.peers["qr"], "qr", timeout=10)
        due = dt.datetime.combine(TODAY, dt.time(3, 0))
        run = run_scheduled_pull(index, "daily", pull, puller, due)
        assert run is not None and (run.studies, run.instances, run.failed) == (1, 12, 0)
        _wait_complete(node, wanted, 12)
        assert run_scheduled_pull(index, "daily", pull, puller, due) is None  # served
        # the next due time is a new run; its relative dates count from its own day
        later = run_scheduled_pull(index, "daily", pull, puller, due + dt.timedelta(days=2))
        assert later is not None and (later.studies, later.instances) == (0, 0)
        assert last_pull_due(index, "daily") == due + dt.timedelta(days=2)

        # install: a run missed since the last recorded due time runs at once, else none
        def next_run(last_due: dt.datetime) -> dt.datetime:
            with index.session() as session:
                session.query(PullRun).delete()
                session.add(PullRun(pull_name="daily", peer="qr", due_at=last_due))
                session.commit()
            scheduler = BackgroundScheduler(timezone="UTC")
            install_scheduled_pulls(scheduler, config, index, lambda name: puller)
            scheduler.start(paused=True)
            try:
                job = scheduler.get_job("pull:daily")
                assert job is not None and job.max_instances == 1
                result: dt.datetime = job.next_run_time
                return result
            finally:
                scheduler.shutdown(wait=False)

        now = dt.datetime.now(dt.timezone.utc)
        latest = now.replace(minute=now.minute - now.minute % 5, second=0, microsecond=0)
        assert next_run(latest.replace(tzinfo=None) - dt.timedelta(minutes=5)) <= now + \
            dt.timedelta(seconds=1)
        assert next_run(latest.replace(tzinfo=None)) == latest + dt.timedelta(minutes=5)
    finally:
        index.dispose()
    shutil.rmtree(tmp_path / "a")


@requires_dcmqrscp
def test_c_get_sub_operations_refused_by_the_store_are_failures_and_leave_nothing(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    qr = DcmQrScp(tmp_path / "qr")
    wanted, files = _study(tmp_path / "a", date=TODAY)
    qr.load(files)
    # a disk reserve no disk has: every instance is refused (0xA700), as the SCP refuses it
    node = node_factory(start=False, min_free_bytes=1 << 60, peers={"qr": qr.peer("get")})
    started.append(qr.__enter__())
    result = _pull(node, "--from", "qr", "--study", wanted)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"study '{wanted}': 0 instance(s) retrieved, 12 failed" in result.stdout
    assert "1 study(ies) found, 0 instance(s) retrieved by get, 12 failure(s)" in result.stderr
    assert _study_row(node, wanted) is None
    assert list((node.store / "tmp").iterdir()) == []
    assert list((node.store / "instances").rglob("*.dcm")) == []


@pytest.mark.slow
@requires_dcmqrscp
def test_a_scheduled_c_get_pull_in_the_node_stores_through_its_scp_spool_and_fires_a_rule(
        node_factory: NodeFactory, tmp_path: Path, started: list[Any]) -> None:
    qr = DcmQrScp(tmp_path / "qr")
    wanted, files = _study(tmp_path / "a", date=TODAY - dt.timedelta(days=1))
    qr.load(files)
    pulls = {"hourly": {"schedule": "0 * * * *", "peer": "qr", "since": "-1d"}}
    node = _rule_node(node_factory, tmp_path, {"qr": qr.peer("get")}, pulls=pulls, start=False)
    started.append(qr.__enter__())
    latest = _latest_hour()
    node.store.mkdir()
    index = _index(node)
    try:
        with index.session() as session:
            session.add(PullRun(pull_name="hourly", peer="qr",
                                due_at=latest - dt.timedelta(hours=1)))
            session.commit()
    finally:
        index.dispose()
    node.start()
    _wait_complete(node, wanted, 12)
    assert _jobs(node) == [("ct-any", wanted)]
    assert (f"scheduled pull hourly (due {latest:%Y-%m-%d %H:%M} UTC) from qr: 1 study(ies) "
            "found, 12 instance(s) retrieved, 0 failure(s)") in node.log()
    assert list((node.store / "tmp").iterdir()) == []
