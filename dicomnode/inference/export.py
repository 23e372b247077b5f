"""Export a trained PyTorch network to an ONNX file that ONNX Runtime runs as torch does.

Used by the importers (``dicomnode models import``); it needs torch and onnx (the ``import``
extra), the node that runs the exported package needs neither.

ONNX Runtime's CPU ``InstanceNormalization`` sums its statistics in float32, one element
after the other. Over the hundreds of thousands of voxels of a feature map the mean is then
off by about 1e-5 of its size, and where a channel is nearly constant (air, background, zero
padding) its deviations are that small too: 5e-4 to 6e-3 in logits on nnU-Net networks,
where torch (pairwise sums) is at 1e-6. :func:`precise_instance_norm` rewrites each such node
in two passes (the mean, then the mean of the squared deviations) with both reductions
accumulated in float64; inputs, outputs and everything else stay float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

__all__ = ["MAX_IR_VERSION", "export_network", "precise_instance_norm"]

#: The newest ONNX IR version ONNX Runtime 1.20+ loads (onnx's helpers may write newer).
MAX_IR_VERSION = 10


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=17)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            ranks[info.name] = len(tensor.shape.dim)
    return ranks


def _mean64(source: str, target: str, axes: list[int], opset: int,
            axes_name: str) -> list[onnx.NodeProto]:
    """Nodes making ``target``, the float32 mean of ``source`` over ``axes`` summed in
    float64 (from opset 18 the axes are the tensor ``axes_name``)."""
    wide, mean = f"{target}_f64", f"{target}_mean64"
    reduce = (helper.make_node("ReduceMean", [wide, axes_name], [mean], keepdims=1)
              if opset >= 18 else
              helper.make_node("ReduceMean", [wide], [mean], axes=axes, keepdims=1))
    return [helper.make_node("Cast", [source], [wide], to=onnx.TensorProto.DOUBLE), reduce,
            helper.make_node("Cast", [mean], [target], to=onnx.TensorProto.FLOAT)]


def precise_instance_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``InstanceNormalization`` written out in two passes.

    ``y = scale * (x - mean) / sqrt(mean((x - mean)^2) + epsilon) + bias`` over the spatial
    axes of each (sample, channel), as ``torch.nn.InstanceNorm*d`` computes it.

    Raises:
        ValueError: the rank of a normalised tensor cannot be inferred.
    """
    opset = _opset(model)
    ranks = _ranks(model)
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:  # scale/bias of an affine-free norm come as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        # parameters with equal values (a freshly initialised network's norms) are shared by
        # the exporter through Identity nodes
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, scale, bias = node.input
        rank = ranks.get(x)
        if rank is None or rank < 3:
            raise ValueError(f"InstanceNormalization node {node.name or index}: the rank of "
                             f"its input {x!r} cannot be inferred")
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"_pin{index}_"
        axes = list(range(2, rank))
        broadcast = [-1, *[1] * (rank - 2)]  # [C, 1, ..., 1]
        for name in (scale, bias):
            if name not in constants:
                raise ValueError(f"InstanceNormalization node {node.name or index}: its "
                                 f"{name!r} is not a constant")
        added += [
            numpy_helper.from_array(
                constants[scale].reshape(broadcast).astype(np.float32),
                p + "scale"),
            numpy_helper.from_array(
                constants[bias].reshape(broadcast).astype(np.float32),
                p + "bias"),
            numpy_helper.from_array(np.array(epsilon, dtype=np.float32), p + "eps"),
        ]

        if opset >= 18:
            added.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), p + "axes"))
        nodes += [
            *_mean64(x, p + "mean", axes, opset, p + "axes"),
            helper.make_node("Sub", [x, p + "mean"], [p + "dev"]),
            helper.make_node("Mul", [p + "dev", p + "dev"], [p + "sq"]),
            *_mean64(p + "sq", p + "var", axes, opset, p + "axes"),
            helper.make_node("Add", [p + "var", p + "eps"], [p + "vareps"]),
            helper.make_node("Sqrt", [p + "vareps"], [p + "std"]),
            helper.make_node("Div", [p + "dev", p + "std"], [p + "norm"]),
            helper.make_node("Mul", [p + "norm", p + "scale"], [p + "scaled"]),
            helper.make_node("Add", [p + "scaled", p + "bias"], list(node.output),
                             name=node.name),
        ]
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    # the replaced nodes' scale and bias, now unused (ONNX Runtime warns about each)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def export_network(module: Any, example: Any, path: str | Path, *, opset: int = 17,
                   input_name: str = "input", output_name: str = "logits",
                   dynamic_axes: Sequence[int] | None = None) -> onnx.ModelProto:
    """Export ``module`` (a ``torch.nn.Module`` in eval mode) run on ``example`` (a tensor
    ``(batch, channels, *spatial)``) to ``path``, with the batch and spatial axes dynamic
    (``dynamic_axes``: which axes, default all but the channels), precise instance
    normalisation, and an IR version ONNX Runtime loads. Returns the written model.

    Raises:
        ValueError: ``opset`` is below 17 or the exported graph does not check.
    """
    import torch

    if opset < 17:
        raise ValueError(f"opset must be 17 or newer, not {opset}")
    rank = example.dim()
    axes = list(dynamic_axes) if dynamic_axes is not None else [0, *range(2, rank)]
    names = {a: ("batch" if a == 0 else f"s{a - 2}") for a in axes}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: names, output_name: names},
                          do_constant_folding=True)
    model = precise_instance_norm(onnx.load(str(path)))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model
