"""Geometry verdicts on frames built in the test (pure computation, no I/O)."""

from __future__ import annotations

import pytest

from dicomnode.geometry import Frame, assess, orientation_label

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
