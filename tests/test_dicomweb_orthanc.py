"""DICOMweb with a real Orthanc and its DICOMweb plugin: Orthanc stores into the node by
STOW-RS (its ``/dicom-web/servers/NAME/stow``), and the node's outbox sends results to
Orthanc's STOW-RS (a DICOMweb destination); HTTP failures map to retries or final ones."""

from __future__ import annotations

import socket
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata
from conftest import NodeFactory
from orthanc import OrthancServer, requires_orthanc_dicomweb

from dicomnode.config import OutboxConfig, PeerConfig
from dicomnode.send.outbox import Outbox
from dicomnode.store.db import Index, open_index
from dicomnode.store.tables import OutboxItem, OutboxState

PASSWORD = "orthanc-sends-with-this-1"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield idx
    idx.dispose()


def _items(index: Index) -> list[OutboxItem]:
    with index.session() as session:
        return list(session.query(OutboxItem).order_by(OutboxItem.id).all())


def _peer(url: str, **dicomweb: Any) -> PeerConfig:
    return PeerConfig.model_validate({"ae_title": "WEBPEER", "dicomweb": {"url": url,
                                                                          **dicomweb}})


def _outbox(index: Index, peers: dict[str, PeerConfig]) -> Outbox:
    return Outbox(index, peers, ae_title="DICOMNODE",
                  settings=OutboxConfig(timeout_seconds=10.0, retry_initial_seconds=1,
                                        retry_max_seconds=1))


@pytest.mark.slow
@requires_orthanc_dicomweb
def test_orthanc_stows_a_study_into_the_node(node_factory: NodeFactory,
                                             tmp_path: Path) -> None:
    (tmp_path / "orthanc.pw").write_text(PASSWORD + "\n")
    node = node_factory(peers={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                           "dicomweb": {"receive_auth": {
                                               "user": "orthanc",
                                               "password_file": str(tmp_path / "orthanc.pw")}}}})
    url = node.console_url() + "/dicomweb/"
    study_uid = pydicom.uid.generate_uid()
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=5, rows=32, columns=32,
                               study_uid=study_uid)
    with OrthancServer(tmp_path / "orthanc", dicomweb=True, dicomweb_servers={
            "node": (url, "orthanc", PASSWORD), "wrong": (url, "orthanc", "not-it")}) as orthanc:
        ids = {orthanc.upload(p)["ParentStudy"] for p in ct}
        orthanc.stow("node", sorted(ids))
        (study,) = node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "complete")
        assert study["study_instance_uid"] == study_uid
        assert study["instance_count"] == 5
        # a wrong password: Orthanc's job fails, nothing more is stored
        with pytest.raises(urllib.error.HTTPError):  # Orthanc's job failed: 401
            orthanc.stow("wrong", sorted(ids))
    assert "STOW-RS from peer orthanc: 5 instance(s) stored, 0 failed" in node.log()
    assert "wrong token" in node.log()
    assert PASSWORD not in node.log()


@pytest.mark.slow
@requires_orthanc_dicomweb
def test_outbox_sends_results_to_orthanc_by_stow(index: Index, tmp_path: Path) -> None:
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=3, rows=16, columns=16)
    uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in ct}
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as orthanc:
        outbox = _outbox(index, {"archive": _peer(f"{orthanc.url}/dicom-web")})
        assert outbox.destinations == ["archive"]
        outbox.enqueue(ct, ["archive"])
        report = outbox.deliver_due()
        assert report.sent == 3, report
        assert orthanc.sop_instance_uids() == uids
    assert {i.state for i in _items(index)} == {OutboxState.SENT}
    assert {i.last_status for i in _items(index)} == {0}


@pytest.mark.slow
@requires_orthanc_dicomweb
def test_dicomnode_send_to_a_dicomweb_peer_uses_stow(node_factory: NodeFactory,
                                                     tmp_path: Path) -> None:
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=2, rows=16, columns=16)
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as orthanc:
        node = node_factory(start=False, peers={"web": {
            "ae_title": "WEB", "dicomweb": {"url": f"{orthanc.url}/dicom-web"}}})
        result = node.cli("send", "--to", "web", *map(str, ct))
        assert "2 sent, 0 failed" in result.stderr
        assert len(orthanc.sop_instance_uids()) == 2


def test_outbox_stow_failures_are_retried_or_final(index: Index, tmp_path: Path) -> None:
    """A peer that is down is retried; a wrong URL (404) is final; a 503 is retried; an
    instance the peer refuses (Failure Reason 0xC000) is final, one out of resources
    (0xA700) retried, one a 409 leaves out final; a missing credential file is final."""
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=2, rows=16, columns=16)
    refused = str(pydicom.dcmread(ct[0]).SOPInstanceUID)
    answers: dict[str, tuple[int, bytes]] = {}
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length)
            assert body.rstrip().endswith(b"--")
            seen.append(dict(self.headers))
            status, answer = answers[self.path]
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+xml" if answer.startswith(b"<")
                             else "application/dicom+json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    failed = (b'{"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["'
              + refused.encode() + b'"]}, "00081197": {"vr": "US", "Value": [49152]}}]}}')
    answers["/gone/studies"] = (404, b"")
    answers["/busy/studies"] = (503, b"")
    other = str(pydicom.dcmread(ct[1]).SOPInstanceUID)
    stored = (b', "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["'
              + other.encode() + b'"]}}]}}')
    answers["/partial/studies"] = (202, failed[:-1] + stored)
    answers["/full/studies"] = (409, failed.replace(b"[49152]", b"[42752]"))
    # the PS3.19 native XML answer some servers give whatever is asked for
    answers["/xml/studies"] = (202, f"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">
<DicomAttribute tag="00081155" vr="UI"><Value number="1">{refused}</Value></DicomAttribute>
<DicomAttribute tag="00081197" vr="US"><Value number="1">43264</Value></DicomAttribute>
</Item></DicomAttribute>
<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence"><Item number="1">
<DicomAttribute tag="00081155" vr="UI"><Value number="1">{other}</Value></DicomAttribute>
<DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value></DicomAttribute>
</Item></DicomAttribute>
</NativeDicomModel>""".encode())
    (tmp_path / "token").write_text("node-token-123\n")
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    peers = {"down": _peer(down), "gone": _peer(f"{base}/gone"), "busy": _peer(f"{base}/busy"),
             "partial": _peer(f"{base}/partial", auth={"token_file": str(tmp_path / "token")}),
             "full": _peer(f"{base}/full"), "xml": _peer(f"{base}/xml"),
             "nokey": _peer(f"{base}/full", auth={"token_file": str(tmp_path / "missing")})}
    try:
        outbox = _outbox(index, peers)
        outbox.enqueue(ct, list(peers))
        outbox.deliver_due()
    finally:
        server.shutdown()
    states: dict[tuple[str, str], OutboxState] = {}
    for item in _items(index):
        states[item.destination, item.sop_instance_uid] = item.state
    pending, failed_state, sent = OutboxState.PENDING, OutboxState.FAILED, OutboxState.SENT
    assert states == {
        ("down", refused): pending, ("down", other): pending,
        ("gone", refused): failed_state, ("gone", other): failed_state,
        ("busy", refused): pending, ("busy", other): pending,
        ("partial", refused): failed_state, ("partial", other): sent,
        # 0xA700 is retried; an instance a 409 leaves out is not
        ("full", refused): pending, ("full", other): failed_state,
        ("nokey", refused): failed_state, ("nokey", other): failed_state,
        ("xml", refused): failed_state, ("xml", other): sent,
    }
    by_key = {(i.destination, i.sop_instance_uid): i for i in _items(index)}
    assert by_key["partial", refused].last_status == 0xC000
    assert by_key["full", refused].last_status == 0xA700
    assert by_key["xml", refused].last_status == 0xA900
    assert by_key["xml", other].last_status == 0xB000  # stored with a warning
    assert "cannot read it" in (by_key["nokey", other].last_error or "")
    assert any(h.get("Authorization") == "Bearer node-token-123" for h in seen)
    assert all(h["Content-Type"].startswith('multipart/related; type="application/dicom"')
               for h in seen)


def test_dicomweb_peer_configuration_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an http or https URL"):
        _peer("ftp://x/dicom-web")
    with pytest.raises(ValidationError, match="not both"):
        _peer("http://x", auth={"token_file": "t", "user": "u", "password_file": "p"})
    with pytest.raises(ValidationError, match="needs both user and password_file"):
        _peer("http://x", auth={"user": "u"})
    with pytest.raises(ValidationError, match="give url"):
        PeerConfig.model_validate({"ae_title": "X", "dicomweb": {}})
    assert _peer("http://x/dicom-web/").stow_url == "http://x/dicom-web"


@pytest.mark.slow
@requires_orthanc_dicomweb
def test_dicomweb_round_trip_orthanc_stows_the_node_runs_a_model_and_stows_results_back(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    """No DIMSE at all: Orthanc stores a CT into the node by STOW-RS, the rule fires on
    completion, the job's SEG and RTSTRUCT go back to Orthanc by STOW-RS (re-identified,
    into the original study) through the running node's outbox."""
    import json

    from conftest import wait_until

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "orthanc.pw").write_text(PASSWORD + "\n")
    (tmp_path / "deid.key").write_bytes(b"dicomweb-test-key-0123456789")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text("""rules:
  - name: ct-external
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [pacs]
""")
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=16, rows=64, columns=64,
                               patient_name="Web^Wanda", patient_id="PAT-WEB-1")
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as orthanc:
        node = node_factory(
            peers={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "dicomweb": {
                "url": f"{orthanc.url}/dicom-web",
                "receive_auth": {"user": "orthanc",
                                 "password_file": str(tmp_path / "orthanc.pw")}}}},
            rules_dir=str(rules), models_dir=str(root / "models"),
            deid={"key_file": str(tmp_path / "deid.key")},
            outbox={"retry_initial_seconds": 1, "check_interval_seconds": 0.5},
            completion={"quiet_seconds": 1})
        # Orthanc learns the node as a DICOMweb server once the console's port is known
        orthanc.stop()
        orthanc.config["DicomWeb"]["Servers"] = {
            "node": [node.console_url() + "/dicomweb/", "orthanc", PASSWORD]}
        orthanc.start()
        study = {orthanc.upload(p)["ParentStudy"] for p in ct}
        orthanc.stow("node", sorted(study))
        (study_id,) = study

        def results_back() -> bool:
            modalities = {s["MainDicomTags"]["Modality"]
                          for s in orthanc.get(f"/studies/{study_id}/series?expand")}
            return {"SEG", "RTSTRUCT"} <= modalities

        wait_until(results_back, 180, f"SEG and RTSTRUCT in Orthanc; node log:\n{node.log()}")
        assert len(orthanc.get("/studies")) == 1  # back in the original study
        outbox = json.loads(node.cli("outbox", "--json").stdout)
        assert outbox["counts"]["sent"] == len(outbox["items"]) >= 2
    log = node.log()
    assert "STOW-RS from peer pacs: 16 instance(s) stored, 0 failed" in log
    assert "Web^Wanda" not in log and "PAT-WEB-1" not in log and PASSWORD not in log
