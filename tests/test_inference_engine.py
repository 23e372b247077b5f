"""Inference engine on small real ONNX models built here: pre-processing, windows, flips,
post-processing, resampling back onto the source grid, and provider choice."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import yaml
from onnx import TensorProto, helper

from dicomnode.inference.postprocess import clean_mask
from dicomnode.inference.predict import InferenceError, predict, window_starts
from dicomnode.inference.preprocess import normalise, prepare
from dicomnode.inference.runtime import choose_providers, clear_cache, open_session
from dicomnode.inference.segment import LabelMask, segment, structures_of_label_map
from dicomnode.models.card import (
    CropSpec,
    IntensitySpec,
    LabelSpec,
    OutputSpec,
    PostprocessingSpec,
    PreprocessingSpec,
    load_card,
)

LABEL = {
    "value": 1, "channel": 0, "name": "Thing", "color": [255, 0, 0],
    "category": {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"},
    "type": {"scheme": "SCT", "value": "12738006", "meaning": "Brain"},
}  # fmt: skip


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 10  # onnx.helper writes IR 14, which onnxruntime 1.31 rejects
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _model(nodes: list[onnx.NodeProto], rank: int, path: Path,
           inits: Sequence[onnx.TensorProto] = (), in_shape: Sequence[object] | None = None,
           out_channels: object = "c") -> Path:
    dims = in_shape if in_shape is not None else ["n", "c", *("s" + str(i) for i in
                                                             range(rank - 2))]
    out_dims = ["n", out_channels, *dims[2:]]
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
        initializer=list(inits),
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _identity(path: Path, rank: int) -> Path:
    return _model([helper.make_node("Identity", ["x"], ["y"])], rank, path)


def _cumsum_last(path: Path, rank: int) -> Path:
    """y = cumulative sum of x along the last axis: position dependent, not flip-equivariant."""
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [rank - 1])
    return _model([helper.make_node("CumSum", ["x", "axis"], ["y"])], rank, path, [axis])


def _package(folder: Path, model: Path, **card: object) -> Path:
    data: dict[str, object] = {
        "name": folder.name, "version": "1", "description": "test", "intended_use": "tests",
        "license": "Apache-2.0", "authors": ["tests"], "source": "tests",
        "file": model.name, "inputs": [{"name": "img", "modality": "CT"}],
        "outputs": {"labels": [LABEL]},
    }  # fmt: skip
    data.update(card)
    folder.mkdir(parents=True, exist_ok=True)
    if model.parent != folder:
        (folder / model.name).write_bytes(model.read_bytes())
    (folder / "LICENSE").write_text("test\n")
    (folder / "card.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def _image(array: np.ndarray, spacing: Sequence[float] = (0.8, 0.9, 2.5),
           origin: Sequence[float] = (-10.0, 20.0, 30.0),
           direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction])
    return image


@pytest.fixture(autouse=True)
def _fresh_sessions() -> None:
    clear_cache()


# ------------------------------------------------------------------ windows and flips


def test_window_starts_cover_the_axis() -> None:
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(64, 32, 0.5) == [0, 16, 32]
    starts = window_starts(100, 32, 0.25)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 24 for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_sliding_window_equals_whole_volume_for_a_pointwise_model(
    tmp_path: Path, blending: str
) -> None:
    session = open_session(_identity(tmp_path / "id.onnx", 5))
    rng = np.random.default_rng(1)
    tensor = rng.normal(size=(2, 23, 40, 37)).astype(np.float32)
    outputs = OutputSpec(labels=[LABEL])  # type: ignore[list-item]
    whole = PreprocessingSpec()
    windowed = PreprocessingSpec(patch_size=(16, 16, 16), overlap=0.5, blending=blending,
                                 batch_size=3)
    [(s0, e0, a)] = list(predict(tensor, session.run, whole, outputs))
    [(s1, e1, b)] = list(predict(tensor, session.run, windowed, outputs))
    assert (s0, e0) == (s1, e1) == (0, 23)
    np.testing.assert_allclose(a, tensor, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, tensor, rtol=0, atol=1e-5)


def test_sliding_window_pads_inputs_smaller_than_the_patch(tmp_path: Path) -> None:
    session = open_session(_identity(tmp_path / "id.onnx", 5))
    tensor = np.arange(1 * 5 * 6 * 7, dtype=np.float32).reshape(1, 5, 6, 7)
    pre = PreprocessingSpec(patch_size=(8, 8, 8))
    [(_, _, scores)] = list(predict(tensor, session.run, pre, OutputSpec(labels=[LABEL])))
    assert scores.shape == (1, 5, 6, 7)
    np.testing.assert_allclose(scores, tensor, atol=1e-4)


def test_test_time_flips_average_flipped_predictions(tmp_path: Path) -> None:
    session = open_session(_cumsum_last(tmp_path / "cumsum.onnx", 4))
    rng = np.random.default_rng(2)
    tensor = rng.normal(size=(1, 3, 8, 9)).astype(np.float32)
    outputs = OutputSpec(labels=[LABEL])  # type: ignore[list-item]
    plain = PreprocessingSpec(dimensionality="2d", batch_size=2)
    flipped = PreprocessingSpec(dimensionality="2d", batch_size=2, tta_flips=((1,),))
    got = np.concatenate([s for _, _, s in predict(tensor, session.run, flipped, outputs)],
                         axis=1)
    base = np.concatenate([s for _, _, s in predict(tensor, session.run, plain, outputs)],
                          axis=1)
    mirror = np.flip(np.cumsum(np.flip(tensor, axis=3), axis=3), axis=3)
    np.testing.assert_allclose(base, np.cumsum(tensor, axis=3), atol=1e-5)
    np.testing.assert_allclose(got, (base + mirror) / 2, atol=1e-5)
    assert not np.allclose(got, base)


def test_two_and_a_half_d_stacks_neighbour_slices_as_channels(tmp_path: Path) -> None:
    session = open_session(_identity(tmp_path / "id.onnx", 4))
    tensor = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1) * np.ones((1, 6, 2, 3),
                                                                          dtype=np.float32)
    pre = PreprocessingSpec(dimensionality="2.5d", context_slices=1, batch_size=4)
    slabs = list(predict(tensor, session.run, pre, OutputSpec(labels=[LABEL])))
    assert [(a, b) for a, b, _ in slabs] == [(0, 4), (4, 6)]
    scores = np.concatenate([s for _, _, s in slabs], axis=1)
    # channel k of slice z holds slice z - 1 + k, clamped at the ends
    assert scores[:, :, 0, 0].tolist() == [
        [0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 5]]


def test_fixed_model_size_mismatch_is_explained(tmp_path: Path) -> None:
    path = _model([helper.make_node("Identity", ["x"], ["y"])], 5, tmp_path / "fixed.onnx",
                  in_shape=["n", 1, 16, 16, 16], out_channels=1)
    session = open_session(path)
    pre = PreprocessingSpec()
    with pytest.raises(InferenceError, match=r"expects input .*16, 16, 16.* gets .*10, 12, 14"):
        list(predict(np.zeros((1, 10, 12, 14), np.float32), session.run, pre,
                     OutputSpec(labels=[LABEL]), input_shape=session.input_shape))


# ------------------------------------------------------------------ pre-processing


def test_resize_grid_keeps_the_extent_and_maps_centres_like_skimage() -> None:
    image = _image(np.zeros((10, 20, 30)), spacing=(1.0, 2.0, 3.0), origin=(0, 0, 0))
    model = prepare([image], PreprocessingSpec(resize=(15, 10, 5), antialias=False))
    grid = model.grid
    assert grid.GetSize() == (15, 10, 5)
    np.testing.assert_allclose(grid.GetSpacing(), (2.0, 4.0, 6.0))
    # first output centre sits at input index (0 + 0.5) * factor - 0.5 = 0.5 on each axis
    np.testing.assert_allclose(grid.GetOrigin(), (0.5, 1.0, 1.5))
    assert model.tensor.shape == (1, 5, 10, 15)
    assert not model.identity


def test_orientation_crop_and_axes() -> None:
    array = np.zeros((6, 8, 10), np.float32)
    array[2:4, 3:6, 4:9] = 100.0
    image = _image(array)
    model = prepare([image], PreprocessingSpec(
        orientation="RAS", axes="xyz", crop=CropSpec(to="bbox", threshold=50.0, margin_mm=0.0)))
    # RAS flips x and y; the crop keeps the 5 x 3 x 2 box; xyz puts x first.
    assert model.tensor.shape == (1, 5, 3, 2)
    assert float(model.tensor.min()) == 100.0
    direction = np.array(model.grid.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(np.diag(direction), (-1, -1, 1))


def test_same_grid_needs_no_copy() -> None:
    image = _image(np.ones((3, 4, 5)))
    model = prepare([image], PreprocessingSpec())
    assert model.identity
    assert not model.tensor.flags.writeable  # a view of the image, not a copy


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (IntensitySpec(method="window", window=(-100, 100)), [-100, -100, 0, 100, 100]),
        (IntensitySpec(method="window", window=(-100, 100), rescale=True),
         [0, 0, 0.5, 1, 1]),
        (IntensitySpec(method="divide_max"), [-2.5, -0.25, 0, 0.25, 1]),
        (IntensitySpec(method="percentile", percentiles=(0, 100)),
         [0, 9 / 14, 10 / 14, 11 / 14, 1]),
    ],
)
def test_intensity_methods(spec: IntensitySpec, expected: list[float]) -> None:
    values = np.array([-1000, -100, 0, 100, 400], np.float32)
    np.testing.assert_allclose(normalise(values, spec), expected, atol=1e-6)


def test_zscore_over_voxels_above_a_threshold() -> None:
    values = np.array([-1000, -1000, 10, 20, 30], np.float32)
    out = normalise(values, IntensitySpec(method="zscore", threshold=-500))
    np.testing.assert_allclose(out[2:], [-1.2247449, 0, 1.2247449], atol=1e-5)


# ------------------------------------------------------------------ post-processing


def test_clean_mask_components_volume_and_holes() -> None:
    mask = np.zeros((4, 20, 20), bool)
    mask[:, 2:12, 2:12] = True      # 400 voxels with a hole
    mask[1:3, 5:8, 5:8] = False     # the hole (enclosed in 3D)
    mask[:, 15:18, 15:18] = True    # 36 voxels
    mask[0, 0, 19] = True           # 1 voxel
    spacing = (1.0, 1.0, 1.0)
    largest = clean_mask(mask, spacing, PostprocessingSpec(largest_components=1))
    assert largest.sum() == 400 - 18 and not largest[:, 15:18, 15:18].any()
    big = clean_mask(mask, spacing, PostprocessingSpec(min_volume_ml=0.002))
    assert big.sum() == 400 - 18 + 36 and not big[0, 0, 19]
    filled = clean_mask(mask, spacing, PostprocessingSpec(fill_holes="volume"))
    assert filled[1:3, 5:8, 5:8].all() and filled.sum() == 400 + 36 + 1
    per_slice = clean_mask(mask, spacing, PostprocessingSpec(fill_holes="slice"))
    assert per_slice[1:3, 5:8, 5:8].all()


def test_slice_fill_leaves_open_channels() -> None:
    mask = np.zeros((3, 10, 10), bool)
    mask[:, 2:8, 2:8] = True
    mask[:, 4:6, 4:6] = False  # a tube through every slice: a hole in 2D, not in 3D
    spacing = (1.0, 1.0, 1.0)
    assert clean_mask(mask, spacing, PostprocessingSpec(fill_holes="slice"))[:, 4:6, 4:6].all()
    assert not clean_mask(mask, spacing, PostprocessingSpec(fill_holes="volume"))[:, 4, 4].any()


def _label(value: int, **postprocessing: object) -> LabelSpec:
    return LabelSpec.model_validate({**LABEL, "value": value, "channel": None,
                                     "name": f"L{value}", "postprocessing": postprocessing})


def test_label_map_structures_are_cleaned_like_separate_masks() -> None:
    """Structures of one label map (an argmax, a framework's labels) are views of it, cleaned
    exactly as their separate masks would be; a fill over another label gets its own mask."""
    labels = np.zeros((6, 30, 30), np.uint8)
    labels[:, 2:12, 2:12] = 1
    labels[:, 5:8, 5:8] = 0            # a hole of background in every slice of label 1
    labels[2:4, 20:22, 2:4] = 1        # a small second region of label 1
    labels[1:5, 15:27, 15:27] = 2
    labels[2:4, 19:23, 19:23] = 3      # label 3 inside label 2 (a hole of label 2)
    labels[0, 28:30, 0:2] = 3          # a 4-voxel region of label 3
    specs = [_label(1, largest_components=1, fill_holes="slice"),
             _label(2, fill_holes="volume"), _label(3, min_volume_ml=0.01), _label(4)]
    spacing = (1.0, 1.0, 1.0)
    original = labels.copy()
    structures = structures_of_label_map(specs, labels, spacing)
    for spec, structure in zip(specs, structures, strict=True):
        expected = clean_mask(original == spec.value, spacing, spec.postprocessing)
        np.testing.assert_array_equal(structure.mask, expected, err_msg=spec.name)
        assert structure.voxel_count == int(expected.sum())
        assert structure.volume_ml == pytest.approx(expected.sum() / 1000.0)
        for z in range(labels.shape[0]):
            np.testing.assert_array_equal(structure.plane(z), expected[z])
    # label 2's filled hole covers label 3: its own mask; the others stay views of the map
    assert [isinstance(s.voxels, LabelMask) for s in structures] == [True, False, True, True]
    assert structures[0].mask[:, 5:8, 5:8].all() and not structures[0].mask[2, 20, 2]
    assert structures[1].mask[2:4, 19:23, 19:23].all()
    assert structures[2].voxel_count == 2 * 4 * 4 and structures[3].voxel_count == 0
    np.testing.assert_array_equal(np.unique(labels), [0, 1, 2, 3])


def test_argmax_on_the_identity_grid_shares_one_label_map(tmp_path: Path) -> None:
    """An argmax on the source grid, slab by slab: each structure a view of one uint8 label
    map. Channels [0.6, x, 1 - x]: label 1 where x > 0.6, 2 where x < 0.4, else none."""
    inits = [helper.make_tensor("k", TensorProto.FLOAT, [], [0.6]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    nodes = [helper.make_node("Sub", ["x", "x"], ["zero"]),
             helper.make_node("Add", ["zero", "k"], ["c0"]),
             helper.make_node("Sub", ["one", "x"], ["c2"]),
             helper.make_node("Concat", ["c0", "x", "c2"], ["y"], axis=1)]
    path = _model(nodes, 4, tmp_path / "three.onnx", inits, out_channels=3)
    labels = [{**LABEL, "value": v, "channel": None, "name": f"L{v}"} for v in (1, 2)]
    folder = _package(tmp_path / "argmax2d", path,
                      preprocessing={"dimensionality": "2d", "batch_size": 3},
                      outputs={"activation": "none", "decision": "argmax", "labels": labels})
    array = np.random.default_rng(5).uniform(0, 1, size=(7, 9, 11)).astype(np.float32)
    result = segment(load_card(folder), [_image(array)])
    expected = np.where(array > 0.6, 1, np.where(array < 0.4, 2, 0))
    shared = result.shared_label_map()
    assert shared is not None and shared.dtype == np.uint8
    assert all(isinstance(s.voxels, LabelMask) for s in result.structures)
    for structure in result.structures:
        np.testing.assert_array_equal(structure.mask, expected == structure.label.value)
        assert structure.voxel_count == int(np.count_nonzero(expected == structure.label.value))
    np.testing.assert_array_equal(result.label_map(), expected)


# ------------------------------------------------------------------ whole runs


def _threshold_card(tmp_path: Path, model: Path, **pre: object) -> Path:
    return _package(tmp_path / "thresh", model, preprocessing=pre,
                    outputs={"activation": "none", "decision": "threshold", "threshold": 0.5,
                             "labels": [LABEL]})


def test_oblique_source_resized_and_back_lands_on_the_source_grid(tmp_path: Path) -> None:
    """A model on a reoriented, resized grid: the mask comes back on the source grid."""
    angle = np.deg2rad(20)
    row = (np.cos(angle), np.sin(angle), 0.0)
    col = (0.0, 0.0, -1.0)
    normal = tuple(np.cross(row, col))
    direction = np.array([row, col, normal]).T.ravel()
    zz, yy, xx = np.mgrid[0:30, 0:40, 0:50]
    ball = ((zz - 15) / 10) ** 2 + ((yy - 20) / 12) ** 2 + ((xx - 25) / 15) ** 2 <= 1
    source = _image(ball * 1.0, spacing=(0.7, 0.8, 1.5), direction=direction)
    card = load_card(_threshold_card(tmp_path, _identity(tmp_path / "id.onnx", 5),
                                     orientation="LPS", resize=[32, 32, 32], antialias=False))
    result = segment(card, [source])
    assert result.geometry.size == source.GetSize()
    mask = result.structures[0].mask
    assert mask.shape == ball.shape
    dice = 2 * (mask & ball).sum() / (mask.sum() + ball.sum())
    assert dice > 0.95
    np.testing.assert_allclose(result.structures[0].volume_ml,
                               ball.sum() * 0.7 * 0.8 * 1.5 / 1000, rtol=0.05)
    label_image = result.label_image()
    assert label_image.GetSize() == source.GetSize()
    np.testing.assert_allclose(label_image.GetDirection(), source.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(label_image.GetOrigin(), source.GetOrigin(), atol=1e-9)


def test_identity_grid_decides_per_slab_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    array = rng.uniform(0, 1, size=(7, 9, 11)).astype(np.float32)
    card = load_card(_threshold_card(tmp_path, _identity(tmp_path / "id.onnx", 4),
                                     dimensionality="2d", batch_size=3))
    result = segment(card, [_image(array)])
    np.testing.assert_array_equal(result.structures[0].mask, array > 0.5)
    assert result.timings.session_run > 0
    assert result.timings.total >= result.timings.session_run


def test_argmax_with_softmax_and_crop(tmp_path: Path) -> None:
    """Two output channels [0, x]: softmax + argmax labels voxels with x > 0; a crop to the
    bounding box pastes the result back, the rest is background."""
    zero = helper.make_node("Sub", ["x", "x"], ["z"])
    cat = helper.make_node("Concat", ["z", "x"], ["y"], axis=1)
    path = _model([zero, cat], 5, tmp_path / "two.onnx", out_channels=2)
    label = {**LABEL, "channel": None}
    folder = _package(tmp_path / "argmax", path,
                      preprocessing={"crop": {"to": "bbox", "threshold": 0.0, "margin_mm": 2}},
                      outputs={"activation": "softmax", "decision": "argmax", "labels": [label]})
    array = np.full((10, 12, 14), -5.0, np.float32)
    array[3:6, 4:8, 5:9] = 3.0
    result = segment(load_card(folder), [_image(array)])
    np.testing.assert_array_equal(result.structures[0].mask, array > 0)


def test_model_with_too_few_channels_is_reported(tmp_path: Path) -> None:
    label = {**LABEL, "channel": 2}
    folder = _package(tmp_path / "few", _identity(tmp_path / "id.onnx", 5),
                      outputs={"labels": [label]})
    with pytest.raises(InferenceError, match=r"outputs 1 channel.*use channel 2"):
        segment(load_card(folder), [_image(np.zeros((4, 5, 6)))])


# ------------------------------------------------------------------ providers


def test_one_log_line_names_the_provider_and_why_others_were_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    configured = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    choice = choose_providers(configured)
    with caplog.at_level(logging.INFO, logger="dicomnode.inference"):
        session = open_session(_identity(tmp_path / "id.onnx", 5), providers=configured,
                               label="probe 1")
        open_session(tmp_path / "id.onnx", providers=configured, label="probe 1")  # cached
    lines = [r.getMessage() for r in caplog.records if r.name == "dicomnode.inference"]
    assert len(lines) == 1
    assert lines[0].startswith(f"model probe 1 runs on {session.provider}")
    assert session.provider == choice.providers[0]
    for name, reason in choice.skipped:
        assert f"{name} skipped: {reason}" in lines[0]
    if session.provider == "CPUExecutionProvider":
        assert "CUDAExecutionProvider skipped" in lines[0]


def test_cpu_only_configuration_skips_nothing(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dicomnode.inference"):
        session = open_session(_identity(tmp_path / "id.onnx", 5),
                               providers=["CPUExecutionProvider"])
    assert session.provider == "CPUExecutionProvider"
    assert "skipped" not in caplog.records[-1].getMessage()


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Dense 1D sampled-Gaussian blur (truncated at 4 sigma, edges clamped) as a matrix."""
    radius = max(1, int(4 * sigma + 0.5))
    matrix = np.zeros((n, n))
    for i in range(n):
        for k in range(-radius, radius + 1):
            matrix[i, min(max(i + k, 0), n - 1)] += np.exp(-0.5 * (k / sigma) ** 2)
    return matrix / matrix.sum(axis=1, keepdims=True)


def test_antialias_gaussian_is_the_sampled_gaussian_of_scipy_and_skimage() -> None:
    from dicomnode.inference.preprocess import _smooth

    rng = np.random.default_rng(4)
    array = rng.normal(size=(12, 14, 16))
    image = _image(array)
    ours = sitk.GetArrayFromImage(_smooth(image, np.array([0.6, 0.0, 1.3])))
    # Independent check: dense blur matrices along x (axis 2) and z (axis 0).
    expected = np.einsum("ij,zyj->zyi", _blur_matrix(16, 0.6), array)
    expected = np.einsum("ij,jyx->iyx", _blur_matrix(12, 1.3), expected)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # Sigmas too small to matter are skipped.
    assert _smooth(image, np.array([0.2, 0.2, 0.2])) is image


def test_pip_installed_cuda_libraries_are_preloaded_before_the_probe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA and cuDNN from pip wheels (onnxruntime-gpu[cuda,cudnn]) load only after
    # onnxruntime.preload_dlls(): the probe must call it before loading libraries by name
    import ctypes

    from dicomnode.inference import runtime

    events: list[str] = []
    monkeypatch.setattr(runtime, "_PRELOADED", [])
    monkeypatch.setattr(runtime, "_pip_cuda_installed", lambda: True)
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda: events.append("preload"),
                        raising=False)
    real_cdll = ctypes.CDLL

    def probe(name: str, *args: object, **kwargs: object) -> object:
        events.append(f"load {name}")
        return real_cdll(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime.ctypes, "CDLL", probe)
    runtime.choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    runtime.choose_providers(["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" not in runtime.ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to probe")
    assert events[0] == "preload" and events.count("preload") == 1
    assert any(e.startswith("load libcudart") for e in events[1:])


def test_io_binding_gives_the_outputs_of_a_plain_run(tmp_path: Path) -> None:
    """The GPU path's IO binding, exercised on the CPU device: same numbers as session.run."""
    session = open_session(_cumsum_last(tmp_path / "cumsum.onnx", 5))
    batch = np.random.default_rng(2).normal(size=(2, 1, 5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(session.run_bound(batch), session.run(batch))
    assert not session.io_binding  # on the CPU a plain run is as good


def test_gpu_provider_options_follow_the_card_and_the_settings(tmp_path: Path) -> None:
    """TensorRT: fp16 only where both the card and the node allow it, the engine cache, and an
    optimisation profile for a sliding-window model's one window shape."""
    from dicomnode.inference.runtime import GpuSettings, provider_options, window_shape

    folder = _package(tmp_path / "patched", _identity(tmp_path / "id.onnx", 5),
                      preprocessing={"patch_size": [32, 64, 48], "batch_size": 2},
                      runtime={"fp16": True})
    card = load_card(folder)
    window = window_shape(card)
    assert window is not None and window.spatial == (32, 64, 48) and window.max_batch == 2
    cache = tmp_path / "trt"
    trt = provider_options("TensorrtExecutionProvider", GpuSettings(device_id=1,
                           engine_cache=cache), input_name="x", window=window,
                           fp16=card.runtime.fp16)
    assert trt["trt_fp16_enable"] == "1" and trt["device_id"] == "1"
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_engine_cache_path"] == str(cache)
    assert trt["trt_profile_min_shapes"] == "x:1x1x32x64x48"
    assert trt["trt_profile_max_shapes"] == trt["trt_profile_opt_shapes"] == "x:2x1x32x64x48"
    no_fp16 = provider_options("TensorrtExecutionProvider", GpuSettings(fp16=False),
                               input_name="x", window=window, fp16=True)
    assert no_fp16["trt_fp16_enable"] == "0" and "trt_engine_cache_path" not in no_fp16
    whole = load_card(_package(tmp_path / "whole", _identity(tmp_path / "id2.onnx", 5)))
    assert window_shape(whole) is None and whole.runtime.fp16 is False
    assert "trt_profile_min_shapes" not in provider_options(
        "TensorrtExecutionProvider", GpuSettings(), input_name="x", window=None, fp16=False)
    cuda = provider_options("CUDAExecutionProvider", GpuSettings(device_id=3), input_name="x",
                            window=window, fp16=True)
    assert cuda["device_id"] == "3" and cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert provider_options("CPUExecutionProvider", GpuSettings(), input_name="x",
                            window=window, fp16=True) == {}
