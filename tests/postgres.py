"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a temporary data
directory, a free loopback port, trust authentication for one user, stopped at teardown.

PostgreSQL refuses to run as root; as root (CI), the server runs as ``nobody`` through
``runuser``. Tests using it skip, saying why, only when the binaries are not installed
(``apt-get install postgresql``; tools/test.sh installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "pg_bin_dir", "requires_postgres"]


def pg_bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (the newest Debian version), or None."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _psycopg() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


requires_postgres = pytest.mark.skipif(
    pg_bin_dir() is None or not _psycopg(),
    reason="PostgreSQL binaries (Debian package postgresql) or psycopg not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A PostgreSQL server in a temporary folder on 127.0.0.1 (``url()`` per database)."""

    USER = "dicomnode"

    def __init__(self) -> None:
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries not found")
        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:  # postgres refuses root: run it as nobody
            shutil.chown(self.folder, user="nobody")
            self.folder.chmod(0o755)
            self._as = ["runuser", "-u", "nobody", "--"]

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}\n{log}")

    def start(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER,
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        # -F: no fsync (a test server); the socket in our folder, TCP on loopback only
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o",
                  f"-k {self.folder} -p {self.port} -h 127.0.0.1 -F -c max_connections=200",
                  "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                      "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.USER} "
                             "dbname=postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{database}"


def postgres_server() -> Iterator[PostgresServer]:
    """The body of a fixture: a started server, stopped after."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
