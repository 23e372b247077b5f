"""A peer server process that a test or a benchmark starts and stops (Orthanc, Triton): the
part every such wrapper shares. A subclass sets ``log_path`` and ``proc`` and defines
``start`` (returns itself once the server is ready)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import TypeVar

__all__ = ["ServerProcess", "free_port"]

_S = TypeVar("_S", bound="ServerProcess")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server process with its log file; a context manager that starts and stops it."""

    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self: _S, timeout: float = 60.0) -> _S:
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
