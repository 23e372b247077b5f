"""The feedback loop: an edited RTSTRUCT sent back through C-STORE is compared with the node's
own result in a worker process; the stored figures are checked against plastimatch (its own
rasterization of the structure sets and its Dice/Hausdorff) and SimpleITK's Hausdorff
filter; the console's page and JSON, and ``dicomnode qa export``'s files.

Also the parts on their own: contours traced by ``outputs/rtstruct.py`` rasterize back to
the same mask (even-odd rule, holes), and ``outputs/agreement.py`` against plastimatch.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DcmtkStoreSCP, NodeFactory, RunningNode, storescu, wait_until
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from scipy import ndimage

from dicomnode.inference.volume import read_series
from dicomnode.outputs.agreement import agreement
from dicomnode.outputs.contours import (
    Grid,
    _scanline_fill,
    rasterize_rtstruct,
    read_seg,
)
from dicomnode.outputs.rtstruct import slice_contours

ROOT = Path(__file__).resolve().parents[1]
KEY = b"feedback-test-key-0123456789"
PLASTIMATCH = shutil.which("plastimatch")
requires_plastimatch = pytest.mark.skipif(PLASTIMATCH is None,
                                          reason="plastimatch missing (Debian: plastimatch)")


# ---------------------------------------------------------------- rasterization, agreement


def _traced_and_filled(mask: np.ndarray) -> np.ndarray:
    polygons = [line[:, ::-1] for line in slice_contours(mask)]  # (row, col) -> (x, y)
    return _scanline_fill(polygons, *mask.shape)


def test_traced_contours_rasterize_back_to_the_same_mask() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        blobs = ndimage.binary_opening(rng.random((40, 50)) > 0.55)
        assert np.array_equal(_traced_and_filled(blobs), blobs)
    ring = np.zeros((30, 30), dtype=bool)
    yy, xx = np.mgrid[0:30, 0:30]
    ring[(yy - 15) ** 2 + (xx - 15) ** 2 < 100] = True
    ring[(yy - 15) ** 2 + (xx - 15) ** 2 < 25] = False  # a hole: even-odd
    ring[14:17, 14:17] = True  # an island inside the hole
    assert np.array_equal(_traced_and_filled(ring), ring)
    corner = np.zeros((6, 6), dtype=bool)
    corner[1, 1] = corner[2, 2] = True  # touching by a corner only (one polygon)
    assert np.array_equal(_traced_and_filled(corner), corner)


def _plastimatch_dice(reference: Path, compared: Path) -> dict[str, float]:
    out = subprocess.run([str(PLASTIMATCH), "dice", "--all", str(reference), str(compared)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    figures = {}
    for key, pattern in (("dice", r"DICE:\s+([\d.]+)"),
                         ("hd95", r"Percent \(0\.95\) Hausdorff distance \(boundary\) = ([\d.]+)"),
                         ("msd", r"Avg average Hausdorff distance \(boundary\) = ([\d.]+)"),
                         ("hd", r"^Hausdorff distance \(boundary\) = ([\d.]+)")):
        found = re.search(pattern, out, re.M)
        assert found, f"plastimatch did not print {key}:\n{out}"
        figures[key] = float(found.group(1))
    return figures


def _write_mask(mask: np.ndarray, spacing_xyz: tuple[float, float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


@requires_plastimatch
def test_agreement_against_plastimatch_and_simpleitk(tmp_path: Path) -> None:
    z, y, x = np.mgrid[0:30, 0:80, 0:80]
    spacing_xyz = (0.8, 0.8, 2.0)
    ours = ((x - 40) ** 2 * 0.64 + (y - 40) ** 2 * 0.64 + ((z - 15) * 2.0) ** 2) < 20 ** 2
    edited = ((x - 42) ** 2 * 0.64 + (y - 39) ** 2 * 0.64 + ((z - 15) * 2.0) ** 2) < 17 ** 2
    figures = agreement(ours, edited, (2.0, 0.8, 0.8))
    _write_mask(ours, spacing_xyz, tmp_path / "ours.mha")
    _write_mask(edited, spacing_xyz, tmp_path / "edited.mha")
    expected = _plastimatch_dice(tmp_path / "ours.mha", tmp_path / "edited.mha")
    assert figures.dice == pytest.approx(expected["dice"], abs=1e-5)
    assert figures.hd_mm == pytest.approx(expected["hd"], abs=1e-4)
    assert figures.msd_mm == pytest.approx(expected["msd"], abs=0.05)
    assert figures.hd95_mm == pytest.approx(expected["hd95"], abs=0.8)  # one voxel
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(sitk.ReadImage(str(tmp_path / "ours.mha")),
                      sitk.ReadImage(str(tmp_path / "edited.mha")))
    # SimpleITK's filter measures every voxel, not the surfaces: its maximum is the same
    assert figures.hd_mm == pytest.approx(hausdorff.GetHausdorffDistance(), abs=1e-4)
    empty = agreement(ours, np.zeros_like(ours), (2.0, 0.8, 0.8))
    assert (empty.dice, empty.hd95_mm, empty.volume_received_ml) == (0.0, None, 0.0)
    assert empty.volume_change_ml == pytest.approx(-figures.volume_ours_ml)
    with pytest.raises(ValueError, match="one 3D grid"):
        agreement(ours, edited[:-1], (2.0, 0.8, 0.8))


# ---------------------------------------------------------------- end to end through a node


def _rules(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yaml").write_text("""rules:
  - name: ct-external
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
""")
    return folder


def _node(node_factory: NodeFactory, tmp_path: Path, port: int) -> RunningNode:
    key = tmp_path / "deid.key"
    key.write_bytes(KEY)
    return node_factory(
        peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": port}},
        rules_dir=str(_rules(tmp_path / "rules")), models_dir=str(ROOT / "models"),
        deid={"key_file": str(key)},
        outbox={"retry_initial_seconds": 1, "check_interval_seconds": 0.5},
        feedback={"check_interval_seconds": 0.5})


def _get(node: RunningNode, path: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"{node.console_url()}{path}", timeout=10) as reply:
        return reply.read().decode(), reply.headers.get("Content-Security-Policy", "")


def _edit(rtstruct: pydicom.Dataset, grid: Grid, *, erode: str, delete: str,
          erode_mm: float = 2.0) -> pydicom.Dataset:
    """``rtstruct`` as a planning system would send it back: ``erode`` shrunk by ``erode_mm``
    in each slice's plane, ``delete`` removed, new SOP Instance and Series UIDs."""
    edited = copy.deepcopy(rtstruct)
    masks = rasterize_rtstruct(rtstruct, grid).masks
    spacing_yx = (grid.spacing[1], grid.spacing[0])
    numbers = {str(r.ROIName): int(r.ROINumber) for r in rtstruct.StructureSetROISequence}
    eroded = np.stack([ndimage.distance_transform_edt(plane, sampling=spacing_yx) > erode_mm
                       for plane in masks[erode]])
    axes = np.asarray(grid.direction).reshape(3, 3) * np.asarray(grid.spacing)
    template = next(rc for rc in rtstruct.ROIContourSequence
                    if int(rc.ReferencedROINumber) == numbers[erode]).ContourSequence[0]
    items = []
    for k, plane in enumerate(eroded):
        for line in slice_contours(plane):
            index = np.c_[line[:, 1], line[:, 0], np.full(len(line), float(k))]
            points = np.asarray(grid.origin) + index @ axes.T
            item = pydicom.Dataset()
            item.ContourImageSequence = template.ContourImageSequence  # any image will do
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.4f}" for v in points.reshape(-1)]
            items.append(item)
    for rc in edited.ROIContourSequence:
        if int(rc.ReferencedROINumber) == numbers[erode]:
            rc.ContourSequence = DicomSequence(items)
    gone = numbers[delete]
    for keyword, key in (("StructureSetROISequence", "ROINumber"),
                         ("ROIContourSequence", "ReferencedROINumber"),
                         ("RTROIObservationsSequence", "ReferencedROINumber")):
        setattr(edited, keyword, DicomSequence(
            [item for item in getattr(edited, keyword) if int(item.get(key)) != gone]))
    edited.SOPInstanceUID = generate_uid()
    edited.file_meta.MediaStorageSOPInstanceUID = edited.SOPInstanceUID
    edited.SeriesInstanceUID = generate_uid()
    edited.StructureSetLabel = "edited"
    return edited


def _plastimatch_masks(rtstruct: Path, ct_dir: Path, out: Path) -> Path:
    subprocess.run([str(PLASTIMATCH), "convert", "--input", str(rtstruct), "--referenced-ct",
                    str(ct_dir), "--output-prefix", str(out), "--prefix-format", "mha"],
                   capture_output=True, text=True, timeout=120, check=True)
    return out


@requires_plastimatch
@pytest.mark.slow
def test_an_edited_rtstruct_sent_back_is_compared_with_the_result(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    import testdata

    storescp = DcmtkStoreSCP(tmp_path / "received")
    try:
        node = _node(node_factory, tmp_path, storescp.port)
        ct_dir = tmp_path / "ct"
        ct = testdata.synthetic_ct(ct_dir, slices=20, rows=96, columns=96,
                                   patient_id="PAT-FB-1", patient_name="Feedback^Fay")
        assert storescu(node.port, *ct).returncode == 0
        wait_until(lambda: "RTSTRUCT" in storescp.counts("Modality"), 120,
                   "the RTSTRUCT result received")
    finally:
        storescp.close()
    (ours_path,) = [p for p in storescp.folder.iterdir()
                    if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"]
    ours = pydicom.dcmread(ours_path)
    assert ours.PatientID == "PAT-FB-1"  # re-identified: the original study
    grid = Grid.of_image(read_series(ct).image)
    edited = _edit(ours, grid, erode="External", delete="Bone")
    edited_path = tmp_path / "edited.dcm"
    edited.save_as(edited_path, enforce_file_format=True)
    # the same edit naming the structure set it was derived from (the node's result)
    predecessor = pydicom.Dataset()
    predecessor.ReferencedSOPClassUID = ours.SOPClassUID
    predecessor.ReferencedSOPInstanceUID = ours.SOPInstanceUID
    derived = copy.deepcopy(edited)
    derived.PredecessorStructureSetSequence = DicomSequence([predecessor])
    derived.SOPInstanceUID = derived.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    derived_path = tmp_path / "derived.dcm"
    derived.save_as(derived_path, enforce_file_format=True)
    # one whose contour has two points: it cannot be compared
    broken = copy.deepcopy(edited)
    broken.ROIContourSequence[0].ContourSequence[0].ContourData = ["0", "0", "0"] * 2
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken_path = tmp_path / "broken.dcm"
    broken.save_as(broken_path, enforce_file_format=True)
    # one that references nothing of the study's jobs (another planning system's own set)
    unrelated = _edit(ours, grid, erode="External", delete="Bone")
    for ref in unrelated.ReferencedFrameOfReferenceSequence:
        del ref.RTReferencedStudySequence
    for rc in unrelated.ROIContourSequence:
        for item in rc.get("ContourSequence", []):
            del item.ContourImageSequence
    unrelated_path = tmp_path / "unrelated.dcm"
    unrelated.save_as(unrelated_path, enforce_file_format=True)
    # the node's SEG as a viewer would store it again: its own copy, new UIDs, unchanged
    (seg_path,) = [p for p in storescp.folder.iterdir()
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    seg = pydicom.dcmread(seg_path)
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.SeriesInstanceUID = generate_uid()
    seg_copy_path = tmp_path / "seg-copy.dcm"
    seg.save_as(seg_copy_path, enforce_file_format=True)
    # the edited one, and the node's own result sent back unchanged (nothing to compare)
    assert storescu(node.port, edited_path, ours_path, unrelated_path, derived_path,
                    broken_path, seg_copy_path,
                    extra=("-R",)).returncode == 0  # -R: the files' own SOP classes

    def compared() -> dict[str, Any]:
        view: dict[str, Any] = json.loads(_get(node, "/api/v1/models/ct-body/feedback")[0])
        return view

    wait_until(lambda: sum(compared()["objects"].get(s, 0) for s in ("done", "skipped",
                                                                       "failed")) == 5,
               60, "the received objects compared")
    view = compared()
    assert view["objects"] == {"done": 3, "skipped": 1, "failed": 1}, view["objects"]
    with sqlite3.connect(node.store / "index.sqlite") as db:
        rows = db.execute("SELECT sop_instance_uid, state, matched_by, reason, id "
                          "FROM feedback_object").fetchall()
    states = {uid: (state, matched_by, reason) for uid, state, matched_by, reason, _ in rows}
    of_object = {pk: uid for uid, *_, pk in rows}
    assert states[seg.SOPInstanceUID][:2] == ("done", "series")
    # the SEG, read with highdicom, against the node's own SEG: the same structures
    for f in view["figures"]:
        if of_object[f["feedback"]] == seg.SOPInstanceUID:
            assert (f["outcome"], f["dice"], f["hd95_mm"], f["volume_change_ml"]) == (
                "compared", 1.0, 0.0, 0.0), f
    view["figures"] = [f for f in view["figures"]
                       if of_object[f["feedback"]] != seg.SOPInstanceUID]
    assert states[edited.SOPInstanceUID][:2] == ("done", "series")
    assert states[derived.SOPInstanceUID][:2] == ("done", "reference")
    assert states[ours.SOPInstanceUID][:2] == ("skipped", "own")
    assert states[unrelated.SOPInstanceUID][0] == "skipped"
    assert "references neither a result" in states[unrelated.SOPInstanceUID][2]
    assert states[broken.SOPInstanceUID][0] == "failed"
    assert "at least three 3D points" in states[broken.SOPInstanceUID][2]
    assert len(view["figures"]) == 4  # two structures of each compared object
    same: dict[str, set[tuple[Any, ...]]] = {}
    for f in view["figures"]:
        same.setdefault(f["structure"], set()).add((f["dice"], f["hd95_mm"], f["msd_mm"]))
    assert all(len(v) == 1 for v in same.values())  # the same edit, the same figures
    figures = {f["structure"]: f for f in view["figures"]}
    assert set(figures) == {"External", "Bone"}
    bone, external = figures["Bone"], figures["External"]
    assert (bone["outcome"], bone["dice"], bone["hd95_mm"]) == ("deleted", 0.0, None)
    assert bone["volume_received_ml"] == 0 and bone["volume_change_ml"] < 0
    assert external["outcome"] == "compared" and "received_name" not in external  # no token

    # independently: plastimatch rasterizes both structure sets on the CT and compares
    mine = _plastimatch_masks(ours_path, ct_dir, tmp_path / "pm-ours")
    theirs = _plastimatch_masks(edited_path, ct_dir, tmp_path / "pm-edited")
    expected = _plastimatch_dice(mine / "External.mha", theirs / "External.mha")
    assert external["dice"] == pytest.approx(expected["dice"], abs=1e-4)  # same voxels
    assert external["hd95_mm"] == pytest.approx(expected["hd95"], abs=0.1)
    assert external["msd_mm"] == pytest.approx(expected["msd"], abs=0.05)
    assert 1.5 <= external["hd95_mm"] <= 3.0  # eroded by 2 mm
    volume_ours = sitk.GetArrayFromImage(sitk.ReadImage(str(mine / "External.mha"))).sum()
    voxel_ml = float(np.prod(grid.spacing)) / 1000
    assert external["volume_ours_ml"] == pytest.approx(volume_ours * voxel_ml, rel=0.02)
    assert external["volume_change_ml"] < 0
    assert "Feedback^Fay" not in node.log() and "PAT-FB-1" not in node.log()

    # the node's SEG (read with highdicom) holds the same structures as its RTSTRUCT
    from_seg = read_seg(pydicom.dcmread(seg_path), grid).masks
    from_rtstruct = rasterize_rtstruct(ours, grid).masks
    assert from_seg["External"].any()
    for name in ("External", "Bone"):
        assert np.array_equal(from_seg[name], from_rtstruct[name]), name

    # the console's page: the most edited structure first, plots inline, the CSP kept
    page, csp = _get(node, "/models/ct-body/feedback")
    assert "<svg" in page and "script-src 'self'" in csp
    table = page[page.index("most edited"):page.index("Dice over time")]
    assert table.index("Bone") < table.index("External")  # deleted: edited most
    assert view["inputs"] and view["inputs"][0]["modality"] == "CT"
    assert view["inputs"][0]["intensity_p99"] > view["inputs"][0]["intensity_p01"]

    # qa export: image + corrected mask pairs, a manifest without identity
    out = tmp_path / "export"
    done = node.cli("qa", "export", "ct-body", str(out))
    assert "3 image + corrected mask pair(s)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"case-000{n}_{kind}.nii.gz" for n in (1, 2, 3) for kind in ("image", "mask")),
        "manifest.csv", "manifest.json"]
    image = sitk.ReadImage(str(out / "case-0001_image.nii.gz"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case-0001_mask.nii.gz")))
    assert image.GetSize() == grid.size and mask.shape == grid.shape
    edited_external = rasterize_rtstruct(edited, grid).masks["External"]
    assert np.array_equal(mask == 1, edited_external) and not (mask == 2).any()
    source = sitk.GetArrayFromImage(read_series(ct).image)
    assert np.array_equal(sitk.GetArrayFromImage(image), source)  # the CT's HU, as received
    unchanged = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case-0003_mask.nii.gz")))
    assert np.array_equal(unchanged == 2, from_seg["Bone"])  # the SEG copy keeps the bone
    manifest = (out / "manifest.json").read_text() + (out / "manifest.csv").read_text()
    for identity in ("PAT-FB-1", "Feedback", str(ours.StudyInstanceUID),
                     str(edited.SOPInstanceUID), str(ours.SeriesInstanceUID)):
        assert identity not in manifest
    data = json.loads((out / "manifest.json").read_text())
    assert data["cases"][0]["structures"][0]["dice"] == external["dice"]
    again = node.cli("qa", "export", "ct-body", str(out), check=False)
    assert again.returncode == 2 and "not empty" in again.stderr


# ---------------------------------------------------------------- the console's view


def test_the_feedback_view_shows_keys_and_hides_received_names_without_the_token(
        tmp_path: Path) -> None:
    from dicomnode.store.db import open_index
    from dicomnode.store.tables import FeedbackObject, FeedbackStructure, JobInput
    from dicomnode.web.feedback import feedback_page, feedback_view

    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        with index.session() as session, session.begin():
            session.add(FeedbackObject(id=1, instance_pk=7, sop_instance_uid="1.2.3.4",
                                       kind="RTSTRUCT", study_pk=1, job_pk=3, model="m",
                                       model_version="1", matched_by="series", state="done"))
            session.add(FeedbackObject(id=2, instance_pk=8, sop_instance_uid="1.2.3.5",
                                       kind="SEG", study_pk=1, state="pending"))
            for name, outcome, dice in (("Liver", "compared", 0.9), ("Lung", "deleted", 0.0),
                                        ("Heart", "compared", 1.0)):
                session.add(FeedbackStructure(
                    feedback_pk=1, model="m", model_version="1", structure=name,
                    received_name=f"{name} <Dr^Who>", outcome=outcome, dice=dice,
                    hd95_mm=None if outcome == "deleted" else 2.5, msd_mm=None,
                    volume_ours_ml=10.0, volume_received_ml=9.0, volume_change_ml=-1.0))
            session.add(JobInput(job_pk=3, model="m", model_version="1", modality="CT",
                                 manufacturer="<b>Acme</b>", slice_thickness_mm=1.25,
                                 kvp=120.0, intensity_p01=-1000.0, intensity_p50=0.0,
                                 intensity_p99=700.0))
        public = feedback_view(index, "m", authenticated=False)
        assert public["objects"] == {"done": 1}  # the pending one has no model yet
        assert [s["structure"] for s in public["structures"]] == ["Lung", "Liver", "Heart"]
        assert [s["edited"] for s in public["structures"]] == [1, 1, 0]
        assert "Dr^Who" not in json.dumps(public) and "1.2.3.4" not in json.dumps(public)
        assert public["inputs"][0]["dice_mean"] == pytest.approx(round(1.9 / 3, 4))
        with_token = feedback_view(index, "m", authenticated=True)
        assert {f["received_name"] for f in with_token["figures"]} == {
            "Liver <Dr^Who>", "Lung <Dr^Who>", "Heart <Dr^Who>"}
        page = feedback_page(with_token)
        assert "<b>Acme" not in page and "&lt;b&gt;Acme" in page  # escaped
        assert page.count("<svg") == 3
        assert feedback_view(index, "other", authenticated=False)["figures"] == []
        assert "no figures yet" in feedback_page(feedback_view(index, "other",
                                                               authenticated=False))
    finally:
        index.dispose()


def test_qa_export_refuses_an_unknown_model_and_says_when_there_is_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from dicomnode.cli import main

    config = tmp_path / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "store")},
                                      "models_dir": str(ROOT / "models")}))
    assert main(["qa", "export", "no-such-model", str(tmp_path / "a"), "-c", str(config)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["qa", "export", "ct-body", str(tmp_path / "b"), "-c", str(config)]) == 1
    assert "0 image + corrected mask pair(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["cases"] == []


def test_received_structures_match_by_name_ignoring_case_or_by_the_cards_aliases() -> None:
    from dicomnode.jobs.feedback import _received_name
    from dicomnode.models.card import load_card

    card = load_card(ROOT / "models" / "ct-body")
    external = card.outputs.labels[0].model_copy(update={"aliases": ("BODY", "Skin")})
    assert external.name == "External"
    assert _received_name(external, {"External": 1, "external": 2}) == "External"
    assert _received_name(external, {"EXTERNAL ": 1}) == "EXTERNAL "
    assert _received_name(external, {"skin": 1, "Bone": 2}) == "skin"
    assert _received_name(external, {"Bone": 1, "Body_Outline": 2}) is None
