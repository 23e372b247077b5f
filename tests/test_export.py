"""The exporter writes networks that ONNX Runtime runs as torch does, also on nearly constant
input (air, background, zero padding), where its own InstanceNormalization is off by 6e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="pip install -e '.[import]' (torch) for the "
                            "exporter's tests")

from dicomnode.inference.export import export_network, precise_instance_norm  # noqa: E402


def _network(dims: int) -> torch.nn.Module:
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d
    torch.manual_seed(0)
    net = torch.nn.Sequential(conv(1, 8, 3, padding=1), norm(8, affine=True),
                              torch.nn.LeakyReLU(0.01), conv(8, 8, 3, padding=1),
                              norm(8, affine=True), torch.nn.LeakyReLU(0.01), conv(8, 3, 1))
    with torch.no_grad():
        for module in net:
            if isinstance(module, norm):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-1.0, 1.0)
    return net.eval()


def _mostly_air(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = np.full(shape, -1.0, np.float32)  # normalised air
    x += rng.random(shape, dtype=np.float32) * np.float32(1e-3)
    x[(0, 0, *[slice(n // 3, n // 3 + 4) for n in shape[2:]])] += 1.3
    return x


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"input": x})[0]
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_matches_torch_on_mostly_air(tmp_path: Path, dims: int) -> None:
    net = _network(dims)
    x = _mostly_air((1, 1, 40, 64, 64) if dims == 3 else (1, 1, 384, 512))
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    plain = tmp_path / "plain.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.from_numpy(x),), str(plain), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])
    precise = tmp_path / "precise.onnx"
    model = export_network(net, torch.from_numpy(x), precise)
    assert not [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    assert model.ir_version <= 10
    plain_error = float(np.abs(_run(plain, x) - expected).max())
    precise_error = float(np.abs(_run(precise, x) - expected).max())
    print(f"\n{dims}D max |ORT - torch| in logits: InstanceNormalization {plain_error:.2e}, "
          f"precise {precise_error:.2e}")
    assert precise_error < 2e-5
    assert precise_error < plain_error / 10  # the node ONNX Runtime has is measurably worse


def test_spatial_axes_are_dynamic(tmp_path: Path) -> None:
    net = _network(3)
    export_network(net, torch.zeros(1, 1, 16, 16, 16), tmp_path / "net.onnx")
    x = _mostly_air((2, 1, 24, 20, 32))
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "net.onnx", x), expected, atol=2e-5)


def test_opset_18_reduce_mean_takes_axes_as_input(tmp_path: Path) -> None:
    net = _network(2)
    model = export_network(net, torch.zeros(1, 1, 32, 32), tmp_path / "net.onnx", opset=18)
    reduce = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert reduce and all(len(n.input) == 2 for n in reduce)
    x = _mostly_air((1, 1, 64, 64))
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "net.onnx", x), expected, atol=2e-5)


def test_precise_errors() -> None:
    with pytest.raises(ValueError, match="opset must be 17 or newer"):
        export_network(_network(2), torch.zeros(1, 1, 8, 8), "unused.onnx", opset=13)
    node = onnx.helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
                      onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [2]),
                      onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    with pytest.raises(ValueError, match="the rank of its input 'x' cannot be inferred"):
        precise_instance_norm(onnx.helper.make_model(graph))


def test_no_unused_initializer_is_left(tmp_path: Path) -> None:
    model = export_network(_network(3), torch.zeros(1, 1, 8, 8, 8), tmp_path / "net.onnx")
    used = {name for node in model.graph.node for name in node.input}
    assert {init.name for init in model.graph.initializer} <= used


def test_a_freshly_initialised_network_exports(tmp_path: Path) -> None:
    # every norm has scale 1 and bias 0: the exporter shares them through Identity nodes
    net = _network(3)
    with torch.no_grad():
        for module in net:
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.fill_(1.0)
                module.bias.fill_(0.0)
    export_network(net, torch.zeros(1, 1, 8, 8, 8), tmp_path / "net.onnx")
    x = _mostly_air((1, 1, 16, 16, 16))
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "net.onnx", x), expected, atol=2e-5)
