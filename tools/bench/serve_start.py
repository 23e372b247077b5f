#!/usr/bin/env python3
"""Start-up of ``dicomnode serve``: seconds until it answers C-ECHO and the resident memory of
its own process (the worker processes that run models are not counted: they are spawned after
the node listens and hold the models), side by side with DCMTK's ``storescp`` and Orthanc.

Each round starts a fresh process with empty storage on 127.0.0.1 and polls with DCMTK
``echoscu`` every 20 ms until one echo succeeds; the resident set (``VmRSS`` of
``/proc/PID/status``) is read then, and again after ``--settle`` seconds (dicomnode: its workers
have loaded the rule's model by then). The node runs with the shipped models, one rule naming
``ct-body`` (so its workers load a model at start) and the console on.

Usage::

    python tools/bench/serve_start.py [--rounds 5] [--settle 5]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ECHOSCU = Path("/usr/bin/echoscu")
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _echo(port: int, aet: str) -> bool:
    proc = subprocess.run([str(ECHOSCU), "-aet", "ECHOSCU", "-aec", aet, "-to", "1",
                           "127.0.0.1", str(port)], capture_output=True, check=False)
    return proc.returncode == 0


def _measure(start: Callable[[Path, int], subprocess.Popen[bytes]], aet: str,
             settle: float) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = _port()
        t0 = time.perf_counter()
        proc = start(Path(tmp), port)
        try:
            while not _echo(port, aet):
                if proc.poll() is not None:
                    raise RuntimeError(f"{aet} exited with {proc.returncode}")
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"{aet} did not answer C-ECHO in 60 s")
                time.sleep(0.02)
            seconds = time.perf_counter() - t0
            first = _rss_mb(proc.pid)
            time.sleep(settle)
            later = _rss_mb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return seconds, first, later


def _dicomnode(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    (tmp / "rules").mkdir()
    (tmp / "rules" / "rules.yaml").write_text(
        'rules:\n  - name: ct\n    select: SELECT study FROM patient WHERE series NAMED "ct" '
        'HAS Modality = "CT"\n    model: ct-body\n')
    (tmp / "dicomnode.yaml").write_text(
        f"node: {{port: {port}}}\nstorage: {{path: store, min_free_bytes: 0}}\n"
        f"rules_dir: rules\nmodels_dir: {ROOT / 'models'}\nweb: {{port: 0}}\n"
        "peers: {echo: {ae_title: ECHOSCU, host: 127.0.0.1}}\n")
    return subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config",
                             str(tmp / "dicomnode.yaml")], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _storescp(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(STORESCP), "-od", str(tmp), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _orthanc(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    config = tmp / "orthanc.json"
    config.write_text(f'{{"StorageDirectory": "{tmp / "db"}", "IndexDirectory": "{tmp / "db"}",'
                      f' "DicomPort": {port}, "HttpPort": {_port()}, "DicomAet": "ORTHANC",'
                      ' "RemoteAccessAllowed": false, "Plugins": []}')
    return subprocess.Popen([str(ORTHANC), str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args()
    if not ECHOSCU.is_file():
        print("needs DCMTK (apt-get install dcmtk)", file=sys.stderr)
        return 2
    receivers: list[tuple[str, Callable[[Path, int], subprocess.Popen[bytes]], str]] = [
        ("dicomnode", _dicomnode, "DICOMNODE"), ("storescp", _storescp, "ANY-SCP")]
    if ORTHANC.is_file() and shutil.which(str(ORTHANC)):
        receivers.append(("orthanc", _orthanc, "ORTHANC"))
    print(f"{'receiver':<10} {'start s (median, min-max)':>26} {'RSS MB at first echo':>21} "
          f"{'RSS MB after settle':>20}")
    for name, start, aet in receivers:
        rows = [_measure(start, aet, args.settle) for _ in range(args.rounds)]
        secs = [r[0] for r in rows]
        print(f"{name:<10} {statistics.median(secs):>10.3f} ({min(secs):.3f}-{max(secs):.3f})"
              f"      {statistics.median(r[1] for r in rows):>15.1f} "
              f"{statistics.median(r[2] for r in rows):>20.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
