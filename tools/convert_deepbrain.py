#!/usr/bin/env python3
"""Offline converter: deepbrain's TensorFlow 1 frozen graph -> ONNX (dicomnode model ``brain-mr``).

The PyPI package ``deepbrain`` 0.1 (MIT, Ivan Itzcovich) ships ``deepbrain/models/graph.pb``, a
frozen TF1 GraphDef of a small 3D U-Net for brain extraction (skull stripping) on T1-weighted MR.
This tool converts it without TensorFlow:

1. the GraphDef is parsed with a minimal protobuf schema built here at run time (only the
   ``protobuf`` package is needed; field numbers are those of TensorFlow's ``graph.proto``,
   ``node_def.proto``, ``attr_value.proto``, ``tensor.proto`` and ``tensor_shape.proto``);
2. a numpy interpreter executes the GraphDef directly (dead-branch semantics for the dropout
   ``Switch``/``Merge`` conditionals included) and serves as the numeric reference;
3. an equivalent PyTorch network is built, the weights copied in, and exported to ONNX;
4. onnxruntime's output on the exported model is compared with the numpy reference.

Run time needs for each mode:

* ``--describe``: ``protobuf`` + ``numpy``;
* conversion: additionally ``torch`` (2.13.0 CPU was used), ``onnx`` and ``onnxruntime``.

Layouts. TF runs the network on NDHWC ``[N, 128, 128, 128, 1]``; the ONNX model takes NCDHW
``[N, 1, 128, 128, 128]``. Since C == 1 the two are the same buffer (``x_onnx =
x_tf.transpose(0, 4, 1, 2, 3)`` is a reshape) and the spatial axes keep their order: ONNX axis 2/3/4
= TF axis 1/2/3 = the array axes 0/1/2 of the volume deepbrain feeds, which is nibabel's
``get_fdata()`` array (NIfTI voxel axes i, j, k), resized with ``skimage.transform.resize(img,
(128, 128, 128), mode="constant", anti_aliasing=True)`` (order 1, i.e. trilinear), then divided by
its maximum.

Usage::

    pip download --no-deps deepbrain==0.1 -d /tmp/deepbrain
    WHEEL=/tmp/deepbrain/deepbrain-0.1-py3-none-any.whl
    python tools/convert_deepbrain.py --wheel $WHEEL --describe
    python tools/convert_deepbrain.py --wheel $WHEEL --out-dir models/brain-mr
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import platform
import sys
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

WHEEL_NAME = "deepbrain-0.1-py3-none-any.whl"
WHEEL_SHA256 = "87c10e8cf906977dfc828320fb0c319e6ff4de460235cfe33a1c04906a8890de"
GRAPH_MEMBER = "deepbrain/models/graph.pb"
GRAPH_SHA256 = "6be50752ff151808dc7f8059fef39852759de8502d831949b40e991502225a2a"
EXPECTED_PARAMS = 171_465
SIZE = 128
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 rejects IR 14; 10 is accepted by every recent release
INPUT_NAME = "image"
OUTPUT_NAME = "prob"
TOLERANCE = 1e-5

# ---------------------------------------------------------------------------------------------
# Minimal GraphDef schema (field numbers from tensorflow/core/framework/*.proto)
# ---------------------------------------------------------------------------------------------

_OPT, _REP = 1, 3  # FieldDescriptorProto labels
_DOUBLE, _FLOAT, _INT64, _UINT64, _INT32 = 1, 2, 3, 4, 5
_BOOL, _STRING, _MESSAGE, _BYTES, _UINT32 = 8, 9, 11, 12, 13

# (name, number, label, type, type_name, oneof_index)
_FieldSpec = tuple[str, int, int, int, str, int | None]

_SCHEMA: dict[str, list[_FieldSpec]] = {
    "TensorShapeProto.Dim": [
        ("size", 1, _OPT, _INT64, "", None),
        ("name", 2, _OPT, _STRING, "", None),
    ],
    "TensorShapeProto": [
        ("dim", 2, _REP, _MESSAGE, ".tfmin.TensorShapeProto.Dim", None),
        ("unknown_rank", 3, _OPT, _BOOL, "", None),
    ],
    "TensorProto": [
        ("dtype", 1, _OPT, _INT32, "", None),  # enum DataType on the wire = varint
        ("tensor_shape", 2, _OPT, _MESSAGE, ".tfmin.TensorShapeProto", None),
        ("version_number", 3, _OPT, _INT32, "", None),
        ("tensor_content", 4, _OPT, _BYTES, "", None),
        ("float_val", 5, _REP, _FLOAT, "", None),
        ("double_val", 6, _REP, _DOUBLE, "", None),
        ("int_val", 7, _REP, _INT32, "", None),
        ("string_val", 8, _REP, _BYTES, "", None),
        ("int64_val", 10, _REP, _INT64, "", None),
        ("bool_val", 11, _REP, _BOOL, "", None),
        ("half_val", 13, _REP, _INT32, "", None),
        ("uint32_val", 16, _REP, _UINT32, "", None),
        ("uint64_val", 17, _REP, _UINT64, "", None),
    ],
    "AttrValue.ListValue": [
        ("s", 2, _REP, _BYTES, "", None),
        ("i", 3, _REP, _INT64, "", None),
        ("f", 4, _REP, _FLOAT, "", None),
        ("b", 5, _REP, _BOOL, "", None),
        ("type", 6, _REP, _INT32, "", None),
        ("shape", 7, _REP, _MESSAGE, ".tfmin.TensorShapeProto", None),
        ("tensor", 8, _REP, _MESSAGE, ".tfmin.TensorProto", None),
    ],
    "AttrValue": [
        ("list", 1, _OPT, _MESSAGE, ".tfmin.AttrValue.ListValue", 0),
        ("s", 2, _OPT, _BYTES, "", 0),
        ("i", 3, _OPT, _INT64, "", 0),
        ("f", 4, _OPT, _FLOAT, "", 0),
        ("b", 5, _OPT, _BOOL, "", 0),
        ("type", 6, _OPT, _INT32, "", 0),
        ("shape", 7, _OPT, _MESSAGE, ".tfmin.TensorShapeProto", 0),
        ("tensor", 8, _OPT, _MESSAGE, ".tfmin.TensorProto", 0),
        ("placeholder", 9, _OPT, _STRING, "", 0),
    ],
    "NodeDef.AttrEntry": [
        ("key", 1, _OPT, _STRING, "", None),
        ("value", 2, _OPT, _MESSAGE, ".tfmin.AttrValue", None),
    ],
    "NodeDef": [
        ("name", 1, _OPT, _STRING, "", None),
        ("op", 2, _OPT, _STRING, "", None),
        ("input", 3, _REP, _STRING, "", None),
        ("device", 4, _OPT, _STRING, "", None),
        ("attr", 5, _REP, _MESSAGE, ".tfmin.NodeDef.AttrEntry", None),
    ],
    "VersionDef": [
        ("producer", 1, _OPT, _INT32, "", None),
        ("min_consumer", 2, _OPT, _INT32, "", None),
        ("bad_consumers", 3, _REP, _INT32, "", None),
    ],
    "GraphDef": [
        ("node", 1, _REP, _MESSAGE, ".tfmin.NodeDef", None),
        ("version", 3, _OPT, _INT32, "", None),
        ("versions", 4, _OPT, _MESSAGE, ".tfmin.VersionDef", None),
        # field 2 (FunctionDefLibrary: the tf.data pipeline) is kept as unknown bytes
    ],
}

_GRAPHDEF_CLASS: Any = None


def graphdef_class() -> Any:
    """The GraphDef message class of the minimal schema (built once, in a private pool)."""
    global _GRAPHDEF_CLASS
    if _GRAPHDEF_CLASS is not None:
        return _GRAPHDEF_CLASS
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="dicomnode_tfmin_graph.proto", package="tfmin", syntax="proto3"
    )
    top: dict[str, Any] = {}
    # parents first, so that nested messages (``Outer.Inner``) find their outer message
    for full_name, fields in sorted(_SCHEMA.items(), key=lambda item: item[0].count(".")):
        parts = full_name.split(".")
        if len(parts) == 1:
            msg = fdp.message_type.add(name=parts[0])
            top[parts[0]] = msg
        else:
            msg = top[parts[0]].nested_type.add(name=parts[1])
            if parts[1] == "AttrEntry":
                msg.options.map_entry = True
        if any(spec[5] is not None for spec in fields):
            msg.oneof_decl.add(name="value")
        for name, number, label, ftype, type_name, oneof in fields:
            fd = msg.field.add(name=name, number=number, label=label, type=ftype)
            if type_name:
                fd.type_name = type_name
            if oneof is not None:
                fd.oneof_index = oneof
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("tfmin.GraphDef")
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:
        _GRAPHDEF_CLASS = get_class(desc)
    else:  # protobuf < 4.22
        _GRAPHDEF_CLASS = message_factory.MessageFactory(pool).GetPrototype(desc)
    return _GRAPHDEF_CLASS


def parse_graphdef(data: bytes) -> Any:
    graph = graphdef_class()()
    graph.ParseFromString(data)
    return graph


# TensorFlow DataType enum values -> numpy dtypes
_DTYPES: dict[int, Any] = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    7: np.object_,
    9: np.int64,
    10: np.bool_,
    17: np.uint16,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}
_DTYPE_NAMES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    9: "int64",
    10: "bool",
    17: "uint16",
    19: "float16",
    22: "uint32",
    23: "uint64",
}


def tensor_to_numpy(tensor: Any) -> Array:
    """Decode a TensorProto (``tensor_content`` bytes or the typed repeated fields)."""
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype enum {tensor.dtype}")
    dtype = _DTYPES[tensor.dtype]
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    count = int(np.prod(shape, dtype=np.int64))
    if tensor.tensor_content:
        return (
            np.frombuffer(tensor.tensor_content, dtype=np.dtype(dtype).newbyteorder("<"))
            .astype(dtype)
            .reshape(shape)
        )
    values: Sequence[Any]
    if dtype in (np.float32,):
        values = tensor.float_val
    elif dtype is np.float64:
        values = tensor.double_val
    elif dtype in (np.int32, np.uint8, np.int16, np.int8, np.uint16):
        values = tensor.int_val
    elif dtype is np.int64:
        values = tensor.int64_val
    elif dtype is np.bool_:
        values = tensor.bool_val
    elif dtype is np.float16:
        values = np.asarray(tensor.half_val, dtype=np.uint16).view(np.float16).tolist()
    elif dtype is np.uint32:
        values = tensor.uint32_val
    elif dtype is np.uint64:
        values = tensor.uint64_val
    else:
        values = list(tensor.string_val)
    arr = np.asarray(list(values), dtype=dtype)
    if arr.size == count:
        return arr.reshape(shape)
    if arr.size == 0:
        return np.zeros(shape, dtype=dtype)
    # TF semantics: a short list is padded with its last value
    out = np.full(count, arr[-1], dtype=dtype)
    out[: arr.size] = arr
    return out.reshape(shape)


def attr(node: Any, key: str, default: Any = None) -> Any:
    """A node attribute as a plain Python value."""
    if key not in node.attr:
        return default
    value = node.attr[key]
    kind = value.WhichOneof("value")
    if kind == "s":
        return value.s.decode()
    if kind in ("i", "f", "b", "type", "placeholder"):
        return getattr(value, kind)
    if kind == "shape":
        return None if value.shape.unknown_rank else [int(d.size) for d in value.shape.dim]
    if kind == "tensor":
        return tensor_to_numpy(value.tensor)
    if kind == "list":
        lst = value.list
        for name in ("i", "f", "b", "type"):
            if len(getattr(lst, name)):
                return list(getattr(lst, name))
        if len(lst.s):
            return [s.decode() for s in lst.s]
        if len(lst.shape):
            return [[int(d.size) for d in s.dim] for s in lst.shape]
        return []
    return default


def _split_ref(ref: str) -> tuple[str, int, bool]:
    """``"^name"`` -> (name, 0, control); ``"name:1"`` -> (name, 1, False)."""
    if ref.startswith("^"):
        return ref[1:], 0, True
    name, _, port = ref.partition(":")
    return name, int(port) if port else 0, False


# ---------------------------------------------------------------------------------------------
# numpy reference kernels (NDHWC, TensorFlow padding rules)
# ---------------------------------------------------------------------------------------------


def tf_padding(
    in_size: int, k: int, stride: int, dilation: int, padding: str
) -> tuple[int, int, int]:
    """(output size, pad before, pad after) as TF computes them (SAME pads more at the end)."""
    k_eff = (k - 1) * dilation + 1
    if padding == "VALID":
        return (in_size - k_eff) // stride + 1, 0, 0
    if padding != "SAME":
        raise ValueError(f"unsupported padding {padding!r}")
    out = -(-in_size // stride)
    total = max((out - 1) * stride + k_eff - in_size, 0)
    return out, total // 2, total - total // 2


def conv3d(
    x: Array, w: Array, strides: Sequence[int], padding: str, dilations: Sequence[int] = (1, 1, 1)
) -> Array:
    """TF ``Conv3D`` (NDHWC input, DHWIO filter): a sum over kernel offsets of GEMMs."""
    n, cin = x.shape[0], x.shape[4]
    kd, kh, kw, wcin, cout = w.shape
    if wcin != cin:
        raise ValueError(f"Conv3D channel mismatch {cin} vs {wcin}")
    geo = [
        tf_padding(x.shape[1 + a], w.shape[a], strides[a], dilations[a], padding) for a in range(3)
    ]
    xp = np.pad(x, [(0, 0)] + [(g[1], g[2]) for g in geo] + [(0, 0)])
    out_shape = (n, geo[0][0], geo[1][0], geo[2][0])
    out = np.zeros((*out_shape, cout), dtype=x.dtype)
    flat = out.reshape(-1, cout)
    for a, b, c in itertools.product(range(kd), range(kh), range(kw)):
        starts = (a * dilations[0], b * dilations[1], c * dilations[2])
        view = xp[
            :,
            starts[0] : starts[0] + (out_shape[1] - 1) * strides[0] + 1 : strides[0],
            starts[1] : starts[1] + (out_shape[2] - 1) * strides[1] + 1 : strides[1],
            starts[2] : starts[2] + (out_shape[3] - 1) * strides[2] + 1 : strides[2],
            :,
        ]
        flat += view.reshape(-1, cin) @ w[a, b, c]
    return out


def conv3d_backprop_input(
    input_sizes: Sequence[int], w: Array, dy: Array, strides: Sequence[int], padding: str
) -> Array:
    """TF ``Conv3DBackpropInputV2`` (= conv3d_transpose): the adjoint of :func:`conv3d`.

    Scatters every input voxel through the kernel into the *padded* forward-input grid, then cuts
    the forward padding (before, after) away; with SAME, k=3, stride 2 the forward pad is (0, 1).
    """
    n, sd, sh, sw, cin = (int(s) for s in input_sizes)
    kd, kh, kw, wcin, cout = w.shape
    if wcin != cin or dy.shape[4] != cout:
        raise ValueError("Conv3DBackpropInput channel mismatch")
    spatial = (sd, sh, sw)
    geo = [tf_padding(spatial[a], w.shape[a], strides[a], 1, padding) for a in range(3)]
    if tuple(g[0] for g in geo) != tuple(dy.shape[1:4]):
        raise ValueError(f"out_backprop shape {dy.shape} does not match input_sizes {input_sizes}")
    padded = [spatial[a] + geo[a][1] + geo[a][2] for a in range(3)]
    yp = np.zeros((n, *padded, cin), dtype=dy.dtype)
    flat_dy = dy.reshape(-1, cout)
    d, h, wd = dy.shape[1:4]
    for a, b, c in itertools.product(range(kd), range(kh), range(kw)):
        contrib = (flat_dy @ w[a, b, c].T).reshape(n, d, h, wd, cin)
        yp[
            :,
            a : a + (d - 1) * strides[0] + 1 : strides[0],
            b : b + (h - 1) * strides[1] + 1 : strides[1],
            c : c + (wd - 1) * strides[2] + 1 : strides[2],
            :,
        ] += contrib
    return yp[
        :,
        geo[0][1] : geo[0][1] + sd,
        geo[1][1] : geo[1][1] + sh,
        geo[2][1] : geo[2][1] + sw,
        :,
    ]


def max_pool3d(x: Array, ksize: Sequence[int], strides: Sequence[int], padding: str) -> Array:
    geo = [tf_padding(x.shape[1 + a], ksize[a], strides[a], 1, padding) for a in range(3)]
    xp = np.pad(x, [(0, 0)] + [(g[1], g[2]) for g in geo] + [(0, 0)], constant_values=-np.inf)
    out: Array | None = None
    for a, b, c in itertools.product(range(ksize[0]), range(ksize[1]), range(ksize[2])):
        view = xp[
            :,
            a : a + (geo[0][0] - 1) * strides[0] + 1 : strides[0],
            b : b + (geo[1][0] - 1) * strides[1] + 1 : strides[1],
            c : c + (geo[2][0] - 1) * strides[2] + 1 : strides[2],
            :,
        ]
        out = view.copy() if out is None else np.maximum(out, view)
    assert out is not None
    return out


def _strided_slice(x: Array, begin: Array, end: Array, strides: Array, node: Any) -> Array:
    if attr(node, "ellipsis_mask", 0) or attr(node, "new_axis_mask", 0):
        raise NotImplementedError("StridedSlice with ellipsis/new-axis masks")
    bm, em, sm = (attr(node, k, 0) for k in ("begin_mask", "end_mask", "shrink_axis_mask"))
    index: list[Any] = []
    for i in range(len(begin)):
        if sm & (1 << i):
            index.append(int(begin[i]))
        else:
            index.append(
                slice(
                    None if bm & (1 << i) else int(begin[i]),
                    None if em & (1 << i) else int(end[i]),
                    int(strides[i]),
                )
            )
    return np.asarray(x[tuple(index)])


def _sigmoid(x: Array) -> Array:
    return np.exp(-np.logaddexp(0.0, -x)).astype(x.dtype)


class _Dead:
    """Marker of a tensor on an untaken branch of a Switch (TF dead-tensor semantics)."""

    def __repr__(self) -> str:
        return "DEAD"


DEAD = _Dead()


class GraphInterpreter:
    """Executes a (frozen, TF1) GraphDef with numpy: the conversion's numeric reference.

    Float tensors are computed in ``dtype`` (float64 by default, so the reference is more precise
    than TF's own float32 run). ``Switch``/``Merge`` follow TF's dead-tensor rules, so with
    ``training=False`` fed the dropout branches (``RandomUniform`` ...) are never executed.
    """

    def __init__(self, graph: Any, dtype: Any = np.float64, shapes_only: bool = False) -> None:
        self.nodes: dict[str, Any] = {n.name: n for n in graph.node}
        self.dtype = dtype
        self.shapes_only = shapes_only  # convolutions return zeros of the right shape (tracing)
        self.values: dict[str, list[Any]] = {}
        self._ops: dict[str, Callable[[Any, list[Any]], list[Any]]] = {
            "Const": self._const,
            "Identity": lambda n, i: [i[0]],
            "StopGradient": lambda n, i: [i[0]],
            "PlaceholderWithDefault": lambda n, i: [i[0]],
            "Placeholder": self._placeholder,
            "Switch": lambda n, i: [DEAD, i[0]] if bool(i[1]) else [i[0], DEAD],
            "Shape": lambda n, i: [np.asarray(i[0].shape, dtype=_DTYPES[attr(n, "out_type", 3)])],
            "StridedSlice": lambda n, i: [_strided_slice(i[0], i[1], i[2], i[3], n)],
            "Pack": lambda n, i: [np.stack(i, axis=attr(n, "axis", 0))],
            "Fill": lambda n, i: [np.full(tuple(int(v) for v in i[0]), i[1])],
            "Mul": lambda n, i: [np.multiply(i[0], i[1])],
            "Add": lambda n, i: [np.add(i[0], i[1])],
            "AddV2": lambda n, i: [np.add(i[0], i[1])],
            "Sub": lambda n, i: [np.subtract(i[0], i[1])],
            "RealDiv": lambda n, i: [np.divide(i[0], i[1])],
            "Floor": lambda n, i: [np.floor(i[0])],
            "Greater": lambda n, i: [np.greater(i[0], i[1])],
            "Relu": lambda n, i: [np.maximum(i[0], 0)],
            "Sigmoid": lambda n, i: [_sigmoid(i[0])],
            "BiasAdd": self._bias_add,
            "ConcatV2": lambda n, i: [np.concatenate(i[:-1], axis=int(i[-1]))],
            "Conv3D": self._conv3d,
            "Conv3DBackpropInputV2": self._conv3d_backprop_input,
            "MaxPool3D": self._max_pool3d,
            "RandomUniform": self._random_uniform,
        }

    # -- ops ---------------------------------------------------------------------------------
    def _const(self, node: Any, inputs: list[Any]) -> list[Any]:
        value = attr(node, "value")
        if value.dtype.kind == "f":
            value = value.astype(self.dtype)
        return [value]

    def _placeholder(self, node: Any, inputs: list[Any]) -> list[Any]:
        raise KeyError(f"placeholder {node.name!r} must be fed")

    def _bias_add(self, node: Any, inputs: list[Any]) -> list[Any]:
        if attr(node, "data_format", "NHWC").startswith("NC"):
            shape = [1, -1] + [1] * (inputs[0].ndim - 2)
            return [inputs[0] + inputs[1].reshape(shape)]
        return [inputs[0] + inputs[1]]

    def _check_ndhwc(self, node: Any) -> None:
        if attr(node, "data_format", "NDHWC") != "NDHWC":
            raise NotImplementedError(f"{node.name}: only NDHWC is supported")
        if any(d != 1 for d in attr(node, "dilations", [1] * 5)):
            raise NotImplementedError(f"{node.name}: dilations are not supported")

    def _conv3d(self, node: Any, inputs: list[Any]) -> list[Any]:
        self._check_ndhwc(node)
        strides = attr(node, "strides")[1:4]
        x, w = inputs[0], inputs[1]
        if self.shapes_only:
            geo = [
                tf_padding(x.shape[1 + a], w.shape[a], strides[a], 1, attr(node, "padding"))
                for a in range(3)
            ]
            return [np.zeros((x.shape[0], *(g[0] for g in geo), w.shape[4]), dtype=x.dtype)]
        return [conv3d(x, w, strides, attr(node, "padding"))]

    def _conv3d_backprop_input(self, node: Any, inputs: list[Any]) -> list[Any]:
        self._check_ndhwc(node)
        strides = attr(node, "strides")[1:4]
        sizes = [int(v) for v in inputs[0]]
        if self.shapes_only:
            return [np.zeros(sizes, dtype=inputs[2].dtype)]
        return [conv3d_backprop_input(sizes, inputs[1], inputs[2], strides, attr(node, "padding"))]

    def _max_pool3d(self, node: Any, inputs: list[Any]) -> list[Any]:
        self._check_ndhwc(node)
        ksize, strides = attr(node, "ksize")[1:4], attr(node, "strides")[1:4]
        return [max_pool3d(inputs[0], ksize, strides, attr(node, "padding"))]

    def _random_uniform(self, node: Any, inputs: list[Any]) -> list[Any]:
        rng = np.random.default_rng(attr(node, "seed2", 0))
        return [rng.random(tuple(int(v) for v in inputs[0])).astype(self.dtype)]

    # -- execution -----------------------------------------------------------------------------
    def _order(self, targets: Iterable[str], fed: set[str]) -> list[str]:
        """Post-order (dependencies first) of the nodes needed for ``targets``; no recursion."""
        order: list[str] = []
        state: dict[str, int] = {}
        for target in targets:
            stack: list[tuple[str, bool]] = [(target, False)]
            while stack:
                name, expanded = stack.pop()
                if expanded:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name):
                    if state[name] == 1:
                        raise ValueError(f"cycle through {name!r}")
                    continue
                state[name] = 1
                stack.append((name, True))
                if name in fed:
                    continue
                for ref in reversed(self.nodes[name].input):
                    dep = _split_ref(ref)[0]
                    if not state.get(dep):
                        stack.append((dep, False))
                    elif state[dep] == 1:
                        raise ValueError(f"cycle through {dep!r}")
        return order

    def run(self, fetches: Sequence[str], feeds: dict[str, Any]) -> list[Any]:
        """Evaluate ``fetches`` (tensor names, ``"name"`` or ``"name:port"``) given ``feeds``."""
        feed_nodes = {_split_ref(k)[0]: v for k, v in feeds.items()}
        self.values = {}
        for name in self._order([_split_ref(f)[0] for f in fetches], set(feed_nodes)):
            node = self.nodes[name]
            if name in feed_nodes:
                value = feed_nodes[name]
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    value = value.astype(self.dtype)
                self.values[name] = [value]
                continue
            data: list[Any] = []
            dead = False
            for ref in node.input:
                dep, port, control = _split_ref(ref)
                value = self.values[dep][port]
                if value is DEAD:
                    dead = True
                if not control:
                    data.append(value)
            if node.op == "Merge":
                live = [(i, v) for i, v in enumerate(data) if v is not DEAD]
                self.values[name] = [live[0][1], np.int32(live[0][0])] if live else [DEAD, DEAD]
                continue
            if dead:
                self.values[name] = [DEAD, DEAD]
                continue
            if node.op not in self._ops:
                raise NotImplementedError(f"op {node.op} ({name}) is not implemented")
            self.values[name] = self._ops[node.op](node, data)
        return [self.values[_split_ref(f)[0]][_split_ref(f)[1]] for f in fetches]

    def live_producer(self, ref: str) -> str:
        """The computing node behind ``ref`` after the last run: skips Identity, Switch, Merge."""
        name, port, _ = _split_ref(ref)
        while True:
            node = self.nodes[name]
            if node.op in ("Identity", "Switch", "StopGradient"):
                name, port, _ = _split_ref(node.input[0])
            elif node.op == "Merge":
                live = [
                    r
                    for r in node.input
                    if self.values[_split_ref(r)[0]][_split_ref(r)[1]] is not DEAD
                ]
                name, port, _ = _split_ref(live[0])
            else:
                return name if port == 0 else f"{name}:{port}"


# ---------------------------------------------------------------------------------------------
# The network as deepbrain built it (checked against the graph by check_topology)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    name: str  # TF variable scope, also the PyTorch module name
    kind: str  # "conv" (Conv3D+BiasAdd[+Relu]) or "up" (Conv3DBackpropInputV2, no bias)
    cin: int
    cout: int
    k: int
    source: str  # live producer of the layer's input
    relu: bool = True


LAYERS: tuple[Layer, ...] = (
    Layer("conv3d", "conv", 1, 8, 3, "img"),
    Layer("conv3d_1", "conv", 8, 8, 3, "conv3d/Relu"),
    Layer("conv3d_2", "conv", 8, 16, 3, "max_pooling3d/MaxPool3D"),
    Layer("conv3d_3", "conv", 16, 16, 3, "conv3d_2/Relu"),
    Layer("conv3d_4", "conv", 16, 32, 3, "max_pooling3d_1/MaxPool3D"),
    Layer("conv3d_5", "conv", 32, 32, 3, "conv3d_4/Relu"),
    Layer("conv3d_transpose", "up", 32, 32, 3, "max_pooling3d_2/MaxPool3D"),
    Layer("conv3d_6", "conv", 64, 32, 3, "concat"),
    Layer("conv3d_transpose_1", "up", 32, 16, 3, "conv3d_6/Relu"),
    Layer("conv3d_7", "conv", 32, 16, 3, "concat_1"),
    Layer("conv3d_transpose_2", "up", 16, 8, 3, "conv3d_7/Relu"),
    Layer("conv3d_8", "conv", 16, 8, 3, "concat_2"),
    Layer("conv3d_9", "conv", 8, 1, 1, "conv3d_8/Relu", relu=False),
)
POOLS = {  # pool node -> its input
    "max_pooling3d/MaxPool3D": "conv3d_1/Relu",
    "max_pooling3d_1/MaxPool3D": "conv3d_3/Relu",
    "max_pooling3d_2/MaxPool3D": "conv3d_5/Relu",
}
CONCATS = {  # concat node -> (upsampled, skip), channels-last axis
    "concat": ("conv3d_transpose/conv3d_transpose", "conv3d_5/Relu"),
    "concat_1": ("conv3d_transpose_1/conv3d_transpose", "conv3d_3/Relu"),
    "concat_2": ("conv3d_transpose_2/conv3d_transpose", "conv3d_1/Relu"),
}


@dataclass
class WheelContents:
    path: Path
    wheel_sha256: str
    graph_bytes: bytes
    graph_sha256: str
    metadata: dict[str, str]
    extractor_py: str
    year: int
    license_text: str | None = None
    notes: list[str] = field(default_factory=list)


def read_wheel(path: Path, expected_sha256: str | None = WHEEL_SHA256) -> WheelContents:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise SystemExit(f"{path}: sha256 {digest} != expected {expected_sha256}")
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        names = zf.namelist()
        graph = zf.read(GRAPH_MEMBER)
        info = zf.getinfo(GRAPH_MEMBER)
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta_text = zf.read(meta_name).decode()
        lic_names = [n for n in names if Path(n).name.upper().startswith(("LICENSE", "LICENCE"))]
        license_text = zf.read(lic_names[0]).decode() if lic_names else None
        extractor = zf.read("deepbrain/extractor.py").decode()
    metadata: dict[str, str] = {}
    for line in meta_text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(": ")
        if sep and key not in metadata:
            metadata[key] = value
    graph_sha = hashlib.sha256(graph).hexdigest()
    if graph_sha != GRAPH_SHA256:
        print(f"warning: graph.pb sha256 {graph_sha} differs from {GRAPH_SHA256}", file=sys.stderr)
    return WheelContents(
        path=path,
        wheel_sha256=digest,
        graph_bytes=graph,
        graph_sha256=graph_sha,
        metadata=metadata,
        extractor_py=extractor,
        year=info.date_time[0],
        license_text=license_text,
    )


def load_weights(graph: Any) -> dict[str, Array]:
    """Trainable tensors: float Consts named ``<layer>/kernel`` or ``<layer>/bias`` (float32)."""
    weights: dict[str, Array] = {}
    for node in graph.node:
        if node.op == "Const" and node.name.rsplit("/", 1)[-1] in ("kernel", "bias"):
            value = attr(node, "value")
            if value.dtype == np.float32:
                weights[node.name] = value
    return weights


def trace(graph: Any, size: int = SIZE) -> GraphInterpreter:
    """Run the graph once (shapes only, training=False) to learn what is live and the shapes."""
    interp = GraphInterpreter(graph, dtype=np.float32, shapes_only=True)
    x = np.zeros((1, size, size, size, 1), dtype=np.float32)
    interp.run(["prob"], {"img": x, "training": np.bool_(False)})
    return interp


def check_topology(graph: Any, interp: GraphInterpreter | None = None) -> None:
    """Assert that the live inference graph is the network :func:`build_torch_model` makes."""
    interp = interp or trace(graph)
    nodes = interp.nodes
    weights = load_weights(graph)
    problems: list[str] = []

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    def strides_of(node: Any) -> list[int]:
        return list(attr(node, "strides"))

    for layer in LAYERS:
        kernel = weights.get(f"{layer.name}/kernel")
        if layer.kind == "conv":
            expect(
                kernel is not None and kernel.shape == (layer.k,) * 3 + (layer.cin, layer.cout),
                f"{layer.name}: kernel shape",
            )
            bias = weights.get(f"{layer.name}/bias")
            expect(bias is not None and bias.shape == (layer.cout,), f"{layer.name}: bias shape")
            conv = nodes[f"{layer.name}/Conv3D"]
            expect(conv.op == "Conv3D" and attr(conv, "padding") == "SAME", f"{layer.name}: op")
            expect(strides_of(conv) == [1] * 5, f"{layer.name}: strides")
            expect(interp.live_producer(conv.input[0]) == layer.source, f"{layer.name}: input")
            expect(
                interp.live_producer(conv.input[1]) == f"{layer.name}/kernel", f"{layer.name}: w"
            )
            bias_add = nodes[f"{layer.name}/BiasAdd"]
            expect(interp.live_producer(bias_add.input[0]) == conv.name, f"{layer.name}: bias add")
            relu = nodes.get(f"{layer.name}/Relu")
            expect((relu is not None) == layer.relu, f"{layer.name}: relu")
        else:
            expect(
                kernel is not None and kernel.shape == (layer.k,) * 3 + (layer.cout, layer.cin),
                f"{layer.name}: kernel shape",
            )
            expect(f"{layer.name}/bias" not in weights, f"{layer.name}: unexpected bias")
            up = nodes[f"{layer.name}/conv3d_transpose"]
            expect(
                up.op == "Conv3DBackpropInputV2" and attr(up, "padding") == "SAME",
                f"{layer.name}: op",
            )
            expect(strides_of(up) == [1, 2, 2, 2, 1], f"{layer.name}: strides")
            expect(interp.live_producer(up.input[2]) == layer.source, f"{layer.name}: input")
            expect(interp.live_producer(up.input[1]) == f"{layer.name}/kernel", f"{layer.name}: w")
    for name, source in POOLS.items():
        pool = nodes[name]
        expect(pool.op == "MaxPool3D" and attr(pool, "padding") == "VALID", f"{name}: op")
        expect(list(attr(pool, "ksize")) == [1, 2, 2, 2, 1] == strides_of(pool), f"{name}: window")
        expect(interp.live_producer(pool.input[0]) == source, f"{name}: input")
    for name, sources in CONCATS.items():
        concat = nodes[name]
        expect(concat.op == "ConcatV2" and attr(concat, "N") == 2, f"{name}: op")
        got = tuple(interp.live_producer(r) for r in concat.input[:2])
        expect(got == sources, f"{name}: inputs {got}")
        axis = attr(nodes[concat.input[2]], "value")
        expect(int(axis) in (-1, 4), f"{name}: axis {axis}")
    prob = nodes["prob"]
    expect(
        prob.op == "Sigmoid" and interp.live_producer(prob.input[0]) == "conv3d_9/BiasAdd",
        "prob: sigmoid of conv3d_9",
    )
    n_params = sum(int(w.size) for w in weights.values())
    expect(n_params == EXPECTED_PARAMS, f"parameter count {n_params} != {EXPECTED_PARAMS}")
    expect(len(weights) == 23, f"{len(weights)} weight tensors, expected 23")
    if problems:
        raise SystemExit("graph does not match the expected network:\n  " + "\n  ".join(problems))


def describe(graph: Any, size: int = SIZE) -> str:
    """Human-readable summary: ops, placeholders, weights, and the live inference path."""
    lines: list[str] = []
    versions = graph.versions
    lines.append(
        f"GraphDef: {len(graph.node)} nodes, producer {versions.producer}, "
        f"min_consumer {versions.min_consumer}"
    )
    ops = Counter(n.op for n in graph.node)
    lines.append("ops: " + ", ".join(f"{op} x{c}" for op, c in ops.most_common()))
    lines.append("placeholders:")
    for node in graph.node:
        if node.op.startswith("Placeholder"):
            dtype = _DTYPE_NAMES.get(attr(node, "dtype"), "?")
            default = f", default <- {node.input[0]}" if node.input else ""
            if node.name == "training":
                default += " (= True: deepbrain feeds training=False)"
            lines.append(f"  {node.name}: {node.op} {dtype} {attr(node, 'shape')}{default}")
    weights = load_weights(graph)
    lines.append("weights (float32 Const):")
    for name, w in weights.items():
        lines.append(f"  {name:32s} {list(w.shape)!s:22s} {w.size:7d}")
    lines.append(f"  total parameters: {sum(int(w.size) for w in weights.values()):,}")
    interp = trace(graph, size)
    lines.append(f"inference path (training=False, img [1,{size},{size},{size},1], NDHWC):")
    compute = {
        "Conv3D",
        "BiasAdd",
        "Relu",
        "MaxPool3D",
        "Conv3DBackpropInputV2",
        "ConcatV2",
        "Sigmoid",
    }
    for node in graph.node:
        value = interp.values.get(node.name, [DEAD])[0]
        if node.op not in compute or value is DEAD:
            continue
        srcs = [interp.live_producer(r) for r in node.input if not r.startswith("^")]
        if node.op == "Conv3DBackpropInputV2":
            srcs = srcs[1:]  # drop the computed output shape
        if node.op == "ConcatV2":
            srcs = srcs[:-1]
        extra = ""
        if node.op in ("Conv3D", "MaxPool3D", "Conv3DBackpropInputV2"):
            extra = f" {attr(node, 'padding')} strides={attr(node, 'strides')[1:4]}"
        lines.append(
            f"  {node.name:40s} {node.op:22s} {list(value.shape)!s:22s} <- {', '.join(srcs)}{extra}"
        )
    dead_ops = Counter(n.op for n in graph.node if interp.values.get(n.name, [DEAD])[0] is DEAD)
    lines.append(
        "not executed at inference (dropout branches, tf.data iterator, `pred`): "
        + ", ".join(f"{op} x{c}" for op, c in dead_ops.most_common())
    )
    lines.append(
        "note: `pred` = prob > ones_like(<iterator mask>) * 0.5 depends on the training "
        "iterator, so it cannot be fetched at inference; threshold `prob` at 0.5 instead."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# PyTorch model and ONNX export
# ---------------------------------------------------------------------------------------------


def build_torch_model(weights: dict[str, Array]) -> Any:
    """The deepbrain U-Net in PyTorch (NCDHW), weights copied from the TF tensors."""
    import torch
    from torch import nn

    class TFSameConvTranspose3d(nn.Module):
        """TF ``conv3d_transpose(padding="SAME")``: full transposed conv, then TF's crop.

        PyTorch's ``padding`` crops symmetrically; TF's SAME forward pad for k=3, stride 2 is
        (0 before, 1 after), so the transposed result keeps the *first* 2n voxels of the 2n+1.
        """

        def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
            super().__init__()
            self.conv = nn.ConvTranspose3d(cin, cout, k, stride=stride, padding=0, bias=False)
            total = max(k - stride, 0)
            self.crop_begin, self.crop_end = total // 2, total - total // 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            b, e = self.crop_begin, self.crop_end
            stop = -e if e else None
            cropped: torch.Tensor = y[:, :, b:stop, b:stop, b:stop]
            return cropped

    class DeepBrainUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict()
            for layer in LAYERS:
                if layer.kind == "conv":
                    module: nn.Module = nn.Conv3d(
                        layer.cin, layer.cout, layer.k, padding=layer.k // 2
                    )
                else:
                    module = TFSameConvTranspose3d(layer.cin, layer.cout, layer.k, 2)
                self.layers[layer.name] = module
            self.pool = nn.MaxPool3d(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            L = self.layers
            e1 = torch.relu(L["conv3d_1"](torch.relu(L["conv3d"](x))))
            e2 = torch.relu(L["conv3d_3"](torch.relu(L["conv3d_2"](self.pool(e1)))))
            e3 = torch.relu(L["conv3d_5"](torch.relu(L["conv3d_4"](self.pool(e2)))))
            u3 = L["conv3d_transpose"](self.pool(e3))
            d3 = torch.relu(L["conv3d_6"](torch.cat([u3, e3], dim=1)))
            u2 = L["conv3d_transpose_1"](d3)
            d2 = torch.relu(L["conv3d_7"](torch.cat([u2, e2], dim=1)))
            u1 = L["conv3d_transpose_2"](d2)
            d1 = torch.relu(L["conv3d_8"](torch.cat([u1, e1], dim=1)))
            return torch.sigmoid(L["conv3d_9"](d1))

    model = DeepBrainUNet()
    with torch.no_grad():
        for layer in LAYERS:
            # TF Conv3D filter DHWIO -> PyTorch Conv3d OIDHW; TF conv3d_transpose filter
            # DHW(out)(in) -> PyTorch ConvTranspose3d (in)(out)DHW: the same permutation.
            kernel = np.ascontiguousarray(weights[f"{layer.name}/kernel"].transpose(4, 3, 0, 1, 2))
            module: Any = model.layers[layer.name]
            target = module.conv if layer.kind == "up" else module
            if tuple(target.weight.shape) != kernel.shape:
                raise ValueError(f"{layer.name}: {tuple(target.weight.shape)} vs {kernel.shape}")
            target.weight.copy_(torch.from_numpy(kernel))
            if layer.kind == "conv":
                target.bias.copy_(torch.from_numpy(weights[f"{layer.name}/bias"]))
    model.eval()
    return model


def export_onnx(model: Any, path: Path, wheel: WheelContents) -> Any:
    import onnx
    import torch

    dummy = torch.zeros(1, 1, SIZE, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    proto.producer_name = "dicomnode tools/convert_deepbrain.py"
    proto.doc_string = (
        "deepbrain 0.1 brain extractor (3D U-Net, MIT, Ivan Itzcovich), converted from "
        "deepbrain/models/graph.pb. Input NCDHW float32 [N,1,128,128,128]: the T1 volume resized "
        "to 128^3 and divided by its maximum; output sigmoid brain probability, threshold 0.5."
    )
    meta = {
        "source": f"PyPI {WHEEL_NAME} sha256:{wheel.wheel_sha256}",
        "source_graph": f"{GRAPH_MEMBER} sha256:{wheel.graph_sha256}",
        "license": "MIT",
        "parameters": str(EXPECTED_PARAMS),
        "input_layout": "NCDHW; spatial axes = deepbrain's array axes 0,1,2 (TF NDHWC 1,2,3)",
        "preprocessing": "resize to 128^3 (skimage order 1, anti_aliasing); divide by max",
        "postprocessing": "prob > 0.5 = brain (label 1); resize back to the original grid",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


# ---------------------------------------------------------------------------------------------
# Numeric verification
# ---------------------------------------------------------------------------------------------


def synthetic_head(size: int = SIZE, seed: int = 0) -> Array:
    """A head-like phantom (D, H, W): bright ellipsoid 'brain' in a darker 'skull/scalp' shell,
    a little noise, divided by its maximum (deepbrain's normalisation). float32 in [0, 1]."""
    grid = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    head = (z / 0.80) ** 2 + (y / 0.90) ** 2 + (x / 0.72) ** 2
    brain = (z / 0.62) ** 2 + (y / 0.74) ** 2 + (x / 0.56) ** 2
    vol = np.where(head <= 1.0, 0.35, 0.0).astype(np.float32)
    vol[brain <= 1.0] = 0.8
    vol[(brain <= 1.0) & ((z * 3) % 0.5 < 0.1)] = 0.65  # some internal structure
    vol += np.random.default_rng(seed).normal(0.0, 0.02, vol.shape).astype(np.float32)
    vol = np.clip(vol, 0.0, None)
    normalised: Array = (vol / vol.max()).astype(np.float32)
    return normalised


def reference_prob(graph: Any, volume: Array) -> Array:
    """deepbrain's ``prob`` for a (D, H, W) volume via the numpy GraphDef interpreter (float64)."""
    interp = GraphInterpreter(graph, dtype=np.float64)
    img = volume[None, ..., None]  # NDHWC, as deepbrain feeds it
    (prob,) = interp.run(["prob"], {"img": img, "training": np.bool_(False)})
    result: Array = np.asarray(prob)[0, ..., 0]
    return result


def onnx_prob(model_path: Path, volume: Array) -> Array:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: volume[None, None].astype(np.float32)})
    result: Array = np.asarray(out)[0, 0]
    return result


@dataclass
class CheckResult:
    label: str
    max_abs: float
    mean_abs: float
    mask_mismatch: int
    brain_fraction: float
    seconds_reference: float


def compare(graph: Any, model_path: Path, volume: Array, label: str) -> CheckResult:
    t0 = time.perf_counter()
    ref = reference_prob(graph, volume)
    t_ref = time.perf_counter() - t0
    got = onnx_prob(model_path, volume)
    diff = np.abs(got.astype(np.float64) - ref)
    return CheckResult(
        label=label,
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        mask_mismatch=int(np.count_nonzero((got > 0.5) != (ref > 0.5))),
        brain_fraction=float(np.mean(ref > 0.5)),
        seconds_reference=t_ref,
    )


def check_inputs() -> list[tuple[str, Array]]:
    rng = np.random.default_rng(1234)
    noise = rng.random((SIZE, SIZE, SIZE), dtype=np.float32)
    return [("synthetic head phantom", synthetic_head()), ("uniform noise U[0,1)", noise)]


# ---------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------

MIT_TEMPLATE = """MIT License

Copyright (c) {year} {holder}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def license_text(wheel: WheelContents) -> str:
    if wheel.license_text:
        return wheel.license_text
    md = wheel.metadata
    if md.get("License") != "MIT":
        raise SystemExit(f"unexpected licence in METADATA: {md.get('License')!r}")
    holder = md.get("Author", "the deepbrain authors")
    return MIT_TEMPLATE.format(year=wheel.year, holder=holder) + (
        "\n---\n"
        f"Note (dicomnode): {WHEEL_NAME} declares `License: MIT` in its METADATA (and setup.py\n"
        f'`license="MIT"`) but ships no licence file. The text above is the standard MIT licence\n'
        f"with the author named in METADATA ({holder}) and the year of the wheel's files\n"
        f"({wheel.year}). It applies to the model weights in model.onnx, derived from\n"
        f"{GRAPH_MEMBER}.\n"
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "protobuf", "torch", "onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def provenance_text(
    wheel: WheelContents, model_path: Path, proto: Any, results: list[CheckResult], command: str
) -> str:
    model_sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    versions = _versions()
    rows = "\n".join(
        f"| {r.label} | {r.max_abs:.2e} | {r.mean_abs:.2e} | {r.mask_mismatch} | "
        f"{r.brain_fraction:.3f} |"
        for r in results
    )
    opset = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    return f"""# brain-mr: provenance

## Source
- PyPI package `deepbrain` {wheel.metadata.get("Version")} ({wheel.metadata.get("Summary")}),
  author {wheel.metadata.get("Author")}, licence `{wheel.metadata.get("License")}` (METADATA),
  home page {wheel.metadata.get("Home-page")}.
- Wheel `{wheel.path.name}`, sha256 `{wheel.wheel_sha256}`
  (obtained with `pip download --no-deps deepbrain==0.1`).
- Frozen graph `{GRAPH_MEMBER}` ({len(wheel.graph_bytes):,} bytes),
  sha256 `{wheel.graph_sha256}`.
- The wheel contains no licence file; `LICENSE` here is the standard MIT text with the author from
  METADATA and the year of the wheel's files ({wheel.year}); see the note at its end.

## Conversion
```
{command}
```
No TensorFlow: the GraphDef is parsed with a minimal protobuf schema, checked node by node against
the expected U-Net (`check_topology`), rebuilt in PyTorch (weights copied DHWIO -> OIDHW) and
exported with `torch.onnx.export` (TorchScript exporter, opset {OPSET}, dynamic batch axis).
TensorFlow's SAME stride-2 `conv3d_transpose` is reproduced as `ConvTranspose3d(padding=0)` keeping
the first 2n voxels of the 2n+1 on each axis (TF's forward SAME pad is 0 before / 1 after).

- `model.onnx`: sha256 `{model_sha}`, {model_path.stat().st_size:,} bytes, IR version
  {proto.ir_version}, opset {opset}, {EXPECTED_PARAMS:,} parameters.
- Input `{INPUT_NAME}` float32 `[N, 1, 128, 128, 128]` (NCDHW); output `{OUTPUT_NAME}` float32
  `[N, 1, 128, 128, 128]`.
- Tool versions: {", ".join(f"{k} {v}" for k, v in versions.items())}.

## Numeric check
onnxruntime (CPU, float32) on `model.onnx` against an independent numpy float64 interpreter that
executes `graph.pb` itself (TF padding rules, `Conv3DBackpropInputV2` as the adjoint of the SAME
convolution, dead-branch semantics with `training=False`), input `[1, 128, 128, 128, 1]`:

| input | max abs diff | mean abs diff | voxels whose prob>0.5 differ | brain fraction (ref) |
|---|---|---|---|---|
{rows}

Tolerance: {TOLERANCE:g} (max abs). Reproduce with `pytest -m slow tests/test_convert_deepbrain.py`
and `DEEPBRAIN_WHEEL=/path/to/{WHEEL_NAME}`.
"""


CARD_DRAFT = """# DRAFT model card notes for `brain-mr` (the lead owns the card.yaml schema).
# Everything below was read from deepbrain 0.1 (graph.pb, deepbrain/extractor.py) or measured.
name: brain-mr
title: Brain extraction (skull stripping) on T1-weighted MR
source:
  package: deepbrain==0.1          # PyPI, MIT licence, author Ivan Itzcovich
  wheel: deepbrain-0.1-py3-none-any.whl
  wheel_sha256: {wheel_sha}
  graph: deepbrain/models/graph.pb
  graph_sha256: {graph_sha}
  converter: tools/convert_deepbrain.py
license: MIT
file: model.onnx
model_sha256: {model_sha}
parameters: 171465
architecture: 3D U-Net, channels 8/16/32, 3 max-pools, stride-2 transposed convs, skip concats
modality: MR                        # T1-weighted; trained on CC359, NFBS, ADNI (deepbrain README)
body_part: HEAD                     # whole head in, brain mask out
input:
  name: image
  dtype: float32
  shape: [N, 1, 128, 128, 128]      # NCDHW, batch dynamic; spatial size fixed at 128
  axis_order: >-
    ONNX axes 2,3,4 = TF NDHWC axes 1,2,3 = axes 0,1,2 of the array deepbrain resizes, i.e.
    nibabel get_fdata() voxel axes (i, j, k) of the NIfTI; deepbrain does no reorientation.
    For a DICOM series stacked as (slice, row, column) that is the reverse order: transpose to
    (column, row, slice) to match the usual NIfTI (i, j, k) layout (flips depend on the NIfTI
    writer). deepbrain's README says the model was trained with rotation/orientation
    augmentation and works regardless of orientation (not verified here).
  preprocessing:
    - resample: whole volume to [128, 128, 128] regardless of voxel spacing (aspect ratio is
        not kept), skimage.transform.resize(order=1 (trilinear), mode="constant",
        anti_aliasing=True (Gaussian, sigma=(factor-1)/2, only on downsampled axes))
    - normalise: divide by the volume maximum (after resizing); no offset, no clipping; the
        whole pipeline is therefore invariant to a global intensity scale
output:
  name: prob
  dtype: float32
  shape: [N, 1, 128, 128, 128]
  activation: sigmoid               # already applied inside the model
  threshold: 0.5                    # deepbrain: mask = prob > 0.5
  postprocessing: >-
    deepbrain resizes prob back to the original grid (skimage resize, order 1, anti_aliasing,
    mode constant) and then thresholds at 0.5
  labels:
    1: Brain
"""


def write_outputs(
    out_dir: Path, wheel: WheelContents, proto: Any, results: list[CheckResult], command: str
) -> None:
    model_path = out_dir / "model.onnx"
    (out_dir / "LICENSE").write_text(license_text(wheel))
    (out_dir / "PROVENANCE.md").write_text(
        provenance_text(wheel, model_path, proto, results, command)
    )
    (out_dir / "card.draft.yaml").write_text(
        CARD_DRAFT.format(
            wheel_sha=wheel.wheel_sha256,
            graph_sha=wheel.graph_sha256,
            model_sha=hashlib.sha256(model_path.read_bytes()).hexdigest(),
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help=f"path to {WHEEL_NAME}")
    parser.add_argument("--out-dir", type=Path, default=Path("models/brain-mr"))
    parser.add_argument("--describe", action="store_true", help="print the graph summary and exit")
    parser.add_argument("--skip-check", action="store_true", help="skip the numpy reference check")
    parser.add_argument(
        "--allow-other-wheel", action="store_true", help="do not insist on the known wheel sha256"
    )
    args = parser.parse_args(argv)

    wheel = read_wheel(args.wheel, None if args.allow_other_wheel else WHEEL_SHA256)
    graph = parse_graphdef(wheel.graph_bytes)
    if args.describe:
        print(describe(graph))
        return 0

    interp = trace(graph)
    check_topology(graph, interp)
    weights = load_weights(graph)
    print(
        f"graph OK: {len(weights)} weight tensors, {sum(w.size for w in weights.values()):,} "
        "parameters"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "model.onnx"
    proto = export_onnx(build_torch_model(weights), model_path, wheel)
    print(f"wrote {model_path} ({model_path.stat().st_size:,} bytes, IR {proto.ir_version})")

    results: list[CheckResult] = []
    if not args.skip_check:
        for label, volume in check_inputs():
            result = compare(graph, model_path, volume, label)
            results.append(result)
            print(
                f"check [{label}]: max|onnx-ref| = {result.max_abs:.3e}, mean = "
                f"{result.mean_abs:.3e}, mask mismatches = {result.mask_mismatch}, "
                f"reference took {result.seconds_reference:.1f} s"
            )
        worst = max(r.max_abs for r in results)
        if worst > TOLERANCE:
            raise SystemExit(f"numeric check failed: {worst:.3e} > {TOLERANCE:g}")
    wheel_arg = f"/tmp/deepbrain/{WHEEL_NAME}"
    command = (
        f"pip download --no-deps deepbrain==0.1 -d /tmp/deepbrain\n"
        f"python tools/convert_deepbrain.py --wheel {wheel_arg} --out-dir {args.out_dir.as_posix()}"
    )
    write_outputs(args.out_dir, wheel, proto, results, command)
    print(f"wrote {args.out_dir}/LICENSE, PROVENANCE.md, card.draft.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
