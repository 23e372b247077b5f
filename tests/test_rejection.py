"""IOCM rejection notes judged by tools none of us wrote: dciodvfy (dicom3tools) validates the
Key Object Selection Document, highdicom reads it back, a real Orthanc stores it into the
results' study, and the boundary re-identifies it for a clinical peer consistently with the
results it rejects. The results are real: ``ct-body`` on a small synthetic CT."""

from __future__ import annotations

import copy
import logging
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from orthanc import OrthancServer, requires_orthanc
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from test_deid_data import KEY

from dicomnode.boundary import PeerCopy, for_peer, profile_options, pseudonymize_files
from dicomnode.config import DeidConfig, OutputsConfig, PeerConfig
from dicomnode.deid import Pseudonymizer
from dicomnode.inference.segment import load_inputs, segment
from dicomnode.models.card import load_card
from dicomnode.outputs.rejection import (
    REJECTION_SERIES_NUMBER,
    KeyObjectSelectionDocumentStorage,
    RejectionReason,
    build_rejection_note,
    write_rejection_note,
)
from dicomnode.outputs.write import Results, write_results
from dicomnode.send.scu import send_files
from dicomnode.store.db import open_index
from dicomnode.store.pseudonyms import PseudonymMap

ROOT = Path(__file__).resolve().parents[1]
DCIODVFY = Path("/usr/bin/dciodvfy")
ALL_OBJECTS = OutputsConfig(seg=True, rtstruct=True, sr=True)
CLINICAL = PeerConfig(ae_title="PACS", host="127.0.0.1", port=104)
RESEARCH = PeerConfig(ae_title="RESEARCH", host="127.0.0.1", port=105, pseudonymize=True)


@dataclass
class Superseded:
    """A model run's results (the version a newer one supersedes) and their headers."""

    files: list[Path]
    results: Results
    headers: list[Dataset]


def _run(files: list[Path], out: Path) -> Superseded:
    card = load_card(ROOT / "models" / "ct-body")
    (volume,) = load_inputs(card, {"ct": files})
    results = write_results(segment(card, [volume.image]), volume, files, out, ALL_OBJECTS)
    headers = [pydicom.dcmread(o.path, stop_before_pixels=True) for o in results.objects]
    return Superseded(files, results, headers)


@pytest.fixture(scope="module")
def superseded(small_ct: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Superseded:
    return _run(small_ct, tmp_path_factory.mktemp("results"))


def _note(headers: list[Dataset], seed: str = "job 7/version 1", **kwargs: object
          ) -> hd.ko.KeyObjectSelectionDocument:
    return build_rejection_note(headers, seed=seed,
                                series_description="ct-body 1.0.0 result 1 rejected",
                                **kwargs)  # type: ignore[arg-type]


def _dciodvfy(path: Path) -> tuple[int, str, list[str]]:
    if not DCIODVFY.is_file():
        pytest.skip(f"{DCIODVFY} missing: install the Debian package dicom3tools")
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True,
                          check=False, timeout=120)
    report = proc.stdout + proc.stderr
    return proc.returncode, report, [line for line in report.splitlines()
                                     if line.startswith("Error")]


def _evidence(ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of every evidence reference."""
    return [(str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
             str(sop.ReferencedSOPClassUID), str(sop.ReferencedSOPInstanceUID))
            for study in ds.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence]


def _content(ds: Dataset) -> list[tuple[str, str, str]]:
    """(value type, SOP class, SOP instance) of every reference in the content tree."""
    return [(str(item.ValueType), str(item.ReferencedSOPSequence[0].ReferencedSOPClassUID),
             str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            for item in ds.ContentSequence if "ReferencedSOPSequence" in item]


def _expected(headers: list[Dataset]) -> list[tuple[str, str, str, str]]:
    return [(str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPClassUID),
             str(h.SOPInstanceUID)) for h in headers]


def test_dciodvfy_finds_no_error_in_the_note(superseded: Superseded, tmp_path: Path) -> None:
    written = write_rejection_note(_note(superseded.headers), tmp_path / "rejection-1.dcm")
    code, report, errors = _dciodvfy(written.path)
    assert "KeyObjectSelectionDocument" in report  # dciodvfy checked it against the KOS IOD
    assert code == 0 and not errors, report
    assert written.kind == "KO" and written.sop_class_uid == KeyObjectSelectionDocumentStorage
    assert not list(tmp_path.glob(".*.tmp"))
    # the judge can fail: a note whose evidence misses an instance of its content is reported
    broken = pydicom.dcmread(written.path)
    del broken.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[-1]
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    _code, report, errors = _dciodvfy(tmp_path / "broken.dcm")
    assert errors, report


def test_every_rejected_instance_is_referenced_once_in_content_and_evidence(
        superseded: Superseded, tmp_path: Path) -> None:
    headers = superseded.headers
    assert {h.Modality for h in headers} == {"SEG", "RTSTRUCT", "SR"}
    path = write_rejection_note(_note(headers), tmp_path / "note.dcm").path
    ds = pydicom.dcmread(path)
    first = headers[0]
    # a Key Object Selection Document in a new series of the results' study and patient
    assert ds.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert ds.file_meta.MediaStorageSOPClassUID == KeyObjectSelectionDocumentStorage
    assert ds.Modality == "KO" and ds.SeriesNumber == REJECTION_SERIES_NUMBER
    assert ds.InstanceNumber == 1 and ds.ContentDate and ds.ContentTime
    assert ds.SeriesDescription == "ct-body 1.0.0 result 1 rejected"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "StudyDescription"):
        assert ds.get(keyword) == first.get(keyword), keyword
    assert ds.SeriesInstanceUID not in {h.SeriesInstanceUID for h in headers}
    assert ds.Manufacturer == "dicomnode" and ds.SoftwareVersions.startswith("dicomnode ")
    # the IOCM document title
    (title,) = ds.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001", "DCM", "Rejected for Quality Reasons")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    # every instance exactly once in the evidence, hierarchically, and in the content tree
    evidence = _evidence(ds)
    assert Counter(evidence) == Counter(_expected(headers))
    assert len(ds.CurrentRequestedProcedureEvidenceSequence) == 1
    content = _content(ds)
    assert Counter((c, i) for _t, c, i in content) == Counter(
        (str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in headers)
    kinds = {i: t for t, _c, i in content}
    assert {h.Modality: kinds[h.SOPInstanceUID] for h in headers} == {
        "SEG": "IMAGE", "RTSTRUCT": "COMPOSITE", "SR": "COMPOSITE"}
    # highdicom reads it back as a KOS and resolves every reference through the evidence
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    referenced = [item.referenced_sop_instance_uid for item in kos.content.get_references()]
    assert sorted(referenced) == sorted(str(h.SOPInstanceUID) for h in headers)
    for h in headers:
        assert kos.resolve_reference(str(h.SOPInstanceUID)) == (
            h.StudyInstanceUID, h.SeriesInstanceUID, h.SOPInstanceUID)
    (observer,) = kos.content.get_observer_contexts(codes.DCM.Device)
    assert observer.observer_identifying_attributes.name == "dicomnode"


def test_whole_datasets_give_the_same_note_as_headers(superseded: Superseded) -> None:
    whole = [pydicom.dcmread(o.path) for o in superseded.results.objects]
    a, b = _note(whole), _note(superseded.headers)
    assert _evidence(a) == _evidence(b) and _content(a) == _content(b)


def test_changing_the_note_leaves_the_rejected_objects_as_they_are(
        superseded: Superseded) -> None:
    headers = [copy.deepcopy(h) for h in superseded.headers]
    seg = headers[0]
    seg.OtherPatientIDsSequence = [Dataset()]
    seg.OtherPatientIDsSequence[0].PatientID = "OTHER-1"
    seg.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    before = [copy.deepcopy(h) for h in headers]
    note = _note(headers)
    assert note.OtherPatientIDsSequence[0].PatientID == "OTHER-1"
    note.PatientName = "Changed^Name"  # as re-identification changes it, in place
    note.OtherPatientIDsSequence[0].PatientID = "CHANGED"
    note.StudyInstanceUID = "1.2.3"
    assert headers == before


def test_the_same_seed_gives_the_same_uids_another_seed_other_uids(
        superseded: Superseded) -> None:
    headers = superseded.headers
    first, again = _note(headers), _note(list(reversed(headers)))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID, again.SOPInstanceUID)
    other = _note(headers, seed="job 7/version 2")
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert first.SOPInstanceUID != other.SOPInstanceUID
    made = {first.SeriesInstanceUID, first.SOPInstanceUID, other.SeriesInstanceUID,
            other.SOPInstanceUID}
    assert len(made) == 4
    results = {u for o in superseded.results.objects
               for u in (o.sop_instance_uid, o.series_instance_uid)}
    assert not made & results  # never a UID of an object it rejects
    for uid in made:
        assert uid.startswith("2.25.") and len(uid) <= 64


@pytest.mark.parametrize("reason", list(RejectionReason))
def test_each_reason_is_a_cid_7010_title(superseded: Superseded, reason: RejectionReason) -> None:
    titles = {getattr(codes.cid7010, name) for name in codes.cid7010.dir()}
    assert reason.code in titles
    ds = _note(superseded.headers, reason=reason)
    (title,) = ds.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        reason.code.value, reason.code.scheme_designator, reason.code.meaning)
    assert {r.code.value for r in RejectionReason} == {"113001", "113037", "113038", "113039"}


def test_the_model_card_names_the_software_when_given(superseded: Superseded) -> None:
    card = load_card(ROOT / "models" / "ct-body")
    ds = _note(superseded.headers, card=card, description=None)
    assert ds.ManufacturerModelName == "ct-body"
    assert ds.SoftwareVersions == superseded.headers[0].SoftwareVersions
    assert not [i for i in ds.ContentSequence if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "113012"]


def _copy(ds: Dataset, **changes: str) -> Dataset:
    out = copy.deepcopy(ds)
    for keyword, value in changes.items():
        setattr(out, keyword, value)
    return out


def test_precise_errors(superseded: Superseded) -> None:
    seg, rtstruct, sr = superseded.headers
    with pytest.raises(ValueError, match="needs at least one object to reject: none given"):
        _note([])
    with pytest.raises(ValueError, match=r"objects 1 and 3 have the same SOP Instance UID"):
        _note([seg, rtstruct, _copy(seg)])
    elsewhere = _copy(sr, StudyInstanceUID="1.2.3.4")
    with pytest.raises(ValueError, match=r"belong to 2 studies \(object 1 and object 3 differ\)"
                       r": a rejection note covers one study"):
        _note([seg, rtstruct, elsewhere])
    other_patient = _copy(rtstruct, PatientID="SOMEONE-ELSE")
    with pytest.raises(ValueError, match=r"carry 2 Patient IDs \(object 1 and object 2 differ"
                       ) as caught:
        _note([seg, other_patient])
    assert "SOMEONE-ELSE" not in str(caught.value) and seg.PatientID not in str(caught.value)
    no_series = _copy(rtstruct)
    del no_series.SeriesInstanceUID
    with pytest.raises(ValueError, match="object 2 has no SeriesInstanceUID"):
        _note([seg, no_series])
    with pytest.raises(ValueError, match="seed of a rejection note's UIDs must not be empty"):
        _note([seg], seed="")
    with pytest.raises(ValueError, match="series_number must be positive, not 0"):
        _note([seg], series_number=0)
    with pytest.raises(TypeError, match="sequence of pydicom Datasets"):
        _note(seg)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rejected object 2 is a PosixPath"):
        _note([seg, superseded.results.objects[1].path])  # type: ignore[list-item]


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def test_identity_is_copied_as_it_is_and_never_logged(
        superseded: Superseded, all_logs: pytest.LogCaptureFixture,
        recwarn: pytest.WarningsRecorder) -> None:
    # a name without a caret and a sex outside M/F/O: highdicom's constructor would warn
    # with the name (printed to the node's log) and refuse the sex; the note copies both
    # as they are and neither logs nor warns with them
    headers = [_copy(h, PatientName="Madonna", PatientSex="X") for h in superseded.headers]
    ds = _note(headers)
    assert str(ds.PatientName) == "Madonna" and ds.PatientSex == "X"
    said = [r.getMessage() for r in all_logs.records] + [str(w.message) for w in recwarn]
    assert not [m for m in said if "Madonna" in m], said


@pytest.mark.slow
@requires_orthanc
def test_orthanc_stores_the_note_in_the_results_study(superseded: Superseded,
                                                      tmp_path: Path) -> None:
    note = write_rejection_note(_note(superseded.headers), tmp_path / "rejection.dcm")
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        peer = PeerConfig.model_validate(orthanc.peer())

        def copies(paths: list[Path]) -> list[PeerCopy]:  # what the boundary lets through
            return [for_peer(p, "orthanc", peer, pseudonyms=PseudonymMap(index),
                             out_dir=tmp_path / "orthanc-copies") for p in paths]

        sent = send_files("DICOMNODE", peer, "orthanc", copies(
            [*superseded.files, *(o.path for o in superseded.results.objects)]))
        assert all(r.ok for r in sent), [r.message for r in sent if not r.ok]
        (result,) = send_files("DICOMNODE", peer, "orthanc", copies([note.path]))
        assert result.ok, result.message
        (study,) = orthanc.get("/studies?expand")  # the note joined the results' study
        series = {s["MainDicomTags"]["Modality"]: s
                  for s in orthanc.get(f"/studies/{study['ID']}/series?expand")}
        assert set(series) == {"CT", "SEG", "RTSTRUCT", "SR", "KO"}
        assert series["KO"]["MainDicomTags"]["SeriesInstanceUID"] == note.series_instance_uid
        stored = pydicom.dcmread(BytesIO(orthanc.file(orthanc.instance_id(
            note.sop_instance_uid))))
        assert Counter(_evidence(stored)) == Counter(_expected(superseded.headers))
        # Orthanc does not implement IOCM: the rejected results stay
        assert {o.sop_instance_uid for o in superseded.results.objects} <= \
            orthanc.sop_instance_uids()
    index.dispose()


def test_a_clinical_peer_gets_the_note_reidentified_with_the_results(
        small_ct: list[Path], tmp_path: Path) -> None:
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        pseudonyms = PseudonymMap(index)
        report = pseudonymize_files(small_ct, tmp_path / "pseudonymized",
                                    Pseudonymizer(KEY, profile_options(DeidConfig())), pseudonyms)
        assert not report.failed
        run = _run(sorted(report.written), tmp_path / "results")
        original = pydicom.dcmread(small_ct[0], stop_before_pixels=True)
        pseudonymous = run.headers[0]
        assert pseudonymous.StudyInstanceUID != original.StudyInstanceUID
        assert pseudonymous.PatientID != original.PatientID
        note = write_rejection_note(_note(run.headers), tmp_path / "rejection.dcm")
        # a research peer gets the note as it is, with the pseudonymous results
        assert for_peer(note.path, "research", RESEARCH, pseudonyms=pseudonyms,
                        out_dir=tmp_path / "research").path == note.path
        # a clinical peer gets the results and the note re-identified
        results = [pydicom.dcmread(for_peer(o.path, "pacs", CLINICAL, pseudonyms=pseudonyms,
                                            out_dir=tmp_path / "clinical").path,
                                   stop_before_pixels=True)
                   for o in run.results.objects]
        path = for_peer(note.path, "pacs", CLINICAL, pseudonyms=pseudonyms,
                        out_dir=tmp_path / "clinical").path
        assert path != note.path
        back = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber",
                        "StudyDate", "StudyID", "StudyDescription"):
            assert back.get(keyword) == original.get(keyword), keyword
            assert back.get(keyword) == results[0].get(keyword), keyword
        assert "PatientIdentityRemoved" not in back and "DeidentificationMethod" not in back
        assert (back.SOPInstanceUID, back.SeriesInstanceUID) == (
            note.sop_instance_uid, note.series_instance_uid)  # the note keeps its own UIDs
        # its references are exactly the re-identified results, in the original study
        assert Counter(_evidence(back)) == Counter(_expected(results))
        assert Counter((c, i) for _t, c, i in _content(back)) == Counter(
            (str(r.SOPClassUID), str(r.SOPInstanceUID)) for r in results)
        identity = pseudonyms.study(str(pseudonymous.StudyInstanceUID))
        assert identity is not None
        left = {str(e.value) for e in back.iterall() if e.VR == "UI"} & set(identity.uid_map)
        assert not left  # no pseudonymous UID remains
        code, report_text, errors = _dciodvfy(path)
        assert code == 0 and not errors, report_text
    finally:
        index.dispose()



def _for_research(superseded: Superseded, tmp_path: Path) -> tuple[Dataset, list[Dataset], Path]:
    """The note and the results as a research peer gets them (identified results made
    pseudonymous with the node's key): the note, the results' headers, the note's file."""
    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        pseudonyms = PseudonymMap(index)
        keyed = Pseudonymizer(KEY, profile_options(DeidConfig()))
        note = write_rejection_note(_note(superseded.headers), tmp_path / "rejection.dcm")
        results = [pydicom.dcmread(for_peer(o.path, "research", RESEARCH, pseudonyms=pseudonyms,
                                            out_dir=tmp_path / "research",
                                            pseudonymizer=keyed).path, stop_before_pixels=True)
                   for o in superseded.results.objects]
        path = for_peer(note.path, "research", RESEARCH, pseudonyms=pseudonyms,
                        out_dir=tmp_path / "research", pseudonymizer=keyed).path
        return pydicom.dcmread(path), results, path
    finally:
        index.dispose()


def test_a_research_peer_gets_the_note_pseudonymized_with_the_results(
        superseded: Superseded, tmp_path: Path) -> None:
    back, results, _path = _for_research(superseded, tmp_path)
    assert back.PatientID == results[0].PatientID != superseded.headers[0].PatientID
    assert back.StudyInstanceUID == results[0].StudyInstanceUID
    # the keyed UIDs of the note's references are those of the pseudonymized results
    assert Counter(_evidence(back)) == Counter(_expected(results))
    assert Counter(i for _t, _c, i in _content(back)) == Counter(
        str(r.SOPInstanceUID) for r in results)


def test_a_research_peer_gets_the_note_s_content_tree_with_its_sop_classes(
        superseded: Superseded, tmp_path: Path) -> None:
    # the Content Sequence is dummied for research peers (PS3.15 action D): the SOP class
    # UIDs in its references are the standard's and must not be remapped with the rest
    back, results, path = _for_research(superseded, tmp_path)
    assert Counter((c, i) for _t, c, i in _content(back)) == Counter(
        (str(r.SOPClassUID), str(r.SOPInstanceUID)) for r in results)
    code, report_text, errors = _dciodvfy(path)
    assert code == 0 and not errors, report_text
