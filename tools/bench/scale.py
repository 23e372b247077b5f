#!/usr/bin/env python3
"""Several nodes on one PostgreSQL index: throughput of one node against two, and the
claim latency under competing workers. A benchmark, not a timed test.

A PostgreSQL server is started in a temporary folder on a free loopback port (Debian's
``postgresql`` binaries, as ``nobody`` when run as root: ``tests/postgres.py``), and a DCMTK
``storescp`` receives the results. Each node is ``python -m dicomnode serve`` pinned to one
CPU core with ``taskset -c CORE`` (its worker processes inherit the pinning), one worker
process, ONNX Runtime with one thread (``inference.intra_op_threads: 1``,
``OMP_NUM_THREADS=1``), rule ``ct-body`` on every CT study, results sent to the storescp.

* ``throughput`` (cases ``one`` and ``two``): ``--studies N`` copies of the InVesalius
  Cranium CT (108 slices 256x256, fresh UIDs each) are C-STOREd by DCMTK ``storescu`` to a
  receive-only node (``dicomnode serve``, ``pipeline.workers: 0``, unpinned), which fires
  the rule: N pending jobs. Then one ``dicomnode worker`` node pinned to core 0 (case
  ``one``), or two pinned to cores 0 and 1 (case ``two``), sharing the database and the
  storage root, start and run them; the receiving node sends the results. Timed: the
  processing window (first job started to last job finished, from the index) and the
  wall time from the workers' start to the last result acknowledged by the storescp.
  Studies per hour of the processing window, and the ratio two/one (target >= 1.8); and
  the steady state: the jobs finished after every node has finished its first job, per
  second of the time from then to the last (each node's start-up, spawning its worker
  and loading the model, is in the first figure but not in this one).
  Receiving is kept out of the window: on a 2-core machine it would take the cores the
  nodes are pinned to.
* ``claims``: ``--claim-jobs`` jobs in a fresh database, ``--claimers`` processes
  (default 4) each claiming one job at a time (``claim_next``: ``SELECT ... FOR UPDATE
  SKIP LOCKED``) and finishing it at once until none is left; p50 and p99 of one claim's
  latency (ms), and the double claims (must be 0).

The machine's load (``/proc/loadavg``) is recorded before and after each case: on a shared
machine the figures are only as good as the cores were free.

Usage::

    python tools/bench/scale.py [--studies 8] [--claim-jobs 2000] [--claimers 4]
        [--cases one,two,claims] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import testdata  # noqa: E402
import yaml  # noqa: E402
from postgres import PostgresServer  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


#: ``--workers-send``: the worker nodes deliver their own results (node.worker_sends_results)
WORKERS_SEND = False


def _node(work: Path, name: str, core: int | None, url: str, root: Path, dest_port: int,
          rules: Path, key: Path, *, command: str = "worker", workers: int = 1,
          ) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = _port()
    folder = work / name
    folder.mkdir()
    config = {
        "node": {"id": name, "port": port, "ae_title": "DICOMNODE", "lease_seconds": 30,
                 "heartbeat_seconds": 5, "worker_sends_results": WORKERS_SEND},
        "storage": {"path": str(root), "database_url": url, "min_free_bytes": 0},
        "peers": {"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port},
                  "storescu": {"ae_title": "STORESCU", "host": "127.0.0.1"}},
        "completion": {"quiet_seconds": 1, "series_quiet_seconds": 0.5,
                       "check_interval_seconds": 0.2},
        "rules_dir": str(rules), "models_dir": str(ROOT / "models"),
        "deid": {"key_file": str(key)},
        "inference": {"intra_op_threads": 1, "providers": ["CPUExecutionProvider"]},
        "pipeline": {"workers": workers},
        "outbox": {"check_interval_seconds": 0.5},
        "web": {"enabled": False},
    }
    path = folder / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(config))
    log = folder / "node.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    pin = [] if core is None else ["taskset", "-c", str(core)]
    proc = subprocess.Popen([*pin, sys.executable, "-m", "dicomnode", command,
                             "--config", str(path)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    ready = "listening as" if command == "serve" else "started as worker"
    deadline = time.monotonic() + 60
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node {name} did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, port, log


def _throughput(server: PostgresServer, work: Path, nodes: int, studies: list[list[Path]],
                ) -> dict[str, Any]:
    url = server.create_database()
    from dicomnode.store.db import open_index

    open_index(url).dispose()  # the schema, once, before the nodes start
    case = work / f"case{nodes}"
    case.mkdir()
    received = case / "received"
    received.mkdir()
    dest_port = _port()
    scp = subprocess.Popen([STORESCP, "-aet", "DEST", "+uf", "-od", str(received),
                            str(dest_port)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    rules = case / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text("""rules:
  - name: ct-body
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
""")
    key = case / "deid.key"
    key.write_bytes(b"scale-benchmark-key-0123456789")
    receiver = _node(case, "rx", None, url, case / "store", dest_port, rules, key,
                     command="serve", workers=0)
    engine = create_engine(url)
    for files in studies:
        subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                        str(receiver[1]), *map(str, files)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "TCP_NODELAY": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # every study complete, its job pending
        with engine.connect() as connection:
            if connection.execute(text("SELECT count(*) FROM job")).scalar_one() \
                    == len(studies):
                break
        time.sleep(0.2)
    time.sleep(3)  # the receiving node idle
    load_before = _load()
    t0 = time.monotonic()
    started = [_node(case, f"w{i}", i, url, case / "store", dest_port, rules, key)
               for i in range(nodes)]
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            jobs = connection.execute(text("SELECT state FROM job")).scalars().all()
            unsent = connection.execute(text(
                "SELECT count(*) FROM outbox_item WHERE state <> 'SENT'")).scalar_one()
            items = connection.execute(text("SELECT count(*) FROM outbox_item")).scalar_one()
        if all(state == "DONE" for state in jobs) and items and not unsent:
            break
        time.sleep(0.2)
    seconds = time.monotonic() - t0
    with engine.connect() as connection:
        first, last = connection.execute(text(
            "SELECT min(started_at), max(finished_at) FROM job")).one()
        timings = connection.execute(text("SELECT timings FROM job")).scalars().all()
        finished = dict(connection.execute(text("SELECT id, finished_at FROM job")).all())
    window = (last - first).total_seconds()
    jobs_of = {log.parent.name: [int(j) for j in re.findall(
        r"dicomnode\.jobs: job (\d+) started", log.read_text(errors="replace"))]
        for *_rest, log in started}
    per_node = {name: len(ids) for name, ids in jobs_of.items()}
    # steady state: from the moment every node has finished its first (cold) job, the
    # jobs finished per second (each node's start: spawn, imports, model load, excluded)
    firsts = [min(finished[j] for j in ids) for ids in jobs_of.values() if ids]
    steady_from = max(firsts) if firsts else first
    steady_jobs = sum(1 for t in finished.values() if t > steady_from)
    steady_s = (last - steady_from).total_seconds()
    inference = [t["inference"] for t in timings if t and "inference" in t]
    for proc, *_rest in [*started, receiver]:
        proc.terminate()
    for proc, *_rest in [*started, receiver]:
        proc.wait(60)
    scp.terminate()
    scp.wait(10)
    engine.dispose()
    return {"nodes": nodes, "studies": len(studies),
            "processing_window_s": round(window, 1),
            "wall_s_to_last_result": round(seconds, 1),
            "studies_per_hour": round(len(studies) / window * 3600, 1),
            "steady_jobs": steady_jobs, "steady_window_s": round(steady_s, 1),
            "steady_studies_per_hour": round(steady_jobs / steady_s * 3600, 1)
            if steady_s > 0 else None,
            "jobs_per_node": per_node,
            "inference_median_s": round(statistics.median(inference), 2) if inference else None,
            "load_before": load_before, "load_after": _load()}


def _claimer(url: str, owner: str, out: Any) -> None:
    from dicomnode.jobs.queue import claim_next, finish
    from dicomnode.store.db import open_index

    index = open_index(url)
    latencies, claimed = [], []
    while True:
        started = time.perf_counter()
        ids = claim_next(index, 1, owner=owner, lease_seconds=60)
        latencies.append(time.perf_counter() - started)
        if not ids:
            break
        claimed.extend(ids)
        finish(index, ids[0], {"ok": True, "timings": {}, "results": []}, 3, owner=owner)
    index.dispose()
    out.append((latencies[:-1], claimed))


def _claims(server: PostgresServer, jobs: int, claimers: int) -> dict[str, Any]:
    from dicomnode.states import JobTrigger
    from dicomnode.store.db import open_index
    from dicomnode.store.tables import Job, Patient, Study

    url = server.create_database()
    index = open_index(url)
    with index.session() as session:
        study = Study(study_instance_uid="1.2.3", patient=Patient(patient_id="BENCH"))
        session.add_all([Job(rule_name="r", model="m", study=study, inputs_key=f"k{i}",
                             bindings=[], trigger=JobTrigger.COMPLETE) for i in range(jobs)])
        session.commit()
    index.dispose()
    load_before = _load()
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        out = manager.list()
        procs = [context.Process(target=_claimer, args=(url, f"w{i}", out))
                 for i in range(claimers)]
        t0 = time.monotonic()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        seconds = time.monotonic() - t0
        results = list(out)
    latencies = sorted(x for lat, _ in results for x in lat)
    claimed = [i for _, ids in results for i in ids]
    q = statistics.quantiles(latencies, n=100)
    return {"claimers": claimers, "jobs": jobs, "claimed": len(claimed),
            "double_claims": len(claimed) - len(set(claimed)),
            "claim_ms_p50": round(q[49] * 1000, 2), "claim_ms_p99": round(q[98] * 1000, 2),
            "claims_per_second": round(len(claimed) / seconds, 1),
            "load_before": load_before, "load_after": _load()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--claim-jobs", type=int, default=2000)
    parser.add_argument("--claimers", type=int, default=4)
    parser.add_argument("--cases", default="one,two,claims")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers-send", action="store_true",
                        help="the worker nodes deliver their own results "
                             "(node.worker_sends_results), not the receiving node")
    args = parser.parse_args()
    global WORKERS_SEND
    WORKERS_SEND = args.workers_send
    cases = args.cases.split(",")
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python":
                                          platform.python_version()}}
    server = PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="dicomnode-scale-") as tmp:
            work = Path(tmp)
            studies = [testdata.cranium_ct(work / "data" / str(i),
                                           study_uid=f"1.2.826.0.1.3680043.10.1138.9{i}",
                                           patient_id=f"SCALE-{i}")
                       for i in range(args.studies)] if {"one", "two"} & set(cases) else []
            for case, nodes in (("one", 1), ("two", 2)):
                if case in cases:
                    report[case] = _throughput(server, work, nodes, studies)
                    print(case, json.dumps(report[case]), flush=True)
            if "one" in report and "two" in report:
                report["speedup"] = round(report["two"]["studies_per_hour"]
                                          / report["one"]["studies_per_hour"], 2)
                one_steady = report["one"]["steady_studies_per_hour"]
                two_steady = report["two"]["steady_studies_per_hour"]
                if one_steady and two_steady:
                    report["speedup_steady"] = round(two_steady / one_steady, 2)
            if "claims" in cases:
                report["claims"] = _claims(server, args.claim_jobs, args.claimers)
                print("claims", json.dumps(report["claims"]), flush=True)
    finally:
        server.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
