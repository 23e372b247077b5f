"""The overlay picture of a finished job (:mod:`dicomnode.outputs.overlay`) on real data:
the Cranium head CT with the shipped ct-body model's structures, a sagittal MR series,
the same head stored in other index orders and tilted obliquely, and a 512 x 512 x 300
CT for the time a picture takes.

Orientation is checked in patient terms: a structure cut to the patient's left,
anterior or superior half (by the LPS position of its voxels) must show only on the
documented side of each view (axial: patient left on the right, anterior up; coronal:
left on the right, superior up; sagittal: anterior on the left, superior up).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk
import testdata
from PIL import Image

from dicomnode.inference.segment import segment
from dicomnode.inference.volume import read_series
from dicomnode.models.card import load_card
from dicomnode.outputs.overlay import (
    VIEWS,
    OverlayLayout,
    OverlayStructure,
    overlay_layout,
    render_overlay,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256
EXTERNAL_GREEN = (0, 160, 0)

RGB = npt.NDArray[np.uint8]


@pytest.fixture(scope="module")
def cranium(tmp_path_factory: pytest.TempPathFactory) -> sitk.Image:
    folder = tmp_path_factory.mktemp("cranium")
    return read_series(testdata.cranium_ct(folder)).image


@pytest.fixture(scope="module")
def ct_body(cranium: sitk.Image) -> tuple[OverlayStructure, ...]:
    """The shipped ct-body model's External, Bone and (empty on a head) Lungs."""
    result = segment(load_card(ROOT / "models" / "ct-body"), [cranium])
    return tuple(OverlayStructure(s.label.name, s.label.color, s.volume_ml, s.mask)
                 for s in result.structures)


# --------------------------------------------------------------------------- helpers


def _decode(png: bytes, layout: OverlayLayout) -> RGB:
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG"
    assert picture.mode == "RGB"
    assert picture.size == (layout.width, layout.height)
    assert not getattr(picture, "text", {}), "no text chunks (nothing beyond the pixels)"
    pixels: RGB = np.asarray(picture.convert("RGB"))
    return pixels


def _panels(pixels: RGB, layout: OverlayLayout) -> dict[str, RGB]:
    return {view: pixels[box.top:box.bottom, box.left:box.right]
            for view, box in zip(VIEWS, layout.panels, strict=True)}


def _exact(pixels: RGB, color: Sequence[int]) -> npt.NDArray[np.bool_]:
    result: npt.NDArray[np.bool_] = np.all(pixels == np.array(color, dtype=np.uint8), axis=2)
    return result


def _greenish(pixels: RGB) -> npt.NDArray[np.bool_]:
    """Pixels tinted by the External colour (0, 160, 0): green well above red and blue."""
    p = pixels.astype(np.int32)
    result: npt.NDArray[np.bool_] = (p[..., 1] - p[..., 0] > 30) & (p[..., 1] - p[..., 2] > 30)
    return result


def _lps(image: sitk.Image) -> tuple[npt.NDArray[np.float64], ...]:
    """LPS x, y and z (mm) of every voxel centre, each indexed [z, y, x]."""
    nx, ny, nz = image.GetSize()
    origin = np.array(image.GetOrigin())
    matrix = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    k, j, i = np.ogrid[0:nz, 0:ny, 0:nx]
    coords = tuple(origin[c] + matrix[c, 0] * i + matrix[c, 1] * j + matrix[c, 2] * k
                   for c in range(3))
    # Cross-check one voxel against SimpleITK's own index-to-point mapping.
    probe = (nx - 1, 0, nz - 1)
    np.testing.assert_allclose(
        [c[probe[2], probe[1], probe[0]] for c in coords],
        image.TransformIndexToPhysicalPoint(probe), atol=1e-6)
    return coords


def _bounds_middle(image: sitk.Image) -> npt.NDArray[np.float64]:
    """LPS centre of the bounding box of the voxel corners (the middle of each view)."""
    n = image.GetSize()
    corners = [image.TransformContinuousIndexToPhysicalPoint(
        (a * n[0] - 0.5, b * n[1] - 0.5, c * n[2] - 0.5))
        for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    points = np.array(corners)
    middle: npt.NDArray[np.float64] = (points.min(axis=0) + points.max(axis=0)) / 2
    return middle


def _changed(image: sitk.Image, body: npt.NDArray[np.bool_],
             part: npt.NDArray[np.bool_]) -> dict[str, npt.NDArray[np.bool_]]:
    """Per view, the pixels that drawing ``part`` of ``body`` changes.

    Both pictures draw ``body`` too, so that its centroid places the planes in both.
    """
    layout = overlay_layout(2)
    whole = OverlayStructure("Body", EXTERNAL_GREEN, 1.0, body)

    def views(mask: npt.NDArray[np.bool_]) -> dict[str, RGB]:
        structures = [whole, OverlayStructure("Part", (255, 0, 255), 1.0, mask)]
        return _panels(_decode(render_overlay(image, structures), layout), layout)

    plain, drawn = views(np.zeros_like(part)), views(part)
    return {view: np.any(plain[view] != drawn[view], axis=2) for view in VIEWS}


def _assert_halves(image: sitk.Image, body: npt.NDArray[np.bool_], tolerance: int = 2) -> None:
    """The patient's left / anterior / superior half of ``body`` shows only on the
    documented side of each view that shows it."""
    x, y, z = _lps(image)
    mx, my, mz = _bounds_middle(image)
    half = SIZE / 2
    # Patient left (+x): right half of the axial and coronal views.
    changed = _changed(image, body, body & (x > mx))
    for view in ("axial", "coronal"):
        columns = np.nonzero(changed[view])[1]
        assert columns.size > 500, view
        assert columns.min() >= half - tolerance, (view, columns.min())
    # Anterior (-y): upper half of the axial view, left half of the sagittal view.
    changed = _changed(image, body, body & (y < my))
    rows = np.nonzero(changed["axial"])[0]
    assert rows.size > 500 and rows.max() < half + tolerance, rows.max()
    columns = np.nonzero(changed["sagittal"])[1]
    assert columns.size > 500 and columns.max() < half + tolerance, columns.max()
    # Superior (+z): upper half of the coronal and sagittal views.
    changed = _changed(image, body, body & (z > mz))
    for view in ("coronal", "sagittal"):
        rows = np.nonzero(changed[view])[0]
        assert rows.size > 500, view
        assert rows.max() < half + tolerance, (view, rows.max())


# --------------------------------------------------------------------------- tests


def test_ct_body_structures_on_cranium(cranium: sitk.Image,
                                       ct_body: tuple[OverlayStructure, ...]) -> None:
    names = [s.name for s in ct_body]
    assert names == ["External", "Bone", "Lungs"]
    assert not ct_body[2].mask.any(), "a head has no lungs: an empty structure"
    title = "Job 17 - ct-body 1.0.0"
    layout = overlay_layout(len(ct_body), title=title)
    png = render_overlay(cranium, ct_body, title=title)
    pixels = _decode(png, layout)
    panels = _panels(pixels, layout)

    # Each drawn structure's outline is its exact colour, in every view; the empty
    # Lungs appear nowhere but in their legend swatch.
    for structure, swatch in zip(ct_body, layout.swatches, strict=True):
        swatch_pixels = pixels[swatch.top:swatch.bottom, swatch.left:swatch.right]
        assert _exact(swatch_pixels, structure.color).all(), structure.name
        for view in VIEWS:
            count = int(_exact(panels[view], structure.color).sum())
            if structure.mask.any():
                assert count > 100, (structure.name, view, count)
            else:
                assert count == 0, (structure.name, view, count)

    # The External tint covers the head (about half of each view) and lies nowhere
    # outside the views but the External swatch.
    green = _greenish(pixels)
    for view, box in zip(VIEWS, layout.panels, strict=True):
        share = green[box.top:box.bottom, box.left:box.right].mean()
        assert 0.25 < share < 0.8, (view, share)
        green[box.top:box.bottom, box.left:box.right] = False
    external = layout.swatches[0]
    assert green[external.top:external.bottom, external.left:external.right].all()
    green[external.top:external.bottom, external.left:external.right] = False
    assert not green.any()

    # Without structures the same views hold no External tint at all.
    plain = _decode(render_overlay(cranium, [], title=title), overlay_layout(0, title=title))
    assert not _greenish(plain).any()
    # The tint is where the head is: tissue (bright) pixels of the plain picture.
    plain_panels = _panels(plain, overlay_layout(0, title=title))
    for view in VIEWS:
        tinted = _greenish(panels[view])
        tissue = plain_panels[view].mean(axis=2) > 60  # above about -400 HU
        assert (tinted & tissue).sum() > 0.9 * tinted.sum(), view


def test_cranium_head_top_is_up(cranium: sitk.Image,
                                ct_body: tuple[OverlayStructure, ...]) -> None:
    """The scan stops at the skull base, below the rounded vertex: in the coronal and
    sagittal views the External is narrow at its top rows and wide at its bottom rows."""
    layout = overlay_layout(1)
    pixels = _decode(render_overlay(cranium, ct_body[:1]), layout)
    for view, panel in _panels(pixels, layout).items():
        width = _greenish(panel).sum(axis=1)
        rows = np.nonzero(width)[0]
        top, bottom = int(rows.min()), int(rows.max())
        print(f"{view}: External rows {top}..{bottom}, widths {width[top + 3]} at the top,"
              f" {width[bottom - 3]} at the bottom")
        if view != "axial":
            assert width[top + 3] < 0.5 * width[bottom - 3], view
            assert top > 10, "air above the vertex, inside the volume"


def test_views_follow_patient_axes_on_cranium(cranium: sitk.Image,
                                              ct_body: tuple[OverlayStructure, ...]) -> None:
    _assert_halves(cranium, ct_body[0].mask)


def test_views_follow_patient_axes_on_an_oblique_volume(
        cranium: sitk.Image, ct_body: tuple[OverlayStructure, ...]) -> None:
    """The same voxels with a tilted direction (25 degrees about z, then 15 about x)."""
    rotation = sitk.VersorRigid3DTransform()
    rotation.SetRotation((0.0, 0.0, 1.0), np.deg2rad(25))
    tilt = sitk.VersorRigid3DTransform()
    tilt.SetRotation((1.0, 0.0, 0.0), np.deg2rad(15))
    direction = (np.array(tilt.GetMatrix()).reshape(3, 3)
                 @ np.array(rotation.GetMatrix()).reshape(3, 3))
    oblique = sitk.Image(cranium)
    oblique.SetDirection(tuple(direction.ravel()))
    _assert_halves(oblique, ct_body[0].mask)


@pytest.mark.parametrize("orientation", ["RAI", "ASL", "IPR"])
def test_index_order_does_not_change_the_picture(
        cranium: sitk.Image, ct_body: tuple[OverlayStructure, ...], orientation: str) -> None:
    """The same anatomy stored in another index order (axes permuted and flipped by
    DICOMOrient, physical positions unchanged) gives the same bytes."""
    reference = render_overlay(cranium, ct_body[:2], title="t")
    image = sitk.DICOMOrient(cranium, orientation)
    structures = []
    for s in ct_body[:2]:
        mask = sitk.GetImageFromArray(s.mask.astype(np.uint8))
        mask.CopyInformation(cranium)
        array = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, orientation)).astype(bool)
        structures.append(OverlayStructure(s.name, s.color, s.volume_ml, array))
    assert image.GetDirection() != cranium.GetDirection()
    assert render_overlay(image, structures, title="t") == reference


def test_sagittal_series(tmp_path: Path) -> None:
    """A sagittal MR (rows anterior to posterior, columns head to feet, 2 mm slices
    along -x) of a ball phantom of semi-axes 36 mm (x) and 57.6 mm (y, z)."""
    volume = read_series(testdata.sagittal_series(tmp_path))
    image = volume.image
    assert image.GetDirection() == (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    assert image.GetSpacing() == (1.0, 1.0, 2.0)
    ball = volume.array() > 0
    layout = overlay_layout(1, title="MR")
    pixels = _decode(render_overlay(
        image, [OverlayStructure("Ball", (255, 0, 0), 1.0, ball)], title="MR"), layout)
    expected = {"axial": 36 / 57.6, "coronal": 36 / 57.6, "sagittal": 1.0}
    for view, panel in _panels(pixels, layout).items():
        red = (panel[..., 0].astype(int) - panel[..., 1]) > 60
        rows, columns = np.nonzero(red)
        aspect = (np.ptp(columns) + 1) / (np.ptp(rows) + 1)
        print(f"{view}: ball {np.ptp(columns) + 1} x {np.ptp(rows) + 1} pixels")
        assert aspect == pytest.approx(expected[view], abs=0.05), view
    # Not CT: the 1st..99th percentile window (0..1000 here) shows the shell (1000)
    # white, the core (500) mid-grey and the background (0) black.
    layout = overlay_layout(0)
    sagittal = _panels(_decode(render_overlay(image, []), layout), layout)["sagittal"]
    middle = SIZE // 2
    assert tuple(sagittal[middle, middle]) == pytest.approx((128, 128, 128), abs=3)
    assert tuple(sagittal[middle, middle + 80]) == (255, 255, 255)
    assert tuple(sagittal[middle - 124, middle - 124]) == (0, 0, 0)
    _assert_halves(image, ball)


def test_same_input_same_bytes(cranium: sitk.Image,
                               ct_body: tuple[OverlayStructure, ...]) -> None:
    first = render_overlay(cranium, ct_body, title="x", size=200)
    assert render_overlay(cranium, ct_body, title="x", size=200) == first
    _decode(first, overlay_layout(3, title="x", size=200))


def test_empty_masks_and_no_structures(cranium: sitk.Image) -> None:
    empty = np.zeros(sitk.GetArrayViewFromImage(cranium).shape, dtype=bool)
    structures = [OverlayStructure("A", (255, 0, 0), 0.0, empty),
                  OverlayStructure("B" * 80, (0, 0, 255), float("nan"), empty)]
    layout = overlay_layout(2, size=64)
    pixels = _decode(render_overlay(cranium, structures, size=64), layout)
    for structure in structures:
        assert not _exact(pixels[layout.panels[0].top:], structure.color)[:64].any()
    _decode(render_overlay(cranium, [], size=64), overlay_layout(0, size=64))
    with pytest.raises(ValueError, match="shape"):
        render_overlay(cranium, [OverlayStructure("C", (1, 2, 3), 0.0, empty[1:])])
    with pytest.raises(ValueError, match="size"):
        render_overlay(cranium, [], size=8)
    with pytest.raises(ValueError, match="color"):
        OverlayStructure("D", (0, 0, 300), 0.0, empty)


def test_large_ct_renders_quickly() -> None:
    """512 x 512 x 300 CT (the synthetic phantom's HU slice, 0.8 x 0.8 x 1.25 mm)."""
    hu = testdata.synthetic_phantom_hu(512, 512).astype(np.float32)
    volume = np.empty((300, 512, 512), dtype=np.float32)
    volume[:] = hu
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 1.25))
    del volume
    array = sitk.GetArrayViewFromImage(image)
    structures = [OverlayStructure("External", EXTERNAL_GREEN, 1.0, array > -500),
                  OverlayStructure("Bone", (241, 214, 145), 1.0, array > 300),
                  OverlayStructure("Lungs", (197, 165, 145), 0.0,
                                   np.zeros(array.shape, dtype=bool))]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        png = render_overlay(image, structures, title="timing")
        times.append(time.perf_counter() - start)
    print(f"512 x 512 x 300 CT: {min(times):.3f} s (best of 3), {max(times):.3f} s worst")
    assert min(times) < 1.0
    layout = overlay_layout(3, title="timing")
    pixels = _decode(png, layout)
    for view in VIEWS:
        assert _exact(_panels(pixels, layout)[view], EXTERNAL_GREEN).any(), view
