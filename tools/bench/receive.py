#!/usr/bin/env python3
"""Receive throughput: dicomnode against DCMTK storescp, Orthanc and a bare pynetdicom SCP.

One CT series (default 300 slices of 512 x 512, explicit VR little endian, ~150 MB) is
sent over ONE association per repetition to each receiver in turn, all on 127.0.0.1.
Every repetition starts a fresh receiver process with empty storage, so every instance
is new to it. The time measured runs from the association being established to the
last C-STORE response; every response must be Success (0x0000) and every receiver must
hold all instances afterwards.

Receivers:

* ``dicomnode``: ``python -m dicomnode serve`` with its default, fully durable storage
  (each file and its folder fsynced before Success is answered; the index rows written
  by one background writer, one SQLite WAL commit with synchronous=FULL per batch).
* ``storescp``: DCMTK's ``/usr/bin/storescp +xa -od DIR`` (writes files, no fsync).
* ``orthanc``: ``/usr/sbin/Orthanc`` with its default storage (SyncStorageArea:
  fdatasync of each file, not of its folder; SQLite index in WAL mode with
  synchronous=NORMAL), no plugins.
* ``bare``: a minimal pynetdicom SCP (this script with ``--bare-scp``) whose C-STORE
  handler only writes ``event.encoded_dataset()`` to a file (no fsync, no index).

The sender is DCMTK's ``/usr/bin/storescu`` by default (``--associations N``: N storescu
processes at once, each with every N-th file over its own association); ``--sender
pynetdicom`` sends from this process instead, streaming the files from disk
(``STORE_SEND_CHUNKED_DATASET``) with TCP_NODELAY on its socket. Maximum PDU sizes are
each receiver's default unless ``--max-pdu`` is given.

Usage::

    python tools/bench/receive.py [--repeat 3] [--slices 300] [--rows 512] [--json OUT]
    python tools/bench/receive.py --slices 20 --rows 128 --repeat 1   # quick check

MB are 10**6 bytes of the Part-10 files sent; "inst/s" and "MB/s" are medians over the
repetitions, with the minimum and maximum beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[2]
STORESCP = Path("/usr/bin/storescp")  # a pip package shadows DCMTK's storescp on PATH
STORESCU = Path("/usr/bin/storescu")  # DCMTK's sender, not pynetdicom's storescu on PATH
SENDERS = ("storescu", "pynetdicom")
ORTHANC = Path("/usr/sbin/Orthanc")
SENDER_AET = "BENCHSCU"
RECEIVERS = ("dicomnode", "storescp", "orthanc", "bare")
TARGETS = {"orthanc": 1.0, "bare": 1.0}  # dicomnode must reach this fraction of each
TARGETS_CONCURRENT = {"orthanc": 0.8}  # the same with --associations > 1
START_TIMEOUT = 60.0
RECEIVE_PROCESSES = 1  # dicomnode's node.receive_processes (--receive-processes)
DIMSE_TIMEOUT = 60.0  # seconds one C-STORE response may take before the run fails

# -------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_nodelay(assoc: Any) -> None:
    """TCP_NODELAY on an association's socket (Nagle stalls small DIMSE PDUs)."""
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def child_env() -> dict[str, str]:
    """Environment of every receiver: TCP_NODELAY=1 (DCMTK reads it: storescp, Orthanc)
    and this checkout first on PYTHONPATH, so ``-m dicomnode`` runs the code beside this
    script even where the installed (editable) package points at another checkout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": path}


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (e.g. VmHWM, the peak resident set size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (dicomnode's receiver processes, with
    ``--receive-processes``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and its descendants (all threads) from
    /proc/PID/stat."""
    ticks = 0
    for one in tree_pids(pid):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_peak_rss_mib(pid: int) -> float:
    """The largest peak resident set size (VmHWM) of a process and its descendants."""
    peaks = []
    for one in tree_pids(pid):
        try:
            peaks.append(proc_status_kib(one, "VmHWM") / 1024)
        except (OSError, KeyError):
            continue
    return max(peaks)


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def first_line(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else "unknown"


def echo_ok(port: int, called_aet: str) -> bool:
    """One C-ECHO; True when the peer answered Success."""
    ae = AE(ae_title=SENDER_AET)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0x0000


# -------------------------------------------------------------------------- receivers


class Receiver(ABC):
    """One receiver process with its own empty storage under ``workdir``."""

    name = ""
    called_aet = ""
    storage = ""  # what "stored" means for this receiver, for the report

    def __init__(self, workdir: Path, max_pdu: int | None) -> None:
        self.workdir = workdir
        self.max_pdu = max_pdu
        self.port = free_port()
        self.log_path = workdir / "receiver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    def wait_ready(self) -> None: ...

    @abstractmethod
    def count(self) -> int:
        """How many instances the receiver holds."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=child_env())
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                self.wait_ready()
                return
            except (OSError, RuntimeError):
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _require_echo(self) -> None:
        if not echo_ok(self.port, self.called_aet):
            raise RuntimeError("no C-ECHO answer yet")


class Dicomnode(Receiver):
    name = "dicomnode"
    called_aet = "DICOMNODE"
    storage = ("fsync file + dir before Success; index rows by one background writer, "
               "one SQLite WAL synchronous=FULL commit per batch")

    def command(self) -> list[str]:
        node: dict[str, Any] = {"ae_title": self.called_aet, "host": "127.0.0.1",
                                "port": self.port}
        if self.max_pdu is not None:
            node["maximum_pdu_size"] = self.max_pdu
        if RECEIVE_PROCESSES > 1:
            node["receive_processes"] = RECEIVE_PROCESSES
        config = {
            "node": node,
            "storage": {"path": str(self.workdir / "store")},
            "peers": {"bench": {"ae_title": SENDER_AET, "host": "127.0.0.1"}},
            "rules_dir": str(self.workdir / "rules"),
            "models_dir": str(self.workdir / "models"),
        }
        self.config_path = self.workdir / "dicomnode.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        return [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)]

    def wait_ready(self) -> None:
        if "listening as" not in self.log_path.read_text(errors="replace"):
            raise RuntimeError("not listening yet")

    def count(self) -> int:
        out = subprocess.run(
            [sys.executable, "-m", "dicomnode", "studies", "--json",
             "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=120, check=True, env=child_env())
        return sum(int(s["instance_count"]) for s in json.loads(out.stdout)["studies"])


class Storescp(Receiver):
    name = "storescp"
    called_aet = "STORESCP"
    storage = "files only, no fsync"

    def command(self) -> list[str]:
        self.out_dir = self.workdir / "files"
        self.out_dir.mkdir()
        pdu = ["-pdu", str(self.max_pdu)] if self.max_pdu is not None else []
        return [str(STORESCP), "-aet", self.called_aet, "+xa", "-dhl", *pdu,
                "-od", str(self.out_dir), str(self.port)]

    def wait_ready(self) -> None:
        self._require_echo()

    def count(self) -> int:
        return sum(1 for p in self.out_dir.iterdir() if p.is_file())


class Orthanc(Receiver):
    name = "orthanc"
    called_aet = "ORTHANC"
    storage = "fdatasync file (SyncStorageArea), no dir sync, SQLite WAL synchronous=NORMAL"

    def command(self) -> list[str]:
        self.http_port = free_port()
        config: dict[str, Any] = {
            "Name": "bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.called_aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        if self.max_pdu is not None:
            config["MaximumPduLength"] = self.max_pdu
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [str(ORTHANC), str(path)]

    def _get(self, route: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{route}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)

    def wait_ready(self) -> None:
        try:
            self._get("/system")
        except urllib.error.URLError as exc:
            raise RuntimeError(str(exc.reason)) from None
        self._require_echo()  # the DICOM port, too

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


class BareScp(Receiver):
    name = "bare"
    called_aet = "BARESCP"
    storage = "files only, no fsync, no index"

    def command(self) -> list[str]:
        self.out_dir = self.workdir / "files"
        self.out_dir.mkdir()
        pdu = ["--max-pdu", str(self.max_pdu)] if self.max_pdu is not None else []
        return [sys.executable, str(Path(__file__).resolve()), *pdu,
                "--bare-scp", str(self.port), str(self.out_dir)]

    def wait_ready(self) -> None:
        self._require_echo()

    def count(self) -> int:
        return sum(1 for p in self.out_dir.iterdir() if p.is_file())


RECEIVER_CLASSES: dict[str, type[Receiver]] = {
    cls.name: cls for cls in (Dicomnode, Storescp, Orthanc, BareScp)}


def bare_scp(port: int, out_dir: Path, max_pdu: int | None) -> None:
    """Run the bare pynetdicom SCP until SIGTERM (the ``--bare-scp`` mode)."""

    def on_open(event: evt.Event) -> None:
        set_nodelay(event.assoc)

    def on_store(event: evt.Event) -> int:
        name = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        (out_dir / f"{name}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=BareScp.called_aet)
    if max_pdu is not None:
        ae.maximum_pdu_size = max_pdu
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ae.start_server(("127.0.0.1", port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])


# -------------------------------------------------------------------------- sender


@dataclass
class Repetition:
    seconds: float
    instances: int
    megabytes: float
    instances_per_s: float
    mb_per_s: float
    latency_ms_p50: float
    latency_ms_p99: float
    receiver_cpu_s: float  # receiver process CPU time (all threads) while sending
    sender_cpu_s: float  # this process's CPU time while sending
    peak_rss_mib: float  # receiver's VmHWM, read before it is stopped
    acceptor_max_pdu: int  # the receiver's maximum PDU length, as it announced it
    load_1min: float = 0.0  # the machine's 1-minute load average after the repetition
    sender: str = "pynetdicom"
    associations: int = 1


def send_series(receiver: Receiver, paths: list[Path], total_bytes: int) -> Repetition:
    """Send every file over one association; check every status and the stored count."""
    sop_class = pydicom.dcmread(paths[0], stop_before_pixels=True)
    ae = AE(ae_title=SENDER_AET)
    ae.add_requested_context(sop_class.SOPClassUID, sop_class.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = DIMSE_TIMEOUT
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=receiver.called_aet)
    if not assoc.is_established:
        raise RuntimeError(f"{receiver.name}: association not established")
    set_nodelay(assoc)
    cpu_receiver = proc_cpu_seconds(receiver.pid)
    cpu_sender = self_cpu_seconds()
    latencies: list[float] = []
    start = time.perf_counter()
    try:
        for number, path in enumerate(paths):
            sent = time.perf_counter()
            status = assoc.send_c_store(path, msg_id=number % 65535 + 1)
            latencies.append(time.perf_counter() - sent)
            code = int(status.Status) if status and "Status" in status else None
            if code != 0x0000:
                answer = "no response" if code is None else f"status {code:#06x}"
                raise RuntimeError(
                    f"{receiver.name}: C-STORE {number + 1} of {len(paths)} failed after "
                    f"{latencies[-1]:.1f} s ({answer})")
        seconds = time.perf_counter() - start
    finally:
        if assoc.is_established:
            assoc.release()
    cpu_sender = self_cpu_seconds() - cpu_sender
    cpu_receiver = proc_cpu_seconds(receiver.pid) - cpu_receiver
    stored = receiver.count()
    if stored != len(paths):
        raise RuntimeError(f"{receiver.name} holds {stored} instances, {len(paths)} were sent")
    latencies.sort()
    megabytes = total_bytes / 1e6
    return Repetition(
        seconds=seconds, instances=len(paths), megabytes=megabytes,
        instances_per_s=len(paths) / seconds, mb_per_s=megabytes / seconds,
        latency_ms_p50=1e3 * statistics.median(latencies),
        latency_ms_p99=1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        receiver_cpu_s=cpu_receiver, sender_cpu_s=cpu_sender,
        peak_rss_mib=tree_peak_rss_mib(receiver.pid),
        acceptor_max_pdu=int(assoc.acceptor.maximum_length or 0),
    )


def send_storescu(receiver: Receiver, paths: list[Path], total_bytes: int,
                  associations: int) -> Repetition:
    """Send the files with DCMTK ``storescu``: ``associations`` processes at once, each a
    contiguous share of the series over one association; check the stored count."""
    shares = [paths[k::associations] for k in range(associations)]
    cpu_receiver = proc_cpu_seconds(receiver.pid)
    before = os.times()
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [str(STORESCU), "-aet", SENDER_AET, "-aec", receiver.called_aet, "-xs",
         "127.0.0.1", str(receiver.port), *map(str, share)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        for share in shares if share]
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=DIMSE_TIMEOUT * 10)
        if proc.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    seconds = time.perf_counter() - start
    after = os.times()
    cpu_receiver = proc_cpu_seconds(receiver.pid) - cpu_receiver
    if failures:
        raise RuntimeError(f"{receiver.name}: storescu failed: {failures[0]}")
    stored = receiver.count()
    if stored != len(paths):
        raise RuntimeError(f"{receiver.name} holds {stored} instances, {len(paths)} were sent")
    megabytes = total_bytes / 1e6
    sender_cpu = (after.children_user + after.children_system
                  - before.children_user - before.children_system)
    return Repetition(
        seconds=seconds, instances=len(paths), megabytes=megabytes,
        instances_per_s=len(paths) / seconds, mb_per_s=megabytes / seconds,
        latency_ms_p50=1e3 * seconds * associations / len(paths), latency_ms_p99=0.0,
        receiver_cpu_s=cpu_receiver, sender_cpu_s=sender_cpu,
        peak_rss_mib=tree_peak_rss_mib(receiver.pid),
        acceptor_max_pdu=0, load_1min=os.getloadavg()[0], sender="storescu",
        associations=associations,
    )


# -------------------------------------------------------------------------- the run


@dataclass
class Summary:
    name: str
    storage: str
    repetitions: list[Repetition] = field(default_factory=list)

    def stat(self, key: str) -> dict[str, float]:
        values = [float(getattr(r, key)) for r in self.repetitions]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine_info(workdir: Path) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = proc_meminfo_kib("MemTotal")
    usage = shutil.disk_usage(workdir)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "workdir": str(workdir),
        "disk_free_gib": round(usage.free / 2**30, 1),
        "disk_total_gib": round(usage.total / 2**30, 1),
    }


def proc_meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def versions() -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "dicomnode": f"{dist('dicomnode')} ({dicomnode_source()})",
        "pynetdicom": dist("pynetdicom"),
        "pydicom": dist("pydicom"),
        "sqlalchemy": dist("SQLAlchemy"),
        "sqlite": sqlite3.sqlite_version,
        "storescp": first_line([str(STORESCP), "--version"]),
        "orthanc": first_line([str(ORTHANC), "--version"]),
    }


def dicomnode_source() -> str:
    """Where the receivers' ``python -m dicomnode`` imports dicomnode from."""
    out = subprocess.run([sys.executable, "-c", "import dicomnode; print(dicomnode.__file__)"],
                         capture_output=True, text=True, timeout=60, env=child_env())
    return str(Path(out.stdout.strip()).parent) if out.returncode == 0 else "not importable"


def make_series(data_dir: Path, slices: int, rows: int) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tools"))
    import testdata  # tools/testdata.py

    return list(testdata.synthetic_ct(data_dir, slices=slices, rows=rows, columns=rows))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    info = {"machine": machine_info(workdir), "versions": versions()}
    print_header(info)
    started = time.perf_counter()
    paths = make_series(workdir / "series", args.slices, args.rows)
    total_bytes = sum(p.stat().st_size for p in paths)
    print(f"series: {len(paths)} instances of {args.rows}x{args.rows}, "
          f"{total_bytes / 1e6:.1f} MB, built in {time.perf_counter() - started:.1f} s\n")

    summaries = {name: Summary(name, RECEIVER_CLASSES[name].storage) for name in args.receivers}
    # Rounds, each receiver once per round, starting with a different one each round, so
    # drift of the shared machine and disk, and what one run leaves behind (dirty pages
    # still being written back) do not always fall on the same receiver.
    order: list[str] = list(args.receivers)
    for rep in range(1, args.repeat + 1):
        shift = (rep - 1) % len(order)
        for name in order[shift:] + order[:shift]:
            rundir = workdir / f"{name}-{rep}"
            rundir.mkdir()
            receiver = RECEIVER_CLASSES[name](rundir, args.max_pdu)
            try:
                receiver.start()
                if args.sender == "storescu":
                    result = send_storescu(receiver, paths, total_bytes, args.associations)
                else:
                    if args.associations != 1:
                        raise SystemExit("--associations needs --sender storescu")
                    result = send_series(receiver, paths, total_bytes)
                    result.load_1min = os.getloadavg()[0]
            except Exception:
                print(f"--- {name} log:\n{receiver.log_tail()}", file=sys.stderr)
                raise
            finally:
                receiver.stop()
            shutil.rmtree(rundir, ignore_errors=True)
            summaries[name].repetitions.append(result)
            print(f"  round {rep} {name:<10} {result.instances_per_s:7.1f} inst/s "
                  f"{result.mb_per_s:7.1f} MB/s  ({result.seconds:.2f} s, "
                  f"receiver CPU {result.receiver_cpu_s:.2f} s, "
                  f"sender CPU {result.sender_cpu_s:.2f} s, peak RSS "
                  f"{result.peak_rss_mib:.0f} MiB, load {result.load_1min:.2f})", flush=True)

    ratios = {}
    if "dicomnode" in summaries:
        ours = summaries["dicomnode"].stat("instances_per_s")["median"]
        for other in summaries:
            if other != "dicomnode":
                ratios[other] = ours / summaries[other].stat("instances_per_s")["median"]
    report = {
        **info,
        "series": {"instances": len(paths), "rows": args.rows, "columns": args.rows,
                   "transfer_syntax": "1.2.840.10008.1.2.1", "bytes": total_bytes},
        "repeat": args.repeat,
        "max_pdu": args.max_pdu,
        "sender": args.sender,
        "associations": args.associations,
        "receive_processes": args.receive_processes,
        "receivers": {
            name: {
                "storage": s.storage,
                "instances_per_s": s.stat("instances_per_s"),
                "mb_per_s": s.stat("mb_per_s"),
                "peak_rss_mib": max(r.peak_rss_mib for r in s.repetitions),
                "receiver_cpu_ms_per_instance": s.stat("receiver_cpu_s")["median"]
                * 1e3 / len(paths),
                "load_1min": s.stat("load_1min"),
                "repetitions": [asdict(r) for r in s.repetitions],
            }
            for name, s in summaries.items()
        },
        "ratios_dicomnode_to": ratios,
        "targets": {other: {"ratio": ratios[other], "target": target,
                            "met": ratios[other] >= target}
                    for other, target in (TARGETS if args.associations == 1
                                          else TARGETS_CONCURRENT).items()
                    if other in ratios},
    }
    print_table(report)
    return report


# -------------------------------------------------------------------------- output


def print_header(info: dict[str, Any]) -> None:
    m, v = info["machine"], info["versions"]
    print(f"machine: {m['nproc']} CPU(s), {m['cpu_model']}, {m['memory_gib']} GiB RAM, "
          f"kernel {m['kernel']}")
    print(f"disk:    {m['disk_free_gib']} GiB free of {m['disk_total_gib']} GiB at {m['workdir']}")
    print(f"versions: python {v['python']}, dicomnode {v['dicomnode']}, "
          f"pynetdicom {v['pynetdicom']}, pydicom {v['pydicom']}, "
          f"SQLAlchemy {v['sqlalchemy']}, SQLite {v['sqlite']}")
    print(f"          {v['storescp']}; {v['orthanc']}")


def print_table(report: dict[str, Any]) -> None:
    series = report["series"]
    print(f"\n{series['instances']} instances, {series['bytes'] / 1e6:.1f} MB per repetition, "
          f"{report['repeat']} repetition(s); median [min - max]\n")
    header = (f"{'receiver':<10} {'inst/s':>22} {'MB/s':>22} {'p50 ms':>7} {'CPU ms':>7} "
              f"{'peak RSS':>9} {'max PDU':>8}")
    print(header)
    print("-" * len(header))
    for name, r in report["receivers"].items():
        ips, mbs, reps = r["instances_per_s"], r["mb_per_s"], r["repetitions"]
        p50 = statistics.median(x["latency_ms_p50"] for x in reps)
        cpu = statistics.median(1e3 * x["receiver_cpu_s"] / x["instances"] for x in reps)
        pdu = reps[0]["acceptor_max_pdu"]
        print(f"{name:<10} {ips['median']:6.1f} [{ips['min']:5.1f} - {ips['max']:5.1f}] "
              f"{mbs['median']:6.1f} [{mbs['min']:5.1f} - {mbs['max']:5.1f}] "
              f"{p50:7.1f} {cpu:7.1f} {r['peak_rss_mib']:5.0f} MiB {pdu:>8}")
    print("\np50 ms: median time from C-STORE request to response; CPU ms: receiver CPU time")
    print("per instance (all threads); peak RSS: receiver's VmHWM; max PDU: as it announced.")
    for name, r in report["receivers"].items():
        print(f"  {name:<10} {r['storage']}")
    if report["ratios_dicomnode_to"]:
        print()
        for other, ratio in report["ratios_dicomnode_to"].items():
            target = report["targets"].get(other)
            verdict = ""
            if target:
                verdict = (f"  target >= {target['target']:.1f}x: "
                           f"{'met' if target['met'] else 'NOT met'}")
            print(f"dicomnode / {other:<9} {ratio:5.2f}x{verdict}")


# -------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per receiver")
    parser.add_argument("--slices", type=int, default=300, help="instances in the series")
    parser.add_argument("--rows", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--sender", choices=SENDERS, default="storescu",
                        help="DCMTK storescu (default) or pynetdicom in this process")
    parser.add_argument("--associations", type=int, default=1,
                        help="concurrent storescu associations, each a share of the series")
    parser.add_argument("--receive-processes", type=int, default=1,
                        help="dicomnode's node.receive_processes (receiver processes)")
    parser.add_argument("--receivers", nargs="+", choices=RECEIVERS, default=list(RECEIVERS))
    parser.add_argument("--max-pdu", type=int, default=None,
                        help="receivers' maximum PDU length (default: each one's own)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a new temporary folder, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--bare-scp", nargs=2, metavar=("PORT", "DIR"),
                        help=argparse.SUPPRESS)  # internal: run the bare pynetdicom SCP
    args = parser.parse_args(argv)

    if args.bare_scp:
        bare_scp(int(args.bare_scp[0]), Path(args.bare_scp[1]), args.max_pdu)
        return 0
    if args.repeat < 1 or args.slices < 1 or args.rows < 1:
        parser.error("--repeat, --slices and --rows must be positive")
    global RECEIVE_PROCESSES
    RECEIVE_PROCESSES = args.receive_processes

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # readiness polls fail noisily
    _config.STORE_SEND_CHUNKED_DATASET = True
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="bench-receive-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    try:
        report = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
