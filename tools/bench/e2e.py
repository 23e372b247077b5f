#!/usr/bin/env python3
"""End to end: from the last instance acknowledged to the results stored in Orthanc.

One Orthanc 1.10 (``/usr/sbin/Orthanc``) and one ``python -m dicomnode serve`` run on
127.0.0.1 with free ports. The node has two rules (a CT series -> ``ct-body``, an MR
series -> ``brain-mr``) sending to Orthanc, a pseudonymization key, and every other
setting at its default; the console, on by default, gets a free port. Cases:

* ``cranium``: the InVesalius Cranium CT, 108 slices 256x256 -> ``ct-body``;
* ``ct300``: the synthetic CT of ``tools/testdata.py``, 300 slices 512x512 -> ``ct-body``;
* ``colin27``: the Colin27 T1 MR, 181 slices 217x181 -> ``brain-mr``.

Per case and round: the series is written with fresh UIDs and uploaded to Orthanc over
REST (not timed); the node is left to go idle; then ``POST /modalities/dicomnode/store``
makes Orthanc C-STORE the study to the node. That call is synchronous: when it returns
the last instance has been acknowledged (``t0``). The script then polls Orthanc until
the study holds both a SEG and an RTSTRUCT series (``t_end``), and splits ``t_end - t0``
with the index (``dicomnode jobs --json`` and ``outbox --json``; all naive UTC):

  wait     job created_at - t0 (the rule fired)
  queue    job started_at - created_at (a worker claimed it)
  worker   finished_at - started_at - the job's own step timings (hand-off to the worker
           process, spawning it on the first job, recording the outcome)
  pseudo, read, infer (model = session.run, inside infer), write, reid: the job's timings
  send     t_end - finished_at (outbox pick-up, association, C-STORE, this poll)
  total    t_end - t0;  non-model = total - model

Each case runs twice per round (``--sizes``): as the data comes (``cranium``: its
instances do not state the series' size, so the node must wait for the series' quiet time,
``completion.series_quiet_seconds``, 10 s by default), and with every instance stating it
(``cranium+size``: ImagesInAcquisition, so the series settles as its last instance arrives).

Targets: the rule fires within 1 s of the configured quiet time (the longer of the series' and
the study's) when the data does not state its size, and within 1 s when it does (``wait``,
every run); everything except the model under 3 s for the 300-slice CT (``non-model``).
A round's job is "cold" when it is the first job of its model in this node (the worker
loads the model; on the very first job it is also spawned). Medians leave cold runs out
when a case has warm ones.

Usage::

    python tools/bench/e2e.py [--repeat 3] [--cases cranium,ct300,colin27] [--json OUT]
        [--poll 0.025] [--set outbox.check_interval_seconds=0.5 ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from orthanc_server import ORTHANC, OrthancServer  # noqa: E402  (tools/, after sys.path)

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
HOST = "127.0.0.1"
NODE_AET = "DICOMNODE"
ORTHANC_AET = "ORTHANC"
KEY = b"e2e-benchmark-key-0123456789abcdef"
CASES: dict[str, tuple[str, str]] = {  # name: (model, description)
    "cranium": ("ct-body", "Cranium CT, 108 x 256x256"),
    "ct300": ("ct-body", "synthetic CT, 300 x 512x512"),
    "colin27": ("brain-mr", "Colin27 T1 MR, 181 x 217x181"),
}
FIRE_MARGIN_S = 1.0  # the rule fires within this long after the quiet time (or at once)
NON_MODEL_TARGET_S = 3.0  # everything but session.run, for the 300-slice CT
NON_MODEL_CASE = "ct300"
STEPS = ("pseudonymize", "read", "inference", "write", "reidentify")

RULES = """rules:
  - name: ct
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [orthanc]
  - name: mr
    select: >-
      SELECT study FROM patient WHERE series NAMED "t1" HAS Modality = "MR"
    model: brain-mr
    send_to: [orthanc]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """TCP_NODELAY=1 (DCMTK inside Orthanc reads it) and this checkout first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": path}


def utc(text: str | None) -> float | None:
    """An index time (ISO 8601 UTC with ``Z``) as POSIX seconds."""
    if text is None:
        return None
    return dt.datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=dt.timezone.utc).timestamp()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -------------------------------------------------------------------------- the node


class Node:
    """One ``python -m dicomnode serve`` with the two rules sending to Orthanc."""

    def __init__(self, workdir: Path, orthanc: OrthancServer, port: int,
                 overrides: dict[str, Any]) -> None:
        self.workdir = workdir
        self.port = port
        self.log_path = workdir / "node.log"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules").mkdir(exist_ok=True)
        (workdir / "rules" / "rules.yaml").write_text(RULES, encoding="utf-8")
        key = workdir / "deid.key"
        key.write_bytes(KEY)
        key.chmod(0o600)
        self.config: dict[str, Any] = {
            "node": {"ae_title": NODE_AET, "host": HOST, "port": port},
            "storage": {"path": str(workdir / "store"), "min_free_bytes": 0},
            "peers": {"orthanc": {"ae_title": ORTHANC_AET, "host": HOST,
                                  "port": orthanc.dicom_port}},
            "rules_dir": str(workdir / "rules"),
            "models_dir": str(ROOT / "models"),
            "deid": {"key_file": str(key)},
        }
        from dicomnode.config import Config  # this checkout's (ROOT is first on sys.path)

        if "web" in Config.model_fields:  # the console: on, as by default, on a free port
            self.config["web"] = {"port": 0}
        from dicomnode.config import PeerConfig

        if "research" in PeerConfig.model_fields:  # brain-mr is a research model
            self.config["peers"]["orthanc"]["research"] = True
        for dotted, value in overrides.items():
            section: dict[str, Any] = self.config
            *parents, last = dotted.split(".")
            for part in parents:
                section = section.setdefault(part, {})
            section[last] = value
        self.config_path = workdir / "dicomnode.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def quiet_seconds(self) -> float:
        """The quiet time a study whose series do not state their size waits for (s)."""
        from dicomnode.config import Config

        completion = Config.model_validate(self.config).completion
        return max(completion.quiet_seconds,
                   float(getattr(completion, "series_quiet_seconds", 0.0)))

    def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=child_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dicomnode exited:\n{tail(self.log_path)}")
            if "listening as" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"dicomnode did not start:\n{tail(self.log_path)}")

    def stop(self) -> None:
        stop_process(self.proc, 60.0)

    def cli(self, *args: str) -> Any:
        """A ``dicomnode ... --json`` command's answer."""
        out = subprocess.run(
            [sys.executable, "-m", "dicomnode", *args, "--json", "--config",
             str(self.config_path)],
            capture_output=True, text=True, timeout=120, env=child_env())
        if out.returncode != 0:
            raise RuntimeError(f"dicomnode {' '.join(args)} failed:\n{out.stderr}")
        return json.loads(out.stdout)

    def idle(self) -> bool:
        """Every study complete, no job pending or running, nothing left in the outbox."""
        studies = self.cli("studies")["studies"]
        jobs = self.cli("jobs")["jobs"]
        counts = self.cli("outbox")["counts"]
        return (all(s["state"] == "complete" for s in studies)
                and all(j["state"] in ("done", "failed") for j in jobs)
                and counts["pending"] == 0 and counts["sending"] == 0)


# -------------------------------------------------------------------------- one run


@dataclass
class Run:
    case: str
    round: int
    instances: int
    cold: bool  # the first job of its model in this node (worker loads the model)
    spawn: bool  # the first job of this node (the worker process is spawned, too)
    push: float  # Orthanc's synchronous C-STORE call (not part of total)
    ack_lag: float  # t0 - the node's last_received_at of the study (how late t0 is)
    wait: float
    queue: float
    worker: float
    pseudonymize: float
    read: float
    inference: float
    model: float
    write: float
    reidentify: float
    send: float
    outbox: float  # last item's sent_at - job finished_at (inside send)
    total: float
    non_model: float
    trigger: str
    provider: str
    outbox_items: int
    load: float  # 1-minute load average of the machine at t0
    fire_ok: bool = False
    non_model_ok: bool | None = None
    times: dict[str, Any] = field(default_factory=dict)


def make_series(label: str, folder: Path, round_no: int) -> list[Path]:
    import pydicom
    import testdata  # tools/testdata.py

    case, stated = base_case(label), label.endswith(SIZE_SUFFIX)
    patient = {"patient_id": f"E2E-{case.upper()}-{round_no}",
               "patient_name": f"Bench^{case.capitalize()}{round_no}"}
    if case == "cranium":
        paths = list(testdata.cranium_ct(folder, **patient))
    elif case == "ct300":
        paths = list(testdata.synthetic_ct(folder, slices=300, **patient))
    else:
        paths = list(testdata.colin27_mr(folder, **patient))
    if stated:  # every instance says how many images the series has
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.AcquisitionNumber = 1
            ds.ImagesInAcquisition = len(paths)
            ds.save_as(path)
    return paths


SIZE_SUFFIX = "+size"


def base_case(label: str) -> str:
    return label.removesuffix(SIZE_SUFFIX)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def results_stored(orthanc: OrthancServer, study_id: str, known: dict[str, str]) -> bool:
    """True when the study holds a SEG and an RTSTRUCT series (``known``: series -> modality)."""
    for series in orthanc.get(f"/studies/{study_id}")["Series"]:
        if series not in known:
            known[series] = str(orthanc.get(f"/series/{series}")["MainDicomTags"]
                                .get("Modality", ""))
    return {"SEG", "RTSTRUCT"} <= set(known.values())


def one_run(case: str, round_no: int, orthanc: OrthancServer, node: Node, data_dir: Path,
            models_seen: set[str], poll: float, timeout: float) -> Run:
    folder = data_dir / f"{case}-{round_no}"
    paths = make_series(case, folder, round_no)
    study_id = ""
    for path in paths:
        study_id = str(orthanc.upload(path)["ParentStudy"])
    shutil.rmtree(folder, ignore_errors=True)
    known: dict[str, str] = {}
    if results_stored(orthanc, study_id, known):
        raise RuntimeError(f"{case}: the study already holds results before the push")
    jobs_before = {j["id"] for j in node.cli("jobs")["jobs"]}
    wait_until(node.idle, 120, "the node to be idle")

    pushed = time.time()
    orthanc.push("dicomnode", [study_id])
    t0 = time.time()
    load = os.getloadavg()[0]
    deadline = time.monotonic() + timeout
    while not results_stored(orthanc, study_id, known):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{case}: no SEG and RTSTRUCT in Orthanc after {timeout:g} s;"
                               f" node log:\n{tail(node.log_path)}")
        time.sleep(poll)
    t_end = time.time()

    study_uid = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
    (study,) = node.cli("studies", "--study", study_uid)["studies"]
    jobs = [j for j in node.cli("jobs")["jobs"]
            if j["id"] not in jobs_before and j["study"] == study["id"]]
    if len(jobs) != 1 or jobs[0]["state"] != "done":
        raise RuntimeError(f"{case}: expected one done job, found {json.dumps(jobs)}")
    job = jobs[0]
    items = [i for i in node.cli("outbox")["items"] if i["job_id"] == job["id"]]
    if not items or any(i["state"] != "sent" for i in items):
        raise RuntimeError(f"{case}: outbox items not all sent: {json.dumps(items)}")

    model = CASES[base_case(case)][0]
    created, started, finished = (utc(job[k]) for k in ("created_at", "started_at",
                                                        "finished_at"))
    assert created is not None and started is not None and finished is not None
    last_received = utc(study["last_received_at"])
    assert last_received is not None
    last_sent = max(utc(i["sent_at"]) or 0.0 for i in items)
    timings = job["timings"]
    steps = {s: float(timings.get(s, 0.0)) for s in STEPS}
    total = t_end - t0
    run = Run(
        case=case, round=round_no, instances=len(paths),
        cold=model not in models_seen, spawn=not models_seen,
        push=t0 - pushed, ack_lag=t0 - last_received,
        wait=created - t0, queue=started - created,
        worker=finished - started - sum(steps.values()),
        pseudonymize=steps["pseudonymize"], read=steps["read"], inference=steps["inference"],
        write=steps["write"], reidentify=steps["reidentify"], model=float(timings["model"]),
        send=t_end - finished, outbox=last_sent - finished,
        total=total, non_model=total - float(timings["model"]),
        trigger=str(job["trigger"]), provider=str(timings.get("provider", "")),
        outbox_items=len(items), load=load,
        times={"t_push": pushed, "t0": t0, "t_end": t_end, "last_received_at": last_received,
               "job": job, "outbox": items},
    )
    run.fire_ok = run.wait <= fire_target(case, node)
    if base_case(case) == NON_MODEL_CASE:
        run.non_model_ok = run.non_model < NON_MODEL_TARGET_S
    models_seen.add(model)
    return run


# -------------------------------------------------------------------------- report

COLUMNS = ("push", "wait", "queue", "worker", "pseudonymize", "read", "inference", "model",
           "write", "reidentify", "send", "total", "non_model")
HEADS = ("push", "wait", "queue", "worker", "pseudo", "read", "infer", "model", "write",
         "reid", "send", "total", "non-model")


def fire_target(label: str, node: Node) -> float:
    """The latest the rule may fire after the last instance (s)."""
    if label.endswith(SIZE_SUFFIX):
        return FIRE_MARGIN_S
    return node.quiet_seconds() + FIRE_MARGIN_S


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def run_line(r: Run) -> str:
    values = " ".join(f"{getattr(r, c):6.2f}" for c in COLUMNS)
    flag = "cold" if r.cold else "warm"
    return (f"{r.case:<12} {r.round:>2} {flag:<4} {values}  {verdict(r.fire_ok):>4} "
            f"{verdict(r.non_model_ok):>4} {r.load:5.1f}")


def header() -> str:
    return (f"{'case':<12} {'rd':>2} {'':<4} " + " ".join(f"{h:>6}" for h in HEADS)
            + f"  {'fire':>4} {'<3s':>4} {'load':>5}")


def summarize(runs: list[Run], cases: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case in cases:
        mine = [r for r in runs if r.case == case]
        warm = [r for r in mine if not r.cold] or mine
        med = {c: statistics.median(float(getattr(r, c)) for r in warm) for c in COLUMNS}
        med["outbox"] = statistics.median(r.outbox for r in warm)
        med["ack_lag"] = statistics.median(r.ack_lag for r in warm)
        summary[case] = {
            "model": CASES[base_case(case)][0], "series": CASES[base_case(case)][1],
            "instances": mine[0].instances, "size_stated": case.endswith(SIZE_SUFFIX),
            "runs": len(warm), "runs_are_warm": any(not r.cold for r in mine),
            "median": med,
            "max_wait": max(r.wait for r in mine),
            "max_non_model_warm": max(r.non_model for r in warm),
            "fire_ok": all(r.fire_ok for r in mine),
            "non_model_ok": (med["non_model"] < NON_MODEL_TARGET_S
                             if base_case(case) == NON_MODEL_CASE else None),
            "triggers": sorted({r.trigger for r in mine}),
        }
    return summary


def print_summary(summary: dict[str, Any], quiet: float) -> None:
    print("\nmedians over warm runs (seconds):")
    print(f"{'case':<12} {'n':>2} {'':<4} " + " ".join(f"{h:>6}" for h in HEADS))
    for case, s in summary.items():
        med = s["median"]
        flag = "warm" if s["runs_are_warm"] else "cold"
        print(f"{case:<12} {s['runs']:>2} {flag:<4} "
              + " ".join(f"{med[c]:6.2f}" for c in COLUMNS))
    print()
    for stated in (False, True):
        mine = {c: s for c, s in summary.items() if s["size_stated"] == stated}
        if not mine:
            continue
        fire = all(s["fire_ok"] for s in mine.values())
        waits = ", ".join(f"{c} {s['median']['wait']:.2f} (max {s['max_wait']:.2f})"
                          for c, s in mine.items())
        what = (f"within {FIRE_MARGIN_S:g} s of the last instance (size stated)" if stated
                else f"within {FIRE_MARGIN_S:g} s of the {quiet:g} s quiet time (size not "
                     "stated)")
        print(f"target 1, the rule fires {what}, every run: {verdict(fire)}  [{waits}]")
    if NON_MODEL_CASE in summary:
        s = summary[NON_MODEL_CASE]
        med = s["median"]
        parts = [(c, med[c]) for c in ("wait", "queue", "worker", "pseudonymize", "read",
                                        "write", "reidentify", "send")]
        parts.append(("inference outside session.run", med["inference"] - med["model"]))
        where = ", ".join(f"{c} {v:.2f}" for c, v in sorted(parts, key=lambda kv: -kv[1]))
        print(f"target 2, everything except the model < {NON_MODEL_TARGET_S:g} s for the "
              f"300-slice CT (median): {verdict(s['non_model_ok'])}  "
              f"[{med['non_model']:.2f} s = {where}]")
    else:
        print("target 2: not measured (the ct300 case was not run)")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    orthanc = subprocess.run([str(ORTHANC), "--version"], capture_output=True, text=True,
                             timeout=30)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dicomnode"],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(),
            "orthanc": (orthanc.stdout.strip().splitlines() or ["?"])[0],
            "checkout": f"{head or '?'} + {len(changed)} changed path(s) under dicomnode/"}


# -------------------------------------------------------------------------- main


def parse_set(values: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE (e.g. outbox.check_interval_seconds=0.5),"
                             f" not {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the cases")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, in order (default {','.join(CASES)})")
    parser.add_argument("--poll", type=float, default=0.025,
                        help="seconds between polls of Orthanc for the results")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a node setting (dotted key, YAML value); repeatable")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a new temporary folder, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--sizes", default="unstated,stated",
                        help="run each case as it is (unstated) and/or with its instances "
                             "stating the series' size (stated)")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    if not sizes or set(sizes) - {"stated", "unstated"}:
        parser.error("--sizes takes stated, unstated or both")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not ORTHANC.exists():
        parser.error(f"{ORTHANC} missing: install the Debian package orthanc")
    if "colin27" in cases and not CH2.is_file():
        parser.error(f"{CH2} missing: install the Debian package mricron-data")
    overrides = parse_set(args.set)

    base = args.workdir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=base))
    info = machine()
    print(f"machine: {info['cpus']} CPU(s), {info['cpu']}, python {info['python']}, "
          f"kernel {info['kernel']}; {info['orthanc']}; checkout {info['checkout']}")
    print(f"node settings changed from the defaults: {overrides or 'none'}")
    node_port = free_port()
    orthanc = OrthancServer(workdir / "orthanc", ae_title=ORTHANC_AET,
                            modalities={"dicomnode": (NODE_AET, node_port)})
    node = Node(workdir / "node", orthanc, node_port, overrides)
    labels = [c + (SIZE_SUFFIX if size == "stated" else "") for c in cases for size in sizes]
    runs: list[Run] = []
    try:
        orthanc.start()
        node.start()
        print(header(), flush=True)
        models_seen: set[str] = set()
        for round_no in range(1, args.repeat + 1):
            for case in labels:
                run = one_run(case, round_no, orthanc, node, workdir / "data", models_seen,
                              args.poll, args.timeout)
                runs.append(run)
                print(run_line(run), flush=True)
        studies = len(orthanc.get("/studies"))
        if studies != len(runs):  # results must land in the original studies only
            raise RuntimeError(f"Orthanc holds {studies} studies, {len(runs)} were pushed")
    except Exception:
        print(f"--- node log:\n{tail(node.log_path)}", file=sys.stderr)
        raise
    finally:
        node.stop()
        orthanc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs, labels)
    print_summary(summary, node.quiet_seconds())
    print(f"\nproviders: {sorted({r.provider for r in runs})}; triggers: "
          f"{sorted({r.trigger for r in runs})}; t0 after the node's last_received_at: "
          f"median {statistics.median(r.ack_lag for r in runs):.3f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": info, "overrides": overrides, "repeat": args.repeat, "poll": args.poll,
            "targets": {"fire_margin_s": FIRE_MARGIN_S, "quiet_s": node.quiet_seconds(),
                        "non_model_s": NON_MODEL_TARGET_S},
            "summary": summary, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
