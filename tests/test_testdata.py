"""Tests of tools/testdata.py, the builders of real DICOM test data.

Geometry is checked in DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import testdata  # noqa: E402

HAVE_CRANIUM = testdata.CRANIUM_PATH.is_file()
HAVE_COLIN = testdata.COLIN27_PATH.is_file()
HAVE_DCMTK = all(
    Path("/usr/bin", tool).is_file() for tool in ("dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv")
)
DCIODVFY = Path("/usr/bin/dciodvfy")

needs_cranium = pytest.mark.skipif(
    not HAVE_CRANIUM, reason="Debian package invesalius-examples not installed"
)
needs_colin = pytest.mark.skipif(not HAVE_COLIN, reason="Debian package mricron-data not installed")


# --------------------------------------------------------------------------- helpers


def _read_all(paths: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def _normal(ds: Dataset) -> npt.NDArray[np.float64]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return np.cross(iop[:3], iop[3:])


def _positions(datasets: Sequence[Dataset]) -> npt.NDArray[np.float64]:
    return np.asarray([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)


def _modality_values(ds: Dataset) -> npt.NDArray[np.float64]:
    arr = ds.pixel_array.astype(np.float64)
    return arr * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def _check_part10(path: Path, sop_class: str) -> Dataset:
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPClassUID == sop_class == ds.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.ImplementationClassUID
    return ds


def _check_series_identity(datasets: Sequence[Dataset], study_uid: str | None = None) -> None:
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    if study_uid is not None:
        assert datasets[0].StudyInstanceUID == study_uid


# --------------------------------------------------------------------------- Cranium CT


@pytest.fixture(scope="module")
def cranium_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if not HAVE_CRANIUM:
        pytest.skip("Debian package invesalius-examples not installed")
    out = tmp_path_factory.mktemp("cranium")
    return testdata.cranium_ct(out, study_uid="1.2.826.0.1.3680043.8.498.77", patient_id="P77")


@needs_cranium
def test_cranium_arrays_hu_and_bone_mask() -> None:
    hu, mask, spacing = testdata.cranium_arrays()
    assert hu.shape == (108, 256, 256)
    assert hu.dtype == np.int16
    assert mask.shape == hu.shape
    assert spacing == pytest.approx((1.5, 0.9570312, 0.9570312))
    assert hu.min() == -1024  # already Hounsfield units, no offset
    bone = hu > 226
    assert bone.sum() > 100_000  # a whole skull, not a few voxels
    assert hu.max() > 1500  # cortical bone / teeth
    # Brain tissue sits around 20..60 HU somewhere in the middle slice.
    centre = hu[54, 100:156, 100:156]
    assert -50 < float(np.median(centre)) < 100
    stored = mask > 127
    dice = 2 * (stored & bone).sum() / (stored.sum() + bone.sum())
    assert dice > 0.95
    # Arrays are copies: mutating them does not touch the cache.
    hu[0, 0, 0] = 1234
    assert testdata.cranium_arrays()[0][0, 0, 0] != 1234


@needs_cranium
def test_cranium_orientation_is_anatomical() -> None:
    hu, _mask, _ = testdata.cranium_arrays()
    # The head rest (a thin arc outside the head, near the image's side edges) lies
    # posterior, i.e. in the lower half (high row indices) once the rows are in DICOM
    # order (+y = posterior); nothing of the kind lies in the upper (anterior) corners.
    middle = hu[54]
    edges = np.concatenate([middle[:, :30], middle[:, -30:]], axis=1) > -500
    assert edges[128:].sum() > 100
    assert edges[:128].sum() == 0
    # Slice 0 is at the skull base and the last slices reach the vertex: the head's
    # cross-section shrinks towards +z (superior).
    area = (hu > -200).sum(axis=(1, 2))
    assert area[-1] < 0.6 * area[54]


@needs_cranium
def test_cranium_ct_series(cranium_series: list[Path]) -> None:
    assert len(cranium_series) == 108
    assert cranium_series == sorted(cranium_series)
    first = _check_part10(cranium_series[0], CTImageStorage)
    datasets = _read_all(cranium_series)
    _check_series_identity(datasets, "1.2.826.0.1.3680043.8.498.77")
    assert first.PatientID == "P77"
    assert first.Modality == "CT"
    assert first.BodyPartExamined == "HEAD"
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.9570312, 0.9570312])
    assert float(first.SliceThickness) == pytest.approx(1.5)
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 109))
    pos = _positions(datasets)
    steps = np.diff(pos, axis=0)
    assert np.allclose(steps, [0.0, 0.0, 1.5], atol=1e-4)  # +z along the normal
    assert np.allclose(_normal(first), [0, 0, 1])
    hu, _mask, _ = testdata.cranium_arrays()
    for k in (0, 54, 107):
        values = _modality_values(datasets[k])
        assert np.array_equal(values, hu[k])
    assert first.RescaleType == "HU"


def test_cranium_missing_package_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    testdata._cranium_raw.cache_clear()
    monkeypatch.setattr(testdata, "CRANIUM_PATH", tmp_path / "absent.inv3")
    try:
        with pytest.raises(FileNotFoundError, match="invesalius-examples"):
            testdata.cranium_arrays()
    finally:
        testdata._cranium_raw.cache_clear()


# --------------------------------------------------------------------------- synthetic CT


def test_synthetic_ct_300_slices_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    paths = testdata.synthetic_ct(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(paths) == 300
    assert elapsed < 15.0, f"300 slices of 512x512 took {elapsed:.1f} s"
    last = pydicom.dcmread(paths[-1])
    assert (last.Rows, last.Columns) == (512, 512)
    assert float(last.ImagePositionPatient[2]) == pytest.approx(299 * 1.25)
    assert last.InstanceNumber == 300


def test_synthetic_ct_missing_slice_and_values(tmp_path: Path) -> None:
    paths = testdata.synthetic_ct(
        tmp_path, slices=20, rows=64, columns=80, spacing=(0.7, 0.9, 2.5), missing={3, 7}
    )
    assert len(paths) == 18
    datasets = _read_all(paths)
    _check_part10(paths[0], CTImageStorage)
    _check_series_identity(datasets)
    numbers = [ds.InstanceNumber for ds in datasets]
    assert 4 not in numbers and 8 not in numbers
    assert numbers == [k + 1 for k in range(20) if k not in (3, 7)]
    pos = _positions(datasets)
    z = pos[:, 2]
    assert np.allclose(z, [k * 2.5 for k in range(20) if k not in (3, 7)])
    assert np.allclose(pos[:, :2], pos[0, :2])
    gaps = np.diff(z)
    assert sorted(set(np.round(gaps, 4))) == [2.5, 5.0]  # the gap is really there
    first = datasets[0]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.7, 0.9])
    assert float(first.RescaleIntercept) == -1024
    assert first.pixel_array.dtype == np.int16
    values = _modality_values(datasets[5])  # slice index 6
    assert values[0, 0] == 6 - 1024  # slice marker
    assert values[32, 40] == testdata.PHANTOM_WATER_HU
    assert values[1, 40] == testdata.PHANTOM_AIR_HU
    assert (values == testdata.PHANTOM_BONE_HU).sum() > 100
    phantom = testdata.synthetic_phantom_hu(64, 80)
    assert np.array_equal(values[1:], phantom[1:])


# --------------------------------------------------------------------------- sagittal MR


def test_sagittal_series_geometry(tmp_path: Path) -> None:
    paths = testdata.sagittal_series(
        tmp_path, slices=12, rows=32, columns=48, spacing=(1.0, 1.5, 3.0)
    )
    assert len(paths) == 12
    first = _check_part10(paths[0], MRImageStorage)
    datasets = _read_all(paths)
    _check_series_identity(datasets)
    assert first.Modality == "MR"
    assert [float(v) for v in first.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    normal = _normal(first)
    assert np.allclose(normal, [-1, 0, 0])
    pos = _positions(datasets)
    assert np.allclose(np.diff(pos[:, 0]), -3.0)  # stepping along x ...
    assert np.allclose(np.diff(pos @ normal), 3.0)  # ... in the direction of the normal
    assert np.allclose(pos[:, 1:], pos[0, 1:])
    assert first.pixel_array.shape == (32, 48)
    middle = datasets[6].pixel_array
    assert middle.max() > 0 and middle[0, 0] == 0


# --------------------------------------------------------------------------- enhanced MR


@pytest.fixture(scope="module")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = testdata.multiframe_mr(
        tmp_path_factory.mktemp("emr"), frames=10, rows=40, columns=36, spacing=(1.2, 1.1, 2.5)
    )
    assert len(paths) == 1
    return paths[0]


def test_multiframe_mr_structure(multiframe: Path) -> None:
    ds = _check_part10(multiframe, EnhancedMRImageStorage)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    assert ds.NumberOfFrames == 10
    assert ds.FrameOfReferenceUID
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([1.2, 1.1])
    assert float(measures.SliceThickness) == pytest.approx(2.5)
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop == [1, 0, 0, 0, 1, 0]
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == 10
    pos = np.asarray(
        [f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=np.float64
    )
    normal = np.cross(iop[:3], iop[3:])
    assert np.allclose(np.diff(pos @ normal), 2.5)
    assert np.allclose(pos[:, :2], pos[0, :2])
    stack = [f.FrameContentSequence[0].InStackPositionNumber for f in frames]
    assert stack == list(range(1, 11))
    assert ds.pixel_array.shape == (10, 40, 36)


@pytest.mark.skipif(not DCIODVFY.is_file(), reason="Debian package dicom3tools not installed")
def test_multiframe_mr_passes_dciodvfy(multiframe: Path) -> None:
    proc = subprocess.run(
        [str(DCIODVFY), str(multiframe)], capture_output=True, text=True, check=False
    )
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


# --------------------------------------------------------------------------- transcode


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real CT slices when available (signed 16-bit), else synthetic ones."""
    out = tmp_path_factory.mktemp("small_ct")
    if HAVE_CRANIUM:
        return testdata.cranium_ct(out, slices=[40, 41])
    return testdata.synthetic_ct(out, slices=2, rows=64, columns=64)


DCMTK_SYNTAXES = sorted(set(testdata.SYNTAXES) - {"jpeg2000"})


@pytest.mark.parametrize("syntax", sorted(testdata.SYNTAXES))
def test_transcode_ct(syntax: str, small_ct: list[Path], tmp_path: Path) -> None:
    if syntax != "jpeg2000" and not HAVE_DCMTK:
        pytest.skip("Debian package dcmtk not installed")
    out = testdata.transcode(small_ct, tmp_path / syntax, syntax)
    assert [p.name for p in out] == [p.name for p in small_ct]
    for src, dst in zip(small_ct, out, strict=True):
        a = pydicom.dcmread(src)
        b = pydicom.dcmread(dst)
        assert b.file_meta.TransferSyntaxUID == testdata.SYNTAXES[syntax]
        assert b.SOPInstanceUID == a.SOPInstanceUID  # keep_uids=True by default
        assert b.SeriesInstanceUID == a.SeriesInstanceUID
        if syntax in testdata.LOSSLESS_SYNTAXES:
            assert np.array_equal(a.pixel_array, b.pixel_array)
            assert np.array_equal(_modality_values(a), _modality_values(b))
        else:
            # Lossy: the rescale written by DCMTK must still give HU.
            err = np.abs(_modality_values(a) - _modality_values(b))
            assert float(err.mean()) < 40.0


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle", "big-endian"])
def test_transcode_multiframe_lossless(syntax: str, multiframe: Path, tmp_path: Path) -> None:
    if syntax != "jpeg2000" and not HAVE_DCMTK:
        pytest.skip("Debian package dcmtk not installed")
    (dst,) = testdata.transcode([multiframe], tmp_path, syntax)
    a = pydicom.dcmread(multiframe)
    b = pydicom.dcmread(dst)
    assert b.file_meta.TransferSyntaxUID == testdata.SYNTAXES[syntax]
    assert b.NumberOfFrames == a.NumberOfFrames
    assert np.array_equal(a.pixel_array, b.pixel_array)


def test_transcode_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown syntax"):
        testdata.transcode([], tmp_path, "jpeg-xl")
    if not HAVE_DCMTK:
        pytest.skip("Debian package dcmtk not installed")
    bad = testdata.malformed_file(tmp_path / "bad.dcm")
    with pytest.raises(RuntimeError, match="dcmconv"):
        testdata.transcode([bad], tmp_path / "out", "implicit")


# --------------------------------------------------------------------------- broken files


def test_malformed_file(tmp_path: Path) -> None:
    path = testdata.malformed_file(tmp_path / "sub" / "bad.dcm")
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with pytest.raises(Exception):  # noqa: B017 - pydicom raises OSError today
        pydicom.dcmread(path)


def test_missing_uid_file(tmp_path: Path) -> None:
    path = testdata.missing_uid_file(tmp_path / "nouid.dcm", study_uid="1.2.3.4")
    ds = _check_part10(path, CTImageStorage)
    assert "SeriesInstanceUID" not in ds
    assert ds.StudyInstanceUID == "1.2.3.4"
    assert ds.pixel_array.shape == (64, 64)


# --------------------------------------------------------------------------- Colin27 MR


@needs_colin
def test_colin27_mr_geometry_matches_nifti(tmp_path: Path) -> None:
    paths = testdata.colin27_mr(tmp_path, slices=[0, 90, 180])
    assert len(paths) == 3
    datasets = _read_all(paths)
    _check_part10(paths[0], MRImageStorage)
    _check_series_identity(datasets)
    first = datasets[0]
    assert (first.Rows, first.Columns) == (217, 181)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    pos = _positions(datasets)
    assert np.allclose(np.diff(pos[:, 2]), 90.0)
    assert [ds.InstanceNumber for ds in datasets] == [1, 91, 181]
    # Voxels of the NIfTI (RAS world) must land on the DICOM pixel at the same LPS point.
    data, affine = testdata._read_nifti(testdata.COLIN27_PATH)
    mid = datasets[1]
    origin = np.asarray(mid.ImagePositionPatient, dtype=np.float64)
    iop = np.asarray(mid.ImageOrientationPatient, dtype=np.float64)
    drow, dcol = (float(v) for v in mid.PixelSpacing)
    pixels = mid.pixel_array
    # The template's affine is axis-aligned: NIfTI k alone sets the height (z).
    k_nifti = next(
        k
        for k in range(data.shape[2])
        if abs((affine @ np.array([0.0, 0.0, k, 1.0]))[2] - origin[2]) < 1e-3
    )
    rng = np.random.default_rng(0)
    checked = 0
    for i, j in rng.integers(20, 160, size=(200, 2)):
        ras = affine @ np.array([i, j, k_nifti, 1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])  # NIfTI RAS -> DICOM LPS
        rel = lps - origin
        column = round(float(rel @ iop[:3]) / dcol)
        row = round(float(rel @ iop[3:]) / drow)
        if 0 <= row < mid.Rows and 0 <= column < mid.Columns:
            assert pixels[row, column] == data[i, j, k_nifti]
            checked += 1
    assert checked > 100
    assert pixels.max() > 100  # real brain, not empty


# --------------------------------------------------------------------------- CLI


def test_cli_main_with_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not HAVE_DCMTK:
        pytest.skip("Debian package dcmtk not installed")
    rc = testdata.main(
        [
            "synthetic-ct",
            str(tmp_path),
            "--slices",
            "6",
            "--missing",
            "2",
            "4",
            "--syntax",
            "rle",
        ]
    )
    assert rc == 0
    native = sorted((tmp_path / "native").glob("*.dcm"))
    copies = sorted((tmp_path / "rle").glob("*.dcm"))
    assert len(native) == len(copies) == 4
    assert "wrote 4 file(s)" in capsys.readouterr().out


def test_cli_script(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "testdata.py"), "sagittal", str(tmp_path), "--slices", "3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("*.dcm"))) == 3
    bad = subprocess.run(
        [sys.executable, str(TOOLS / "testdata.py"), "cranium", str(tmp_path), "--slices", "3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2


def test_builders_create_missing_out_dir(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    paths = testdata.sagittal_series(target, slices=2, rows=8, columns=8)
    assert [p.parent for p in paths] == [target, target]
