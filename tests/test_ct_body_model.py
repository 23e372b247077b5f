"""Tests of `models/ct-body/model.onnx`, the rule-based CT model built by tools/build_ct_body.py.

The model takes axial slices in Hounsfield units (HU), float32 ``[N, 1, H, W]``, and returns
float32 ``[N, 3, H, W]`` probabilities: channel 0 External, 1 Bone, 2 Lungs. Tests run it with
onnxruntime on the CPU and threshold every channel at 0.5 as the inference engine does.
The Cranium test needs the Debian package ``invesalius-examples`` and is skipped without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "ct-body" / "model.onnx"

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]


builder = load_tool("build_ct_body")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def session() -> Any:
    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


def _run(session: Any, hu: npt.ArrayLike) -> FloatArray:
    """Run the model on ``hu`` (HU, ``[N, 1, H, W]``); returns ``prob`` ``[N, 3, H, W]``."""
    x = np.asarray(hu, dtype=np.float32)
    out: FloatArray = session.run(["prob"], {"hu": x})[0]
    return out


# ------------------------------------------------------------------------------ the file itself


def test_committed_model_matches_a_fresh_build() -> None:
    fresh = builder.model_bytes()
    assert MODEL.read_bytes() == fresh, "run: python tools/build_ct_body.py"
    assert builder.model_bytes() == fresh  # deterministic
    assert builder.main(["--check"]) == 0


def test_check_fails_on_a_different_file(tmp_path: Path) -> None:
    stale = tmp_path / "model.onnx"
    stale.write_bytes(MODEL.read_bytes()[:-1] + b"\x00")
    assert builder.main(["--check", "--out", str(stale)]) == 1
    assert builder.main(["--check", "--out", str(tmp_path / "missing.onnx")]) == 1
    assert builder.main(["--out", str(stale)]) == 0  # rewrite it
    assert builder.main(["--check", "--out", str(stale)]) == 0


def test_model_header_and_metadata() -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(MODEL))
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["name"] == "ct-body"
    assert meta["version"] == "1.0.0"
    assert meta["labels"] == "External,Bone,Lungs"
    assert "rule-based" in meta["kind"] and "rule-based" in model.doc_string
    # No learned weights: the initializers are a handful of scalars and axis indices.
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer]
    assert sum(sizes) <= 10
    assert [i.name for i in model.graph.input] == ["hu"]
    assert [o.name for o in model.graph.output] == ["prob"]
    assert (ROOT / "models" / "ct-body" / "LICENSE").read_text().count("Apache License") >= 2


# ----------------------------------------------------------------------------- synthetic slices


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> BoolArray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside: BoolArray = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return inside


def _phantom() -> tuple[FloatArray, BoolArray, BoolArray, BoolArray]:
    """A 128 x 160 slice in HU and its expected External, Bone and Lungs masks.

    Water ellipse (0 HU) surrounded by air (-1000 HU), a bone ring (700 HU) inside it and two
    air-filled "lungs" (-850 HU) inside the ring.
    """
    shape = (128, 160)
    water = _ellipse(shape, 64, 80, 52, 72)
    ring = _ellipse(shape, 64, 80, 48, 68) & ~_ellipse(shape, 64, 80, 42, 61)
    lungs = _ellipse(shape, 64, 52, 24, 15) | _ellipse(shape, 64, 108, 24, 15)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[water] = 0.0
    hu[ring] = 700.0
    hu[lungs] = -850.0
    return hu, water, ring, lungs


def test_synthetic_phantom_masks_are_exact(session: Any) -> None:
    hu, water, ring, lungs = _phantom()
    empty = np.full_like(hu, -1000.0)
    prob = _run(session, np.stack([hu, empty])[:, None])
    assert prob.shape == (2, 3, *hu.shape)
    assert prob.dtype == np.float32
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    external, bone, lung = (prob[0, c] > 0.5 for c in range(3))
    assert ring.sum() > 1000 and lungs.sum() > 2000  # the phantom is what it claims
    np.testing.assert_array_equal(external, water)  # the enclosed air is part of the outline
    np.testing.assert_array_equal(bone, ring)
    np.testing.assert_array_equal(lung, lungs)  # outside air is not lung
    assert not (prob[1] > 0.5).any()  # a slice of air: nothing at all
    # Soft but steep: far from every threshold the values are saturated.
    assert float(prob[0, 0][water].min()) > 0.99
    assert float(prob[0, 2][lungs].min()) > 0.99
    assert float(prob[0, 0][~water].max()) < 1e-6


def test_thresholds_sit_between_integer_hu(session: Any) -> None:
    values = np.array(
        [-501, -500, -499, -498, 224, 225, 226, 227, -402, -401, -400, -399], dtype=np.float32
    )
    # One row (H = 1): nothing can be enclosed along a column, so the inside test is off.
    prob = _run(session, values[None, None, None, :])[0, :, 0]
    body = prob[0] > 0.5
    bone = prob[1] > 0.5
    np.testing.assert_array_equal(body, values > -500)
    np.testing.assert_array_equal(bone, values >= 226)
    assert not (prob[2] > 0.5).any()
    # Probability 0.5 exactly on each threshold; one HU either side gives 0.5 -+ ~0.025.
    at = _run(session, np.array([-499.5, 225.5, 0.0], np.float32)[None, None, None, :])
    assert at[0, 0, 0, 0] == pytest.approx(0.5, abs=1e-6)
    assert at[0, 1, 0, 1] == pytest.approx(0.5, abs=1e-6)
    assert prob[1, 6] == pytest.approx(1 / (1 + np.exp(-0.5 / 5.0)), abs=1e-6)  # HU 226

    # Lungs: air-like is HU <= -400, tested where the pixel is enclosed on all four sides.
    hu = np.full((len(values), 1, 21, 21), 0.0, dtype=np.float32)
    hu[:, 0, 10, 10] = values
    lung = _run(session, hu)[:, 2, 10, 10] > 0.5
    np.testing.assert_array_equal(lung, values <= -400)


def test_thin_shells_do_not_enclose_air(session: Any) -> None:
    """Air between the patient and a thin head rest (U-shaped shell) is neither body nor lung."""
    shape = (128, 160)
    head = _ellipse(shape, 50, 80, 30, 30)
    yy, _ = np.mgrid[: shape[0], : shape[1]]
    below = yy >= 50

    def shell(thickness: int) -> BoolArray:
        outer = _ellipse(shape, 50, 80, 44 + thickness, 44 + thickness)
        cradle: BoolArray = outer & ~_ellipse(shape, 50, 80, 44, 44) & below
        return cradle

    thin, thick = shell(3), shell(9)
    pocket = _ellipse(shape, 50, 80, 44, 44) & below & ~head
    slices = []
    for cradle in (thin, thick):
        hu = np.full(shape, -1000.0, dtype=np.float32)
        hu[head] = 40.0
        hu[cradle] = 300.0
        slices.append(hu)
    prob = _run(session, np.stack(slices)[:, None])
    # A 3-pixel shell is eroded away before the inside test: only head and shell are External.
    np.testing.assert_array_equal(prob[0, 0] > 0.5, head | thin)
    assert not (prob[0, 2] > 0.5).any()
    # A 9-pixel one is thick enough to enclose: part of the pocket becomes "inside" (the rule
    # is geometric; the engine's component analysis has to sort such cases out).
    enclosed = (prob[1, 2] > 0.5) & pocket
    assert enclosed.sum() > 100
    np.testing.assert_array_equal(prob[1, 2] > 0.5, enclosed)


@pytest.mark.parametrize("shape", [(3, 1, 64, 80), (1, 1, 33, 47), (2, 1, 5, 3)])
def test_dynamic_batch_and_size(session: Any, shape: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    hu = rng.uniform(-1100.0, 1500.0, size=shape).astype(np.float32)
    prob = _run(session, hu)
    assert prob.shape == (shape[0], 3, shape[2], shape[3])
    assert np.isfinite(prob).all()
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    np.testing.assert_array_equal(prob[:, 1] > 0.5, hu[:, 0] >= 225.5)
    # Lungs and External never disagree: every lung pixel is inside the outline.
    assert not ((prob[:, 2] > 0.5) & ~(prob[:, 0] > 0.5)).any()


# ------------------------------------------------------------------------------- real head CT


def test_cranium_head_ct(session: Any) -> None:
    testdata = load_tool("testdata")
    if not testdata.CRANIUM_PATH.is_file():
        pytest.skip(f"{testdata.CRANIUM_PATH} missing: install Debian package invesalius-examples")
    hu, bone_mask, spacing = testdata.cranium_arrays()
    assert hu.shape == (108, 256, 256)
    prob = np.concatenate(
        [_run(session, hu[k : k + 36, None]) for k in range(0, hu.shape[0], 36)], axis=0
    )
    external, bone, lungs = (prob[:, c] > 0.5 for c in range(3))
    reference = bone_mask > 0

    dice = 2.0 * float((bone & reference).sum()) / float(bone.sum() + reference.sum())
    coverage = float((external & reference).sum()) / float(reference.sum())
    ml = float(np.prod(spacing)) / 1000.0  # mL per voxel, spacing in mm
    external_ml = float(external.sum()) * ml
    tissue_ml = float((hu > -500).sum()) * ml
    lungs_ml = float(lungs.sum()) * ml
    print(
        f"\nCranium: bone Dice {dice:.4f}, External covers {coverage:.2%} of bone, External "
        f"{external_ml:.0f} mL (tissue > -500 HU {tissue_ml:.0f} mL, enclosed air "
        f"{external_ml - tissue_ml:.0f} mL), raw Lungs {lungs_ml:.0f} mL"
    )
    assert dice >= 0.99
    assert coverage >= 0.99
    # 162 mm of head from the teeth to the vertex plus the head rest: about 3.4 L measured.
    assert 3000.0 <= external_ml <= 3700.0
    # The enclosed air (sinuses, nasal cavity, pharynx, mastoids) is tens of mL; the air
    # pockets inside the thin head rest (about 500 mL) must not be counted.
    assert 10.0 <= external_ml - tissue_ml <= 150.0
    # No lungs in a head: only small air spaces, all inside the outline.
    assert lungs_ml <= 150.0
    assert not (lungs & ~external).any()
