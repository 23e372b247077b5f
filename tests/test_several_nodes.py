"""Several nodes on one real PostgreSQL index and one storage root, as processes: two
`dicomnode serve` nodes (two SCP ports) receive studies between them and share the jobs;
one is killed with kill -9 in the middle of a job, its lease lapses and the other node
finishes its work: every result reaches the destination (a DCMTK storescp) exactly once.
A `dicomnode worker` (no DICOM port) runs the jobs of a receive-only node
(``pipeline.workers: 0``), and `dicomnode status` lists both."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testdata
from conftest import DcmtkStoreSCP, NodeFactory, RunningNode, storescu, wait_until
from sqlalchemy import Engine, create_engine, text

from dicomnode.store.db import open_index

ROOT = Path(__file__).resolve().parents[1]
KEY = b"several-nodes-test-key-0123456"

pytestmark = pytest.mark.slow


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    scp = DcmtkStoreSCP(tmp_path / "received")
    yield scp
    scp.close()


@pytest.fixture
def shared(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, Path, Engine]]:
    """The shared index (made once, before any node starts) and storage root."""
    open_index(pg_url).dispose()
    engine = create_engine(pg_url)
    yield pg_url, tmp_path / "shared-store", engine
    engine.dispose()


def _rules(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yaml").write_text("""rules:
  - name: ct-external
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
""")
    return folder


def _node(node_factory: NodeFactory, tmp_path: Path, shared: tuple[str, Path, Engine],
          storescp: DcmtkStoreSCP, node_id: str, *, command: str = "serve",
          workers: int = 1, start: bool = True, worker_sends: bool = False,
          outbox_interval: float = 0.5) -> RunningNode:
    url, root, _engine = shared
    key = tmp_path / "deid.key"
    key.write_bytes(KEY)
    return node_factory(
        command=command, start=start,
        # a loaded machine may pause a transfer: no series settles on part of itself
        quiet_seconds=3, completion={"series_quiet_seconds": 2},
        node={"id": node_id, "lease_seconds": 4, "heartbeat_seconds": 1,
              "worker_sends_results": worker_sends},
        storage={"path": str(root), "database_url": url},
        peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": storescp.port}},
        rules_dir=str(_rules(tmp_path / "rules")), models_dir=str(ROOT / "models"),
        deid={"key_file": str(key)}, pipeline={"workers": workers},
        outbox={"retry_initial_seconds": 1, "check_interval_seconds": outbox_interval})


def _wait(predicate: Any, timeout: float, what: str, *nodes: RunningNode) -> None:
    """wait_until, failing with the nodes' logs as they are then; a predicate that raises
    (the storescp writing a file being read) is not met yet."""

    def met() -> bool:
        try:
            return bool(predicate())
        except Exception:
            return False

    try:
        wait_until(met, timeout, what)
    except AssertionError as exc:
        logs = "\n".join(f"--- {n.config_path.parent.name}:\n{n.log()[-3000:]}" for n in nodes)
        raise AssertionError(f"{exc}\n{logs}") from None


def _jobs(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT id, state, owner, attempts, results FROM job ORDER BY id")).mappings().all()
    # the state column holds the JobState member's name (DONE): as the reports say it
    return [{**row, "state": row["state"].lower()} for row in rows]


def _study(tmp_path: Path, n: int, *, slices: int = 8, size: int = 96) -> list[Path]:
    return testdata.synthetic_ct(tmp_path / f"study{n}", slices=slices, rows=size,
                                 columns=size, study_uid=f"1.2.826.0.1.3680043.10.1138.{n}",
                                 patient_id=f"SCALE-{n}")


def _results(jobs: list[dict[str, Any]]) -> set[str]:
    uids = set()
    for job in jobs:
        results = job["results"] if isinstance(job["results"], list) else json.loads(
            job["results"] or "[]")
        uids |= {r["sop_instance_uid"] for r in results}
    return uids


def test_two_nodes_share_the_work_and_a_node_killed_mid_job_loses_nothing(
        node_factory: NodeFactory, tmp_path: Path, shared: tuple[str, Path, Engine],
        storescp: DcmtkStoreSCP) -> None:
    engine = shared[2]
    nodes = {name: _node(node_factory, tmp_path, shared, storescp, name) for name in "ab"}
    # both receive: studies 1-3 to a, 4-6 to b; the jobs go to whichever node claims first
    for n in range(1, 7):
        sent = storescu(nodes["a" if n <= 3 else "b"].port, *_study(tmp_path, n))
        assert sent.returncode == 0, sent.stderr
    _wait(lambda: len(_jobs(engine)) == 6 and all(
        j["state"] == "done" for j in _jobs(engine)), 180, "the first six jobs done",
        *nodes.values())
    first = _results(_jobs(engine))
    _wait(lambda: set(storescp.received()) == first, 60, "their results at the dest",
          *nodes.values())
    # nothing is being sent now: the kill below falls in a job, never in a C-STORE
    big = _study(tmp_path, 7, slices=160, size=256)  # a job of a few seconds
    assert storescu(nodes["a"].port, *big).returncode == 0
    running: list[dict[str, Any]] = []

    def one_running() -> bool:
        running[:] = [j for j in _jobs(engine) if j["state"] == "running"]
        return bool(running)

    deadline = time.monotonic() + 60
    while not one_running():
        assert time.monotonic() < deadline, "the big study's job never ran"
        time.sleep(0.02)
    (job,) = running
    victim, survivor = nodes[job["owner"]], nodes["b" if job["owner"] == "a" else "a"]
    victim.kill()  # kill -9 in the middle of the job: its worker process goes with it
    killed = job["id"]
    _wait(lambda: len(_jobs(engine)) == 7 and all(
        j["state"] == "done" for j in _jobs(engine)), 240, "every job done", survivor)
    jobs = _jobs(engine)
    expected = _results(jobs)
    assert len(expected) >= 7 and first < expected  # results of every study
    _wait(lambda: set(storescp.received()) == expected, 60, "every result at the dest",
          survivor)
    time.sleep(3)  # anything sent twice would arrive now
    received = storescp.received()
    assert set(received) == expected and set(received.values()) == {1}  # 0 lost, 0 twice
    attempts = {j["id"]: j["attempts"] for j in jobs}
    assert attempts.pop(killed) == 2  # its lease lapsed, the survivor ran it again
    assert set(attempts.values()) == {1}  # every other job ran exactly once
    assert f"job {killed} started" in survivor.log()
    status = json.loads(survivor.cli("status", "--json").stdout)
    alive = {n["id"]: n["alive"] for n in status["nodes"]}
    assert alive == {job["owner"]: False, ("b" if job["owner"] == "a" else "a"): True}


def test_a_worker_node_runs_the_jobs_of_a_receive_only_node(
        node_factory: NodeFactory, tmp_path: Path, shared: tuple[str, Path, Engine],
        storescp: DcmtkStoreSCP) -> None:
    engine = shared[2]
    receiver = _node(node_factory, tmp_path, shared, storescp, "rx", workers=0)
    worker = _node(node_factory, tmp_path, shared, storescp, "gpu", command="worker")
    for n in range(1, 4):
        assert storescu(receiver.port, *_study(tmp_path, n)).returncode == 0
    _wait(lambda: len(_jobs(engine)) == 3 and all(
        j["state"] == "done" for j in _jobs(engine)), 120, "the worker ran every job",
        receiver, worker)
    jobs = _jobs(engine)
    for job in jobs:
        assert f"job {job['id']} started" in worker.log()
        assert f"job {job['id']} started" not in receiver.log()
    expected = _results(jobs)
    # the receiving node sends what the worker wrote (the shared storage root)
    _wait(lambda: set(storescp.received()) == expected, 60, "every result at the dest",
          receiver, worker)
    assert set(storescp.received().values()) == {1}
    status = receiver.cli("status")
    assert "rx " in status.stdout and "gpu " in status.stdout
    report = json.loads(receiver.cli("status", "--json").stdout)
    roles = {n["id"]: (n["role"], n["alive"]) for n in report["nodes"]}
    assert roles == {"rx": ("serve", True), "gpu": ("worker", True)}
    assert worker.terminate() == 0
    report = json.loads(receiver.cli("status", "--json").stdout)
    assert {n["id"]: n["alive"] for n in report["nodes"]} == {"rx": True, "gpu": False}


def test_a_worker_node_told_to_send_delivers_its_own_results(
        node_factory: NodeFactory, tmp_path: Path, shared: tuple[str, Path, Engine],
        storescp: DcmtkStoreSCP) -> None:
    """``node.worker_sends_results``: the worker that made the results sends them (the
    receiving node, checking its outbox once an hour, sends none); each arrives once."""
    engine = shared[2]
    receiver = _node(node_factory, tmp_path, shared, storescp, "rx", workers=0,
                     outbox_interval=3600)
    worker = _node(node_factory, tmp_path, shared, storescp, "gpu", command="worker",
                   worker_sends=True)
    for n in range(1, 3):
        assert storescu(receiver.port, *_study(tmp_path, n)).returncode == 0
    _wait(lambda: len(_jobs(engine)) == 2 and all(
        j["state"] == "done" for j in _jobs(engine)), 120, "the worker ran every job",
        receiver, worker)
    expected = _results(_jobs(engine))
    _wait(lambda: set(storescp.received()) == expected, 60, "every result at the dest",
          receiver, worker)
    assert set(storescp.received().values()) == {1}
    sent = re.findall(r"outbox item \d+ \([^)]*\) -> dest: sent", worker.log())
    assert len(sent) == len(expected), worker.log()[-2000:]
    assert ": sent" not in receiver.log()
