"""The framework profiles' parameters as a model card holds them: parsed and validated here,
with no numerics (this runs wherever cards are loaded, the node's own process included);
``dicomnode.inference.profiles`` runs them.

- nnU-Net v2: :class:`NnunetPlan` from ``profile`` (the plan's ``transpose_forward``,
  spacing, patch size, normalisation per channel, resampling, labels and regions).
- MONAI bundles: the supported transforms and their parameters (:data:`PREPROCESSING`,
  :data:`POSTPROCESSING`, :data:`INFERER`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomnode.models.card import Card

__all__ = ["INFERER", "NORMALIZATIONS", "POSTPROCESSING", "PREPROCESSING", "NnunetPlan",
           "Normalization", "Resampling", "plan_of", "validate", "validate_monai",
           "validate_nnunet"]


ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
_ORIENTATION = re.compile(r"^(?=.*[LR])(?=.*[AP])(?=.*[SI])[LRAPSI]{3}$")
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                  "RescaleTo01Normalization", "RGBTo01Normalization")


@dataclass(frozen=True)
class Normalization:
    """One input channel's intensity normalisation (nnU-Net's scheme and its parameters)."""

    scheme: str
    use_mask_for_norm: bool = False
    mean: float = 0.0
    std: float = 1.0
    percentile_00_5: float = 0.0
    percentile_99_5: float = 0.0


@dataclass(frozen=True)
class Resampling:
    """``resample_data_or_seg_to_shape``'s arguments."""

    order: int
    order_z: int = 0
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class NnunetPlan:
    """The parameters of ``card.profile`` (framework ``nnunet``), validated.

    Array axes are nnU-Net's (``[z, y, x]`` of SimpleITK, then ``transpose_forward``);
    ``spacing`` is the configuration's target spacing in mm on those axes.
    """

    files: tuple[str, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization: tuple[Normalization, ...]
    resampling_data: Resampling
    resampling_probabilities: Resampling
    tile_step_size: float
    use_gaussian: bool
    mirror_axes: tuple[int, ...] | None
    labels: Mapping[str, Any]
    regions_class_order: tuple[int, ...] | None
    num_heads: int
    postprocessing: tuple[tuple[Any, ...], ...]  # labels_or_regions per largest-component step
    anisotropy_threshold: float = ANISO_THRESHOLD
    orientation: str | None = None  # reorient the series first (DICOM letters, e.g. RAS)


def _ints(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
        raise ValueError(f"profile.{key} must be a list of integers (got {value!r})")
    return tuple(int(v) for v in value)


def _floats(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
        raise ValueError(f"profile.{key} must be a list of numbers (got {value!r})")
    return tuple(float(v) for v in value)


def _resampling(value: Any, key: str) -> Resampling:
    if not isinstance(value, dict):
        raise ValueError(f"profile.{key} must be a mapping with order, order_z, force_separate_z")
    order, order_z = value.get("order"), value.get("order_z", 0)
    force = value.get("force_separate_z")
    if order not in (0, 1, 2, 3, 4, 5) or order_z not in (0, 1):
        raise ValueError(f"profile.{key}: order must be 0..5 and order_z 0 or 1 (got "
                         f"{order!r}, {order_z!r})")
    if force not in (None, True, False):
        raise ValueError(f"profile.{key}.force_separate_z must be true, false or null")
    return Resampling(int(order), int(order_z), force)


def plan_of(profile: Mapping[str, Any]) -> NnunetPlan:
    """Validate ``profile`` (a card's ``profile`` mapping) into an :class:`NnunetPlan`.

    Raises:
        ValueError: a key is missing or wrong; the message names it.
    """
    required = ("files", "transpose_forward", "transpose_backward", "spacing", "patch_size",
                "normalization", "resampling_data", "resampling_probabilities", "labels")
    missing = [k for k in required if k not in profile]
    if missing:
        raise ValueError(f"profile (nnunet) misses {', '.join(missing)}")
    files = profile["files"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ValueError("profile.files must list the ONNX file of each fold")
    forward = _ints(profile["transpose_forward"], "transpose_forward")
    backward = _ints(profile["transpose_backward"], "transpose_backward")
    if sorted(forward) != [0, 1, 2] or [forward[i] for i in backward] != [0, 1, 2]:
        raise ValueError("profile.transpose_forward/backward must be inverse permutations of "
                         f"0, 1, 2 (got {list(forward)}, {list(backward)})")
    spacing = _floats(profile["spacing"], "spacing")
    patch = _ints(profile["patch_size"], "patch_size")
    if len(patch) != 3 or len(spacing) != 3:
        raise ValueError("only 3d configurations are supported: profile.patch_size and "
                         f"profile.spacing need 3 values (got {list(patch)}, {list(spacing)})")
    if min(patch) < 1 or min(spacing) <= 0:
        raise ValueError("profile.patch_size and profile.spacing must be positive")
    norms = []
    for i, n in enumerate(profile["normalization"] or []):
        if not isinstance(n, dict) or n.get("scheme") not in NORMALIZATIONS:
            raise ValueError(f"profile.normalization[{i}].scheme must be one of "
                             f"{', '.join(NORMALIZATIONS)}")
        fields = {k: n[k] for k in ("mean", "std", "percentile_00_5", "percentile_99_5")
                  if k in n}
        if n["scheme"] == "CTNormalization" and len(fields) != 4:
            raise ValueError(f"profile.normalization[{i}]: CTNormalization needs mean, std, "
                             "percentile_00_5 and percentile_99_5")
        norms.append(Normalization(str(n["scheme"]), bool(n.get("use_mask_for_norm", False)),
                                   **{k: float(v) for k, v in fields.items()}))
    if not norms:
        raise ValueError("profile.normalization needs one entry per input channel")
    step = float(profile.get("tile_step_size", 0.5))
    if not 0 < step <= 1:
        raise ValueError(f"profile.tile_step_size must be in (0, 1] (got {step})")
    mirror = profile.get("mirror_axes")
    mirror_axes = None if mirror is None else _ints(mirror, "mirror_axes")
    if mirror_axes is not None and any(not 0 <= a < 3 for a in mirror_axes):
        raise ValueError(f"profile.mirror_axes must be spatial axes 0..2 (got {mirror})")
    labels = profile["labels"]
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise ValueError("profile.labels must be dataset.json's labels with background: 0")
    order = profile.get("regions_class_order")
    regions = None if order is None else _ints(order, "regions_class_order")
    heads = int(profile.get("num_segmentation_heads",
                            len(regions) if regions is not None else len(labels)))
    post = []
    for i, step_ in enumerate(profile.get("postprocessing") or []):
        target = step_.get("labels_or_regions") if isinstance(step_, dict) else None
        if target is None:
            raise ValueError(f"profile.postprocessing[{i}] needs labels_or_regions")
        post.append(tuple(target) if isinstance(target, list) else (target,))
    orientation = profile.get("orientation")
    if orientation is not None and not (isinstance(orientation, str)
                                        and _ORIENTATION.match(orientation)):
        raise ValueError(f"profile.orientation {orientation!r} is not an orientation code "
                         "(three letters, one of L/R, A/P, S/I each, e.g. RAS)")
    return NnunetPlan(
        files=tuple(files), transpose_forward=forward, transpose_backward=backward,
        spacing=spacing, patch_size=patch, normalization=tuple(norms),
        resampling_data=_resampling(profile["resampling_data"], "resampling_data"),
        resampling_probabilities=_resampling(profile["resampling_probabilities"],
                                             "resampling_probabilities"),
        tile_step_size=step, use_gaussian=bool(profile.get("use_gaussian", True)),
        mirror_axes=mirror_axes, labels=labels, regions_class_order=regions, num_heads=heads,
        postprocessing=tuple(post),
        anisotropy_threshold=float(profile.get("anisotropy_threshold", ANISO_THRESHOLD)),
        orientation=orientation)


def validate_nnunet(card: Card) -> None:
    """Check ``card.profile`` (see :func:`plan_of`) against the card's inputs.

    Raises:
        ValueError: the profile is not a usable nnU-Net plan.
    """
    assert card.profile is not None
    plan = plan_of(card.profile)
    if len(plan.normalization) != len(card.inputs):
        raise ValueError(f"profile.normalization has {len(plan.normalization)} channel(s); "
                         f"the card has {len(card.inputs)} input(s)")
    if card.file not in plan.files:
        raise ValueError(f"profile.files must include the card's file {card.file!r}")



# MONAI

#: pre-processing steps and the parameters each takes (with their defaults)
PREPROCESSING: dict[str, dict[str, Any]] = {
    "Orientation": {"axcodes": None},
    "Spacing": {"pixdim": None, "mode": "bilinear", "padding_mode": "border"},
    "ScaleIntensityRange": {"a_min": None, "a_max": None, "b_min": None, "b_max": None,
                            "clip": False},
    "NormalizeIntensity": {"nonzero": False, "channel_wise": False},
    "CropForeground": {"threshold": 0.0, "margin": 0, "allow_smaller": False,
                       "k_divisible": 1},
    "SpatialPad": {"spatial_size": None, "method": "symmetric", "value": 0.0},
}
#: post-processing steps and their parameters
POSTPROCESSING: dict[str, dict[str, Any]] = {
    "Activations": {"softmax": False, "sigmoid": False},
    "Invert": {"nearest": True},
    "AsDiscrete": {"argmax": False, "threshold": None},
    "KeepLargestConnectedComponent": {"applied_labels": None, "is_onehot": None,
                                      "independent": True, "connectivity": None,
                                      "num_components": 1},
}
INFERER = {"roi_size": None, "overlap": 0.25, "mode": "constant", "sigma_scale": 0.125,
           "sw_batch_size": 1, "padding_mode": "constant", "cval": 0.0}
_AXCODES = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "I": (2, -1), "S": (2, 1)}


# ---------------------------------------------------------------------------------------
# validation


def _check_step(where: str, step: Any, table: Mapping[str, Mapping[str, Any]]) -> None:
    if not isinstance(step, Mapping) or not isinstance(step.get("transform"), str):
        raise ValueError(f"profile.{where}: each step is a mapping with 'transform'")
    name = step["transform"]
    if name not in table:
        raise ValueError(f"profile.{where}: transform {name!r} is not supported; supported: "
                         + ", ".join(table))
    unknown = sorted(set(step) - {"transform"} - set(table[name]))
    if unknown:
        raise ValueError(f"profile.{where}: {name} takes no {', '.join(unknown)}; it takes "
                         + (", ".join(table[name]) or "nothing"))


def _check_values(where: str, name: str, p: Mapping[str, Any]) -> None:
    if name == "Orientation":
        codes = p.get("axcodes")
        if (not isinstance(codes, str) or len(codes) != 3
                or sorted(_AXCODES[c][0] for c in codes if c in _AXCODES) != [0, 1, 2]):
            raise ValueError(f"profile.{where}: Orientation axcodes must name each of L/R, "
                             f"A/P, S/I once (got {codes!r})")
    elif name == "Spacing":
        pixdim = p.get("pixdim")
        if (not isinstance(pixdim, list) or len(pixdim) != 3
                or not all(isinstance(v, int | float) and v > 0 for v in pixdim)):
            raise ValueError(f"profile.{where}: Spacing pixdim must be three positive mm "
                             f"(got {pixdim!r})")
        if p.get("mode", "bilinear") not in ("bilinear", "nearest"):
            raise ValueError(f"profile.{where}: Spacing mode must be bilinear or nearest")
        if p.get("padding_mode", "border") not in ("border", "zeros"):
            raise ValueError(f"profile.{where}: Spacing padding_mode must be border or zeros")
    elif name == "ScaleIntensityRange":
        if p.get("a_min") is None or p.get("a_max") is None:
            raise ValueError(f"profile.{where}: ScaleIntensityRange needs a_min and a_max")
        if (p.get("b_min") is None) != (p.get("b_max") is None):
            raise ValueError(f"profile.{where}: give both b_min and b_max, or neither")
    elif name == "SpatialPad":
        size = p.get("spatial_size")
        if not isinstance(size, list) or len(size) != 3:
            raise ValueError(f"profile.{where}: SpatialPad spatial_size must be three sizes")
        if p.get("method", "symmetric") not in ("symmetric", "end"):
            raise ValueError(f"profile.{where}: SpatialPad method must be symmetric or end")
    elif name == "Activations" and bool(p.get("softmax")) == bool(p.get("sigmoid")):
        raise ValueError(f"profile.{where}: Activations needs exactly one of softmax, sigmoid")
    elif name == "AsDiscrete" and (bool(p.get("argmax")) == (p.get("threshold") is not None)):
        raise ValueError(f"profile.{where}: AsDiscrete needs exactly one of argmax, threshold")


def validate_monai(card: Card) -> None:
    """Check ``card.profile`` for the MONAI profile (raises ValueError, one problem)."""
    profile = card.profile or {}
    unknown = sorted(set(profile) - {"framework", "monai_version", "preprocessing", "inferer",
                                      "postprocessing", "needs_review"})
    if unknown:
        raise ValueError(f"profile: unknown key(s) {', '.join(unknown)} for framework monai")
    if len(card.inputs) != 1:
        raise ValueError("profile monai: the bundle takes one input image")
    for section, table in (("preprocessing", PREPROCESSING), ("postprocessing", POSTPROCESSING)):
        steps = profile.get(section, [])
        if not isinstance(steps, list):
            raise ValueError(f"profile.{section} must be a list of steps")
        for i, step in enumerate(steps):
            _check_step(f"{section}[{i}]", step, table)
            _check_values(f"{section}[{i}]", step["transform"], step)
    inferer = profile.get("inferer")
    if not isinstance(inferer, Mapping):
        raise ValueError("profile.inferer: the sliding-window inferer's parameters are needed")
    unknown = sorted(set(inferer) - set(INFERER))
    if unknown:
        raise ValueError(f"profile.inferer: unknown key(s) {', '.join(unknown)}")
    roi = inferer.get("roi_size")
    if not isinstance(roi, list) or len(roi) != 3 or not all(isinstance(v, int) for v in roi):
        raise ValueError(f"profile.inferer: roi_size must be three sizes (got {roi!r})")
    overlap = inferer.get("overlap", 0.25)
    overlaps = overlap if isinstance(overlap, list) else [overlap]
    if not all(isinstance(o, int | float) and 0 <= o < 1 for o in overlaps):
        raise ValueError(f"profile.inferer: overlap must be in [0, 1) (got {overlap!r})")
    if inferer.get("mode", "constant") not in ("constant", "gaussian"):
        raise ValueError("profile.inferer: mode must be constant or gaussian")
    if inferer.get("padding_mode", "constant") != "constant":
        raise ValueError("profile.inferer: only padding_mode constant is supported")
    post = [s["transform"] for s in profile.get("postprocessing", [])]
    if "AsDiscrete" not in post:
        raise ValueError("profile.postprocessing: the labels need an AsDiscrete step "
                         "(argmax or threshold)")
    if post.count("Invert") > 1:
        raise ValueError("profile.postprocessing: at most one Invert step")




_VALIDATORS = {"nnunet": validate_nnunet, "monai": validate_monai}


def validate(card: Card) -> None:
    """Check ``card.profile`` for its framework (raises ValueError, one problem)."""
    assert card.profile is not None
    framework = card.profile.get("framework")
    if not isinstance(framework, str):
        raise ValueError("profile needs framework: the name of a framework profile")
    if framework not in _VALIDATORS:
        known = ", ".join(sorted(_VALIDATORS))
        raise ValueError(f"profile.framework {framework!r} is not known; known: {known}")
    _VALIDATORS[framework](card)
