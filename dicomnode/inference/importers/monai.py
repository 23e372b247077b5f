"""``dicomnode models import monai-bundle FOLDER --name NAME``: a MONAI bundle as a package.

The bundle (``configs/metadata.json``, ``configs/inference.json`` or ``.yaml``,
``models/model.pt`` (a state dict) or ``models/model.ts`` (TorchScript)) is read with MONAI's
own ``ConfigParser``: the network is instantiated from ``network_def`` and exported to ONNX
(:func:`dicomnode.inference.export.export_network`), and the ``preprocessing``, ``inferer``
and ``postprocessing`` sections are translated step by step into the card's MONAI profile
(:mod:`dicomnode.inference.profiles.monai`). A transform the profile does not implement, or a
parameter it does not support, is refused with the file and line of its ``_target_``.

The package is then checked: the bundle's own pipeline run through MONAI and torch and the
package run through the profile and ONNX Runtime, on the same image (``--check-image`` or a
synthetic one), must agree on >= 99.9 % of the voxels, with a Dice >= 0.995 for each
structure and probabilities within 1e-3 on the model grid. A package whose check fails is
removed. torch and MONAI are imported only when an import runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import yaml

from dicomnode.models.card import file_sha256

__all__ = ["BundleError", "CheckFigures", "ImportedBundle", "add_arguments", "check_bundle",
           "import_bundle", "read_bundle", "run", "run_bundle_with_monai", "translate"]

#: the check's thresholds
MIN_VOXEL_AGREEMENT = 0.999
MIN_DICE = 0.995
MAX_PROBABILITY_DIFF = 1e-3

_NO_OP = {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "SaveImage"}
_SELECT = re.compile(r"^\$?\s*lambda\s+(\w+)\s*:\s*\1\s*>\s*(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)\s*$")


class BundleError(Exception):
    """A bundle that cannot be imported; the message names the file and line."""


# ---------------------------------------------------------------------------------------
# the bundle's files, with line numbers


@dataclass
class ImportedBundle:
    """What :func:`read_bundle` found."""

    folder: Path
    config_path: Path
    metadata_path: Path
    metadata: dict[str, Any]
    weights: Path
    lines: dict[str, int]  # config id ("preprocessing#transforms#2") -> 1-based line


def _node_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _node_lines(value, f"{prefix}#{key.value}" if prefix else str(key.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _node_lines(value, f"{prefix}#{i}" if prefix else str(i), out)


def read_bundle(folder: Path) -> ImportedBundle:
    """Find the bundle's files and the line of every config entry.

    Raises:
        BundleError: a file is missing or does not parse.
    """
    folder = Path(folder)
    configs = folder / "configs"
    metadata_path = configs / "metadata.json"
    if not metadata_path.is_file():
        raise BundleError(f"{folder}: no configs/metadata.json (not a MONAI bundle)")
    config_path = next((configs / f"inference.{ext}" for ext in ("json", "yaml", "yml")
                        if (configs / f"inference.{ext}").is_file()), None)
    if config_path is None:
        raise BundleError(f"{configs}: no inference.json or inference.yaml")
    weights = next((folder / "models" / n for n in ("model.pt", "model.ts")
                    if (folder / "models" / n).is_file()), None)
    if weights is None:
        raise BundleError(f"{folder / 'models'}: no model.pt nor model.ts")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{metadata_path}: {exc}") from None
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(config_path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise BundleError(f"{config_path}: does not parse: {exc}") from None
    if node is not None:
        _node_lines(node, "", lines)
    return ImportedBundle(folder, config_path, metadata_path, metadata, weights, lines)


# ---------------------------------------------------------------------------------------
# translation of the config into the profile


def _frameworks() -> None:
    """Keep MONAI from importing torchvision: MONAI imports it optionally, and a torchvision
    built for another torch (e.g. a CUDA build beside a CPU torch) fails half-way through
    its import. The import command needs none of it."""
    if "torchvision" not in sys.modules:
        sys.modules["torchvision"] = None  # type: ignore[assignment]


def _parser(bundle: ImportedBundle) -> Any:
    _frameworks()
    from monai.bundle import ConfigParser  # type: ignore[attr-defined]

    parser = ConfigParser()
    parser.read_config(str(bundle.config_path))
    parser.read_meta(str(bundle.metadata_path))
    parser["bundle_root"] = str(bundle.folder)
    return parser


class _Item:
    """One transform entry of the config, its values resolved by MONAI's parser."""

    def __init__(self, bundle: ImportedBundle, parser: Any, cid: str) -> None:
        self.bundle, self.parser, self.cid = bundle, parser, cid
        raw = parser[cid]
        self.raw: dict[str, Any] = raw if isinstance(raw, dict) else {}
        target = self.raw.get("_target_")
        self.line = bundle.lines.get(f"{cid}#_target_", bundle.lines.get(cid, 0))
        if not isinstance(target, str) or target.startswith(("$", "@")):
            self.name = str(target if target is not None else raw)
            self.refuse(f"{self.name!r} is not a transform the import can read "
                        "(a _target_ naming a MONAI transform is needed)")
        self.target = str(target)
        self.name = self.target.rsplit(".", 1)[-1]
        self.base = self.name[:-1] if self.name.endswith("d") and self.name[:-1] in (
            *_NO_OP, "Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity",
            "CropForeground", "SpatialPad", "Activations", "Invert", "AsDiscrete",
            "KeepLargestConnectedComponent") else self.name

    def where(self, key: str | None = None) -> str:
        line = self.bundle.lines.get(f"{self.cid}#{key}", self.line) if key else self.line
        return f"{self.bundle.config_path}:{line}"

    def refuse(self, message: str, key: str | None = None) -> None:
        raise BundleError(f"{self.where(key)}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.raw:
            return default
        value = self.parser.get_parsed_content(f"{self.cid}#{key}")
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, tuple):
            value = list(value)
        return value

    def first(self, key: str, default: Any = None) -> Any:
        """A per-key parameter of a dictionary transform: the value for the first key."""
        value = self.get(key, default)
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        return value

    def only(self, allowed: Sequence[str], defaults: Mapping[str, Any] | None = None) -> None:
        """Refuse parameters outside ``allowed`` unless they keep the given default."""
        ignored = {"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "dtype",
                   "lazy", "device", "image_only", "track_meta", "data_type",
                   "output_dir", "output_postfix", "output_ext", "resample", "separate_folder",
                   "print_log", "squeeze_end_dims", "writer", "output_dtype", "to_tensor",
                   "orig_keys", "orig_meta_keys", "overwriting", "start_coord_key",
                   "end_coord_key", "return_coords", "wrap_sequence", "ensure_channel_first",
                   "channel_dim", "strict_check", "simple_keys", "prune_meta_pattern",
                   "prune_meta_sep", "expanduser", "reader", "source_key", "transform",
                   "savepath_in_metadict", "folder_layout", "mode", "padding_mode"}
        for key in self.raw:
            if key.startswith("_") or key in allowed or key in ignored:
                continue
            if defaults is not None and key in defaults and self.get(key) == defaults[key]:
                continue
            self.refuse(f"{self.name}: parameter {key!r} is not supported by the import "
                        f"(supported: {', '.join(allowed) or 'none'})", key)


def _pre_step(item: _Item, image_key: str) -> dict[str, Any] | None:
    base = item.base
    if base == "LoadImage":
        item.only(["reader"])
        reader = item.get("reader")
        if reader not in (None, "NibabelReader", "ITKReader"):
            item.refuse(f"{item.name}: reader {reader!r} is not supported (NIfTI readers only)",
                        "reader")
        return None
    if base in ("EnsureChannelFirst", "EnsureType", "ToTensor"):
        item.only([], {"strict_check": True})
        return None
    if base == "Orientation":
        item.only(["axcodes"], {"as_closest_canonical": False, "labels": None})
        return {"transform": "Orientation", "axcodes": str(item.get("axcodes"))}
    if base == "Spacing":
        item.only(["pixdim", "mode", "padding_mode"],
                  {"align_corners": False, "diagonal": False, "scale_extent": False,
                   "recompute_affine": False, "min_pixdim": None, "max_pixdim": None})
        pixdim = item.get("pixdim")
        pixdim = list(pixdim) if isinstance(pixdim, list) else [pixdim]
        pixdim = (pixdim + [pixdim[-1]] * 3)[:3]
        if any(float(v) <= 0 for v in pixdim):
            item.refuse(f"{item.name}: pixdim {pixdim} keeps a source spacing (<= 0 entries):"
                        " not supported", "pixdim")
        mode = str(item.first("mode", "bilinear"))
        padding = str(item.first("padding_mode", "border"))
        if mode not in ("bilinear", "nearest"):
            item.refuse(f"{item.name}: mode {mode!r} (only bilinear, nearest)", "mode")
        if padding not in ("border", "zeros"):
            item.refuse(f"{item.name}: padding_mode {padding!r} (only border, zeros)",
                        "padding_mode")
        return {"transform": "Spacing", "pixdim": [float(v) for v in pixdim], "mode": mode,
                "padding_mode": padding}
    if base == "ScaleIntensityRange":
        item.only(["a_min", "a_max", "b_min", "b_max", "clip"])
        return {"transform": "ScaleIntensityRange", "a_min": float(item.get("a_min")),
                "a_max": float(item.get("a_max")),
                "b_min": None if item.get("b_min") is None else float(item.get("b_min")),
                "b_max": None if item.get("b_max") is None else float(item.get("b_max")),
                "clip": bool(item.get("clip", False))}
    if base == "NormalizeIntensity":
        item.only(["nonzero", "channel_wise"], {"subtrahend": None, "divisor": None})
        return {"transform": "NormalizeIntensity", "nonzero": bool(item.get("nonzero", False)),
                "channel_wise": bool(item.get("channel_wise", False))}
    if base == "CropForeground":
        item.only(["margin", "allow_smaller", "k_divisible", "select_fn"],
                  {"channel_indices": None})
        source = item.get("source_key", image_key)
        if source != image_key:
            item.refuse(f"{item.name}: source_key {source!r} is not the image "
                        f"({image_key!r})", "source_key")
        if str(item.first("mode", "constant")) != "constant":
            item.refuse(f"{item.name}: only mode constant is supported", "mode")
        threshold = 0.0
        if "select_fn" in item.raw:
            text = item.raw["select_fn"]
            match = _SELECT.match(text) if isinstance(text, str) else None
            if match is None:
                item.refuse(f"{item.name}: select_fn {text!r} is not supported (only the "
                            "default, or '$lambda x: x > VALUE')", "select_fn")
            assert match is not None
            threshold = float(match.group(2))
        return {"transform": "CropForeground", "threshold": threshold,
                "margin": item.get("margin", 0), "allow_smaller":
                bool(item.get("allow_smaller", False)), "k_divisible": item.get("k_divisible", 1)}
    if base == "SpatialPad":
        item.only(["spatial_size", "method"], {"value": 0})
        if str(item.first("mode", "constant")) != "constant":
            item.refuse(f"{item.name}: only mode constant is supported", "mode")
        size = item.get("spatial_size")
        size = list(size) if isinstance(size, list) else [size] * 3
        return {"transform": "SpatialPad", "spatial_size": [int(v) for v in size],
                "method": str(item.get("method", "symmetric"))}
    item.refuse(f"transform {item.name} is not supported in preprocessing (supported: "
                "LoadImage, EnsureChannelFirst, EnsureType, Orientation, Spacing, "
                "ScaleIntensityRange, NormalizeIntensity, CropForeground, SpatialPad)")
    return None


def _post_step(item: _Item) -> dict[str, Any] | None:
    base = item.base
    if base in ("EnsureType", "ToTensor", "SaveImage"):
        return None
    if base == "Activations":
        item.only(["softmax", "sigmoid"], {"other": None})
        return {"transform": "Activations", "softmax": bool(item.first("softmax", False)),
                "sigmoid": bool(item.first("sigmoid", False))}
    if base == "Invert":
        item.only(["nearest_interp"], {"post_func": None})
        if item.raw.get("transform") != "@preprocessing":
            item.refuse(f"{item.name}: only transform '@preprocessing' can be inverted",
                        "transform")
        return {"transform": "Invert", "nearest": bool(item.first("nearest_interp", True))}
    if base == "AsDiscrete":
        item.only(["argmax", "threshold"], {"to_onehot": None, "rounding": None,
                                            "keepdim": True})
        threshold = item.first("threshold")
        return {"transform": "AsDiscrete", "argmax": bool(item.first("argmax", False)),
                "threshold": None if threshold is None else float(threshold)}
    if base == "KeepLargestConnectedComponent":
        item.only(["applied_labels", "is_onehot", "independent", "connectivity",
                   "num_components"])
        labels = item.get("applied_labels")
        return {"transform": "KeepLargestConnectedComponent",
                "applied_labels": None if labels is None else
                [int(v) for v in (labels if isinstance(labels, list) else [labels])],
                "is_onehot": item.get("is_onehot"),
                "independent": bool(item.get("independent", True)),
                "connectivity": item.get("connectivity"),
                "num_components": int(item.get("num_components", 1))}
    item.refuse(f"transform {item.name} is not supported in postprocessing (supported: "
                "Activations, Invertd, AsDiscrete, KeepLargestConnectedComponent, "
                "EnsureType, SaveImage)")
    return None


def _transform_ids(parser: Any, bundle: ImportedBundle, section: str) -> list[str]:
    if section not in parser.config:
        raise BundleError(f"{bundle.config_path}: no {section!r} section")
    node = parser[section]
    if isinstance(node, list):
        return [f"{section}#{i}" for i in range(len(node))]
    if isinstance(node, dict) and isinstance(node.get("transforms"), list):
        target = str(node.get("_target_", ""))
        if target.rsplit(".", 1)[-1] != "Compose":
            line = bundle.lines.get(f"{section}#_target_", 0)
            raise BundleError(f"{bundle.config_path}:{line}: {section}: {target!r} is not "
                              "supported (a Compose of transforms is)")
        return [f"{section}#transforms#{i}" for i in range(len(node["transforms"]))]
    line = bundle.lines.get(section, 0)
    raise BundleError(f"{bundle.config_path}:{line}: {section} is not a list of transforms "
                      "nor a Compose")


def _inferer(parser: Any, bundle: ImportedBundle) -> dict[str, Any]:
    item = _Item(bundle, parser, "inferer")
    if item.name != "SlidingWindowInferer":
        item.refuse(f"inferer {item.name} is not supported (SlidingWindowInferer is)")
    item.only(["roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode",
               "cval"], {"buffer_steps": None, "with_coord": False, "progress": False,
                         "sw_device": None, "cache_roi_weight_map": False, "cpu_thresh": None,
                         "buffer_dim": -1})
    mode = str(item.get("mode", "constant"))
    padding = str(item.get("padding_mode", "constant"))
    if mode not in ("constant", "gaussian"):
        item.refuse(f"{item.name}: mode {mode!r} (constant or gaussian)", "mode")
    if padding != "constant":
        item.refuse(f"{item.name}: padding_mode {padding!r} (only constant)", "padding_mode")
    roi = item.get("roi_size")
    overlap = item.get("overlap", 0.25)
    sigma = item.get("sigma_scale", 0.125)
    return {"roi_size": [int(v) for v in (roi if isinstance(roi, list) else [roi] * 3)],
            "overlap": [float(o) for o in overlap] if isinstance(overlap, list)
            else float(overlap),
            "mode": mode, "sigma_scale": [float(s) for s in sigma] if isinstance(sigma, list)
            else float(sigma),
            "sw_batch_size": int(item.get("sw_batch_size", 1)), "padding_mode": padding,
            "cval": float(item.get("cval", 0.0))}


def translate(bundle: ImportedBundle, parser: Any | None = None) -> dict[str, Any]:
    """The card profile for ``bundle`` (``framework: monai`` and its steps).

    Raises:
        BundleError: a transform or parameter is not supported (file:line in the message).
    """
    _frameworks()
    import monai

    parser = parser if parser is not None else _parser(bundle)
    pre_ids = _transform_ids(parser, bundle, "preprocessing")
    image_key = "image"
    if pre_ids:
        keys = _Item(bundle, parser, pre_ids[0]).get("keys", "image")
        image_key = keys[0] if isinstance(keys, list) else str(keys)
    pre = [s for cid in pre_ids if (s := _pre_step(_Item(bundle, parser, cid), image_key))]
    post = [s for cid in _transform_ids(parser, bundle, "postprocessing")
            if (s := _post_step(_Item(bundle, parser, cid)))]
    return {"framework": "monai", "monai_version": str(monai.__version__),
            "preprocessing": pre, "inferer": _inferer(parser, bundle), "postprocessing": post}


# ---------------------------------------------------------------------------------------
# network, MONAI's own run and the check


def _network(bundle: ImportedBundle, parser: Any) -> Any:
    import torch

    if bundle.weights.suffix == ".ts":
        network = torch.jit.load(str(bundle.weights), map_location="cpu")  # type: ignore[no-untyped-call]
    else:
        network = parser.get_parsed_content("network_def")
        state = torch.load(str(bundle.weights), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        network.load_state_dict(state)
    return network.eval()


def _in_channels(bundle: ImportedBundle) -> int:
    image = (bundle.metadata.get("network_data_format", {}).get("inputs", {})
             .get("image", {}))
    return int(image.get("num_channels", 1))


def _channel_def(bundle: ImportedBundle) -> dict[int, str]:
    outputs = bundle.metadata.get("network_data_format", {}).get("outputs", {})
    pred: Any = outputs.get("pred") or next(iter(outputs.values()), {})
    names = pred.get("channel_def", {}) if isinstance(pred, dict) else {}
    return {int(k): str(v) for k, v in names.items()}


def run_bundle_with_monai(bundle: ImportedBundle, nifti: Path
                          ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32] | None]:
    """The bundle's own pipeline through MONAI on ``nifti``: the final labels (``[x, y, z]``,
    the file's array order) and the data just before ``Invertd`` (model grid) or None."""
    _frameworks()
    import torch
    from monai.data import decollate_batch, list_data_collate  # type: ignore[attr-defined]
    from monai.transforms import (  # type: ignore[attr-defined]
        Invertd,
        SaveImage,
        SaveImaged,
    )

    parser = _parser(bundle)
    network = _network(bundle, parser)
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    first = pre.transforms[0]
    image_key = first.keys[0] if hasattr(first, "keys") else "image"
    data = pre({image_key: str(nifti)})
    batch = list_data_collate([data])
    with torch.no_grad():
        batch["pred"] = inferer(batch[image_key], network)
    item = decollate_batch(batch)[0]
    before_invert: npt.NDArray[np.float32] | None = None
    for transform in getattr(post, "transforms", [post]):
        if isinstance(transform, SaveImage | SaveImaged):
            continue
        if isinstance(transform, Invertd) and before_invert is None:
            before_invert = np.asarray(item["pred"].detach().cpu().numpy(), dtype=np.float32)
        item = transform(item)
    labels = np.asarray(item["pred"].detach().cpu().numpy())[0]
    return np.rint(labels).astype(np.int64), before_invert


@dataclass
class CheckFigures:
    """Agreement of the package with the bundle run through MONAI."""

    voxel_agreement: float
    dice: dict[str, float]
    max_probability_diff: float | None
    voxels: int
    counts: dict[str, int]  # voxels of each structure in MONAI's labels

    @property
    def passed(self) -> bool:
        return (self.voxel_agreement >= MIN_VOXEL_AGREEMENT
                and all(d >= MIN_DICE for d in self.dice.values())
                and (self.max_probability_diff is None
                     or self.max_probability_diff <= MAX_PROBABILITY_DIFF))

    def as_dict(self) -> dict[str, Any]:
        return {"voxel_agreement": self.voxel_agreement, "dice": self.dice,
                "max_probability_diff": self.max_probability_diff, "voxels": self.voxels,
                "structure_voxels": self.counts,
                "thresholds": {"voxel_agreement": MIN_VOXEL_AGREEMENT, "dice": MIN_DICE,
                               "probability": MAX_PROBABILITY_DIFF},
                "passed": self.passed}


def compare(ours: npt.NDArray[Any], theirs: npt.NDArray[Any], labels: Mapping[int, str],
            our_grid: npt.NDArray[np.float32] | None,
            their_grid: npt.NDArray[np.float32] | None) -> CheckFigures:
    """Voxel agreement, per-label Dice and the largest model-grid difference."""
    if ours.shape != theirs.shape:
        raise BundleError(f"the package's labels have shape {list(ours.shape)}, MONAI's "
                          f"{list(theirs.shape)}")
    dice: dict[str, float] = {}
    counts: dict[str, int] = {}
    for value, name in labels.items():
        a, b = ours == value, theirs == value
        counts[name] = int(b.sum())
        total = int(a.sum()) + int(b.sum())
        dice[name] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    diff = None
    if our_grid is not None and their_grid is not None:
        if our_grid.shape != their_grid.shape:
            raise BundleError(f"model grids differ: {list(our_grid.shape)} here, "
                              f"{list(their_grid.shape)} in MONAI")
        diff = float(np.abs(our_grid - their_grid).max())
    return CheckFigures(float((ours == theirs).mean()), dice, diff, int(ours.size), counts)


def synthetic_image(profile: Mapping[str, Any]) -> sitk.Image:
    """A volume for the check: an ellipsoid 'body' with brighter and darker ellipsoids, in
    the intensity range the bundle scales from, about 1.3 windows a side on the model grid,
    its voxels other than the model's spacing, in LPS (so RAS flips two axes)."""
    roi = np.asarray(profile["inferer"]["roi_size"], dtype=float)
    pixdim = next((np.asarray(s["pixdim"]) for s in profile["preprocessing"]
                   if s["transform"] == "Spacing"), np.ones(3))
    scale = next((s for s in profile["preprocessing"]
                  if s["transform"] == "ScaleIntensityRange"), None)
    low, high = (scale["a_min"], scale["a_max"]) if scale else (0.0, 1000.0)
    spacing = pixdim * np.array([0.8, 0.9, 1.25])
    size = np.maximum(np.round(roi * 1.3 * pixdim / spacing), 8).astype(int)  # [x, y, z]
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    array = np.full(tuple(size[::-1]), low, dtype=np.float32)
    array[(x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.8) ** 2 < 1] = low + 0.45 * (high - low)
    array[((x - 0.3) / 0.3) ** 2 + (y / 0.25) ** 2 + ((z + 0.1) / 0.35) ** 2 < 1] = high
    array[((x + 0.35) / 0.25) ** 2 + ((y - 0.1) / 0.3) ** 2 + (z / 0.3) ** 2 < 1] = (
        low + 0.75 * (high - low))
    array += np.asarray(rng.normal(0, 0.02 * (high - low), array.shape), dtype=np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin((-50.0, -60.0, 10.0))
    return image


def check_bundle(bundle: ImportedBundle, package: Path, image: sitk.Image
                 ) -> tuple[CheckFigures, dict[int, str]]:
    """Run the package (profile + ONNX Runtime) and the bundle (MONAI) on ``image``."""
    from dicomnode.inference.profiles.monai import run_profile
    from dicomnode.inference.runtime import open_card_session
    from dicomnode.models.card import load_card

    card = load_card(package)
    assert card.profile is not None
    with tempfile.TemporaryDirectory(prefix="dicomnode-monai-check-") as tmp:
        nifti = Path(tmp) / "image.nii.gz"
        sitk.WriteImage(image, str(nifti))
        # both read the same file: the check compares pipelines, not file round trips
        image = sitk.ReadImage(str(nifti))
        theirs, their_grid = run_bundle_with_monai(bundle, nifti)
    session = open_card_session(card)

    def run_model(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(session.run(batch), dtype=np.float32)

    ours = run_profile(card.profile, image, run_model, keep_model_grid=True)
    labels = {label.value: label.name for label in card.outputs.labels}
    return compare(ours.labels, theirs, labels, ours.model_grid, their_grid), labels


# ---------------------------------------------------------------------------------------
# the package


def _labels(bundle: ImportedBundle, structures: Mapping[str, Any] | None
            ) -> tuple[list[dict[str, Any]], list[str]]:
    """The card's labels from the bundle's ``channel_def``, coded by the structures given or
    the shared table (:mod:`dicomnode.inference.structures`); names left uncoded need review."""
    from dicomnode.inference.structures import labels_for

    channels = _channel_def(bundle)
    if not channels:
        raise BundleError(f"{bundle.metadata_path}: network_data_format.outputs.pred."
                          "channel_def (label value -> name) is needed")
    return labels_for({name: value for value, name in sorted(channels.items()) if value},
                      structures)


def _licence(bundle: ImportedBundle) -> str:
    for path in (bundle.folder / "LICENSE", bundle.folder / "docs" / "LICENSE",
                 bundle.folder / "LICENSE.txt", bundle.folder / "docs" / "LICENSE.txt"):
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    text = bundle.metadata.get("license") or bundle.metadata.get("copyright")
    if text:
        return f"{text}\n"
    raise BundleError(f"{bundle.folder}: no licence found (LICENSE, docs/LICENSE, or "
                      "license/copyright in configs/metadata.json)")


def import_bundle(folder: Path, name: str, models_dir: Path, *,
                  structures: Mapping[str, Any] | None = None,
                  check_image: sitk.Image | None = None) -> tuple[Path, CheckFigures]:
    """Import the bundle in ``folder`` as ``models_dir/name``; returns the package and the
    check's figures. A failed check (or any error) leaves no package.

    Raises:
        BundleError: the bundle cannot be imported or its check fails.
    """
    _frameworks()
    import monai
    import torch

    from dicomnode.inference.export import export_network
    from dicomnode.models.card import _NAME, load_card

    if not _NAME.match(name):
        raise BundleError(f"--name {name!r} is not a model name: lower-case letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit, at most 64")
    bundle = read_bundle(folder)
    package = Path(models_dir) / name
    if package.exists():
        raise BundleError(f"{package} exists; remove it or choose another --name")
    parser = _parser(bundle)
    profile = translate(bundle, parser)
    labels, review = _labels(bundle, structures)
    if review:
        profile["needs_review"] = review
    meta = bundle.metadata
    modality = (meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
                .get("modality", "CT"))
    modality = {"MRI": "MR"}.get(str(modality).upper(), str(modality).upper())
    softmax = any(s["transform"] == "Activations" and s.get("softmax")
                  for s in profile["postprocessing"])
    argmax = any(s["transform"] == "AsDiscrete" and s.get("argmax")
                 for s in profile["postprocessing"])
    card: dict[str, Any] = {
        "name": name,
        "version": str(meta.get("version", "0")),
        "description": str(meta.get("description") or f"MONAI bundle {bundle.folder.name}"),
        "intended_use": str(meta.get("intended_use") or "see the bundle's documentation"),
        # an imported model is research until someone approves it (edit the card's status:
        # clinical or qa; docs/model-cards.md, "Model approval")
        "status": "research",
        "license": str(meta.get("license") or "see LICENSE"),
        "authors": [str(meta.get("authors") or "unknown")],
        "source": f"MONAI bundle {bundle.folder.name}, imported with MONAI {monai.__version__}",
        "file": "model.onnx",
        "inputs": [{"name": "image", "modality": modality}],
        "outputs": {"activation": "softmax" if softmax else "none",
                    "decision": "argmax" if argmax else "threshold",
                    "labels": labels if argmax else
                    [{**label, "channel": label["value"] - 1} for label in labels]},
        "profile": profile,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=str(models_dir)))
    try:
        network = _network(bundle, parser)
        roi = profile["inferer"]["roi_size"]
        example = torch.zeros((1, _in_channels(bundle), *roi), dtype=torch.float32)
        export_network(network, example, staging / "model.onnx", input_name="input",
                       output_name="logits")
        card["sha256"] = file_sha256(staging / "model.onnx")
        (staging / "LICENSE").write_text(_licence(bundle), encoding="utf-8")
        provenance = {
            "bundle": bundle.folder.name, "bundle_version": meta.get("version"),
            "weights": bundle.weights.name, "weights_sha256": file_sha256(bundle.weights),
            "config": bundle.config_path.name, "monai": monai.__version__,
            "torch": torch.__version__,
            "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        final = staging.with_name(name)
        # the card names the package folder; write it, then move the folder in place
        (staging / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        staging.rename(final)
        staging = final
        load_card(final)
        image = check_image if check_image is not None else synthetic_image(profile)
        figures, _ = check_bundle(bundle, final, image)
        report = {"framework": "monai", "monai": monai.__version__, "torch": torch.__version__,
                  **figures.as_dict()}
        (final / "check_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not figures.passed:
            raise BundleError(
                f"check failed: {figures.voxel_agreement:.5%} voxels agree, Dice "
                + ", ".join(f"{k} {v:.4f}" for k, v in figures.dice.items())
                + f", probabilities within {figures.max_probability_diff} (needs >= "
                f"{MIN_VOXEL_AGREEMENT:.1%}, Dice >= {MIN_DICE}, <= {MAX_PROBABILITY_DIFF})")
        return final, figures
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``models import monai-bundle`` options."""
    parser.add_argument("--structures", type=Path, default=None, metavar="FILE",
                        help="YAML: label name -> {color, category, type, "
                        "rt_roi_interpreted_type} as in the card's labels")
    parser.add_argument("--check-image", type=Path, default=None, metavar="FILE",
                        help="an image (NIfTI) to check the package on instead of a "
                        "synthetic volume")


def run(args: argparse.Namespace, models_dir: Path) -> int:
    """Import ``args.folder`` as ``args.name``; print the check's figures."""
    from dicomnode.models.card import CardError

    structures = None
    try:
        if args.structures is not None:
            loaded = yaml.safe_load(Path(args.structures).read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise BundleError(f"{args.structures}: a mapping label name -> entry needed")
            structures = loaded
        image = sitk.ReadImage(str(args.check_image)) if args.check_image else None
        Path(models_dir).mkdir(parents=True, exist_ok=True)
        package, figures = import_bundle(Path(args.folder), args.name, Path(models_dir),
                                         structures=structures, check_image=image)
    except (BundleError, CardError, OSError, RuntimeError, ValueError) as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 1
    print(f"imported {package}")
    print(f"  check against MONAI: {figures.voxel_agreement:.5%} of {figures.voxels} voxels "
          "agree; Dice " + ", ".join(f"{k} {v:.5f}" for k, v in figures.dice.items())
          + f"; max probability difference {figures.max_probability_diff}; structure voxels "
          + ", ".join(f"{k} {v}" for k, v in figures.counts.items()))
    from dicomnode.models.card import load_card

    card = load_card(package)
    review = (card.profile or {}).get("needs_review")
    if review:
        print(f"  needs review (no SNOMED CT code known): {', '.join(review)}")
    return 0
