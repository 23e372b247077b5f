"""Receiving in several processes (node.receive_processes): four DCMTK storescu
associations at once into two receiver processes sharing the port, the store and the
index; the study completes whole and the index is consistent; the receivers end with the
node, gracefully on SIGTERM and at once when it is killed (-9)."""

from __future__ import annotations

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
