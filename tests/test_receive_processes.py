"""Receiving in several processes (node.receive_processes): four DCMTK storescu
associations at once into two receiver processes sharing the port, the store and the
index; the study completes whole and the index is consistent; the receivers end with the
node, gracefully on SIGTERM and at once when it is killed (-9)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import testdata
from conftest import NodeFactory, storescu


def _children(pid: int) -> list[int]:
    """The node's receiver processes (spawned interpreters; not multiprocessing's
    resource tracker)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False)
    return [int(line.split()[0]) for line in out.stdout.splitlines()
            if "spawn_main" in line]


def _alive(pid: int) -> bool:
    return subprocess.run(["ps", "-p", str(pid)], capture_output=True,
                          check=False).returncode == 0


def _holders(port: int) -> list[int]:
    """The process id holding each established connection to ``port`` (from ``ss``)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True)
    return [int(pid) for pid in re.findall(r"pid=(\d+)", out.stdout)]


def test_associations_are_shared_evenly_between_receiver_processes(
        node_factory: NodeFactory) -> None:
    """Each new association goes to the receiver holding the fewest: six associations
    opened one after another (each idle once open) end up three in each process. The node
    says "listening as" (what the fixture waits for) once both receivers accept."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    node = node_factory(node={"receive_processes": 2})
    assert node.proc is not None
    receivers = _children(node.proc.pid)
    assert len(receivers) == 2
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    open_ = []
    try:
        for _ in range(6):
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            assert assoc.is_established
            open_.append(assoc)
        held = _holders(node.port)
        assert sorted(held.count(pid) for pid in receivers) == [3, 3], held
    finally:
        for assoc in open_:
            assoc.release()


@pytest.mark.slow
def test_four_associations_into_two_receiver_processes(node_factory: NodeFactory,
                                                       data_dir: Path) -> None:
    files = testdata.synthetic_ct(data_dir / "rp", slices=24, rows=64, columns=64)
    node = node_factory(quiet_seconds=1.0, node={"receive_processes": 2})
    assert node.proc is not None
    receivers = _children(node.proc.pid)
    assert len(receivers) == 2, "two receiver processes"
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def send(share: list[Path]) -> None:
        result = storescu(node.port, *share)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=send, args=(files[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r.returncode for r in results] == [0] * 4, [r.stderr[-300:] for r in results]
    studies = node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    assert len(studies) == 1
    assert studies[0]["instance_count"] == len(files)
    assert len(studies[0]["series"]) == 1
    assert len(list((node.store / "instances").rglob("*.dcm"))) == len(files)
    assert node.terminate() == 0
    assert not any(_alive(pid) for pid in receivers)


@pytest.mark.slow
def test_receiver_processes_end_when_the_node_is_killed(node_factory: NodeFactory) -> None:
    node = node_factory(node={"receive_processes": 2})
    assert node.proc is not None
    receivers = _children(node.proc.pid)
    assert len(receivers) == 2
    node.kill()
    deadline = time.monotonic() + 5.0
    while any(_alive(pid) for pid in receivers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in receivers), "an orphan receiver still runs"
