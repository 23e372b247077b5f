"""``dicomnode models import nnunet FOLDER --name NAME``: an nnU-Net v2 trained-model folder
(``dataset.json``, ``plans.json``, ``fold_N/checkpoint_*.pth``, as ``nnUNetv2_train`` writes
it under ``Trainer__Plans__configuration``) -> a model package running the ``nnunet`` profile
(:mod:`dicomnode.inference.profiles.nnunet`).

Each fold's network is built from the plan by its trainer's ``build_network_architecture``
(the trainer class is read from the checkpoint and imported from its own module only: nnU-Net's
lookup by name imports every trainer, some of which need torchvision), its weights loaded and
exported to ``fold_N.onnx`` by :func:`dicomnode.inference.export.export_network`. The card
holds the plan's parameters; ``PROVENANCE`` what was imported; ``check_report.json`` the check:
the package's output (ONNX Runtime) against ``nnUNetPredictor`` (torch) with the same folds,
mirroring and step on one volume (a synthetic CT/MR-like one, or ``--check-image``). An import
whose check fails leaves nothing behind.

torch and nnunetv2 are imported inside the functions: this module is imported when the CLI
builds its parser.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from dicomnode.models.card import file_sha256

__all__ = ["THRESHOLDS", "CheckFigures", "add_arguments", "compare", "import_model",
           "reference_prediction", "run"]

#: the check's pass marks: voxel agreement of the label maps, per-structure Dice, and the
#: largest difference of the softmax/sigmoid probabilities on the model grid
THRESHOLDS = {"voxel_agreement": 0.999, "dice": 0.995, "probability_difference": 1e-3}
LICENCE_NAMES = ("LICENSE", "LICENSE.txt", "LICENCE", "LICENCE.txt", "COPYING", "license.txt")


class ImportFailed(Exception):
    """The folder cannot be imported; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configuration", default=None,
                        help="the plan configuration (default: from the folder name, else "
                             "3d_fullres)")
    parser.add_argument("--folds", nargs="+", default=None,
                        help="folds to import (default: every fold_N holding the checkpoint)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth",
                        help="checkpoint file name in each fold (default checkpoint_final.pth)")
    parser.add_argument("--structures", type=Path, default=None,
                        help="YAML mapping label names to display names, SNOMED CT codes and "
                             "colours (see dicomnode/inference/structures.py)")
    parser.add_argument("--check-image", type=Path, default=None,
                        help="a volume (NIfTI or any SimpleITK format) for the check; default "
                             "a synthetic one")
    parser.add_argument("--orientation", default=None,
                        help="reorient series to this orientation (DICOM letters) before the "
                             "network, as the model's training data were stored; RAS for "
                             "TotalSegmentator's weights (default: as read)")
    parser.add_argument("--version", dest="model_version", default="1",
                        help="the package's version (default 1)")


@dataclass
class CheckFigures:
    """Agreement of the package with nnU-Net's own predictor on one volume."""

    voxel_agreement: float
    dice: dict[str, float]
    max_probability_difference: float
    max_logit_difference: float
    probability_difference_p999: float
    input_difference: float
    voxels: int
    model_grid: list[int]
    problems: list[str] = field(default_factory=list)

    @property
    def min_dice(self) -> float:
        return min(self.dice.values(), default=1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "voxel_agreement": self.voxel_agreement,
            "dice": self.dice,
            "min_dice": self.min_dice,
            "max_probability_difference": self.max_probability_difference,
            "probability_difference_p99_9": self.probability_difference_p999,
            "max_logit_difference": self.max_logit_difference,
            "preprocessed_input_max_difference": self.input_difference,
            "voxels": self.voxels,
            "model_grid": self.model_grid,
        }


# --------------------------------------------------------------------------- reading


@dataclass
class NnunetFolder:
    """What the importer read from an nnU-Net result folder."""

    folder: Path
    dataset: dict[str, Any]
    plans: dict[str, Any]
    configuration: str
    trainer_name: str
    folds: list[str]
    checkpoints: list[Path]
    mirror_axes: tuple[int, ...] | None
    weights: list[dict[str, Any]]
    postprocessing: list[dict[str, Any]]


def _folds(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> list[str]:
    if folds:
        return [str(f) for f in folds]
    found = sorted((p.name[5:] for p in folder.glob("fold_*") if (p / checkpoint).is_file()),
                   key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    if not found:
        raise ImportFailed(f"{folder}: no fold_N/{checkpoint}")
    return found


def _postprocessing(folder: Path) -> list[dict[str, Any]]:
    """nnU-Net's postprocessing steps (``postprocessing.json`` next to the folds or in a
    ``crossval_results_folds_*`` folder); only largest-component steps are understood."""
    candidates = [folder / "postprocessing.json", *sorted(folder.glob("*/postprocessing.json"))]
    for path in candidates:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        names = data.get("postprocessing_fns", [])
        kwargs = data.get("postprocessing_kwargs", [])
        steps = []
        for name, kw in zip(names, kwargs, strict=True):
            if name != "remove_all_but_largest_component_from_segmentation":
                raise ImportFailed(f"{path}: postprocessing step {name} is not supported")
            steps.append({"labels_or_regions": kw["labels_or_regions"]})
        return steps
    return []


def read_folder(folder: Path, *, configuration: str | None, folds: Sequence[str] | None,
                checkpoint: str) -> NnunetFolder:
    """Read ``folder``'s JSON files and checkpoints (torch)."""
    import torch

    for name in ("dataset.json", "plans.json"):
        if not (folder / name).is_file():
            raise ImportFailed(f"{folder}: no {name} (is it an nnU-Net v2 trained-model folder?)")
    dataset = json.loads((folder / "dataset.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    parts = folder.name.split("__")
    fold_names = _folds(folder, folds, checkpoint)
    weights, paths = [], []
    trainer_name, mirror, config_name = "", None, configuration
    for i, fold in enumerate(fold_names):
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ImportFailed(f"{path}: not found")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if i == 0:
            trainer_name = str(ckpt.get("trainer_name") or parts[0])
            mirror = ckpt.get("inference_allowed_mirroring_axes")
            config_name = configuration or ckpt.get("init_args", {}).get("configuration") or (
                parts[2] if len(parts) == 3 else "3d_fullres")
        weights.append(ckpt["network_weights"])
        paths.append(path)
    assert config_name is not None
    if config_name not in plans.get("configurations", {}):
        raise ImportFailed(f"{folder / 'plans.json'}: no configuration {config_name!r} "
                           f"(has {', '.join(plans.get('configurations', {}))})")
    return NnunetFolder(folder, dataset, plans, config_name, trainer_name, fold_names, paths,
                        None if mirror is None else tuple(int(a) for a in mirror), weights,
                        _postprocessing(folder))


def _trainer_class(name: str) -> Any:
    """The trainer class ``name``, imported from the one module that defines it."""
    import importlib

    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if name == "nnUNetTrainer":
        return nnUNetTrainer
    root = Path(nnunetv2.__path__[0])
    pattern = re.compile(rf"^class {re.escape(name)}\(", re.MULTILINE)
    for path in sorted((root / "training" / "nnUNetTrainer").rglob("*.py")):
        if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            module = ".".join(("nnunetv2", *path.relative_to(root).with_suffix("").parts))
            try:
                return getattr(importlib.import_module(module), name)
            except Exception as exc:  # a trainer module needing what is not installed
                print(f"note: trainer {name} cannot be imported ({exc}); building the network "
                      "with nnUNetTrainer's architecture", file=sys.stderr)
                return nnUNetTrainer
    return nnUNetTrainer  # a custom trainer: the plan's architecture, as nnU-Net's default


def build_network(model: NnunetFolder) -> Any:
    """The plan's network (no deep supervision), with fold 0's weights, in eval mode."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(model.plans)
    config = manager.get_configuration(model.configuration)
    labels = manager.get_label_manager(model.dataset)
    trainer = _trainer_class(model.trainer_name)
    network = trainer.build_network_architecture(
        manager, config, determine_num_input_channels(manager, config, model.dataset),
        labels.num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(model.weights[0])
    network.eval()
    return network


# --------------------------------------------------------------------------- the card


def _input_specs(model: NnunetFolder) -> list[dict[str, str]]:
    channels = model.dataset.get("channel_names") or model.dataset.get("modality") or {}
    schemes = model.plans["configurations"][model.configuration].get("normalization_schemes", [])
    specs, used = [], set()
    for i, key in enumerate(sorted(channels, key=lambda k: int(k))):
        raw = str(channels[key])
        ct = raw.upper() == "CT" or (i < len(schemes) and schemes[i] == "CTNormalization")
        name = re.sub(r"[^A-Za-z0-9_]", "_", raw).lower() or f"channel{i}"
        if not re.match(r"^[A-Za-z_]", name):
            name = f"c_{name}"
        while name in used:
            name += f"_{i}"
        used.add(name)
        specs.append({"name": name[:64], "modality": "CT" if ct else "MR"})
    if not specs:
        raise ImportFailed("dataset.json names no input channel (channel_names)")
    return specs


def profile_of(model: NnunetFolder, files: Sequence[str],
               orientation: str | None = None) -> dict[str, Any]:
    """The card's ``profile`` for ``model``: the plan's parameters the nnunet profile needs."""
    import nnunetv2

    plans = model.plans
    config = plans["configurations"][model.configuration]
    if "inherits_from" in config:  # resolve the inheritance as PlansManager does
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        config = PlansManager(plans).get_configuration(model.configuration).configuration
    if config.get("resampling_fn_data") != "resample_data_or_seg_to_shape" or config.get(
            "resampling_fn_probabilities") != "resample_data_or_seg_to_shape":
        raise ImportFailed("only nnU-Net's default resampling (resample_data_or_seg_to_shape) "
                           "is supported")
    if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise ImportFailed(f"preprocessor {config.get('preprocessor_name')} is not supported")
    if len(config["patch_size"]) != 3:
        raise ImportFailed(f"configuration {model.configuration} is 2d: only 3d "
                           "configurations are supported")
    if "previous_stage" in config:
        raise ImportFailed(f"configuration {model.configuration} is a cascade stage: not "
                           "supported")
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    norms = []
    for i, scheme in enumerate(config["normalization_schemes"]):
        entry: dict[str, Any] = {"scheme": scheme,
                                 "use_mask_for_norm": bool(config["use_mask_for_norm"][i])}
        if scheme == "CTNormalization":
            p = properties[str(i)]
            entry.update(mean=float(p["mean"]), std=float(p["std"]),
                         percentile_00_5=float(p["percentile_00_5"]),
                         percentile_99_5=float(p["percentile_99_5"]))
        norms.append(entry)

    def resampling(key: str) -> dict[str, Any]:
        kw = config[key]
        return {"order": int(kw.get("order", 3)), "order_z": int(kw.get("order_z", 0)),
                "force_separate_z": kw.get("force_separate_z")}

    labels = model.dataset["labels"]
    regions = model.dataset.get("regions_class_order")
    heads = len(regions) if regions else len(labels)
    return {
        "framework": "nnunet",
        "nnunet_version": nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else
        _version("nnunetv2"),
        "configuration": model.configuration,
        "trainer": model.trainer_name,
        "plans": plans.get("plans_name", "nnUNetPlans"),
        "folds": model.folds,
        "files": list(files),
        "transpose_forward": list(plans["transpose_forward"]),
        "transpose_backward": list(plans["transpose_backward"]),
        "spacing": [float(s) for s in config["spacing"]],
        "patch_size": [int(s) for s in config["patch_size"]],
        "normalization": norms,
        "resampling_data": resampling("resampling_fn_data_kwargs"),
        "resampling_probabilities": resampling("resampling_fn_probabilities_kwargs"),
        "tile_step_size": 0.5,
        "use_gaussian": True,
        "mirror_axes": None if model.mirror_axes is None else list(model.mirror_axes),
        "labels": labels,
        "regions_class_order": regions,
        "num_segmentation_heads": heads,
        "postprocessing": model.postprocessing,
        "orientation": orientation,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def card_of(model: NnunetFolder, name: str, version: str, profile: dict[str, Any],
            structures: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The card (as YAML-ready data) and the label names needing review."""
    from dicomnode.inference.structures import labels_for

    dataset = model.dataset
    regions = profile["regions_class_order"]
    foreground = [(k, v) for k, v in dataset["labels"].items() if k != "background"]
    if regions:  # a region's label value is its place in regions_class_order
        values = {k: int(regions[i]) for i, (k, _) in enumerate(foreground)}
    else:
        values = {k: int(v) for k, v in foreground}
    if max(values.values(), default=0) > 255:
        raise ImportFailed("label values above 255 are not supported")
    labels, review = labels_for(values, structures)
    if regions:
        for i, label in enumerate(labels):
            label["channel"] = i
    config = profile
    licence = str(dataset.get("licence") or dataset.get("license") or "see LICENSE")
    card = {
        "name": name,
        "version": version,
        "description": (
            f"nnU-Net v2 model {model.plans.get('dataset_name', model.folder.name)}, "
            f"configuration {model.configuration}, trainer {model.trainer_name}, folds "
            f"{', '.join(model.folds)}; imported by dicomnode from {model.folder.name}. "
            + str(dataset.get("description") or "")).strip(),
        "intended_use": ("As validated by whoever trained the model (see PROVENANCE); the "
                         "import reproduces nnU-Net's own output (see check_report.json), it "
                         "does not validate the model."),
        # an imported model is research until someone approves it (edit the card's status:
        # clinical or qa; docs/model-cards.md, "Model approval")
        "status": "research",
        "license": licence[:200],
        "authors": [str(dataset.get("reference") or "the model's trainers (see PROVENANCE)")],
        "source": f"nnU-Net v2 result folder {model.folder.name}",
        "file": config["files"][0],
        "onnx_input": "input",
        "onnx_output": "logits",
        "inputs": _input_specs(model),
        "preprocessing": {"patch_size": config["patch_size"], "dimensionality": "3d"},
        "outputs": {
            "activation": "sigmoid" if regions else "softmax",
            "decision": "threshold" if regions else "argmax",
            "labels": labels,
        },
        "profile": profile,
    }
    return card, review


# --------------------------------------------------------------------------- the check


def synthetic_volume(profile: dict[str, Any], modality: str) -> sitk.Image:
    """A CT- or MR-like volume for the check: a body ellipse with blobs of the dataset's
    foreground intensities, a bit larger than the patch on the model grid, on a grid that is
    neither the model's spacing nor its axes' order (so resampling and padding run)."""
    rng = np.random.default_rng(20260101)
    forward = profile["transpose_forward"]
    backward = profile["transpose_backward"]
    spacing_zyx = [float(profile["spacing"][i]) for i in backward]  # untransposed
    patch_zyx = [int(profile["patch_size"][i]) for i in backward]
    factors = (1.2, 1.1, 1.1)
    shape = [max(8, int(p * 1.3 / f)) for p, f in zip(patch_zyx, factors, strict=True)]
    spacing = [s * f for s, f in zip(spacing_zyx, factors, strict=True)]
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = x**2 / 0.8 + y**2 / 0.6 <= 1.0
    norm = profile["normalization"][0]
    if norm["scheme"] == "CTNormalization":
        background, mean, std = -1000.0, norm["mean"], norm["std"]
    else:
        background, mean, std = 0.0, 300.0, 100.0
    img = np.where(body, mean - std, background)
    for _ in range(6):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.15, 0.35, 3)
        blob = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
        img[blob & body] = mean + rng.uniform(-1, 1) * std
    img = img + rng.normal(0, 0.1 * std, img.shape) * body
    del forward
    image = sitk.GetImageFromArray(img.astype(np.float32))
    image.SetSpacing(spacing[::-1])
    return image


def reference_prediction(model_folder: Path, image: sitk.Image, folds: Sequence[str], *,
                         checkpoint: str = "checkpoint_final.pth", configuration: str | None = None,
                         ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """``nnUNetPredictor``'s output for ``image`` written to and read from NIfTI by nnU-Net's
    ``SimpleITKIO``: the label map ``[z, y, x]`` (with the folder's postprocessing applied, as
    ``nnUNetv2_apply_postprocessing`` would), the float16 fold-averaged logits on the model
    grid and the preprocessed input (float32, model grid)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = read_folder(model_folder, configuration=configuration, folds=folds,
                        checkpoint=checkpoint)
    network = build_network(model)
    manager = PlansManager(model.plans)
    config = manager.get_configuration(model.configuration)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, manager, config, model.weights, model.dataset,
                                    model.trainer_name, model.mirror_axes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case_0000.nii.gz"
        sitk.WriteImage(image, str(path))
        data, props = SimpleITKIO().read_images([str(path)])
    adapter = PreprocessAdapterFromNpy([data], [None], [props], [None], manager, model.dataset,
                                       config, num_threads_in_multithreaded=1, verbose=False)
    item = next(adapter)
    preprocessed = item["data"]
    logits = predictor.predict_logits_from_preprocessed_data(preprocessed).cpu()
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, manager, config, predictor.label_manager, item["data_properties"])
    seg = np.asarray(seg)
    if model.postprocessing:
        from nnunetv2.postprocessing.remove_connected_components import (
            apply_postprocessing,
            remove_all_but_largest_component_from_segmentation,
        )

        seg = apply_postprocessing(
            seg, [remove_all_but_largest_component_from_segmentation] * len(model.postprocessing),
            model.postprocessing)
    return seg, logits.numpy(), np.asarray(preprocessed)


def _probabilities(logits: npt.NDArray[Any], regions: bool) -> npt.NDArray[np.float32]:
    x = logits.astype(np.float32)
    if regions:
        return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float32)
    x = x - x.max(axis=0, keepdims=True)
    e = np.exp(x)
    return np.asarray(e / e.sum(axis=0, keepdims=True), dtype=np.float32)


def compare(card: Any, model_folder: Path, image: sitk.Image, *,
            checkpoint: str = "checkpoint_final.pth") -> tuple[CheckFigures,
                                                                npt.NDArray[Any],
                                                                npt.NDArray[Any]]:
    """Our package (``card``) against nnU-Net on ``image``: figures, our label map, nnU-Net's."""
    from dicomnode.inference.profiles import nnunet as profile

    assert card.profile is not None
    folds = [str(f) for f in card.profile["folds"]]
    plan = profile.plan_of(card.profile)
    reference, ref_logits, ref_input = reference_prediction(
        model_folder, profile.oriented(plan, [image])[0], folds, checkpoint=checkpoint,
        configuration=card.profile["configuration"])
    if plan.orientation is not None:  # nnU-Net's labels back onto the image's own grid
        labels = sitk.GetImageFromArray(reference)
        labels.CopyInformation(profile.oriented(plan, [image])[0])
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            image.GetDirection())
        reference = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, code))
    prepared = profile.prepare(plan, [image])
    input_difference = float(np.abs(prepared.data - ref_input).max()) if (
        prepared.data.shape == ref_input.shape) else float("inf")
    ours_logits = profile.model_grid_logits(card, [image])
    ours, _, _ = profile.predict_label_map(card, [image])
    problems = []
    if ours_logits.shape != ref_logits.shape:
        problems.append(f"model grid {list(ours_logits.shape)} differs from nnU-Net's "
                        f"{list(ref_logits.shape)}")
        max_p = max_l = p999 = float("inf")
    else:
        regions = plan.regions_class_order is not None
        dp = np.abs(_probabilities(ours_logits, regions) - _probabilities(ref_logits, regions))
        max_p = float(dp.max())
        p999 = float(np.quantile(dp, 0.999))
        max_l = float(np.abs(ours_logits.astype(np.float32)
                             - ref_logits.astype(np.float32)).max())
    agreement = float(np.mean(ours == reference)) if ours.shape == reference.shape else 0.0
    dice: dict[str, float] = {}
    for label in card.outputs.labels:
        a, b = ours == label.value, reference == label.value
        total = int(a.sum()) + int(b.sum())
        if total:
            dice[label.name] = round(2.0 * int((a & b).sum()) / total, 6)
    figures = CheckFigures(agreement, dice, max_p, max_l, p999, input_difference,
                           int(reference.size), [int(s) for s in ours_logits.shape[1:]],
                           problems)
    if agreement < THRESHOLDS["voxel_agreement"]:
        figures.problems.append(f"voxel agreement {agreement:.5f} < "
                                f"{THRESHOLDS['voxel_agreement']}")
    low = {k: v for k, v in dice.items() if v < THRESHOLDS["dice"]}
    if low:
        figures.problems.append(f"Dice below {THRESHOLDS['dice']}: {low}")
    if not p999 <= THRESHOLDS["probability_difference"]:
        figures.problems.append(
            f"probabilities on the model grid differ by {p999:.2e} (99.9th percentile) > "
            f"{THRESHOLDS['probability_difference']}")
    return figures, ours, reference


# --------------------------------------------------------------------------- the import


def _write_licence(model: NnunetFolder, package: Path) -> None:
    for name in LICENCE_NAMES:
        if (model.folder / name).is_file():
            shutil.copy2(model.folder / name, package / "LICENSE")
            return
    said = model.dataset.get("licence") or model.dataset.get("license")
    (package / "LICENSE").write_text(
        "No licence file was found in the imported nnU-Net folder.\n"
        + (f"Its dataset.json states the licence: {said}\n" if said else
           "Its dataset.json states no licence: ask the model's owner before clinical or "
           "shared use.\n"))


def import_model(folder: Path, package: Path, *, name: str, version: str = "1",
                 configuration: str | None = None, folds: Sequence[str] | None = None,
                 checkpoint: str = "checkpoint_final.pth", structures: Path | None = None,
                 check_image: sitk.Image | None = None,
                 orientation: str | None = None) -> tuple[CheckFigures, list[str]]:
    """Write the package for ``folder`` into ``package`` (an empty folder) and check it.

    Returns the check's figures (``problems`` empty when it passed) and the label names that
    need review.
    """
    import onnxruntime
    import torch
    import yaml

    from dicomnode.inference.export import export_network
    from dicomnode.models.card import load_card

    model = read_folder(folder, configuration=configuration, folds=folds, checkpoint=checkpoint)
    network = build_network(model)
    files = [f"fold_{f}.onnx" for f in model.folds]
    profile = profile_of(model, files, orientation)
    channels = len(model.dataset.get("channel_names") or model.dataset.get("modality") or {})
    example = torch.zeros((1, channels, *profile["patch_size"]), dtype=torch.float32)
    for weights, file in zip(model.weights, files, strict=True):
        network.load_state_dict(weights)
        network.eval()
        export_network(network, example, package / file, opset=17, input_name="input",
                       output_name="logits")
    card, review = card_of(model, name, version, profile, structures)
    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    (package / "card.yaml").write_text(yaml.dump(card, Dumper=_Dumper, sort_keys=False,
                                                 width=100))
    _write_licence(model, package)
    provenance = {
        "imported_from": str(folder.resolve()),
        "dataset": model.plans.get("dataset_name"),
        "plans": model.plans.get("plans_name"),
        "configuration": model.configuration,
        "trainer": model.trainer_name,
        "folds": model.folds,
        "checkpoints": {str(p.relative_to(folder)): file_sha256(p) for p in model.checkpoints},
        "dataset_json": {k: model.dataset.get(k) for k in ("name", "description", "reference",
                                                             "licence", "release")
                         if k in model.dataset},
        "nnunetv2": _version("nnunetv2"),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (package / "PROVENANCE").write_text(json.dumps(provenance, indent=2) + "\n")
    loaded = load_card(package)
    modality = loaded.inputs[0].modality
    image = check_image if check_image is not None else synthetic_volume(profile, modality)
    figures, _, _ = compare(loaded, folder, image, checkpoint=checkpoint)
    report = {
        "framework": "nnunetv2",
        "framework_version": _version("nnunetv2"),
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "input": "given volume" if check_image is not None else "synthetic volume",
        "folds": model.folds,
        "mirror_axes": profile["mirror_axes"],
        "thresholds": THRESHOLDS,
        **figures.as_dict(),
        "passed": not figures.problems,
        "problems": figures.problems,
        "needs_review": review,
    }
    (package / "check_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return figures, review


def run(args: argparse.Namespace, models_dir: Path) -> int:
    """The ``models import nnunet`` command; prints a report, returns the exit code."""
    from dicomnode.inference.structures import StructuresError

    folder = Path(args.folder)
    name = str(args.name)
    if not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", name):
        print(f"--name {name!r}: lower-case letters, digits, '.', '_' and '-'", file=sys.stderr)
        return 2
    target = Path(models_dir) / name
    if target.exists():
        print(f"{target} exists: remove it or choose another --name", file=sys.stderr)
        return 2
    image = None
    if args.check_image is not None:
        try:
            image = sitk.ReadImage(str(args.check_image))
        except RuntimeError as exc:
            print(f"--check-image {args.check_image}: cannot read: {exc}", file=sys.stderr)
            return 2
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.importing-", dir=models_dir)) / name
    staging.mkdir()
    try:
        figures, review = import_model(
            folder, staging, name=name, version=args.model_version,
            configuration=args.configuration, folds=args.folds, checkpoint=args.checkpoint,
            structures=args.structures, check_image=image, orientation=args.orientation)
        if figures.problems:
            print(f"import of {folder.name} failed its check against nnU-Net; no package "
                  "written:", file=sys.stderr)
            for problem in figures.problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        staging.rename(target)
    except ImportError as exc:
        print(f"models import nnunet needs torch, nnunetv2 and onnx (pip install "
              f"'dicomnode[import]'): {exc}", file=sys.stderr)
        return 2
    except (ImportFailed, StructuresError, ValueError, KeyError, OSError) as exc:
        print(f"cannot import {folder}: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    print(f"imported {folder.name} as {target}")
    print(f"  check against nnunetv2 {_version('nnunetv2')}: voxel agreement "
          f"{figures.voxel_agreement:.5%}, min Dice {figures.min_dice:.4f}, probabilities "
          f"max |diff| {figures.max_probability_difference:.2e} (99.9th percentile "
          f"{figures.probability_difference_p999:.2e}) on the model grid "
          f"{figures.model_grid}")
    if review:
        print(f"  labels needing review (no code known; give --structures): {', '.join(review)}")
    return 0
