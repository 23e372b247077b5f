"""The Orthanc server of ``tools/orthanc_server.py`` for the tests, and their skip marker.

Usage::

    from orthanc import OrthancServer, requires_orthanc

    @requires_orthanc
    def test_something(tmp_path: Path) -> None:
        with OrthancServer(tmp_path / "orthanc",
                           modalities={"dicomnode": ("DICOMNODE", node_port)}) as orthanc:
            ...
"""

from __future__ import annotations

import pytest
from orthanc_server import DICOMWEB_PLUGIN, ORTHANC, OrthancServer

__all__ = ["ORTHANC", "OrthancServer", "requires_orthanc", "requires_orthanc_dicomweb"]

requires_orthanc = pytest.mark.skipif(
    not ORTHANC.exists(),
    reason="Orthanc is not installed (/usr/sbin/Orthanc, Debian package orthanc; "
           "tools/test.sh installs it)")

requires_orthanc_dicomweb = pytest.mark.skipif(
    not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists(),
    reason="Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb; "
           "tools/test.sh installs it)")
