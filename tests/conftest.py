"""Shared fixtures: real dicomnode processes on loopback ports, real peers, real files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import yaml

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

DCMTK = Path("/usr/bin")  # a pip package installs its own `storescu` on PATH: use DCMTK's


def load_tool(name: str) -> ModuleType:
    """The module of ``tools/NAME.py`` (a conversion tool), loaded once per process."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part-10 file, without preamble and File Meta Information."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part-10 file"
    assert data[132:136] == b"\x02\x00\x00\x00", "file meta must start with its group length"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


@dataclass
class RunningNode:
    """A `dicomnode serve` (or `dicomnode worker`) process started by the tests."""

    config_path: Path
    port: int
    store: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    command: str = "serve"

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        started = len(self.log())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", self.command, "--config",
             str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.config_path.parent)
        # logged once the socket is bound and listening; a worker has no socket
        ready = "listening as" if self.command == "serve" else "started as worker"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early:\n{self.log()}")
            if ready in self.log()[started:]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"node did not start:\n{self.log()}")

    def console_url(self) -> str:
        """The console's base URL, from the node's log (its port is picked when it starts)."""
        deadline = time.monotonic() + 10
        while (found := re.search(r"console at (http://[^/\s]+)/", self.log())) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no console in the node's log:\n{self.log()}")
            time.sleep(0.05)
        return found.group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "dicomnode", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"dicomnode {' '.join(args)} failed:\n{result.stderr}")
        return result

    def studies(self) -> list[dict[str, Any]]:
        report = json.loads(self.cli("studies", "--json").stdout)
        assert report["schema"] == 1
        studies: list[dict[str, Any]] = report["studies"]
        return studies

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            studies = self.studies()
            if predicate(studies):
                return studies
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; studies: {json.dumps(studies)[:2000]}")
            time.sleep(0.2)


NodeFactory = Callable[..., RunningNode]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *,
               interval: float = 0.2) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something true, and
    return that; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start `dicomnode serve` processes with a test configuration; stopped at teardown."""
    nodes: list[RunningNode] = []

    def make(*, quiet_seconds: float = 1.0, min_free_bytes: int = 0, start: bool = True,
             command: str = "serve", **overrides: Any) -> RunningNode:
        base = tmp_path / f"node{len(nodes)}"
        base.mkdir()
        port = free_port()
        config: dict[str, Any] = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                     "shutdown_grace_seconds": 20},
            "storage": {"path": "store", "min_free_bytes": min_free_bytes},
            "peers": {
                "testscu": {"ae_title": "TESTSCU", "host": "127.0.0.1"},
                "storescu": {"ae_title": "STORESCU", "host": "localhost"},
                "self": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
            },
            "completion": {"quiet_seconds": quiet_seconds, "series_quiet_seconds": 0.5,
                           "check_interval_seconds": 0.2},
            "web": {"port": 0},  # a free port, logged as "console at http://HOST:PORT/"
            "logging": {"level": "INFO"},
        }
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        path = base / "dicomnode.yaml"
        path.write_text(yaml.safe_dump(config))
        node = RunningNode(path, port, base / "store", base / "node.log", command=command)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    for node in nodes:
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait(10)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def small_ct(data_dir: Path) -> list[Path]:
    import testdata

    return testdata.synthetic_ct(data_dir / "small_ct", slices=24, rows=64, columns=64)


def start_storage_scp(ae_title: str, on_store: Callable[[Any], Any]) -> tuple[int, Any]:
    """A pynetdicom Storage SCP on a free loopback port calling ``on_store`` with each
    C-STORE event (it returns the status); returns the port and the server (shut it down)."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    port = free_port()
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    return port, server


class DcmtkStoreSCP:
    """DCMTK storescp (AE title DEST) on a free loopback port, writing every received
    instance to its own file (+uf) in ``folder``; ``close()`` stops it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(DCMTK / "storescp"), "-aet", "DEST", "+uf", "-od", str(folder), str(self.port)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def counts(self, keyword: str) -> Counter[str]:
        """How many received instances have each value of ``keyword``."""
        import pydicom

        return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).get(keyword))
                       for p in self.folder.iterdir() if p.is_file())

    def received(self) -> Counter[str]:
        """Instances received per SOP Instance UID."""
        return self.counts("SOPInstanceUID")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def storescu(port: int, *paths: Path, aet: str = "STORESCU", aec: str = "DICOMNODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send with DCMTK's storescu (TCP_NODELAY=1: DCMTK leaves Nagle on otherwise)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [str(DCMTK / "storescu"), "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, text=True, timeout=300, env=env)


def write_model_card(folder: Path, inputs: Sequence[tuple[str, str]]) -> Path:
    """Write a minimal valid model card (no ONNX file) taking ``inputs`` (name, modality)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"name: {folder.name}",
        "version: 0.0.1",
        "description: test card",
        "intended_use: tests",
        "status: clinical",
        "license: Apache-2.0",
        "authors: [tests]",
        "source: tests",
        "inputs:",
        *(f"  - {{name: {name}, modality: {modality}}}" for name, modality in inputs),
        "outputs:",
        "  labels:",
        "    - {value: 1, channel: 0, name: Thing, color: [255, 0, 0],",
        "       category: {scheme: SCT, value: '123037004', meaning: Anatomical Structure},",
        "       type: {scheme: SCT, value: '12738006', meaning: Brain}}",
    ]
    path = folder / "card.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server (tests/postgres.py) for the session; skips without one."""
    from postgres import PostgresServer, pg_bin_dir

    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL binaries not installed (Debian package postgresql)")
    pytest.importorskip("psycopg", reason="psycopg not installed (the test extra)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """The SQLAlchemy URL of a new empty database on the session's PostgreSQL server."""
    url: str = postgres.create_database()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty index's URL: a SQLite file, then (second parameter) a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def index(index_url: str) -> Iterator[Any]:
    """The index at ``index_url`` (SQLite and PostgreSQL), disposed at teardown."""
    from dicomnode.store.db import open_index

    opened = open_index(index_url)
    yield opened
    opened.dispose()


def store_study_with_a_job(node: Any, folder: Path, **series: Any) -> int:
    """Store a small CT series in an in-process node (``dicomnode.node.Node``) and complete
    its study: its rule creates a job (which the node dispatches when a worker is free).
    ``series``: more arguments of ``testdata.synthetic_ct``. Returns the job's id."""
    import datetime as dt
    import shutil

    import testdata
    from sqlalchemy import select

    from dicomnode.store.tables import Job, utcnow

    options = {"slices": 4, "rows": 16, "columns": 16, **series}
    for path in testdata.synthetic_ct(folder, **options):
        staged = node.files.tmp / path.name
        shutil.copyfile(path, staged)
        study_pk = node.store.ingest(staged, calling_ae_title="TESTSCU").study_pk
    assert study_pk in node.completion.check(now=utcnow() + dt.timedelta(minutes=1))
    with node.index.session() as session:
        return int(session.scalars(select(Job.id).where(Job.study_pk == study_pk)).one())


@pytest.fixture
def pynetdicom_globals() -> Iterator[None]:
    """StorageSCP.start sets module-wide settings: put them back after the test."""
    import tempfile

    from pynetdicom import _config

    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET,
             _config.LOG_REQUEST_IDENTIFIERS)
    yield
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_REQUEST_IDENTIFIERS = saved
