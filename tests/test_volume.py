"""read_series() on real DICOM files written by tools/testdata.py.

Positions, spacings and directions are in DICOM patient coordinates (LPS, mm); image
arrays are indexed [z, y, x] = [slice, row, column].
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, MRImageStorage, generate_uid

from dicomnode.inference.volume import SeriesVolume, VolumeError, read_series, write_nifti

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import testdata  # noqa: E402

needs_cranium = pytest.mark.skipif(
    not testdata.CRANIUM_PATH.is_file(), reason="Debian package invesalius-examples not installed"
)
needs_colin = pytest.mark.skipif(
    not testdata.COLIN27_PATH.is_file(), reason="Debian package mricron-data not installed"
)
needs_dcmtk = pytest.mark.skipif(
    not all(Path("/usr/bin", t).is_file() for t in ("dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv")),
    reason="DCMTK not installed",
)

_sitk: Any = sitk  # SimpleITK's methods carry no annotations


# --------------------------------------------------------------------------- helpers


def _image(volume: SeriesVolume) -> Any:
    return volume.image


def _direction(volume: SeriesVolume) -> npt.NDArray[np.float64]:
    """The 3 x 3 direction matrix; its columns are the x, y, z axes in LPS."""
    return np.asarray(_image(volume).GetDirection(), dtype=np.float64).reshape(3, 3)


def _physical(volume: SeriesVolume, index: tuple[int, int, int]) -> npt.NDArray[np.float64]:
    """LPS position (mm) of voxel (x=column, y=row, z=slice)."""
    return np.asarray(_image(volume).TransformIndexToPhysicalPoint(index), dtype=np.float64)


def _ipp(path: Path) -> npt.NDArray[np.float64]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return np.asarray(ds.ImagePositionPatient, dtype=np.float64)


def _hu(path: Path) -> npt.NDArray[np.float32]:
    ds = pydicom.dcmread(path)
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.asarray(values, dtype=np.float32)


def _edit(path: Path, change: Any) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _set_z(z: float) -> Any:
    def change(ds: Dataset) -> None:
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6g}", f"{y:.6g}", f"{z:.6g}"]
    return change


def _small_ct(out: Path, **kwargs: Any) -> list[Path]:
    options: dict[str, Any] = {"slices": 6, "rows": 16, "columns": 20, **kwargs}
    paths: list[Path] = testdata.synthetic_ct(out, **options)
    return paths


# --------------------------------------------------------------------------- real series


@needs_cranium
def test_cranium_volume_equals_the_source_in_any_file_order(tmp_path: Path) -> None:
    paths = testdata.cranium_ct(tmp_path / "cranium")
    hu, _bone, (dz, dy, dx) = testdata.cranium_arrays()
    volume = read_series(paths)

    array = volume.array()
    assert array.dtype == np.float32 and array.shape == (108, 256, 256)
    np.testing.assert_array_equal(array, hu.astype(np.float32))
    assert _image(volume).GetSpacing() == pytest.approx((dx, dy, dz))
    assert (dx, dz) == pytest.approx((0.957031, 1.5))
    np.testing.assert_allclose(_image(volume).GetOrigin(), _ipp(paths[0]), atol=1e-6)
    np.testing.assert_allclose(_image(volume).GetOrigin(),
                               (-127.5 * dx, -127.5 * dy, -53.5 * dz), atol=1e-4)
    np.testing.assert_array_equal(_direction(volume), np.eye(3))
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert volume.sop_instance_uids == tuple(uids)
    assert volume.frame_numbers == (1,) * 108
    assert volume.sop_class_uids == (CTImageStorage,) * 108
    assert volume.modality == "CT" and not volume.resampled and volume.geometry.whole
    assert volume.series_instance_uid == pydicom.dcmread(paths[0]).SeriesInstanceUID

    shuffled = list(paths)
    random.Random(7).shuffle(shuffled)
    assert shuffled != paths
    again = read_series(shuffled)
    np.testing.assert_array_equal(again.array(), array)
    assert again.sop_instance_uids == volume.sop_instance_uids
    assert _image(again).GetOrigin() == _image(volume).GetOrigin()


@needs_colin
def test_colin27_volume_and_index_to_lps_transform(tmp_path: Path) -> None:
    paths = testdata.colin27_mr(tmp_path / "colin")
    expected, affine = testdata.colin27_arrays()
    volume = read_series(paths)
    np.testing.assert_array_equal(volume.array(), expected.astype(np.float32))

    image = _image(volume)
    matrix = _direction(volume) @ np.diag(image.GetSpacing())
    np.testing.assert_allclose(matrix, affine[:3, :3], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), affine[:3, 3], atol=1e-4)
    nz, ny, nx = expected.shape
    for index in [(0, 0, 0), (nx - 1, 0, 0), (0, ny - 1, 0), (17, 101, nz - 1), (90, 108, 90)]:
        want = affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(_physical(volume, index), want[:3], atol=1e-4)


def test_sagittal_direction_is_right_handed_and_positions_match(tmp_path: Path) -> None:
    paths = testdata.sagittal_series(tmp_path / "sag", slices=8, rows=16, columns=20,
                                     spacing=(1.0, 1.25, 2.0))
    volume = read_series(list(reversed(paths)))
    direction = _direction(volume)
    # columns: row cosine (+y), column cosine (-z), normal row x column (-x)
    np.testing.assert_array_equal(direction[:, 0], [0, 1, 0])
    np.testing.assert_array_equal(direction[:, 1], [0, 0, -1])
    np.testing.assert_array_equal(direction[:, 2], [-1, 0, 0])
    assert np.linalg.det(direction) == pytest.approx(1.0)
    # PixelSpacing (1.0 between rows, 1.25 between columns) -> (x, y) = (1.25, 1.0)
    assert _image(volume).GetSpacing() == pytest.approx((1.25, 1.0, 2.0))
    assert _image(volume).GetSize() == (20, 16, 8)
    for k, path in enumerate(paths):  # slices step along the normal: z follows the files
        ipp = _ipp(path)
        np.testing.assert_allclose(_physical(volume, (0, 0, k)), ipp, atol=1e-6)
        np.testing.assert_allclose(_physical(volume, (3, 5, k)),
                                   ipp + 3 * 1.25 * np.array([0, 1, 0])
                                   + 5 * 1.0 * np.array([0, 0, -1]), atol=1e-6)
        np.testing.assert_array_equal(volume.array()[k], pydicom.dcmread(path).pixel_array)
    assert volume.modality == "MR" and volume.sop_class_uids[0] == MRImageStorage


def test_stack_stored_against_the_normal_is_reversed(tmp_path: Path) -> None:
    paths = _small_ct(tmp_path / "ct")
    for k, path in enumerate(paths):
        _edit(path, _set_z(-1.25 * k))  # instance k lies at z = -1.25 k: files run feet-wards
    volume = read_series(paths)
    np.testing.assert_array_equal(_direction(volume), np.eye(3))
    assert _image(volume).GetSpacing()[2] == pytest.approx(1.25)
    np.testing.assert_allclose(_image(volume).GetOrigin(), _ipp(paths[-1]), atol=1e-6)
    # pixel (0, 0) of instance k holds HU k - 1024: z runs along +z, so from the last file
    np.testing.assert_array_equal(volume.array()[:, 0, 0], [-1024 + k for k in (5, 4, 3, 2, 1, 0)])


def test_multiframe_frames_map_to_their_positions(tmp_path: Path) -> None:
    (path,) = testdata.multiframe_mr(tmp_path / "emr", frames=6, rows=12, columns=10)
    ds = pydicom.dcmread(path)
    volume = read_series([path])
    np.testing.assert_array_equal(_direction(volume), np.eye(3))
    assert _image(volume).GetSpacing() == pytest.approx((1.5, 1.5, 3.0))
    assert volume.sop_instance_uids == (ds.SOPInstanceUID,) * 6
    assert volume.frame_numbers == (1, 2, 3, 4, 5, 6)
    assert volume.sop_class_uids == (EnhancedMRImageStorage,) * 6
    np.testing.assert_array_equal(volume.array(), ds.pixel_array)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(_physical(volume, (0, 0, f)), ipp, atol=1e-6)
        np.testing.assert_allclose(_physical(volume, (9, 11, f)),
                                   ipp + np.array([9 * 1.5, 11 * 1.5, 0.0]), atol=1e-6)


def test_multiframe_sorting_and_per_frame_value_transformation(tmp_path: Path) -> None:
    (path,) = testdata.multiframe_mr(tmp_path / "emr", frames=5, rows=12, columns=10)
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    items = ds.PerFrameFunctionalGroupsSequence
    positions = [item.PlanePositionSequence[0].ImagePositionPatient for item in items]
    for f, item in enumerate(items):
        item.PlanePositionSequence[0].ImagePositionPatient = positions[4 - f]
        transform = Dataset()  # per frame: overrides the shared slope 1, intercept 0
        transform.RescaleSlope = "2"
        transform.RescaleIntercept = str(f)
        transform.RescaleType = "US"
        item.PixelValueTransformationSequence = DicomSequence([transform])
    ds.save_as(path, enforce_file_format=True)

    volume = read_series([path])
    assert volume.frame_numbers == (5, 4, 3, 2, 1)
    expected = np.stack([2 * stored[f] + f for f in (4, 3, 2, 1, 0)]).astype(np.float32)
    np.testing.assert_array_equal(volume.array(), expected)
    np.testing.assert_allclose(_physical(volume, (0, 0, 0)),
                               np.asarray(positions[0], dtype=float), atol=1e-6)


# --------------------------------------------------------------------------- transfer syntaxes


@pytest.fixture(scope="module")
def native_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _small_ct(tmp_path_factory.mktemp("native"), slices=4, rows=32, columns=48)


@needs_dcmtk
@pytest.mark.parametrize("syntax", sorted(testdata.SYNTAXES))
def test_transfer_syntaxes_decode_like_the_native_series(
    syntax: str, native_ct: list[Path], tmp_path: Path
) -> None:
    reference = read_series(native_ct).array()
    copies = testdata.transcode(native_ct, tmp_path / syntax, syntax)
    assert pydicom.dcmread(copies[0]).file_meta.TransferSyntaxUID == testdata.SYNTAXES[syntax]
    array = read_series(copies).array()
    if syntax in testdata.LOSSLESS_SYNTAXES:
        np.testing.assert_array_equal(array, reference)
    else:  # lossy: 8-bit baseline costs ~16 HU per level, 12-bit extended a few HU
        error = np.abs(array.astype(np.float64) - reference)
        mean_limit, max_limit = (30.0, 200.0) if syntax == "jpeg-baseline" else (5.0, 30.0)
        assert error.mean() < mean_limit and error.max() < max_limit, (error.mean(), error.max())


@needs_dcmtk
@pytest.mark.parametrize("syntax", ["jpeg2000", "rle", "deflated"])
def test_compressed_multiframe_decodes_frame_by_frame(syntax: str, tmp_path: Path) -> None:
    (path,) = testdata.multiframe_mr(tmp_path / "emr", frames=5, rows=64, columns=48)
    (copy,) = testdata.transcode([path], tmp_path / syntax, syntax)
    np.testing.assert_array_equal(read_series([copy]).array(), pydicom.dcmread(path).pixel_array)


def test_multiframe_with_shared_groups_only(tmp_path: Path) -> None:
    (path,) = testdata.multiframe_mr(tmp_path / "emr", frames=1, rows=8, columns=6)
    ds = pydicom.dcmread(path)
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    del ds.PerFrameFunctionalGroupsSequence
    ds.SharedFunctionalGroupsSequence[0].PlanePositionSequence = position
    ds.save_as(path, enforce_file_format=True)
    volume = read_series([path])
    assert _image(volume).GetSize() == (6, 8, 1)
    assert _image(volume).GetSpacing() == pytest.approx((1.5, 1.5, 3.0))  # SliceThickness 3
    np.testing.assert_allclose(_image(volume).GetOrigin(), position[0].ImagePositionPatient)


# --------------------------------------------------------------------------- gaps, tilt, mixes


def test_missing_slice_is_refused_or_interpolated(tmp_path: Path) -> None:
    paths = _small_ct(tmp_path / "ct", slices=8, missing=[3])
    with pytest.raises(VolumeError, match=r"gap of 1 slice at z=3\.8 mm"):
        read_series(paths)

    volume = read_series(paths, resample_irregular=True)
    assert volume.resampled and not volume.geometry.whole
    assert _image(volume).GetSize() == (20, 16, 8)
    assert _image(volume).GetSpacing()[2] == pytest.approx(1.25)
    array = volume.array()
    by_slice = {k: _hu(p) for k, p in zip((0, 1, 2, 4, 5, 6, 7), paths, strict=True)}
    for k, hu in by_slice.items():
        np.testing.assert_array_equal(array[k], hu)  # grid slices on a source slice: as is
    np.testing.assert_array_equal(array[3], (by_slice[2] + by_slice[4]) / 2)
    assert array[3, 0, 0] == -1021.0  # between -1022 (slice 2) and -1020 (slice 4)
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert volume.sop_instance_uids == (uids[0], uids[1], uids[2], uids[2], *uids[3:])


def test_irregular_spacing_is_interpolated_on_the_median_spacing(tmp_path: Path) -> None:
    paths = _small_ct(tmp_path / "ct", slices=6, spacing=(0.8, 0.8, 1.0))
    zs = [0.0, 1.0, 2.0, 3.4, 4.4, 5.4]
    for path, z in zip(paths, zs, strict=True):
        _edit(path, _set_z(z))
    with pytest.raises(VolumeError, match="irregular slice spacing"):
        read_series(paths)
    volume = read_series(paths, resample_irregular=True)
    # median spacing 1.0 mm, 5.4 mm span -> 5 steps of 1.08 mm
    assert _image(volume).GetSize()[2] == 6
    assert _image(volume).GetSpacing()[2] == pytest.approx(1.08)
    targets = np.arange(6) * 1.08
    want = np.interp(targets, zs, [k - 1024.0 for k in range(6)])
    np.testing.assert_allclose(volume.array()[:, 0, 0], want, atol=1e-4)
    np.testing.assert_array_equal(volume.array()[:, 5, 7],
                                  [_hu(paths[0])[5, 7]] * 6)  # constant phantom stays constant
    np.testing.assert_allclose(_physical(volume, (0, 0, 5)), _ipp(paths[-1]), atol=1e-6)


def test_two_series_are_refused(tmp_path: Path) -> None:
    first = _small_ct(tmp_path / "a", slices=3)
    second = _small_ct(tmp_path / "b", slices=3)
    with pytest.raises(VolumeError, match="belong to 2 series"):
        read_series([*first, *second])


def test_gantry_tilt_is_refused_even_with_resampling(tmp_path: Path) -> None:
    paths = _small_ct(tmp_path / "ct", slices=5)

    def shift(k: int) -> Any:
        def change(ds: Dataset) -> None:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [f"{x:.6g}", f"{y + 0.4 * k:.6g}", f"{z:.6g}"]
        return change

    for k, path in enumerate(paths):
        _edit(path, shift(k))
    for resample in (False, True):
        with pytest.raises(VolumeError, match=r"gantry-tilted") as caught:
            read_series(paths, resample_irregular=resample)
        assert "not supported" in str(caught.value)


def test_mixed_matrix_and_duplicates_are_refused_with_resampling(tmp_path: Path) -> None:
    small = _small_ct(tmp_path / "a", slices=4)
    other = _small_ct(tmp_path / "b", slices=5, rows=20)
    source = pydicom.dcmread(small[0], stop_before_pixels=True)

    def join(ds: Dataset) -> None:
        ds.SeriesInstanceUID = source.SeriesInstanceUID
        ds.FrameOfReferenceUID = source.FrameOfReferenceUID

    _edit(other[4], join)
    with pytest.raises(VolumeError, match="more than one matrix size"):
        read_series([*small, other[4]], resample_irregular=True)
    copy = tmp_path / "copy.dcm"
    ds = pydicom.dcmread(small[1])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(copy, enforce_file_format=True)
    with pytest.raises(VolumeError, match="duplicate slice position"):
        read_series([*small, copy], resample_irregular=True)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    paths = _small_ct(tmp_path / "ct", slices=1, spacing=(0.5, 0.7, 3.0))
    volume = read_series(paths)
    assert _image(volume).GetSize() == (20, 16, 1)
    assert _image(volume).GetSpacing() == pytest.approx((0.7, 0.5, 3.0))
    np.testing.assert_array_equal(volume.array()[0], _hu(paths[0]))


def test_unusable_inputs_are_refused_with_reasons(tmp_path: Path) -> None:
    paths = _small_ct(tmp_path / "ct", slices=3)
    with pytest.raises(TypeError):
        read_series(str(paths[0]))  # a str is a Sequence of str: refused explicitly
    with pytest.raises(VolumeError, match="no files"):
        read_series([])
    broken = testdata.malformed_file(tmp_path / "broken.dcm")
    with pytest.raises(VolumeError, match="file 4 of 4 cannot be parsed"):
        read_series([*paths, broken])

    def to_rgb(ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    _edit(paths[1], to_rgb)
    with pytest.raises(VolumeError, match="file 2 of 3 has SamplesPerPixel 3"):
        read_series(paths)


# --------------------------------------------------------------------------- NIfTI, memory


def test_write_nifti_round_trip_keeps_array_and_geometry(tmp_path: Path) -> None:
    paths = testdata.sagittal_series(tmp_path / "sag", slices=6, rows=16, columns=20)
    volume = read_series(paths)
    target = tmp_path / "sag.nii.gz"
    write_nifti(volume.image, target)
    back = _sitk.ReadImage(str(target))
    np.testing.assert_array_equal(_sitk.GetArrayFromImage(back), volume.array())
    np.testing.assert_allclose(back.GetSpacing(), _image(volume).GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), _image(volume).GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), _image(volume).GetDirection(), atol=1e-5)
    # The file itself holds RAS world coordinates: x and y of LPS negated.
    _data, affine_ras = testdata._read_nifti(target)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine_ras[:3, 3]
    np.testing.assert_allclose(lps, _ipp(paths[0]), atol=1e-4)
    with pytest.raises(ValueError, match=r"\.nii"):
        write_nifti(volume.image, tmp_path / "sag.mha")


@pytest.mark.slow
def test_memory_peak_is_about_the_volume(tmp_path: Path) -> None:
    """Decoding file by file into one preallocated image: no second copy of the volume."""
    slices, rows, columns = 200, 256, 256
    _small_ct(tmp_path / "ct", slices=slices, rows=rows, columns=columns)
    volume_mb = slices * rows * columns * 4 / 2**20  # 50 MiB of float32
    # VmHWM (peak resident size) belongs to the process's memory map and starts afresh at
    # exec; getrusage()'s ru_maxrss would carry over the peak of this pytest process.
    script = textwrap.dedent(f"""
        from pathlib import Path
        from dicomnode.inference.volume import read_series
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        paths = sorted(Path({str(tmp_path / "ct")!r}).glob("*.dcm"))
        before = status("VmRSS")
        volume = read_series(paths)
        print(status("VmHWM") - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1])
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 1.4 * volume_mb + 15, (growth_mb, volume_mb)


def test_series_volume_validates_its_fields(tmp_path: Path) -> None:
    volume = read_series(_small_ct(tmp_path / "ct", slices=3))
    fields: dict[str, Any] = {
        "image": volume.image, "sop_instance_uids": volume.sop_instance_uids,
        "frame_numbers": volume.frame_numbers, "sop_class_uids": volume.sop_class_uids,
        "modality": "CT", "series_instance_uid": "1.2", "study_instance_uid": "1.3",
        "frame_of_reference_uid": None, "geometry": volume.geometry,
    }
    SeriesVolume(**fields)
    with pytest.raises(ValueError, match="sop_instance_uids has 2 entries for 3 slices"):
        SeriesVolume(**{**fields, "sop_instance_uids": volume.sop_instance_uids[:2]})
    with pytest.raises(ValueError, match="float32"):
        SeriesVolume(**{**fields, "image": _sitk.Cast(volume.image, sitk.sitkInt16)})
