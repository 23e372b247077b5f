"""Tests of `models/brain-mr/model.onnx`: deepbrain 0.1 converted by tools/convert_deepbrain.py.

Default tests need numpy + onnxruntime (and onnx / protobuf where said); the comparison against the
numpy interpreter of deepbrain's own ``graph.pb`` is marked slow and runs only when
``DEEPBRAIN_WHEEL`` points at ``deepbrain-0.1-py3-none-any.whl``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "brain-mr"
MODEL = MODEL_DIR / "model.onnx"


conv = load_tool("convert_deepbrain")


@pytest.fixture(scope="module")
def session() -> Any:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])


def test_model_files_present() -> None:
    assert MODEL.is_file()
    assert 600_000 < MODEL.stat().st_size < 800_000  # 171,465 float32 + graph
    lic = (MODEL_DIR / "LICENSE").read_text()
    assert "MIT License" in lic and "Copyright (c) 2018 Ivan Itzcovich" in lic
    prov = (MODEL_DIR / "PROVENANCE.md").read_text()
    assert conv.WHEEL_SHA256 in prov and conv.GRAPH_SHA256 in prov


def test_io_names_and_shapes(session: Any) -> None:
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "image" and out.name == "prob"
    assert inp.type == out.type == "tensor(float)"
    assert inp.shape[1:] == out.shape[1:] == [1, 128, 128, 128]
    assert isinstance(inp.shape[0], str)  # dynamic batch
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["parameters"] == "171465" and meta["license"] == "MIT"


def test_parameter_count() -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 0]
    assert sum(sizes) == 171_465
    assert len(sizes) == 23  # 13 kernels + 10 biases (the transposed convs have none)


def test_synthetic_head_gives_probability_map(session: Any) -> None:
    volume = conv.synthetic_head()
    assert volume.shape == (128, 128, 128) and volume.max() == pytest.approx(1.0)
    (prob,) = session.run(["prob"], {"image": volume[None, None]})
    assert prob.shape == (1, 1, 128, 128, 128) and prob.dtype == np.float32
    assert np.isfinite(prob).all()
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    p = prob[0, 0]
    assert p[56:72, 56:72, 56:72].mean() > 0.5  # the centre of the bright ellipsoid
    assert (p[:8, :8, :8] < 0.01).all() and (p[-8:, -8:, -8:] < 0.01).all()  # air


# --- the reference kernels, checked without the wheel ------------------------------------------


@pytest.mark.parametrize("size", [4, 5])
def test_backprop_input_is_adjoint_of_same_conv(size: int) -> None:
    """<conv(x), y> == <x, conv_transpose(y)> for TF SAME, stride 2, odd and even sizes."""
    rng = np.random.default_rng(size)
    x = rng.normal(size=(1, size, size + 1, size, 3))
    w = rng.normal(size=(3, 3, 3, 3, 2))
    fwd = conv.conv3d(x, w, (2, 2, 2), "SAME")
    assert fwd.shape[1:4] == tuple(-(-s // 2) for s in x.shape[1:4])
    y = rng.normal(size=fwd.shape)
    back = conv.conv3d_backprop_input(x.shape, w, y, (2, 2, 2), "SAME")
    assert back.shape == x.shape
    assert np.vdot(fwd, y) == pytest.approx(np.vdot(x, back), rel=1e-12)


def test_tf_same_transpose_keeps_first_2n() -> None:
    """TF SAME k=3 s=2 transposed conv == unpadded transposed conv cropped to its first 2n."""
    rng = np.random.default_rng(7)
    n, cin, cout = 4, 3, 2
    dy = rng.normal(size=(1, n, n, n, cin))
    w = rng.normal(size=(3, 3, 3, cout, cin))  # DHW, out, in (Conv3DBackpropInput layout)
    full = np.zeros((1, 2 * n + 1, 2 * n + 1, 2 * n + 1, cout))
    for i, j, k in itertools.product(range(n), repeat=3):
        full[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, 2 * k : 2 * k + 3] += np.einsum(
            "abcoi,i->abco", w, dy[0, i, j, k]
        )
    tf_out = conv.conv3d_backprop_input((1, 2 * n, 2 * n, 2 * n, cout), w, dy, (2, 2, 2), "SAME")
    np.testing.assert_allclose(tf_out, full[:, : 2 * n, : 2 * n, : 2 * n], rtol=1e-12)
    assert conv.tf_padding(2 * n, 3, 2, 1, "SAME") == (n, 0, 1)  # TF pads more at the end


def test_interpreter_on_a_tiny_graphdef() -> None:
    """Minimal schema round trip + interpreter: Conv3D, BiasAdd, Relu, MaxPool3D, Sigmoid."""
    pytest.importorskip("google.protobuf")
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 3, 1, 2)).astype(np.float32)
    graph = conv.graphdef_class()()

    def node(name: str, op: str, *inputs: str) -> Any:
        n = graph.node.add(name=name, op=op)
        n.input.extend(inputs)
        return n

    img = node("img", "Placeholder")
    img.attr["dtype"].type = 1
    k = node("k", "Const")
    k.attr["value"].tensor.dtype = 1
    k.attr["value"].tensor.tensor_shape.dim.add(size=3)
    for s in kernel.shape[1:]:
        k.attr["value"].tensor.tensor_shape.dim.add(size=s)
    k.attr["value"].tensor.tensor_content = kernel.tobytes()
    b = node("b", "Const")
    b.attr["value"].tensor.dtype = 1
    b.attr["value"].tensor.tensor_shape.dim.add(size=2)
    b.attr["value"].tensor.float_val.append(0.25)  # one value, broadcast (TF semantics)
    c = node("c", "Conv3D", "img", "k")
    c.attr["padding"].s = b"SAME"
    c.attr["strides"].list.i.extend([1, 1, 1, 1, 1])
    node("ba", "BiasAdd", "c", "b")
    node("r", "Relu", "ba")
    p = node("p", "MaxPool3D", "r")
    p.attr["padding"].s = b"VALID"
    p.attr["ksize"].list.i.extend([1, 2, 2, 2, 1])
    p.attr["strides"].list.i.extend([1, 2, 2, 2, 1])
    node("prob", "Sigmoid", "p")

    parsed = conv.parse_graphdef(graph.SerializeToString())
    np.testing.assert_array_equal(conv.attr(parsed.node[1], "value"), kernel)
    np.testing.assert_array_equal(conv.attr(parsed.node[2], "value"), [0.25, 0.25])
    x = rng.normal(size=(1, 4, 4, 4, 1))
    (got,) = conv.GraphInterpreter(parsed).run(["prob"], {"img": x})

    xp = np.pad(x[0, ..., 0], 1)
    ref = np.zeros((4, 4, 4, 2))
    for i, j, kk in itertools.product(range(4), repeat=3):
        ref[i, j, kk] = np.einsum(
            "abc,abco->o", xp[i : i + 3, j : j + 3, kk : kk + 3], kernel[..., 0, :]
        )
    ref = np.maximum(ref + 0.25, 0).reshape(2, 2, 2, 2, 2, 2, 2).max(axis=(1, 3, 5))
    np.testing.assert_allclose(got[0], 1 / (1 + np.exp(-ref)), rtol=1e-6)


# --- the real comparison (needs the wheel) ------------------------------------------------------


@pytest.mark.slow
def test_onnx_matches_numpy_execution_of_graph_pb() -> None:
    wheel = os.environ.get("DEEPBRAIN_WHEEL")
    if not wheel or not Path(wheel).is_file():
        pytest.skip("set DEEPBRAIN_WHEEL to deepbrain-0.1-py3-none-any.whl")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("google.protobuf")
    contents = conv.read_wheel(Path(wheel))
    graph = conv.parse_graphdef(contents.graph_bytes)
    conv.check_topology(graph)
    result = conv.compare(graph, MODEL, conv.synthetic_head(), "phantom")
    assert result.max_abs < 1e-5
    assert result.mask_mismatch == 0
