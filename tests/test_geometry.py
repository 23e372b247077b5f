"""Geometry verdicts on frames built in the test, and on multi-frame index rows."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicomnode.completion import series_verdict
from dicomnode.geometry import Frame, assess, orientation_label
from dicomnode.store.header import read_header
from dicomnode.store.tables import Instance

warnings.filterwarnings("ignore", message=".*download.*")

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def stack(zs: list[float], *, iop: tuple[float, ...] = AXIAL, shift: float = 0.0,
          rows: int = 64) -> list[Frame]:
    return [Frame((-100.0 + shift * i, -100.0, z), iop, rows, 64, (0.5, 0.5))
            for i, z in enumerate(zs)]


def test_regular_stack_in_any_order_is_whole() -> None:
    zs = [-50.0 + 2.5 * i for i in range(40)]
    verdict = assess(stack(list(reversed(zs))))
    assert verdict.whole
    assert verdict.frames == 40
    assert verdict.slice_spacing == pytest.approx(2.5)
    assert verdict.orientation == "AXIAL"


def test_gap_is_reported_with_its_position_and_size() -> None:
    zs = [-130.0 + 2.5 * i for i in range(30) if i not in (4, 5)]
    verdict = assess(stack(zs))
    assert not verdict.whole
    assert verdict.reason == "gap of 2 slices at z=-120.0 mm"


def test_duplicate_positions_are_not_whole() -> None:
    verdict = assess(stack([0.0, 1.0, 2.0, 2.0, 3.0]))
    assert not verdict.whole
    assert "duplicate" in verdict.reason and "z=2.0" in verdict.reason


def test_irregular_spacing_and_gantry_tilt_are_refused() -> None:
    irregular = assess(stack([0.0, 1.0, 2.0, 3.4, 4.4, 5.4]))
    assert not irregular.whole and "irregular slice spacing" in irregular.reason
    tilted = assess(stack([0.0, 1.0, 2.0, 3.0], shift=0.3))
    assert not tilted.whole and "gantry tilt" in tilted.reason


def test_mixed_orientation_matrix_and_missing_position() -> None:
    frames = stack([0.0, 1.0]) + stack([2.0], iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    assert "more than one orientation" in assess(frames).reason
    frames = stack([0.0, 1.0]) + stack([2.0], rows=32)
    assert "more than one matrix size (32x64, 64x64)" in assess(frames).reason
    frames = [*stack([0.0, 1.0]), Frame(None, AXIAL, 64, 64)]
    assert "1 of 3 frames lack ImagePositionPatient" in assess(frames).reason
    assert assess([]).reason == "no image frames"


def test_sagittal_stack_reports_x() -> None:
    sag = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    frames = [Frame((x, -100.0, 100.0), sag, 64, 64) for x in (0.0, 2.0, 6.0, 8.0)]
    verdict = assess(frames)
    assert verdict.orientation == "SAGITTAL"
    assert verdict.reason == "gap of 1 slice at x=4.0 mm"


@pytest.mark.parametrize(("iop", "label"), [
    (AXIAL, "AXIAL"),
    ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "SAGITTAL"),
    ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "CORONAL"),
    ((1.0, 0.0, 0.0, 0.0, 0.7071, 0.7071), "OBLIQUE"),
])
def test_orientation_labels(iop: tuple[float, ...], label: str) -> None:
    assert orientation_label(iop) == label


# ---------------------------------------------------------------- multi-frame objects


def _instance(**values: object) -> Instance:
    base: dict[str, object] = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.481.2", "rows": 10,
                               "columns": 10, "image_orientation_patient": list(AXIAL),
                               "image_position_patient": [0.0, 0.0, -50.0],
                               "pixel_spacing": [2.0, 2.0], "number_of_frames": 1,
                               "frame_positions": None}
    base.update(values)
    return Instance(**base)


def test_rt_dose_grid_frames_are_positioned_by_grid_frame_offset_vector() -> None:
    from pydicom.data import get_testdata_file

    dose = read_header(Path(str(get_testdata_file("rtdose.dcm"))))
    positions = dose.instance["frame_positions"]
    assert dose.instance["number_of_frames"] == 15
    assert positions is not None and len(positions) == 15
    x, y, z = dose.instance["image_position_patient"]
    assert positions[0] == pytest.approx([x, y, z])
    assert positions[14] == pytest.approx([x, y, z + 70.0])  # offsets 0, 5, ... 70 mm
    verdict = series_verdict([_instance(number_of_frames=15, frame_positions=positions)])
    assert verdict is not None and verdict.whole
    assert verdict.frames == 15 and verdict.slice_spacing == pytest.approx(5.0)


def test_grid_offsets_as_z_coordinates_and_a_short_vector() -> None:
    from dicomnode.dicom.frames import FrameSource
    from dicomnode.dicom.header import ImageHeader

    ds = Dataset()
    ds.ImagePositionPatient = [1.0, 2.0, -20.0]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.GridFrameOffsetVector = [-20.0, -17.5, -15.0]  # absolute z, first value not 0
    ds.NumberOfFrames = 3
    header = ImageHeader.from_dataset(ds)
    assert header.frame_source is FrameSource.DOSE_GRID
    positions = [f.position for f in header.frames]
    assert all(p is not None for p in positions)
    assert [p[2] for p in positions if p] == pytest.approx([-20.0, -17.5, -15.0])
    assert all(p[:2] == pytest.approx([1.0, 2.0]) for p in positions if p)
    ds.NumberOfFrames = 4  # one offset per frame, or no positions
    short = ImageHeader.from_dataset(ds)
    assert short.frame_source is FrameSource.UNPOSITIONED
    assert all(f.position is None for f in short.frames)
    assert str(short.problems[0]) == "GridFrameOffsetVector has 3 values, expected 4"
    ds.NumberOfFrames = 3
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # z values need axial
    assert ImageHeader.from_dataset(ds).frame_source is FrameSource.UNPOSITIONED


def test_multiframe_without_per_frame_positions_is_not_a_whole_single_slice() -> None:
    cine = _instance(sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1", number_of_frames=15)
    verdict = series_verdict([cine])
    assert verdict is not None and not verdict.whole
    assert verdict.frames == 15
    assert "15 of 15 frames lack ImagePositionPatient" in verdict.reason
    single = series_verdict([_instance()])
    assert single is not None and single.whole and single.reason == "single slice"


def test_enhanced_frames_with_their_own_orientation_are_judged_per_frame() -> None:
    sagittal = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    frames = [[0.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 10.0, *sagittal]]
    verdict = series_verdict([_instance(sop_class_uid="1.2.840.10008.5.1.4.1.1.4.1",
                                        number_of_frames=3, frame_positions=frames)])
    assert verdict is not None and not verdict.whole
    assert verdict.reason == "frames have more than one orientation"
