"""Result objects judged by independent tools: dciodvfy (dicom3tools) validates every SEG,
RTSTRUCT and SR, PixelMed's validators the SEG and the SR; plastimatch and rt-utils
rasterise the RTSTRUCT back onto the images; highdicom, pydicom-seg and dcmqi read the SEG
back (highdicom the SR too). Real models on real data: ``ct-body`` on the Cranium CT and
``brain-mr`` on the Colin27 MR."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pydicom.uid
import pytest
import SimpleITK as sitk
import testdata
from orthanc import OrthancServer, requires_orthanc
from pydicom.dataset import Dataset
from skimage.draw import polygon2mask

from dicomnode import __version__
from dicomnode.boundary import for_peer
from dicomnode.config import ConfigError, OutputsConfig, PeerConfig, load_config
from dicomnode.inference.segment import (
    LabelMask,
    Segmentation,
    Structure,
    load_inputs,
    segment,
    structures_of_label_map,
)
from dicomnode.inference.volume import SeriesVolume
from dicomnode.models.card import load_card
from dicomnode.outputs.algorithm import algorithm_identity
from dicomnode.outputs.rtstruct import ds_bytes, slice_contours
from dicomnode.outputs.source import OutputError
from dicomnode.outputs.write import Results, write_results
from dicomnode.receive.folder import index_folder
from dicomnode.send.scu import send_files
from dicomnode.store.db import open_index
from dicomnode.store.pseudonyms import PseudonymMap
from dicomnode.store.queries import studies_report

ROOT = Path(__file__).resolve().parents[1]
DCIODVFY = Path("/usr/bin/dciodvfy")
PLASTIMATCH = Path("/usr/bin/plastimatch")
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
ALL_OBJECTS = OutputsConfig(seg=True, rtstruct=True, sr=True)


@dataclass
class Case:
    name: str
    files: list[Path]
    volume: SeriesVolume
    segmentation: Segmentation
    results: Results


def _case(name: str, model: str, input_name: str, files: list[Path], out: Path) -> Case:
    card = load_card(ROOT / "models" / model)
    (volume,) = load_inputs(card, {input_name: files})
    segmentation = segment(card, [volume.image])
    results = write_results(segmentation, volume, files, out, ALL_OBJECTS)
    return Case(name, files, volume, segmentation, results)


@pytest.fixture(scope="module")
def cranium(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("cranium")
    files = testdata.cranium_ct(folder / "ct")
    return _case("cranium", "ct-body", "ct", files, folder / "out")


@pytest.fixture(scope="module")
def colin(tmp_path_factory: pytest.TempPathFactory) -> Case:
    if not CH2.is_file():
        pytest.skip(f"{CH2} missing: install the Debian package mricron-data")
    folder = tmp_path_factory.mktemp("colin")
    files = testdata.colin27_mr(folder / "mr")
    return _case("colin", "brain-mr", "t1", files, folder / "out")


@pytest.fixture(params=["cranium", "colin"])
def case(request: pytest.FixtureRequest) -> Case:
    result: Case = request.getfixturevalue(request.param)
    return result


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def _need(tool: Path, package: str) -> None:
    if not tool.is_file():
        pytest.skip(f"{tool} missing: install the Debian package {package}")


@pytest.mark.slow
def test_dciodvfy_finds_no_error_in_any_object(case: Case) -> None:
    _need(DCIODVFY, "dicom3tools")
    assert {o.kind for o in case.results.objects} == {"SEG", "RTSTRUCT", "SR"}
    for obj in case.results.objects:
        proc = subprocess.run([str(DCIODVFY), str(obj.path)], capture_output=True, text=True,
                              check=False, timeout=120)
        report = proc.stdout + proc.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert proc.returncode == 0 and not errors, f"{case.name} {obj.kind}:\n{report}"


@pytest.mark.slow
def test_plastimatch_rasterises_each_structure_back_onto_its_mask(case: Case,
                                                                   tmp_path: Path) -> None:
    _need(PLASTIMATCH, "plastimatch")
    rtstruct = case.results.by_kind("RTSTRUCT").path
    images = case.files[0].parent
    # --xor-contours: a hole is its own contour inside its island, the even-odd convention
    # of treatment planning systems (plastimatch otherwise fills holes: a skull would
    # become a solid head)
    proc = subprocess.run(
        [str(PLASTIMATCH), "convert", "--input", str(rtstruct), "--referenced-ct", str(images),
         "--output-prefix", str(tmp_path / "out"), "--prefix-format", "nrrd",
         "--xor-contours"], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = 0
    for structure in case.segmentation.structures:
        if structure.volume_ml <= 10:
            continue
        raster = sitk.ReadImage(str(tmp_path / "out" / f"{structure.label.name}.nrrd"))
        on_grid = sitk.Resample(raster, case.volume.image, sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0)
        dice = _dice(sitk.GetArrayFromImage(on_grid) > 0, structure.mask)
        print(f"{case.name} {structure.label.name}: Dice {dice:.4f}")
        assert dice >= 0.97, f"{structure.label.name}: Dice {dice:.4f}"
        checked += 1
    assert checked == (2 if case.name == "cranium" else 1)


def _frame_source(frame: Dataset) -> str:
    item = frame.DerivationImageSequence[0].SourceImageSequence[0]
    return str(item.ReferencedSOPInstanceUID)


def test_highdicom_reads_the_seg_back_on_the_source_slices(case: Case) -> None:
    seg = hd.seg.segread(case.results.by_kind("SEG").path)
    headers = {str(ds.SOPInstanceUID): ds for ds in
               (pydicom.dcmread(p, stop_before_pixels=True) for p in case.files)}
    first = next(iter(headers.values()))
    structures = case.segmentation.structures
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert seg.PatientID == first.PatientID
    # by default a frame per source slice and segment where the segment has a voxel
    non_empty = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in structures)
    assert int(seg.NumberOfFrames) == non_empty
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = headers[_frame_source(frame)]
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient], atol=1e-4)
    for number, (item, structure) in enumerate(zip(seg.SegmentSequence, structures,
                                                   strict=True), start=1):
        assert item.SegmentNumber == number and item.SegmentLabel == structure.label.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == case.segmentation.card.name
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == structure.label.type.value
        rgb = hd.color.CIELabColor.from_dicom_value(
            tuple(item.RecommendedDisplayCIELabValue)).to_rgb()
        assert np.abs(np.subtract(rgb, structure.label.color)).max() <= 1
    # the pixel data equals the masks, slice by slice
    pixels = seg.get_pixels_by_source_instance(list(case.volume.sop_instance_uids),
                                               combine_segments=False,
                                               skip_overlap_checks=True)
    for number, structure in enumerate(structures):
        np.testing.assert_array_equal(pixels[..., number] > 0, structure.mask)


def test_the_labelmap_seg_holds_one_segment_number_per_pixel(cranium: Case,
                                                             tmp_path: Path) -> None:
    options = OutputsConfig(seg_type="labelmap", rtstruct=False)
    results = write_results(cranium.segmentation, cranium.volume, cranium.files, tmp_path,
                            options)
    seg = hd.seg.segread(results.by_kind("SEG").path)
    assert seg.SegmentationType == "LABELMAP"
    pixels = seg.get_pixels_by_source_instance(list(cranium.volume.sop_instance_uids),
                                               combine_segments=True)
    expected = np.zeros(pixels.shape, dtype=np.uint8)
    for number, structure in enumerate(cranium.segmentation.structures, start=1):
        expected[structure.mask] = number  # later structures win where they overlap
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.slow
@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_a_shared_label_map_writes_the_same_objects_as_separate_masks(
        cranium: Case, tmp_path: Path, seg_type: str) -> None:
    """Disjoint structures held as views of one label map (how many-class models are kept)
    give the same SEG pixels and RTSTRUCT contours as the same structures held as masks."""
    segmentation = cranium.segmentation
    views = structures_of_label_map(segmentation.card.outputs.labels,
                                    segmentation.label_map(), segmentation.geometry.spacing)
    assert all(isinstance(s.voxels, LabelMask) for s in views)
    assert sum(s.voxel_count for s in views) > 0
    masks = tuple(Structure(s.label, s.mask, s.voxel_count, s.volume_ml) for s in views)
    options = OutputsConfig(seg_type=seg_type)  # type: ignore[arg-type]
    written = {}
    for name, structures in (("views", views), ("masks", masks)):
        shaped = dataclasses.replace(segmentation, structures=structures)
        written[name] = write_results(shaped, cranium.volume, cranium.files, tmp_path / name,
                                      options, seed="same")
    seg_a, seg_b = (pydicom.dcmread(written[n].by_kind("SEG").path) for n in ("views", "masks"))
    assert seg_a.NumberOfFrames == seg_b.NumberOfFrames
    assert seg_a.PixelData == seg_b.PixelData
    assert seg_a.SegmentsOverlap == seg_b.SegmentsOverlap == "NO"
    rt_a, rt_b = (pydicom.dcmread(written[n].by_kind("RTSTRUCT").path)
                  for n in ("views", "masks"))
    contours = [[[list(c.ContourData) for c in getattr(roi, "ContourSequence", [])]
                 for roi in rt.ROIContourSequence] for rt in (rt_a, rt_b)]
    assert contours[0] == contours[1] and any(contours[0])


@pytest.mark.slow
def test_empty_frames_are_left_out_by_default_and_kept_when_asked(cranium: Case,
                                                                  tmp_path: Path) -> None:
    assert OutputsConfig().seg_omit_empty_frames is True
    structures = cranium.segmentation.structures
    non_empty = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in structures)
    every = len(cranium.files) * len(structures)
    assert non_empty < every
    frames = {}
    for omit in (True, False, "auto"):
        options = OutputsConfig(seg_omit_empty_frames=omit, rtstruct=False)
        results = write_results(cranium.segmentation, cranium.volume, cranium.files,
                                tmp_path / str(omit), options)
        seg = pydicom.dcmread(results.by_kind("SEG").path, stop_before_pixels=True)
        frames[omit] = int(seg.NumberOfFrames)
    assert frames == {True: non_empty, False: every, "auto": every}  # auto: up to 16 segments


def _ds_strings(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds.iterall():
        if elem.VR == "DS" and elem.value is not None:
            values = elem.value if elem.VM > 1 else [elem.value]
            out.extend(str(getattr(v, "original_string", v)) for v in values)
    return out


@pytest.mark.slow
def test_rtstruct_references_contours_names_colours_and_algorithm(case: Case) -> None:
    path = case.results.by_kind("RTSTRUCT").path
    ds = pydicom.dcmread(path)
    assert not ds.file_meta.TransferSyntaxUID.is_implicit_VR
    headers = {str(h.SOPInstanceUID): h for h in
               (pydicom.dcmread(p, stop_before_pixels=True) for p in case.files)}
    first = next(iter(headers.values()))
    assert ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    series = refs.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(headers)
    card = case.segmentation.card
    written = [s for s in case.segmentation.structures if s.voxel_count]  # empty: left out
    for roi, contour, obs, structure in zip(
            ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence,
            written, strict=True):
        label = structure.label
        assert roi.ROIName == label.name and roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert card.name in roi.ROIGenerationDescription
        assert card.version in roi.ROIGenerationDescription
        assert list(contour.ROIDisplayColor) == list(label.color)
        assert obs.RTROIInterpretedType == label.rt_roi_interpreted_type
        assert contour.ReferencedROINumber == roi.ROINumber == obs.ReferencedROINumber
        items = contour.ContourSequence
        for item in items:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            image = headers[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == item.NumberOfContourPoints >= 3
            # each contour lies in the plane of the image it references
            normal = np.cross(*np.asarray(image.ImageOrientationPatient, float).reshape(2, 3))
            offset = (points - np.asarray(image.ImagePositionPatient, float)) @ normal
            assert np.abs(offset).max() < 1e-3
    strings = _ds_strings(ds)
    assert strings and max(len(s) for s in strings) <= 16


def test_a_ring_and_islands_give_one_contour_per_closed_line() -> None:
    mask = np.zeros((40, 50), dtype=bool)
    yy, xx = np.mgrid[:40, :50]
    r = np.hypot(yy - 20, xx - 18)
    mask[(r < 12) & (r >= 6)] = True  # a ring: outer line and hole
    mask[5:9, 38:45] = True  # an island
    mask[30, 40] = mask[31, 41] = True  # two pixels touching only by a corner: one region
    contours = slice_contours(mask)
    assert len(contours) == 4
    # even-odd rasterisation of the polygons (pixel centres inside) gives the mask back
    raster = np.zeros_like(mask)
    for line in contours:
        raster ^= polygon2mask(mask.shape, line)
    np.testing.assert_array_equal(raster, mask)


def test_contour_vertices_are_the_marching_squares_edge_midpoints() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        mask = rng.random((24, 31)) < rng.uniform(0.2, 0.8)
        contours = slice_contours(mask)
        raster = np.zeros_like(mask)
        for line in contours:
            raster ^= polygon2mask(mask.shape, line)
            # each vertex lies halfway between an inside and an outside pixel centre
            doubled = np.rint(line * 2).astype(int)
            assert np.allclose(line * 2, doubled)
            assert np.all((doubled[:, 0] + doubled[:, 1]) % 2 == 1)
            for r2, c2 in doubled:
                a = (r2 // 2, c2 // 2)
                b = ((r2 + 1) // 2, (c2 + 1) // 2)
                inside = [0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c]
                          for r, c in (a, b)]
                assert inside[0] != inside[1]
        np.testing.assert_array_equal(raster, mask)


def test_ds_bytes_are_short_decimal_strings() -> None:
    values = np.array([0.0, -0.0, 1.5, -12.25, 123456789.12344, -0.00004, 3.0001, 100.0,
                       -100.1, 999999999.9999, 0.1])
    assert ds_bytes(values) == (b"0\\0\\1.5\\-12.25\\123456789.1234\\0\\3.0001\\100\\"
                                b"-100.1\\999999999.9999\\0.1")
    rng = np.random.default_rng(3)
    many = rng.uniform(-5000, 5000, 20000)
    strings = ds_bytes(many).decode().split("\\")
    assert max(len(s) for s in strings) <= 16
    np.testing.assert_allclose([float(s) for s in strings], np.round(many, 4), atol=1e-9)
    with pytest.raises(OutputError, match="beyond 1e9"):
        ds_bytes(np.array([1e9]))


def test_the_sr_reports_the_volumes_of_the_segments(case: Case) -> None:
    sr = hd.sr.srread(case.results.by_kind("SR").path)
    seg = case.results.by_kind("SEG")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    by_name = {s.label.name: s for s in case.segmentation.structures}
    reported = {}
    for group in groups:
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.sop_instance_uid
        (measurement,) = group.get_measurements()
        reported[str(group.tracking_identifier)] = measurement.value
    expected = {n: round(s.volume_ml, 3) for n, s in by_name.items() if s.voxel_count}
    assert reported == pytest.approx(expected)
    volumes = json.loads(case.results.volumes.read_text())
    assert {s["name"]: s["volume_ml"] for s in volumes["structures"]} == {
        n: round(s.volume_ml, 3) for n, s in by_name.items()}


def test_a_rerun_writes_the_same_uids(cranium: Case, tmp_path: Path) -> None:
    again = write_results(cranium.segmentation, cranium.volume, cranium.files, tmp_path,
                          ALL_OBJECTS)
    first = {o.kind: (o.sop_instance_uid, o.series_instance_uid)
             for o in cranium.results.objects}
    assert {o.kind: (o.sop_instance_uid, o.series_instance_uid)
            for o in again.objects} == first
    other = write_results(cranium.segmentation, cranium.volume, cranium.files,
                          tmp_path / "other", ALL_OBJECTS, seed="another job")
    assert not {o.sop_instance_uid for o in other.objects} & {u for u, _ in first.values()}
    assert not list(tmp_path.glob(".*.tmp"))


def test_sr_without_seg_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("outputs:\n  seg: false\n  sr: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="outputs: sr: true needs seg: true"):
        load_config(path)



@pytest.mark.slow
@requires_orthanc
def test_orthanc_accepts_the_objects_into_the_source_study(case: Case, tmp_path: Path) -> None:
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        peer = PeerConfig.model_validate(orthanc.peer())
        paths = [*case.files, *(o.path for o in case.results.objects)]
        index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
        try:
            copies = [for_peer(p, "orthanc", peer, pseudonyms=PseudonymMap(index),
                               out_dir=tmp_path / "send") for p in paths]
            results = send_files("DICOMNODE", peer, "orthanc", copies)
        finally:
            index.dispose()
        assert all(r.ok for r in results), [r.message for r in results if not r.ok]
        studies = orthanc.get("/studies?expand")
        assert len(studies) == 1  # the results joined the source study
        modalities = {s["MainDicomTags"]["Modality"]
                      for s in orthanc.get(f"/studies/{studies[0]['ID']}/series?expand")}
        assert {"SEG", "RTSTRUCT", "SR"} <= modalities
        for obj in case.results.objects:
            stored = pydicom.dcmread(
                BytesIO(orthanc.file(orthanc.instance_id(obj.sop_instance_uid))))
            assert stored.SOPClassUID == obj.sop_class_uid


def test_a_series_with_gaps_resampled_by_the_card_keeps_its_own_slices(tmp_path: Path) -> None:
    package = tmp_path / "ct-body"
    shutil.copytree(ROOT / "models" / "ct-body", package)
    card_file = package / "card.yaml"
    card_file.write_text(card_file.read_text().replace(
        "preprocessing:\n", "preprocessing:\n  allow_irregular_spacing: true\n", 1))
    files = testdata.synthetic_ct(tmp_path / "ct", slices=24, rows=128, columns=128,
                                  missing=(7, 8, 15))
    card = load_card(package)
    (volume,) = load_inputs(card, {"ct": files})
    assert volume.resampled
    segmentation = segment(card, [volume.image])
    results = write_results(segmentation, volume, files, tmp_path / "out",
                            OutputsConfig(seg_omit_empty_frames=False))
    headers = {str(h.SOPInstanceUID): h for h in
               (pydicom.dcmread(p, stop_before_pixels=True) for p in files)}
    seg = pydicom.dcmread(results.by_kind("SEG").path, stop_before_pixels=True)
    assert int(seg.NumberOfFrames) == len(files) * len(segmentation.structures)
    ds = pydicom.dcmread(results.by_kind("RTSTRUCT").path)
    referenced = set()
    for roi in ds.ROIContourSequence:
        for item in roi.get("ContourSequence", []):
            image = headers[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
            referenced.add(image.SOPInstanceUID)
            z = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)[:, 2]
            np.testing.assert_allclose(z, float(image.ImagePositionPatient[2]), atol=1e-3)
    assert referenced == set(headers)  # the phantom is in every slice


def test_the_card_s_seg_type_wins_over_the_configuration(cranium: Case, tmp_path: Path) -> None:
    card = cranium.segmentation.card
    labelmap_card = card.model_copy(
        update={"outputs": card.outputs.model_copy(update={"seg_type": "labelmap"})})
    segmentation = dataclasses.replace(cranium.segmentation, card=labelmap_card)
    results = write_results(segmentation, cranium.volume, cranium.files, tmp_path,
                            OutputsConfig(seg_type="binary", rtstruct=False))
    seg = pydicom.dcmread(results.by_kind("SEG").path, stop_before_pixels=True)
    assert seg.SegmentationType == "LABELMAP"


def test_a_seg_sent_back_to_a_node_is_not_an_image_series(cranium: Case, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(cranium.results.by_kind("SEG").path, folder / "seg.dcm")
    shutil.copy(cranium.files[0], folder / "ct.dcm")
    index, _ = index_folder(folder, tmp_path / "work")
    try:
        (study,) = studies_report(index)["studies"]
    finally:
        index.dispose()
    verdicts = {s["modality"]: s["geometry"]["state"] for s in study["series"]}
    assert verdicts == {"SEG": "not-image", "CT": "whole"}


# --- IHE AI Results (AIR): the algorithm's identity in every object ----------------------

PROCESSING_EQUIPMENT = ("109102", "DCM")  # CID 7005, what AIR section 6.5.3.1 asks for


def _equipment(ds: Dataset) -> Dataset:
    """The model's Contributing Equipment item: the one with a Device UID (highdicom adds
    the source's acquisition equipment and itself, without)."""
    (item,) = [i for i in ds.ContributingEquipmentSequence if "DeviceUID" in i]
    return item


def test_every_object_names_the_model_as_contributing_equipment(case: Case) -> None:
    card = case.segmentation.card
    devices = set()
    for obj in case.results.objects:
        ds = pydicom.dcmread(obj.path, stop_before_pixels=True)
        item = _equipment(ds)
        (purpose,) = item.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == PROCESSING_EQUIPMENT
        assert item.Manufacturer == ", ".join(card.authors)[:64]
        assert item.ManufacturerModelName == card.name
        assert list(item.SoftwareVersions) == [card.version, f"dicomnode {__version__}"]
        assert pydicom.uid.UID(item.DeviceUID).is_valid
        devices.add(item.DeviceUID)
    assert len(devices) == 1  # one device: the same UID in the SEG, the RTSTRUCT and the SR


def test_the_seg_and_rtstruct_algorithm_identification_match_the_equipment(case: Case) -> None:
    card = case.segmentation.card
    seg = pydicom.dcmread(case.results.by_kind("SEG").path, stop_before_pixels=True)
    item = _equipment(seg)
    for described in seg.SegmentSequence:
        assert described.SegmentAlgorithmName == item.ManufacturerModelName
        (algorithm,) = described.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == item.ManufacturerModelName
        assert algorithm.AlgorithmVersion == item.SoftwareVersions[0]
        assert algorithm.AlgorithmSource == item.Manufacturer  # AIR Table 6.5.3.1-1
    rt = pydicom.dcmread(case.results.by_kind("RTSTRUCT").path)
    assert _equipment(rt).DeviceUID == item.DeviceUID
    for roi in rt.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription.startswith(f"{card.name} {card.version}")
        (algorithm,) = roi.ROIDerivationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion,
                algorithm.AlgorithmSource) == (item.ManufacturerModelName,
                                               item.SoftwareVersions[0], item.Manufacturer)


def _content(items: Any, name: str) -> list[Dataset]:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == name]


def test_the_sr_measurement_groups_follow_air(case: Case) -> None:
    sr = pydicom.dcmread(case.results.by_kind("SR").path)
    seg = pydicom.dcmread(case.results.by_kind("SEG").path, stop_before_pixels=True)
    item = _equipment(sr)
    # the device observer is the model: the Contributing Equipment item's values
    (uid,) = _content(sr.ContentSequence, "121012")
    assert uid.UID == item.DeviceUID
    (model,) = _content(sr.ContentSequence, "121015")
    assert model.TextValue == item.ManufacturerModelName
    (maker,) = _content(sr.ContentSequence, "121014")
    assert maker.TextValue == item.Manufacturer
    # the imaging procedure analysed, by the source's modality (CID 100)
    (procedure,) = _content(sr.ContentSequence, "121058")
    source = pydicom.dcmread(case.files[0], stop_before_pixels=True)
    expected = {"CT": "25045-6", "MR": "25056-3"}[source.Modality]
    assert procedure.ConceptCodeSequence[0].CodeValue == expected
    (measurements,) = _content(sr.ContentSequence, "126010")
    groups = _content(measurements.ContentSequence, "125007")
    by_name = {s.label.name: (n, s) for n, s in
               enumerate(case.segmentation.structures, start=1)}
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert len(groups) == sum(1 for s in case.segmentation.structures if s.voxel_count)
    for group in groups:
        items = group.ContentSequence
        (tracking,) = _content(items, "112039")
        number, structure = by_name[tracking.TextValue]
        (tracking_uid,) = _content(items, "112040")
        assert tracking_uid.UID == segments[number].TrackingUID  # the SEG segment's
        (segment_ref,) = _content(items, "121191")
        ref = segment_ref.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSegmentNumber == number
        (name,) = _content(items, "111001")
        (version,) = _content(items, "111003")
        assert (name.TextValue, version.TextValue) == (item.ManufacturerModelName,
                                                       item.SoftwareVersions[0])
        sites = [i.ConceptCodeSequence[0].CodeValue for i in _content(items, "363698007")]
        # an anatomical structure is its own finding site (ct-body's Bone is a tissue)
        anatomical = structure.label.category.value == "123037004"
        assert sites == ([structure.label.type.value] if anatomical else [])
        (finding,) = _content(items, "121071")
        assert finding.ConceptCodeSequence[0].CodeValue == structure.label.type.value


def test_the_device_uid_changes_with_the_model_file(tmp_path: Path) -> None:
    package = tmp_path / "ct-body"
    shutil.copytree(ROOT / "models" / "ct-body", package)
    card = load_card(package)
    assert card.sha256 is None  # ct-body's card names no checksum: the file is hashed
    first = algorithm_identity(card).device_uid
    assert algorithm_identity(load_card(package)).device_uid == first  # deterministic
    model = package / card.file
    model.write_bytes(model.read_bytes() + b"\0")  # another model file, same card
    changed = algorithm_identity(load_card(package)).device_uid
    assert changed != first and pydicom.uid.UID(changed).is_valid
    model.unlink()
    with pytest.raises(OutputError, match="Device UID derives from the model file"):
        algorithm_identity(load_card(package, verify_files=False))


# --- RTSTRUCT: structures the model found empty ----------------------------------------


def test_empty_structures_are_left_out_of_the_rtstruct_and_listed(cranium: Case,
                                                                 tmp_path: Path) -> None:
    structures = cranium.segmentation.structures
    empty = [s.label.name for s in structures if s.voxel_count == 0]
    assert empty == ["Lungs"]  # ct-body on a head: no lung
    rt = pydicom.dcmread(cranium.results.by_kind("RTSTRUCT").path)
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["External", "Bone"]
    # ROI numbers stay the SEG's segment numbers
    assert [r.ROINumber for r in rt.StructureSetROISequence] == [1, 2]
    assert all("ContourSequence" in c for c in rt.ROIContourSequence)
    volumes = json.loads(cranium.results.volumes.read_text())
    assert volumes["rtstruct_omitted"] == ["Lungs"]
    assert cranium.results.rtstruct_omitted == ("Lungs",)
    # keep: the ROI without contours, as before
    kept = write_results(cranium.segmentation, cranium.volume, cranium.files, tmp_path,
                         OutputsConfig(seg=False, rtstruct_empty_structures="keep"))
    rt = pydicom.dcmread(kept.by_kind("RTSTRUCT").path)
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["External", "Bone", "Lungs"]
    assert "ContourSequence" not in rt.ROIContourSequence[2]
    assert json.loads(kept.volumes.read_text())["rtstruct_omitted"] == []


def test_no_rtstruct_is_written_when_no_structure_has_a_contour(cranium: Case,
                                                               tmp_path: Path) -> None:
    nothing = tuple(Structure(s.label, np.zeros_like(s.mask), 0, 0.0)
                    for s in cranium.segmentation.structures)
    segmentation = dataclasses.replace(cranium.segmentation, structures=nothing)
    results = write_results(segmentation, cranium.volume, cranium.files, tmp_path / "omit",
                            OutputsConfig(seg=False))
    assert not results.objects and not (tmp_path / "omit" / "rtstruct.dcm").exists()
    volumes = json.loads(results.volumes.read_text())
    assert volumes["rtstruct_omitted"] == ["External", "Bone", "Lungs"]
    assert volumes["rtstruct"] == "not written: no structure has a contour"
    kept = write_results(segmentation, cranium.volume, cranium.files, tmp_path / "keep",
                         OutputsConfig(seg=False, rtstruct_empty_structures="keep"))
    rt = pydicom.dcmread(kept.by_kind("RTSTRUCT").path)
    assert len(rt.StructureSetROISequence) == 3


def test_rtstruct_empty_structures_is_omit_or_keep(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("outputs:\n  rtstruct_empty_structures: drop\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="rtstruct_empty_structures"):
        load_config(path)
    assert OutputsConfig().rtstruct_empty_structures == "omit"


# --- RTSTRUCT rules planning systems enforce, one test each -----------------------------


def _rtstruct(case: Case) -> tuple[Dataset, dict[str, Dataset]]:
    ds = pydicom.dcmread(case.results.by_kind("RTSTRUCT").path)
    headers = {str(h.SOPInstanceUID): h for h in
               (pydicom.dcmread(p, stop_before_pixels=True) for p in case.files)}
    return ds, headers


def test_rtstruct_ds_values_have_at_most_16_characters(case: Case) -> None:
    ds, _ = _rtstruct(case)
    strings = _ds_strings(ds)
    assert len(strings) > 1000 and max(len(s) for s in strings) <= 16


def test_rtstruct_uses_the_frame_of_reference_of_its_images(case: Case) -> None:
    ds, headers = _rtstruct(case)
    (frame_of_reference,) = {str(h.FrameOfReferenceUID) for h in headers.values()}
    assert ds.FrameOfReferenceUID == frame_of_reference
    assert [r.FrameOfReferenceUID for r in ds.ReferencedFrameOfReferenceSequence] == [
        frame_of_reference]
    assert {r.ReferencedFrameOfReferenceUID for r in ds.StructureSetROISequence} == {
        frame_of_reference}


def test_rtstruct_roi_numbers_are_unique_and_consistent(case: Case) -> None:
    ds, _ = _rtstruct(case)
    numbers = [int(r.ROINumber) for r in ds.StructureSetROISequence]
    assert len(set(numbers)) == len(numbers)
    assert [int(c.ReferencedROINumber) for c in ds.ROIContourSequence] == numbers
    assert [int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence] == numbers
    observations = [int(o.ObservationNumber) for o in ds.RTROIObservationsSequence]
    assert len(set(observations)) == len(observations)


def test_rtstruct_contours_have_at_least_three_points(case: Case) -> None:
    ds, _ = _rtstruct(case)
    counts = [int(c.NumberOfContourPoints) for roi in ds.ROIContourSequence
              for c in roi.ContourSequence]
    assert counts and min(counts) >= 3
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            assert len(contour.ContourData) == 3 * int(contour.NumberOfContourPoints)


def test_every_rtstruct_contour_references_its_image(case: Case) -> None:
    ds, headers = _rtstruct(case)
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            (ref,) = contour.ContourImageSequence
            image = headers[ref.ReferencedSOPInstanceUID]
            assert ref.ReferencedSOPClassUID == image.SOPClassUID
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            normal = np.cross(*np.asarray(image.ImageOrientationPatient, float).reshape(2, 3))
            offset = (points - np.asarray(image.ImagePositionPatient, float)) @ normal
            assert np.abs(offset).max() < 1e-3  # on the plane of the image it references


# --- validators and readers none of us wrote -------------------------------------------

PIXELMED = Path("/usr/share/java/pixelmed.jar")
# the validators' XSLT exceeds the XPath limits of JDK 17's secure processing
_JAVA_XPATH = ["-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathExprOpLimit=0",
               "-Djdk.xml.xpathTotalOpLimit=0"]


def _pixelmed(validator: str, path: Path) -> str:
    proc = subprocess.run(["java", *_JAVA_XPATH, "-cp", str(PIXELMED),
                           f"com.pixelmed.validate.{validator}", str(path)],
                          capture_output=True, text=True, check=False, timeout=180)
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_pixelmed_finds_no_error_in_the_seg_and_the_sr(case: Case) -> None:
    _need(PIXELMED, "pixelmed-apps")
    # PixelMed (2022) knows no RT IOD; it validates the SR's IOD and its templates
    for kind, validator, found in (("SEG", "DicomInstanceValidator", "Segmentation IOD"),
                                   ("SR", "DicomSRValidator", "Root Template TID_1500")):
        report = _pixelmed(validator, case.results.by_kind(kind).path)
        assert f"Found {found}" in report and "validation complete" in report, report
        errors = [line for line in report.splitlines() if line.startswith("Error")
                  or "Exception" in line]
        assert not errors, f"{case.name} {kind}:\n{report}"


@pytest.mark.slow
def test_rt_utils_reads_every_structure_of_the_rtstruct(case: Case) -> None:
    rt_utils = pytest.importorskip("rt_utils", reason="pip install --no-deps rt-utils")
    rt = rt_utils.RTStructBuilder.create_from(
        dicom_series_path=str(case.files[0].parent),
        rt_struct_path=str(case.results.by_kind("RTSTRUCT").path))
    written = [s for s in case.segmentation.structures if s.voxel_count]
    assert rt.get_roi_names() == [s.label.name for s in written]
    for structure in written:
        mask = rt.get_roi_mask_by_name(structure.label.name)  # [row, column, slice]
        # rt-utils 1.2.7 allocates Columns x Rows and fills [row, column]: for the
        # non-square Colin27 (217 x 181) only the square part is meaningful
        side = min(mask.shape[:2])
        theirs = np.moveaxis(mask[:side, :side], -1, 0)
        ours = structure.mask[:, :side, :side]
        # rt-utils fills each polygon with its outline (cv2.fillPoly on rounded vertices):
        # thin structures (Bone) grow by their border pixels
        dice = _dice(theirs, ours)
        print(f"{case.name} {structure.label.name}: rt-utils Dice {dice:.4f}")
        assert dice >= 0.9, f"{structure.label.name}: Dice {dice:.4f}"


def _pydicom_seg() -> Any:
    # pydicom-seg 0.4.1 (its last release) imports pydicom._storage_sopclass_uids, which
    # pydicom 3 folded into pydicom.uid (same names)
    sys.modules.setdefault("pydicom._storage_sopclass_uids", pydicom.uid)
    return pytest.importorskip("pydicom_seg", reason="pip install --no-deps pydicom-seg")


def test_pydicom_seg_reads_each_segment_back_as_its_mask(case: Case, tmp_path: Path) -> None:
    """pydicom-seg rebuilds a volume from the first to the last frame present: written with
    every frame (``seg_omit_empty_frames: false``), it is the source grid."""
    pydicom_seg = _pydicom_seg()
    written = write_results(case.segmentation, case.volume, case.files, tmp_path,
                            OutputsConfig(seg_omit_empty_frames=False, rtstruct=False))
    seg = pydicom.dcmread(written.by_kind("SEG").path)
    result = pydicom_seg.SegmentReader().read(seg)
    structures = case.segmentation.structures
    assert sorted(result.available_segments) == list(range(1, len(structures) + 1))
    first = pydicom.dcmread(case.files[0], stop_before_pixels=True)
    assert result.referenced_series_uid == first.SeriesInstanceUID
    for number, structure in enumerate(structures, start=1):
        np.testing.assert_array_equal(result.segment_data(number) > 0, structure.mask)
        image = result.segment_image(number)
        np.testing.assert_allclose(image.GetOrigin(), case.volume.image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing(), case.volume.image.GetSpacing(),
                                   atol=1e-4)


def _segimage2itkimage() -> str:
    """dcmqi's converter: on PATH, beside this Python's scripts, or in the dcmqi wheel."""
    tool = (shutil.which("segimage2itkimage")
            or shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent)))
    if tool is None:
        spec = importlib.util.find_spec("dcmqi")
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).parent / "bin" / "segimage2itkimage"
            tool = str(candidate) if candidate.is_file() else None
    if tool is None:
        pytest.skip("segimage2itkimage missing: pip install dcmqi (the test extra); Debian "
                    "has no dcmqi package")
    return tool


def test_dcmqi_converts_each_segment_back_onto_its_mask(case: Case, tmp_path: Path) -> None:
    tool = _segimage2itkimage()
    proc = subprocess.run([tool, "--inputDICOM", str(case.results.by_kind("SEG").path),
                           "--outputDirectory", str(tmp_path), "--outputType", "nrrd",
                           "--prefix", "seg"], capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((tmp_path / "seg-meta.json").read_text())
    labels = [a["SegmentLabel"] for group in meta["segmentAttributes"] for a in group]
    assert labels == [s.label.name for s in case.segmentation.structures]
    for number, structure in enumerate(case.segmentation.structures, start=1):
        image = sitk.ReadImage(str(tmp_path / f"seg-{number}.nrrd"))
        on_grid = sitk.Resample(image, case.volume.image, sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid) > 0, structure.mask)
