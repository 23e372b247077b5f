"""Identity at the boundary: every path to a peer goes through ``boundary.for_peer``, the
default PS3.15 options keep no free text, and no identity reaches a log line.

Real associations: a pynetdicom Storage SCP records the bytes of every C-STORE it receives,
``dicomnode send`` and the outbox send to it."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from conftest import NodeFactory, free_port, start_storage_scp, storescu
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, StoragePresentationContexts, evt
from test_deid_data import KEY, PHI, REF_SOP_UID, make_source

from dicomnode.boundary import PeerBoundary, PeerCopy, for_peer
from dicomnode.config import PeerConfig, load_config
from dicomnode.send.outbox import Outbox
from dicomnode.send.scu import send_files
from dicomnode.store.db import open_index
from dicomnode.store.pseudonyms import PseudonymMap
from dicomnode.store.tables import OutboxState

ROOT = Path(__file__).resolve().parents[1]

#: Free text that is neither a name nor a value the dataset states elsewhere: the Basic
#: Profile removes it, the Clean Descriptors Option keeps it (the standard's "C").
FREE_TEXT = {
    "PatientComments": "MKR-PATCOMMENT",
    "AdditionalPatientHistory": "MKR-HISTORY",
    "AdmittingDiagnosesDescription": "MKR-DIAGNOSIS",
    "ImageComments": "MKR-IMAGECOMMENT",
    "ProtocolName": "MKR-PROTOCOL",
}
NESTED_MARKERS = ("MKR-REQPROC", "MKR-LOCALCODE")
ORIGINAL_UIDS = ("1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002",
                 "1.2.826.0.1.3680043.8.498.1004", REF_SOP_UID)


def phi_file(folder: Path, number: int) -> Path:
    """A CT instance full of identity and of free-text markers."""
    ds = make_source(sop_uid=f"1.2.826.0.1.3680043.8.498.3{number:03d}")
    for keyword, marker in FREE_TEXT.items():
        setattr(ds, keyword, marker)
    ds.RequestAttributesSequence[0].RequestedProcedureDescription = NESTED_MARKERS[0]
    code = Dataset()
    code.CodeValue = "LP-17"
    code.CodingSchemeDesignator = "99HOSP"
    code.CodeMeaning = NESTED_MARKERS[1]
    ds.ProcedureCodeSequence = Sequence([code])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class RecordingSCP:
    """A pynetdicom Storage SCP keeping the encoded dataset of every C-STORE."""

    def __init__(self, ae_title: str = "RESEARCH") -> None:
        self.ae_title = ae_title
        self.received: list[bytes] = []
        self.port, self.server = start_storage_scp(ae_title, self._store)

    def _store(self, event: evt.Event) -> int:
        self.received.append(bytes(event.encoded_dataset()))
        return 0x0000

    def peer(self, **extra: Any) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port, **extra}

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp() -> Iterator[RecordingSCP]:
    server = RecordingSCP()
    yield server
    server.close()


def _config(tmp_path: Path, peers: dict[str, Any], **extra: Any) -> Path:
    (tmp_path / "deid.key").write_bytes(KEY)
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"path": "store"}, "deid": {"key_file": "deid.key"},
        "peers": peers, "logging": {"level": "DEBUG"}, **extra}))
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _leaks(data: bytes) -> list[str]:
    text = data.decode("latin-1").lower()
    found = [p for p in PHI if p.lower() in text]
    return found + [uid for uid in ORIGINAL_UIDS if uid in text]


def test_send_to_a_research_peer_pseudonymizes_every_file(
        tmp_path: Path, scp: RecordingSCP) -> None:
    files = [phi_file(tmp_path / "in", n) for n in range(3)]
    config = _config(tmp_path, {"research": scp.peer(pseudonymize=True)})
    proc = _cli(config, "send", str(tmp_path / "in"), "--to", "research")
    assert proc.returncode == 0, proc.stderr
    assert len(scp.received) == len(files)
    for data in scp.received:
        assert _leaks(data) == []
        for marker in (*FREE_TEXT.values(), *NESTED_MARKERS):  # default: no free text
            assert marker.encode() not in data, marker
    assert not _leaks((proc.stdout + proc.stderr).encode())
    # the map is in the node's index: what the peer got can be re-identified later
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(scp.received[0]), force=True)
    assert ds.PatientIdentityRemoved == "YES"
    index = open_index(load_config(config).db_url)
    try:
        assert PseudonymMap(index).is_pseudonymous_study(str(ds.StudyInstanceUID))
    finally:
        index.dispose()


def test_clean_descriptors_is_opt_in_per_peer(tmp_path: Path, scp: RecordingSCP) -> None:
    phi_file(tmp_path / "in", 1)
    options = ["retain_longitudinal_temporal_modified_dates", "clean_descriptors"]
    config = _config(tmp_path, {"research": scp.peer(pseudonymize=True, deid_options=options)})
    proc = _cli(config, "send", str(tmp_path / "in"), "--to", "research")
    assert proc.returncode == 0, proc.stderr
    (data,) = scp.received
    assert _leaks(data) == []  # identity stated elsewhere in the dataset is still scrubbed
    for marker in (*FREE_TEXT.values(), *NESTED_MARKERS):  # "C": kept, cleaned
        assert marker.encode() in data, marker
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113107", "113105"]


def test_clean_descriptors_for_the_whole_node(tmp_path: Path, scp: RecordingSCP) -> None:
    phi_file(tmp_path / "in", 1)
    config = _config(tmp_path, {"research": scp.peer(pseudonymize=True)},
                     deid={"key_file": "deid.key", "options": ["clean_descriptors"]})
    assert _cli(config, "send", str(tmp_path / "in"), "--to", "research").returncode == 0
    (data,) = scp.received
    assert FREE_TEXT["ProtocolName"].encode() in data and _leaks(data) == []


@pytest.mark.slow
def test_an_object_made_under_more_options_than_a_peer_takes_is_refused(
        tmp_path: Path, scp: RecordingSCP) -> None:
    phi_file(tmp_path / "in", 1)
    config = _config(tmp_path, {"research": scp.peer(pseudonymize=True)},
                     deid={"key_file": "deid.key", "options": ["clean_descriptors"]})
    assert _cli(config, "pseudonymize", str(tmp_path / "in"),
                str(tmp_path / "out")).returncode == 0
    strict = _config(tmp_path, {"research": scp.peer(pseudonymize=True, deid_options=[])})
    proc = _cli(strict, "send", str(tmp_path / "out"), "--to", "research")
    assert proc.returncode == 1
    assert "113105" in proc.stdout and "does not take" in proc.stdout
    assert scp.received == []


def test_the_outbox_pseudonymizes_what_was_queued_identified(
        tmp_path: Path, scp: RecordingSCP) -> None:
    """`outbox resend` and anything else that queues a file: the boundary is at delivery."""
    path = phi_file(tmp_path / "in", 1)
    config = load_config(_config(tmp_path, {"research": scp.peer(pseudonymize=True)}))
    index = open_index(config.db_url)
    try:
        outbox = Outbox.from_config(config, index)
        (item_id,) = outbox.enqueue([path], ["research"])
        assert outbox.deliver_due().sent == 1
        outbox.resend(item_id)
        assert outbox.deliver_due().sent == 1
        # without a key the boundary refuses: never sent identified
        bare = Outbox(index, config.peers, ae_title="DICOMNODE")
        bare.resend(item_id)
        report = bare.deliver_due()
        assert report.failed == 1
        with index.session() as session:
            from dicomnode.store.tables import OutboxItem
            item = session.get(OutboxItem, item_id)
            assert item is not None and item.state is OutboxState.FAILED
            assert "no pseudonymization key" in (item.last_error or "")
    finally:
        index.dispose()
    assert len(scp.received) == 2
    for data in scp.received:
        assert _leaks(data) == []


def test_the_scu_sends_only_what_the_boundary_made(tmp_path: Path, scp: RecordingSCP) -> None:
    path = phi_file(tmp_path / "in", 1)
    research = PeerConfig.model_validate(scp.peer(pseudonymize=True))
    clinical = PeerConfig.model_validate(scp.peer())
    with pytest.raises(TypeError, match="PeerCopy"):
        send_files("DICOMNODE", research, "research", [path])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="for_peer only"):
        PeerCopy(path, path, "research", research)
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        copy = for_peer(path, "pacs", clinical, pseudonyms=PseudonymMap(index), out_dir=None)
        with pytest.raises(TypeError, match="made for peer 'pacs'"):
            send_files("DICOMNODE", research, "research", [copy])
        boundary = PeerBoundary({"pacs": clinical}, PseudonymMap(index), out_dir=None)
        assert boundary.copy(path, "pacs").path == path  # identified, clinical: as it is
    finally:
        index.dispose()
    assert scp.received == []


def test_the_default_options_keep_no_free_text(tmp_path: Path) -> None:
    from dicomnode.boundary import profile_options
    from dicomnode.config import DeidConfig
    from dicomnode.deid import Pseudonymizer

    ds = pydicom.dcmread(phi_file(tmp_path, 1))
    Pseudonymizer(KEY, profile_options(DeidConfig())).apply(ds)
    data = pydicom.filebase.DicomBytesIO()
    ds.save_as(data, enforce_file_format=True)
    for marker in (*FREE_TEXT.values(), *NESTED_MARKERS):
        assert marker.encode() not in data.getvalue(), marker


def test_default_options_are_basic_with_modified_dates(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, {}))
    assert [o.value for o in config.deid.options] == [
        "retain_longitudinal_temporal_modified_dates"]
    old = tmp_path / "old.yaml"
    old.write_text("deid: {clean_descriptors: true}\n")
    with pytest.raises(Exception, match=r"deid\.options"):
        load_config(old)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("peers: {pacs: {ae_title: PACS, deid_options: [clean_descriptors]}}\n")
    with pytest.raises(Exception, match="research peers only"):
        load_config(wrong)


def test_each_success_is_committed_before_the_next_c_store(tmp_path: Path) -> None:
    """At-least-once, with the window as narrow as the protocol allows: while the peer
    handles the n-th C-STORE, the n-1 before it are already ``sent`` in the index."""
    files = [phi_file(tmp_path / "in", n) for n in range(4)]
    config = load_config(_config(tmp_path, {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                     "port": free_port()}}))
    index = open_index(config.db_url)
    seen: list[int] = []

    def store(event: evt.Event) -> int:
        with index.session() as session:
            from dicomnode.store.tables import OutboxItem
            seen.append(session.query(OutboxItem).filter(
                OutboxItem.state == OutboxState.SENT).count())
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.supported_contexts = StoragePresentationContexts
    peer = config.peers["pacs"]
    assert peer.port is not None
    server = ae.start_server(("127.0.0.1", peer.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        outbox = Outbox.from_config(config, index)
        outbox.enqueue(files, ["pacs"])
        assert outbox.deliver_due().sent == len(files)
        # a crash now would re-send nothing; one during C-STORE n re-sends that one only
        assert outbox.recover() == 0
    finally:
        server.shutdown()
        index.dispose()
    assert seen == list(range(len(files)))


# -------------------------------------------------------------------- logs and console

BAD_BIRTH_DATE = "1980-01-02"  # not a DA value: pydicom's validation quotes it


@pytest.mark.slow
def test_a_non_conformant_value_never_reaches_the_log(
        node_factory: NodeFactory, tmp_path: Path, scp: RecordingSCP) -> None:
    path = phi_file(tmp_path / "in", 1)
    ds = pydicom.dcmread(path)
    ds.PatientBirthDate = BAD_BIRTH_DATE
    ds.save_as(path, enforce_file_format=True)
    # received by a node logging at DEBUG
    node = node_factory(logging={"level": "DEBUG"})
    sent = storescu(node.port, path)
    assert sent.returncode == 0, sent.stderr
    node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "complete")
    node.terminate()
    logs = [node.log()]
    # pseudonymized (pydicom converts the value there and quotes it when it rejects it)
    config = _config(tmp_path, {"research": scp.peer(pseudonymize=True)})
    for args in (("send", str(path), "--to", "research"),
                 ("pseudonymize", str(tmp_path / "in"), str(tmp_path / "out"))):
        proc = _cli(config, *args)
        assert proc.returncode == 0, proc.stderr
        logs += [proc.stdout, proc.stderr]
    text = "\n".join(logs)
    assert BAD_BIRTH_DATE not in text
    assert _leaks(text.encode()) == []


def test_reidentification_logs_no_rejected_value(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Restoring a birth date pydicom rejects made it quote the value in the log."""
    from dicomnode.boundary import pseudonymize_files, pseudonymizer

    path = phi_file(tmp_path / "in", 1)
    ds = pydicom.dcmread(path)
    ds.PatientBirthDate = BAD_BIRTH_DATE
    ds.save_as(path, enforce_file_format=True)
    config = load_config(_config(tmp_path, {}))
    index = open_index(config.db_url)
    caplog.set_level(logging.DEBUG)
    try:
        pseudonyms = PseudonymMap(index)
        (pseudo,) = pseudonymize_files([path], tmp_path / "out", pseudonymizer(config),
                                       pseudonyms).written
        clinical = PeerConfig(ae_title="PACS", host="127.0.0.1", port=104)
        copy = for_peer(pseudo, "pacs", clinical, pseudonyms=pseudonyms,
                        out_dir=tmp_path / "pacs")
        assert pydicom.dcmread(copy.path).PatientBirthDate == BAD_BIRTH_DATE  # restored
    finally:
        index.dispose()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "value hidden" in text  # pydicom did complain, without the value
    assert BAD_BIRTH_DATE not in text
