"""Receiving over real associations: pynetdicom and DCMTK peers against a real node process."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pytest
import testdata
from conftest import NodeFactory, RunningNode, dataset_bytes, storescu
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def _stored_files(node: RunningNode) -> dict[str, Path]:
    return {p.stem: p for p in (node.store / "instances").rglob("*.dcm")}


def _send(port: int, paths: list[Path], *, aet: str = "TESTSCU", aec: str = "DICOMNODE",
          ) -> list[int]:
    """C-STORE files with pynetdicom over one association; returns the statuses."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=aet)
    metas = [read_file_meta_info(p) for p in paths]
    ts = {str(m.TransferSyntaxUID) for m in metas}
    sops = {str(m.MediaStorageSOPClassUID) for m in metas}
    ae.requested_contexts = [build_context(s, t) for s in sops for t in ts]
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established
    statuses = []
    for p in paths:
        rsp = assoc.send_c_store(p)
        statuses.append(int(rsp.Status))
    assoc.release()
    return statuses


@pytest.mark.slow
def test_pynetdicom_send_is_stored_byte_identical_and_indexed(
        node_factory: NodeFactory, small_ct: list[Path]) -> None:
    node = node_factory()
    assert _send(node.port, small_ct) == [0] * len(small_ct)
    stored = _stored_files(node)
    assert len(stored) == len(small_ct)
    for path in small_ct:
        assert dataset_bytes(stored[_sop_uid(path)]) == dataset_bytes(path)
    studies = node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    (study,) = studies
    (series,) = study["series"]
    assert series["instance_count"] == len(small_ct)
    assert series["modality"] == "CT"
    assert series["geometry"]["whole"] is True
    assert series["geometry"]["frames"] == len(small_ct)
    assert series["geometry"]["slice_spacing_mm"] == pytest.approx(1.25)
    assert series["geometry"]["orientation"] == "AXIAL"
    assert not any((node.store / "tmp").iterdir())


# storescu's option that proposes each syntax (its default proposes uncompressed ones only)
_PROPOSE = {"jpeg-baseline": "-xy", "jpeg-lossless": "-xs", "jpeg-ls": "-xt", "jpeg2000": "-xv",
            "rle": "-xr", "deflated": "-xd", "big-endian": "-xb", "implicit": "-xi"}


@pytest.mark.parametrize("syntax", ["jpeg-baseline", "jpeg-lossless", "jpeg-ls", "jpeg2000",
                                    "rle", "deflated", "big-endian", "implicit"])
@pytest.mark.slow
def test_dcmtk_storescu_compressed_syntaxes_stored_as_received(
        node_factory: NodeFactory, small_ct: list[Path], data_dir: Path, syntax: str) -> None:
    files = testdata.transcode(small_ct[:3], data_dir / f"ts-{syntax}", syntax)
    node = node_factory()
    result = storescu(node.port, *files, extra=(_PROPOSE[syntax],))
    assert result.returncode == 0, result.stderr
    stored = _stored_files(node)
    assert len(stored) == 3
    for path in files:
        kept = stored[_sop_uid(path)]
        sent_ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        kept_ts = pydicom.dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert kept_ts == sent_ts, "stored in another transfer syntax than received"
        if syntax == "deflated":
            # storescu pads the deflated stream to an even length on the wire
            assert _inflate(dataset_bytes(kept)) == _inflate(dataset_bytes(path))
        else:
            assert dataset_bytes(kept) == dataset_bytes(path)


@pytest.mark.slow
def test_cranium_ct_with_storescu_directory_scan(node_factory: NodeFactory,
                                                 data_dir: Path) -> None:
    files = testdata.cranium_ct(data_dir / "cranium")
    node = node_factory()
    result = storescu(node.port, files[0].parent, extra=("+sd", "+r"))
    assert result.returncode == 0, result.stderr
    studies = node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    (series,) = studies[0]["series"]
    assert series["instance_count"] == 108
    assert series["geometry"]["whole"] is True
    assert series["geometry"]["slice_spacing_mm"] == pytest.approx(1.5, abs=1e-3)
    stored = _stored_files(node)
    for path in files[::17]:
        assert dataset_bytes(stored[_sop_uid(path)]) == dataset_bytes(path)


@pytest.mark.slow
def test_unknown_calling_ae_and_wrong_called_ae_are_refused(node_factory: NodeFactory) -> None:
    node = node_factory()
    for aet, aec, diagnostic in (("INTRUDER", "DICOMNODE", 0x03),
                                 ("TESTSCU", "SOMEONEELSE", 0x07)):
        ae = AE(ae_title=aet)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=aec)
        assert assoc.is_rejected
        assert assoc.acceptor.primitive is not None
        assert assoc.acceptor.primitive.result == 0x01
        assert assoc.acceptor.primitive.diagnostic == diagnostic
    log = node.log()
    assert "calling AE title 'INTRUDER' is not a configured peer" in log
    assert "called AE title 'SOMEONEELSE' is not this node's" in log
    # a known AE from the wrong host is refused as well
    far = node_factory(peers={"testscu": {"ae_title": "TESTSCU", "host": "192.0.2.7"}})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", far.port, ae_title="DICOMNODE")
    assert assoc.is_rejected
    assert "not from its configured host (192.0.2.7)" in far.log()


@pytest.mark.slow
def test_malformed_and_incomplete_datasets_get_failure_and_leave_nothing(
        node_factory: NodeFactory, tmp_path: Path, small_ct: list[Path]) -> None:
    node = node_factory()
    broken = testdata.malformed_file(tmp_path / "broken.dcm")
    no_series = testdata.missing_uid_file(tmp_path / "no-series.dcm")
    statuses = _send(node.port, [broken, no_series, small_ct[0]])
    assert statuses[0] == 0xC001
    assert statuses[1] == 0xC002
    assert statuses[2] == 0x0000, "the node keeps serving after a bad dataset"
    assert len(_stored_files(node)) == 1
    assert not any((node.store / "tmp").iterdir())
    assert "refused with 0xC001" in node.log()
    echo = node.cli("echo", "self")
    assert "Success" in echo.stdout


@pytest.mark.slow
def test_low_disk_answers_out_of_resources_and_stores_nothing(
        node_factory: NodeFactory, small_ct: list[Path]) -> None:
    node = node_factory(min_free_bytes=2**62)
    assert _send(node.port, small_ct[:2]) == [0xA700, 0xA700]
    assert _stored_files(node) == {}
    assert node.studies() == []


@pytest.mark.slow
def test_resend_identical_is_idempotent_and_changed_replaces(
        node_factory: NodeFactory, small_ct: list[Path], tmp_path: Path) -> None:
    node = node_factory()
    assert _send(node.port, small_ct[:2]) == [0, 0]
    assert _send(node.port, small_ct[:2]) == [0, 0]
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(small_ct[0])
    ds.SeriesDescription = "corrected"
    ds.save_as(changed)
    assert _send(node.port, [changed]) == [0]
    stored = _stored_files(node)
    assert len(stored) == 2
    assert dataset_bytes(stored[str(ds.SOPInstanceUID)]) == dataset_bytes(changed)
    (study,) = node.studies()
    assert study["instance_count"] == 2
    assert "re-sent with different content: replacing it" in node.log()


@pytest.mark.slow
def test_completion_waits_for_quiet_time_and_open_associations(
        node_factory: NodeFactory, small_ct: list[Path]) -> None:
    node = node_factory(quiet_seconds=2.0)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    for path in small_ct:
        assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0
    sent_at = time.monotonic()
    assert node.studies()[0]["state"] == "receiving"
    time.sleep(3.5)  # past the quiet time, but the association is still open
    assert node.studies()[0]["state"] == "receiving"
    assoc.release()
    node.wait_for(lambda s: s[0]["state"] == "complete", timeout=10)
    assert time.monotonic() - sent_at >= 2.0

    # a late series re-opens the study, which completes again after the quiet time
    late = testdata.sagittal_series(node.store.parent / "late", slices=5,
                                    study_uid=node.studies()[0]["study_instance_uid"])
    ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    for path in late:
        assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0
    (study,) = node.studies()
    assert study["state"] == "receiving"
    assert study["reopened_count"] == 1
    assoc.release()
    (study,) = node.wait_for(lambda s: s[0]["state"] == "complete", timeout=10)
    assert len(study["series"]) == 2


@pytest.mark.slow
def test_geometry_verdicts_for_gap_sagittal_and_multiframe(
        node_factory: NodeFactory, data_dir: Path) -> None:
    node = node_factory()
    gap = testdata.synthetic_ct(data_dir / "gap", slices=20, rows=32, columns=32, missing=[7])
    sag = testdata.sagittal_series(data_dir / "sag", slices=12)
    mf = testdata.multiframe_mr(data_dir / "mf", frames=24)
    for files in (gap, sag, mf):
        assert _send(node.port, files) == [0] * len(files)
    studies = node.wait_for(lambda s: len(s) == 3 and all(x["state"] == "complete" for x in s))
    by_modality = {}
    for study in studies:
        (series,) = study["series"]
        by_modality[(series["modality"], series["instance_count"])] = series["geometry"]
    verdict = by_modality[("CT", 19)]
    assert verdict["whole"] is False
    z_missing = float(pydicom.dcmread(gap[6]).ImagePositionPatient[2]) + 1.25
    assert verdict["reason"] == f"gap of 1 slice at z={z_missing:.1f} mm"
    assert by_modality[("MR", 12)]["whole"] is True
    assert by_modality[("MR", 12)]["orientation"] == "SAGITTAL"
    assert by_modality[("MR", 1)]["whole"] is True
    assert by_modality[("MR", 1)]["frames"] == 24


@pytest.mark.slow
def test_kill_9_mid_transfer_loses_no_acknowledged_instance(
        node_factory: NodeFactory, data_dir: Path) -> None:
    files = testdata.synthetic_ct(data_dir / "kill9", slices=150, rows=256, columns=256)
    node = node_factory(quiet_seconds=1.0)
    acknowledged: list[str] = []
    done = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 20  # a silent peer fails
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        try:
            for path in files:
                if not assoc.is_established:
                    break
                rsp = assoc.send_c_store(path)
                if "Status" in rsp and int(rsp.Status) == 0:
                    acknowledged.append(_sop_uid(path))
        finally:
            if assoc.is_established:
                assoc.abort()
            done.set()

    _config.STORE_SEND_CHUNKED_DATASET = True
    thread = threading.Thread(target=sender)
    thread.start()
    deadline = time.monotonic() + 120  # a sender that fails or stalls fails the test
    while len(acknowledged) < 40:
        if done.is_set() or time.monotonic() > deadline:
            node.kill()
            pytest.fail(f"only {len(acknowledged)} instance(s) acknowledged; "
                        f"node log:\n{node.log()}")
        time.sleep(0.01)
    node.kill()
    assert done.wait(30), "the sender did not notice the node's death"
    thread.join(10)
    assert 40 <= len(acknowledged) < len(files)

    node.start()
    studies = node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    stored = _stored_files(node)
    for uid in acknowledged:
        assert uid in stored, "an acknowledged instance was lost"
        pydicom.dcmread(stored[uid])  # whole and parseable
    assert studies[0]["instance_count"] >= len(acknowledged)
    assert studies[0]["instance_count"] == len(stored)
    assert not any((node.store / "tmp").iterdir())


@pytest.mark.slow
def test_kill_9_between_success_and_the_index_commit_indexes_after_restart(
        node_factory: NodeFactory, small_ct: list[Path]) -> None:
    """Success is answered once the instance is durable; its index row follows. With the
    index's write lock held by another connection (a real SQLite lock), the node still
    acknowledges the instances, cannot commit their rows, and is killed (-9): after the
    restart every acknowledged instance is indexed (recovery at start)."""
    node = node_factory(quiet_seconds=0.5)
    lock = sqlite3.connect(node.store / "index.sqlite", timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the index's write lock: no row can be committed
        statuses = _send(node.port, small_ct[:6])
        assert statuses == [0] * 6, "instances durable on disk are acknowledged"
        assert len(_stored_files(node)) == 6
        rows = lock.execute("SELECT COUNT(*) FROM instance").fetchone()[0]
        assert rows == 0, "no index row could have been committed"
        node.kill()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    node.start()
    studies = node.wait_for(lambda s: bool(s) and s[0]["state"] == "complete")
    assert studies[0]["instance_count"] == 6


@pytest.mark.slow
def test_sigterm_lets_an_open_association_finish(node_factory: NodeFactory,
                                                 small_ct: list[Path]) -> None:
    node = node_factory()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in small_ct[:5]]
    assert node.proc is not None
    proc = node.proc
    proc.send_signal(15)
    time.sleep(0.5)
    statuses += [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in small_ct[5:]]
    assoc.release()
    assert proc.wait(30) == 0
    node.proc = None
    assert statuses == [0] * len(small_ct)
    assert len(_stored_files(node)) == len(small_ct)
    assert not any((node.store / "tmp").iterdir())
    assert "stopped" in node.log()


@pytest.mark.slow
def test_cli_send_and_echo_report_per_file_status(node_factory: NodeFactory,
                                                  small_ct: list[Path], tmp_path: Path) -> None:
    node = node_factory()
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in small_ct[:3]:
        shutil.copy(p, folder)
    testdata.missing_uid_file(folder / "zz-bad.dcm")
    result = node.cli("send", str(folder), "--to", "self", check=False)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    assert sum(line.endswith("Success") for line in lines) == 3
    assert "zz-bad.dcm: status 0xC002" in result.stdout
    ok = node.cli("send", *map(str, small_ct[3:5]), "--to", "self")
    assert ok.returncode == 0
    assert node.cli("echo", "self").stdout.strip() == "echo self: Success"
    down = node.cli("echo", "nobody", check=False)
    assert down.returncode == 2 and "unknown peer 'nobody'" in down.stderr


def test_bad_configuration_is_reported_with_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 70000\n  ae_titel: X\n")
    result = subprocess.run(["dicomnode", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:2: node.port: Input should be less than or equal to 65535" in result.stderr
    assert f"{bad}:3: node.ae_titel: unknown key; allowed here: ae_title" in result.stderr


def test_storage_contexts_copied_from_verification_equal_pynetdicoms_own() -> None:
    """The SCP's storage contexts (copied from its checked Verification context, to start
    fast) are exactly those ``add_supported_context`` builds for each SOP class, and each
    has its own list of transfer syntaxes."""
    from dicomnode.net.contexts import storage_sop_classes, transfer_syntaxes
    from dicomnode.receive.scp import add_storage_contexts

    syntaxes = list(transfer_syntaxes())
    expected, copied = AE(), AE()
    for ae in (expected, copied):
        ae.add_supported_context(Verification, syntaxes)
    for uid in storage_sop_classes():
        expected.add_supported_context(uid, syntaxes)
    add_storage_contexts(copied, storage_sop_classes())

    def facts(ae: AE) -> list[tuple[object, ...]]:
        return [(c.abstract_syntax, tuple(c.transfer_syntax), c.scu_role, c.scp_role)
                for c in ae.supported_contexts]

    assert facts(copied) == facts(expected) and len(facts(copied)) > 200
    ct = next(c for c in copied.supported_contexts if c.abstract_syntax == CTImageStorage)
    ct.transfer_syntax = ["1.2.840.10008.1.2"]
    verification = next(c for c in copied.supported_contexts
                        if c.abstract_syntax == Verification)
    assert len(verification.transfer_syntax) == len(syntaxes)
