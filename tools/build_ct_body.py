#!/usr/bin/env python3
"""Builder of the ``ct-body`` reference model: a rule-based ONNX graph over Hounsfield units.

``models/ct-body/model.onnx`` is not a trained network. It holds no learned weights, only fixed
constants (three thresholds in Hounsfield units (HU), one logistic slope in HU and one erosion
size in pixels), and labels every pixel of an axial CT slice from its own HU value plus one
in-slice "inside the body" test:

* **External** (channel 0, body outline) = body tissue OR inside. Body tissue is ``HU > -500``.
  A pixel is *inside* when there is thick body tissue strictly before and strictly after it
  along its row AND strictly before and strictly after it along its column (computed with
  ``CumSum`` and ``ReduceSum``, so it is exact, per slice, and needs no loops). *Thick* body
  tissue is the body mask eroded by a 5 x 5 pixel square (``MaxPool`` of the complement), i.e.
  tissue at least 5 pixels (about 3-5 mm) across: thin shells such as a head rest, the
  table top or cushion folds then no longer "enclose" the air between them and the patient,
  while the chest wall, the face and the neck still enclose the lungs, sinuses and airways.
  Air enclosed by the body in the slice is therefore part of the outline. -500 HU is halfway
  between air (-1000 HU) and water (0 HU): a pixel half filled with tissue sits on the
  threshold, so the outline lies on the 50 % partial-volume surface of the skin; fat
  (-120..-50 HU) is well above it, lung parenchyma (-950..-600 HU) below it.
* **Bone** (channel 1) = ``HU >= 226``, the threshold InVesalius and many viewers use for bone
  (the Cranium example's bone mask is exactly this).
* **Lungs** (channel 2) = air-like ``HU <= -400`` AND inside. Lung parenchyma is about
  -950..-600 HU; -400 keeps denser (dependent, ground-glass) lung while excluding fat and
  soft tissue. There is no lower bound: outside air is excluded by the inside test alone.

Each channel is a soft probability: a steep logistic of the signed distance to the threshold,
``sigmoid((HU - T) / S)`` with slope ``S = 5 HU``, multiplied by (Lungs) or maximised with
(External) the hard 0/1 inside test. The thresholds ``T`` sit on half-integers (-499.5, 225.5,
-399.5 HU) so that every integer HU is strictly on one side: thresholding a channel at 0.5 gives
exactly the integer rule above (e.g. HU 226 -> 0.525 bone, HU 225 -> 0.475).

What the graph deliberately does not do (the inference engine does it after thresholding at
0.5): connected components (largest component for External, the two largest for Lungs),
hole filling and minimum volumes. So the raw Lungs channel also holds sinuses, the trachea,
bowel gas, and air enclosed by thick non-patient objects (e.g. a solid head holder).

Contract (a 2D slice model):

* input ``hu``: float32 ``[N, 1, H, W]`` (N slices, H rows, W columns; all dynamic), HU;
* output ``prob``: float32 ``[N, 3, H, W]`` in [0, 1]; channel 0 External, 1 Bone, 2 Lungs.

The file is built with ``onnx.helper`` only (opset 17, IR version 10) and is byte-for-byte
reproducible. Usage::

    python tools/build_ct_body.py            # (re)write models/ct-body/model.onnx
    python tools/build_ct_body.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "ct-body"
MODEL_PATH = MODEL_DIR / "model.onnx"

NAME = "ct-body"
VERSION = "1.0.0"
OPSET = 17
IR_VERSION = 10  # onnx.helper writes a newer IR version that onnxruntime 1.31 rejects
INPUT_NAME = "hu"
OUTPUT_NAME = "prob"
LABELS = ("External", "Bone", "Lungs")  # output channels 0, 1, 2

#: Body tissue: HU > -500, i.e. integer HU >= -499 (centre of the logistic, HU).
BODY_THRESHOLD_HU = -499.5
#: Bone: HU >= 226, i.e. integer HU >= 226 (centre of the logistic, HU).
BONE_THRESHOLD_HU = 225.5
#: Air-like (lung candidate): HU <= -400, i.e. integer HU <= -400 (centre of the logistic, HU).
LUNG_THRESHOLD_HU = -399.5
#: Half width (pixels) of the square that erodes the body mask before the inside test: tissue
#: thinner than 2 * 2 + 1 = 5 pixels does not enclose anything.
EROSION_PX = 2
#: Slope of the logistics (HU): the probability goes from 0.12 to 0.88 over +-10 HU.
SOFTNESS_HU = 5.0

DOC_STRING = (
    "ct-body 1.0.0: rule-based CT segmentation (fixed HU thresholds, no learned weights). "
    "Input 'hu' float32 [N,1,H,W] in Hounsfield units (axial slices). Output 'prob' float32 "
    "[N,3,H,W] in [0,1]: channel 0 External = HU > -500 or enclosed, along both its row and its "
    "column, by such tissue at least 5 pixels thick (body mask eroded by a 5x5 square); "
    "channel 1 Bone = HU >= 226; channel 2 Lungs = HU <= -400 and enclosed. Soft values: "
    "sigmoid((HU - T) / 5 HU) with T = -499.5, 225.5, -399.5 HU, so 0.5 lies exactly on each "
    "threshold. Threshold at 0.5; connected components, hole filling and "
    "minimum volumes are left to the caller."
)


def _scalar(name: str, value: float) -> TensorProto:
    """A float32 scalar initializer."""
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _int64(name: str, values: int | Sequence[int]) -> TensorProto:
    """An int64 initializer: a scalar for an ``int``, a 1-D tensor for a sequence."""
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _inside_nodes(axis: int, tag: str) -> list[onnx.NodeProto]:
    """Nodes computing ``inside_<tag>``: thick body tissue strictly before AND after along ``axis``.

    With ``run`` = inclusive running count of thick-body pixels (``core_f``, 0/1) along the axis
    and ``total`` = the count over the whole line, there is thick body strictly before a pixel
    iff ``run > core_f`` (the pixel's own 0/1 value) and strictly after it iff ``run < total``.
    Counts are small integers, exact in float32.
    """
    return [
        helper.make_node("CumSum", ["core_f", f"axis_{tag}"], [f"run_{tag}"], name=f"run_{tag}"),
        helper.make_node(
            "ReduceSum",
            ["core_f", f"axes_{tag}"],
            [f"total_{tag}"],
            keepdims=1,
            name=f"total_{tag}",
        ),
        helper.make_node(
            "Greater", [f"run_{tag}", "core_f"], [f"before_{tag}"], name=f"before_{tag}"
        ),
        helper.make_node(
            "Less", [f"run_{tag}", f"total_{tag}"], [f"after_{tag}"], name=f"after_{tag}"
        ),
        helper.make_node(
            "And", [f"before_{tag}", f"after_{tag}"], [f"inside_{tag}"], name=f"inside_{tag}"
        ),
    ]


def build_model() -> onnx.ModelProto:
    """Build the ``ct-body`` model (deterministic: the same proto on every call)."""
    float_t = TensorProto.FLOAT
    width = 2 * EROSION_PX + 1
    nodes: list[onnx.NodeProto] = [
        # Thick body tissue (0/1 float): the body mask (HU > -500) eroded with a square, i.e. a
        # pixel is kept when no non-body pixel lies in the (2 * EROSION_PX + 1)^2 window around
        # it. Done as 1 - MaxPool(non-body); MaxPool ignores its padding.
        helper.make_node("LessOrEqual", [INPUT_NAME, "t_body"], ["air"], name="air"),
        helper.make_node("Cast", ["air"], ["air_f"], to=float_t, name="air_f"),
        helper.make_node(
            "MaxPool",
            ["air_f"],
            ["near_air"],
            kernel_shape=[width, width],
            pads=[EROSION_PX] * 4,
            strides=[1, 1],
            name="near_air",
        ),
        helper.make_node("Sub", ["one", "near_air"], ["core_f"], name="core_f"),
        # In-slice inside test along rows (W, axis 3) and columns (H, axis 2).
        *_inside_nodes(3, "row"),
        *_inside_nodes(2, "col"),
        helper.make_node("And", ["inside_row", "inside_col"], ["inside"], name="inside"),
        helper.make_node("Cast", ["inside"], ["inside_f"], to=float_t, name="inside_f"),
        # Channel 0, External = max(P(body tissue), inside).
        helper.make_node("Sub", [INPUT_NAME, "t_body"], ["d_body"], name="d_body"),
        helper.make_node("Mul", ["d_body", "inv_softness"], ["z_body"], name="z_body"),
        helper.make_node("Sigmoid", ["z_body"], ["p_body"], name="p_body"),
        helper.make_node("Max", ["p_body", "inside_f"], ["external"], name="external"),
        # Channel 1, Bone = P(HU >= 226).
        helper.make_node("Sub", [INPUT_NAME, "t_bone"], ["d_bone"], name="d_bone"),
        helper.make_node("Mul", ["d_bone", "inv_softness"], ["z_bone"], name="z_bone"),
        helper.make_node("Sigmoid", ["z_bone"], ["bone"], name="bone"),
        # Channel 2, Lungs = P(HU <= -400) * inside.
        helper.make_node("Sub", ["t_lung", INPUT_NAME], ["d_air"], name="d_air"),
        helper.make_node("Mul", ["d_air", "inv_softness"], ["z_air"], name="z_air"),
        helper.make_node("Sigmoid", ["z_air"], ["p_air"], name="p_air"),
        helper.make_node("Mul", ["p_air", "inside_f"], ["lungs"], name="lungs"),
        helper.make_node(
            "Concat", ["external", "bone", "lungs"], [OUTPUT_NAME], axis=1, name=OUTPUT_NAME
        ),
    ]
    initializers = [
        _scalar("t_body", BODY_THRESHOLD_HU),
        _scalar("t_bone", BONE_THRESHOLD_HU),
        _scalar("t_lung", LUNG_THRESHOLD_HU),
        _scalar("inv_softness", 1.0 / SOFTNESS_HU),
        _scalar("one", 1.0),
        _int64("axis_row", 3),
        _int64("axes_row", [3]),
        _int64("axis_col", 2),
        _int64("axes_col", [2]),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info(INPUT_NAME, float_t, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, float_t, ["N", 3, "H", "W"])],
        initializer=initializers,
        doc_string="Rule-based: HU thresholds and an in-slice enclosure test; no learned weights.",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="dicomnode tools/build_ct_body.py",
        producer_version=VERSION,
        doc_string=DOC_STRING,
        model_version=1,
    )
    model.ir_version = IR_VERSION
    metadata = {
        "name": NAME,
        "version": VERSION,
        "kind": "rule-based (fixed Hounsfield-unit thresholds, no learned weights)",
        "license": "Apache-2.0",
        "modality": "CT",
        "input": f"{INPUT_NAME}: float32 [N,1,H,W], Hounsfield units, axial slices",
        "output": f"{OUTPUT_NAME}: float32 [N,3,H,W] probabilities, threshold 0.5",
        "labels": ",".join(LABELS),
        "thresholds_hu": (
            f"External: HU > -500 (centre {BODY_THRESHOLD_HU}) or enclosed in row and column "
            f"by body eroded with a {2 * EROSION_PX + 1}x{2 * EROSION_PX + 1} pixel square; "
            f"Bone: HU >= 226 (centre {BONE_THRESHOLD_HU}); "
            f"Lungs: HU <= -400 (centre {LUNG_THRESHOLD_HU}) and enclosed"
        ),
        "softness_hu": f"{SOFTNESS_HU}",
        "postprocessing": (
            "left to the caller: External largest component + fill holes; Lungs two largest "
            "components + minimum volume"
        ),
    }
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def model_bytes() -> bytes:
    """The serialized model, as written to ``models/ct-body/model.onnx``."""
    data: bytes = build_model().SerializeToString(deterministic=True)
    return data


def check(path: Path = MODEL_PATH) -> bool:
    """True when the file at ``path`` is byte-identical to a fresh build."""
    return path.is_file() and path.read_bytes() == model_bytes()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MODEL_PATH, help="model file to write/check")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from a fresh build"
    )
    args = parser.parse_args(argv)
    path: Path = args.out
    if args.check:
        if check(path):
            print(f"{path}: up to date")
            return 0
        state = "differs from a fresh build" if path.is_file() else "is missing"
        print(f"{path}: {state}; run python tools/build_ct_body.py", file=sys.stderr)
        return 1
    data = model_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path} ({len(data):,} bytes, IR {IR_VERSION}, opset {OPSET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
