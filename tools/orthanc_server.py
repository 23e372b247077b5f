"""A real Orthanc 1.10 server (``/usr/sbin/Orthanc``, Debian package ``orthanc``) on free
loopback ports, for the tests (``tests/orthanc.py`` adds the pytest marker) and the
benchmarks.

Usage::

    with OrthancServer(workdir, modalities={"dicomnode": ("DICOMNODE", node_port)}) as orthanc:
        ...  # C-STORE to 127.0.0.1:orthanc.dicom_port, called AE title orthanc.ae_title
        assert uid in orthanc.sop_instance_uids()
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        orthanc.push("dicomnode", [orthanc_id])  # C-STORE from Orthanc to the node

The server runs on free ports with its storage and index in ``workdir`` (created), no
plugins unless ``dicomweb=True`` loads the DICOMweb plugin (Debian ``orthanc-dicomweb``:
STOW-RS at ``/dicom-web/studies``, and ``/dicom-web/servers/NAME/stow`` to the servers of
``dicomweb_servers``), HTTP without authentication but answering loopback clients only
(``RemoteAccessAllowed: false``), and it checks the called AE title
(``DicomCheckCalledAet``). Orthanc 1.10 has no setting for the address it listens on,
so it listens on all interfaces: callers only ever talk to it on 127.0.0.1, and never
through an HTTP proxy from the environment. ``TCP_NODELAY=1`` is set in its environment
(DCMTK, inside Orthanc, reads it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server_process import ServerProcess, free_port

__all__ = ["DICOMWEB_PLUGIN", "ORTHANC", "OrthancServer"]

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


class OrthancServer(ServerProcess):
    """One Orthanc process; a context manager that starts it and stops it.

    ``dicomweb`` loads the DICOMweb plugin; ``dicomweb_servers`` names the DICOMweb servers
    it knows, ``{name: (url, user, password)}`` (:meth:`stow` sends to them).
    ``modalities`` names the DICOM peers Orthanc knows, ``{name: (ae_title, port)}``,
    all on 127.0.0.1 (e.g. ``{"dicomnode": ("DICOMNODE", node_port)}``), so that
    :meth:`push` can C-STORE to them. ``config`` adds or overrides Orthanc
    configuration keys.
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC",
                 modalities: Mapping[str, tuple[str, int]] | None = None,
                 check_called_aet: bool = True,
                 dicomweb: bool = False,
                 dicomweb_servers: Mapping[str, tuple[str, str, str]] | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = self.workdir / "orthanc.log"
        self.config: dict[str, Any] = {
            "Name": "dicomnode-peer",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": check_called_aet,
            "DicomModalities": {name: [aet, self.host, port]
                                for name, (aet, port) in (modalities or {}).items()},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                name: list(server) for name, server in (dicomweb_servers or {}).items()}}}
               if dicomweb else {}),
            **(config or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    def peer(self) -> dict[str, Any]:
        """This server as a dicomnode ``peers`` entry (ae_title, host, port)."""
        return {"ae_title": self.ae_title, "host": self.host, "port": self.dicom_port}

    # ------------------------------------------------------------ process

    def start(self, timeout: float = 60.0) -> OrthancServer:
        """Start Orthanc; returns once both its REST API and its DICOM port answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC), "--no-jobs", str(config_path)], stdout=log,
                stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.proc.returncode}:\n"
                                   f"{self.log()}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not start within {timeout:g} s:\n{self.log()}")

    def _ready(self) -> bool:
        try:
            self.get("/system")
            with socket.create_connection((self.host, self.dicom_port), timeout=1):
                return True
        except (OSError, urllib.error.URLError):
            return False


    # ------------------------------------------------------------ REST API

    def get_bytes(self, route: str, timeout: float = 30.0) -> bytes:
        """GET a route of the REST API (e.g. ``/instances/ID/file``); the raw body."""
        with _HTTP.open(self.url + route, timeout=timeout) as reply:
            body: bytes = reply.read()
        return body

    def get(self, route: str, timeout: float = 30.0) -> Any:
        """GET a route of the REST API (e.g. ``/statistics``); the decoded JSON."""
        return json.loads(self.get_bytes(route, timeout))

    def post(self, route: str, body: Any, timeout: float = 120.0) -> Any:
        """POST JSON to a route of the REST API; the decoded JSON answer (None if empty)."""
        request = urllib.request.Request(
            self.url + route, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with _HTTP.open(request, timeout=timeout) as reply:
            data = reply.read()
        return json.loads(data) if data.strip() else None

    def upload(self, path: Path, timeout: float = 60.0) -> dict[str, Any]:
        """POST one DICOM file to ``/instances`` (as a modality would store it)."""
        request = urllib.request.Request(
            self.url + "/instances", data=Path(path).read_bytes(), method="POST",
            headers={"Content-Type": "application/dicom"})
        with _HTTP.open(request, timeout=timeout) as reply:
            answer: dict[str, Any] = json.loads(reply.read())
        return answer

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance, expanded: ``ID`` (Orthanc's), ``MainDicomTags`` and more."""
        found: list[dict[str, Any]] = self.get("/instances?expand")
        return found

    def sop_instance_uids(self) -> set[str]:
        """The SOPInstanceUIDs of every stored instance."""
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()}

    def instance_id(self, sop_instance_uid: str) -> str:
        """Orthanc's ID of the stored instance with this SOPInstanceUID (KeyError if none)."""
        for item in self.instances():
            if item["MainDicomTags"].get("SOPInstanceUID") == sop_instance_uid:
                return str(item["ID"])
        raise KeyError(sop_instance_uid)

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        """The simplified tags of one stored instance (keyword -> value)."""
        tags: dict[str, Any] = self.get(f"/instances/{orthanc_id}/simplified-tags")
        return tags

    def file(self, orthanc_id: str) -> bytes:
        """The Part-10 file of one stored instance, as Orthanc stored it."""
        return self.get_bytes(f"/instances/{orthanc_id}/file")

    def push(self, modality: str, orthanc_ids: list[str], timeout: float = 600.0) -> Any:
        """C-STORE stored instances (or studies/series, by Orthanc ID) to a modality;
        returns when the last instance was acknowledged (a synchronous job)."""
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": orthanc_ids, "Synchronous": True}, timeout)

    def stow(self, server: str, orthanc_ids: list[str], timeout: float = 600.0) -> Any:
        """STOW-RS stored instances (or series, studies, by Orthanc ID) to a DICOMweb
        server of ``dicomweb_servers`` (the DICOMweb plugin's ``/servers/NAME/stow``)."""
        return self.post(f"/dicom-web/servers/{server}/stow",
                         {"Resources": orthanc_ids, "Synchronous": True}, timeout)
