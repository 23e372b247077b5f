"""Pseudonymization at the boundary, wired to the index: `dicomnode pseudonymize`, the
pseudonym map, and results re-identified for clinical peers (or kept pseudonymous for
research peers). A full run: a PHI-laden CT is received by a real node, pseudonymized,
segmented by ct-body, written as SEG and RTSTRUCT and re-identified; no log line of any
step carries identity."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import testdata
from conftest import NodeFactory, storescu
from pydicom.dataset import Dataset
from test_deid_data import KEY, OTHER_KEY, PHI, make_source

from dicomnode.boundary import (
    BoundaryError,
    for_peer,
    node_key,
    pseudonymize_files,
    pseudonymizer,
)
from dicomnode.config import PeerConfig, load_config
from dicomnode.inference.segment import load_inputs, segment
from dicomnode.models.card import load_card
from dicomnode.outputs.write import write_results
from dicomnode.store.db import open_index
from dicomnode.store.pseudonyms import PseudonymMap

ROOT = Path(__file__).resolve().parents[1]
CLINICAL = PeerConfig(ae_title="PACS", host="127.0.0.1", port=104)
RESEARCH = PeerConfig(ae_title="RESEARCH", host="127.0.0.1", port=105, pseudonymize=True)
_PHI_WORDS = re.compile("|".join(rf"\b{re.escape(p)}\b" for p in PHI), re.IGNORECASE)
# the image itself comes from Cranium; everything else of make_source() is identity
_IMAGE_KEYWORDS = {"Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                   "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                   "PixelData", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                   "SeriesInstanceUID", "FrameOfReferenceUID", "Modality",
                   "SpecificCharacterSet"}


def phi_ct(folder: Path, slices: int = 24) -> list[Path]:
    """Cranium CT slices carrying every identity of make_source() (nested and private)."""
    files = testdata.cranium_ct(folder, slices=range(40, 40 + slices))
    for path in files:
        ds = pydicom.dcmread(path)
        for elem in make_source(sop_uid=str(ds.SOPInstanceUID)):
            if elem.keyword not in _IMAGE_KEYWORDS:
                ds[elem.tag] = elem
        ds.save_as(path, enforce_file_format=True)
    return files


def _without_pixels(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    from io import BytesIO
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _phi_in(data: bytes) -> list[str]:
    text = data.decode("latin-1").lower()
    return [p for p in PHI if p.lower() in text]


def _config(tmp_path: Path, key: bytes, name: str = "node") -> Path:
    base = tmp_path / name
    base.mkdir(parents=True, exist_ok=True)
    (base / "deid.key").write_bytes(key)
    path = base / "dicomnode.yaml"
    path.write_text("storage: {path: store}\ndeid: {key_file: deid.key}\n"
                    "logging: {level: DEBUG}\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True,
                          text=True, check=False, timeout=300, cwd=ROOT)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def phi_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phi_ct(tmp_path_factory.mktemp("phi") / "ct")


@pytest.mark.slow
def test_the_command_pseudonymizes_identically_on_nodes_sharing_the_key(
        phi_series: list[Path], tmp_path: Path) -> None:
    source = phi_series[0].parent
    outputs = []
    for name, key in (("a", KEY), ("b", KEY), ("c", OTHER_KEY)):
        out = tmp_path / f"out-{name}"
        proc = _cli("pseudonymize", str(source), str(out), "--config",
                    str(_config(tmp_path, key, name)))
        assert proc.returncode == 0, proc.stderr
        assert f"{len(phi_series)} instance(s) of 1 study(ies)" in proc.stdout
        assert not _PHI_WORDS.search(proc.stdout + proc.stderr)
        outputs.append(_files(out))
    same_a, same_b, other = outputs
    assert same_a == same_b  # two processes, two indexes, one key: the same bytes and names
    assert len(same_a) == len(phi_series)
    assert not set(same_a) & set(other)  # another key: other UIDs, other names
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                 for p in phi_series}
    for name in same_a:
        path = tmp_path / "out-a" / name
        assert not _phi_in(_without_pixels(path)), name
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert not set(re.split(r"[/.]", name)) & {"PID-4711-X"}
    # pixel data unchanged, and the map in the index leads back to every original
    index = open_index(load_config(tmp_path / "a" / "dicomnode.yaml").db_url)
    try:
        ds = pydicom.dcmread(next((tmp_path / "out-a").rglob("*.dcm")))
        identity = PseudonymMap(index).study(str(ds.StudyInstanceUID))
        assert identity is not None
        original = originals[identity.uid_map[str(ds.SOPInstanceUID)]]
        assert pydicom.dcmread(original).PixelData == ds.PixelData
        assert identity.patient_study["PatientID"] == "PID-4711-X"
    finally:
        index.dispose()


@pytest.mark.slow
def test_a_configured_key_must_be_usable_and_is_never_printed(
        tmp_path: Path, phi_series: list[Path]) -> None:
    config = tmp_path / "dicomnode.yaml"
    config.write_text("storage: {path: store}\ndeid: {key_file: missing.key}\n")
    proc = _cli("pseudonymize", str(phi_series[0].parent), str(tmp_path / "out"),
                "--config", str(config))
    assert proc.returncode == 2
    assert "missing.key" in proc.stderr and not (tmp_path / "out").exists()
    weak = _config(tmp_path, b"Sekrit-7", "weak")
    proc = _cli("pseudonymize", str(phi_series[0].parent), str(tmp_path / "out"),
                "--config", str(weak))
    assert proc.returncode == 2 and "at least 16" in proc.stderr
    assert "Sekrit" not in proc.stderr + proc.stdout


def test_without_a_configured_key_the_node_makes_its_own_once(
        tmp_path: Path, phi_series: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_DEID_KEY", raising=False)
    config = load_config(_config(tmp_path, KEY))
    config = config.model_copy(update={"deid": config.deid.model_copy(
        update={"key_file": None})})
    key = node_key(config)
    path = config.storage.path / "deid.key"
    assert path.read_bytes() == key and len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert node_key(config) == key  # reused, never replaced
    monkeypatch.setenv("DICOMNODE_DEID_KEY", KEY.decode())
    assert node_key(config) == KEY  # the environment wins over the node's own key


def _uids(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(keyword, value) of every UI value at every nesting level."""
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                yield elem.keyword, str(v)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


@pytest.mark.slow
def test_a_full_run_reidentifies_seg_and_rtstruct_and_logs_no_identity(
        node_factory: NodeFactory, phi_series: list[Path], tmp_path: Path,
        debug_logs: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "deid.key"
    key_file.write_bytes(KEY)
    node = node_factory(deid={"key_file": str(key_file)}, logging={"level": "DEBUG"})
    sent = storescu(node.port, *phi_series)
    assert sent.returncode == 0, sent.stderr
    node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "complete")
    # pseudonymize what the node stored, as the pipeline will before inference
    pseudo_dir = tmp_path / "pseudonymized"
    proc = node.cli("pseudonymize", str(node.store / "instances"), str(pseudo_dir))
    config = load_config(node.config_path)
    index = open_index(config.db_url)
    try:
        pseudonyms = PseudonymMap(index)
        files = sorted(pseudo_dir.rglob("*.dcm"))
        card = load_card(ROOT / "models" / "ct-body")
        (volume,) = load_inputs(card, {"ct": files})
        result = segment(card, [volume.image])
        written = write_results(result, volume, files, tmp_path / "results",
                                keep_datasets=True)
        identity = pseudonyms.study(volume.study_instance_uid)
        assert identity is not None
        originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                     for p in phi_series}
        first = pydicom.dcmread(phi_series[0], stop_before_pixels=True)
        pseudonymous_uids = set(identity.uid_map)
        for obj in written.objects:
            if obj.kind not in ("SEG", "RTSTRUCT"):
                continue
            made = pydicom.dcmread(obj.path)
            assert made.PatientID != first.PatientID  # made from pseudonymized inputs
            # a research peer gets it as it is
            assert for_peer(obj.path, "research", RESEARCH, pseudonyms=pseudonyms,
                            out_dir=tmp_path / "research").path == obj.path
            path = for_peer(obj.path, "pacs", CLINICAL, pseudonyms=pseudonyms,
                            out_dir=tmp_path / "clinical").path
            # as the pipeline makes it: spliced from the bytes written, the same file
            spliced = for_peer(obj.path, "pacs", CLINICAL, pseudonyms=pseudonyms,
                               out_dir=tmp_path / "spliced", dataset=obj.dataset,
                               encoded=obj.encoded).path
            assert obj.encoded == obj.path.read_bytes()
            assert spliced.read_bytes() == path.read_bytes()
            back = pydicom.dcmread(path)
            assert back.PatientID == "PID-4711-X"
            assert str(back.PatientName) == str(first.PatientName)
            assert back.AccessionNumber == first.AccessionNumber
            assert back.StudyInstanceUID == first.StudyInstanceUID
            assert back.FrameOfReferenceUID == first.FrameOfReferenceUID
            assert back.SOPInstanceUID == made.SOPInstanceUID  # the result keeps its own UID
            # every UID at every level: none pseudonymous is left, and every reference to
            # the source is to an original instance, series, study or frame of reference
            seen = dict.fromkeys(k for k, _ in _uids(back))
            for keyword, uid in _uids(back):
                assert uid not in pseudonymous_uids, keyword
                if keyword == "ReferencedSOPInstanceUID" and uid != back.StudyInstanceUID:
                    assert uid in originals, keyword
                if keyword == "SeriesInstanceUID" and uid != back.SeriesInstanceUID:
                    assert uid == first.SeriesInstanceUID
            assert "ReferencedSOPInstanceUID" in seen
            np.testing.assert_array_equal(
                pydicom.dcmread(obj.path).get("PixelData", b""), back.get("PixelData", b""))
    finally:
        index.dispose()
    logs = "\n".join([node.log(), proc.stdout, proc.stderr,
                      *(r.getMessage() for r in debug_logs.records)])
    assert "accepted" in node.log() and "complete" in node.log()
    found = _PHI_WORDS.findall(logs)
    assert not found, found


def test_an_unknown_pseudonymous_study_never_reaches_a_clinical_peer(
        phi_series: list[Path], tmp_path: Path) -> None:
    node_a = load_config(_config(tmp_path, KEY, "a"))
    node_b = load_config(_config(tmp_path, KEY, "b"))  # same key, but no map of this study
    a, b = open_index(node_a.db_url), open_index(node_b.db_url)
    try:
        report = pseudonymize_files(phi_series[:1], tmp_path / "out", pseudonymizer(node_a),
                                    PseudonymMap(a))
        (path,) = report.written
        with pytest.raises(BoundaryError, match="not sent to clinical peer 'pacs'"):
            for_peer(path, "pacs", CLINICAL, pseudonyms=PseudonymMap(b),
                     out_dir=tmp_path / "clinical")
        assert not (tmp_path / "clinical").exists()
        # node A knows it, and an identified object goes to a clinical peer unchanged
        assert for_peer(path, "pacs", CLINICAL, pseudonyms=PseudonymMap(a),
                        out_dir=tmp_path / "clinical").path.parent == tmp_path / "clinical"
        assert for_peer(phi_series[1], "pacs", CLINICAL, pseudonyms=PseudonymMap(a),
                        out_dir=tmp_path / "clinical").path == phi_series[1]
    finally:
        a.dispose()
        b.dispose()


def test_an_identified_object_is_pseudonymized_for_a_research_peer(
        phi_series: list[Path], tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, KEY))
    index = open_index(config.db_url)
    try:
        pseudonyms = PseudonymMap(index)
        with pytest.raises(BoundaryError, match="no pseudonymization key"):
            for_peer(phi_series[0], "research", RESEARCH, pseudonyms=pseudonyms,
                     out_dir=tmp_path / "research")
        path = for_peer(phi_series[0], "research", RESEARCH, pseudonyms=pseudonyms,
                        out_dir=tmp_path / "research", pseudonymizer=pseudonymizer(config)).path
        assert path != phi_series[0] and not _phi_in(_without_pixels(path))
        assert pseudonyms.is_pseudonymous_study(str(pydicom.dcmread(path).StudyInstanceUID))
    finally:
        index.dispose()


def test_peers_and_the_key_file_in_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("deid: {key_file: keys/deid.key}\n"
                    "peers: {research: {ae_title: RSRCH, pseudonymize: true}}\n")
    config = load_config(path)
    assert config.deid.key_file == tmp_path / "keys" / "deid.key"
    assert config.peers["research"].pseudonymize
    path.write_text("peers: {research: {ae_title: RSRCH, pseudonymize: maybe}}\n")
    with pytest.raises(Exception, match=r"peers\.research\.pseudonymize"):
        load_config(path)
