"""Build a small TRAINED nnU-Net v2 model offline, for the importer's tests.

A synthetic CT-like dataset (``--cases`` volumes of 64-96 voxels a side, a soft-tissue body in
air holding three ellipsoid "organs" named as TotalSegmentator names them: liver, spleen,
kidney_left) with anisotropic spacing that differs between cases (about 0.8 x 0.8 x 3 mm), so
that nnU-Net resamples every case with separate-z (order 3 in-plane, order 0 along z), is
planned and preprocessed with nnU-Net's own API, the 3d_fullres plan is shrunk (patch
16 x 48 x 48, three stages of 8-32 features) and two folds are trained on the CPU for 25 short
epochs with a :class:`nnUNetTrainer` subclass. A held-out case is then predicted with
``nnUNetPredictor`` and its Dice against the truth printed: the network must be decisive (a
random-weights network is no judge of exactness).

Output, ``OUT/``::

    nnUNetTrainerTiny__nnUNetPlans__3d_fullres/   dataset.json, plans.json, fold_0, fold_1
    nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
        the same weights with the checkpoints' trainer_name and inference mirroring axes of
        nnU-Net's nnUNetTrainerNoMirroring variant (as if trained with it)

Checkpoints keep only what inference reads (no optimizer state): 0.8 MB in all, committed as
``tests/data/nnunet_tiny`` (built with the defaults: 25 epochs of 20 iterations per fold; about
5 s an epoch on two idle CPU cores, 4-5 minutes in all; held-out Dice of nnUNetPredictor against
the truth: liver 0.78, spleen 0.92, left kidney 0.87). ``tests/test_nnunet_import.py`` uses the
committed folder; rebuild it with this tool when nnU-Net's checkpoint format changes.

Usage: ``python tools/build_tiny_nnunet.py OUT [--epochs 25] [--cases 12]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

DATASET_ID = 917
DATASET_NAME = f"Dataset{DATASET_ID:03d}_TinyCT"
TRAINER = "nnUNetTrainerTiny"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}
#: organ HU (mean) for labels 1..3; the body is 30 HU, air -1000 HU
ORGAN_HU = {1: 120.0, 2: 260.0, 3: -120.0}
PATCH = [16, 48, 48]


def make_case(seed: int, *, size: tuple[int, int, int] | None = None,
              spacing: tuple[float, float, float] | None = None,
              zero_border: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic CT (HU, int16) and its label image, both in LPS with identity direction.

    ``size`` and ``spacing`` are [x, y, z] (voxels, mm); by default drawn from the seed
    (64-96 in-plane, 18-28 slices; 0.7-0.9 mm in-plane, 2.6-3.4 mm between slices).
    ``zero_border`` rows at the top of every slice are 0 (a scanner's out-of-field fill), so
    nnU-Net's crop to the nonzero box does something.
    """
    rng = np.random.default_rng(seed)
    if size is None:
        n = int(rng.integers(64, 97))
        size = (n, n + int(rng.integers(-6, 7)), int(rng.integers(18, 29)))
    if spacing is None:
        d = float(rng.uniform(0.7, 0.9))
        spacing = (d, d, float(rng.uniform(2.6, 3.4)))
    nx, ny, nz = size
    z, y, x = np.meshgrid(*(np.arange(k, dtype=np.float64) for k in (nz, ny, nx)), indexing="ij")
    # physical mm from the volume centre
    pz, py, px = ((z - (nz - 1) / 2) * spacing[2], (y - (ny - 1) / 2) * spacing[1],
                  (x - (nx - 1) / 2) * spacing[0])
    width, depth = nx * spacing[0], ny * spacing[1]
    body = (px / (0.45 * width)) ** 2 + (py / (0.40 * depth)) ** 2 <= 1.0
    hu = np.where(body, 30.0, -1000.0)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    half_z = nz * spacing[2] / 2
    centres = {  # fractions of the body half-axes: liver left of image, spleen right, kidney back
        1: (-0.35, -0.05), 2: (0.40, -0.10), 3: (0.05, 0.45)}
    for value, (cx, cy) in centres.items():
        ax = float(rng.uniform(0.16, 0.24)) * width * (1.4 if value == 1 else 1.0)
        ay = float(rng.uniform(0.12, 0.18)) * depth
        az = float(rng.uniform(0.45, 0.7)) * half_z
        ox = (cx + rng.uniform(-0.05, 0.05)) * 0.45 * width
        oy = (cy + rng.uniform(-0.05, 0.05)) * 0.40 * depth
        oz = float(rng.uniform(-0.15, 0.15)) * half_z
        inside = ((px - ox) / ax) ** 2 + ((py - oy) / ay) ** 2 + ((pz - oz) / az) ** 2 <= 1.0
        inside &= body
        labels[inside] = value
        hu[inside] = ORGAN_HU[value]
    hu += rng.normal(0.0, 20.0, hu.shape) * body
    if zero_border:
        hu[:, :zero_border, :] = 0.0
        labels[:, :zero_border, :] = 0
    image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    label_image = sitk.GetImageFromArray(labels)
    for im in (image, label_image):
        im.SetSpacing(spacing)
        im.SetOrigin((-(nx - 1) / 2 * spacing[0], -(ny - 1) / 2 * spacing[1], -half_z))
    return image, label_image


def held_out_case() -> tuple[sitk.Image, sitk.Image]:
    """The held-out test case: not in training, its own spacing, fewer slices than the patch
    after resampling (so the symmetric padding is used), several windows in-plane, and zero
    rows to crop."""
    return make_case(4242, size=(92, 84, 13), spacing=(0.76, 0.76, 3.3), zero_border=3)


def _write_dataset(raw: Path, cases: int) -> None:
    images, labels = raw / "imagesTr", raw / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(cases):
        image, label = make_case(1000 + i)
        sitk.WriteImage(image, str(images / f"tiny_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(labels / f"tiny_{i:03d}.nii.gz"))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "name": "TinyCT",
        "description": "dicomnode synthetic CT-like ellipsoid organs (tools/build_tiny_nnunet.py)",
        "licence": "CC0-1.0",
        "reference": "dicomnode test data, made by tools/build_tiny_nnunet.py",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _shrink_plan(plans_file: Path) -> None:
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = PATCH
    config["batch_size"] = 2
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=3, features_per_stage=[8, 16, 32],
                kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    plans["configurations"] = {"3d_fullres": config}
    plans_file.write_text(json.dumps(plans, indent=2))


def _trainer_class() -> Any:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerTiny(nnUNetTrainer):
        """A few short epochs on the CPU."""

        def __init__(self, plans: dict[str, Any], configuration: str, fold: int,
                     dataset_json: dict[str, Any],
                     device: torch.device = torch.device("cpu")) -> None:  # noqa: B008
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ.get("TINY_EPOCHS", "25"))
            self.num_iterations_per_epoch = 20
            self.num_val_iterations_per_epoch = 2
            self.initial_lr = 2e-2
            self.save_every = 10**6

    return nnUNetTrainerTiny


def _slim_checkpoint(path: Path, **override: Any) -> None:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keep = {k: checkpoint[k] for k in ("network_weights", "init_args", "trainer_name",
                                       "inference_allowed_mirroring_axes", "current_epoch")}
    keep.update(override)
    torch.save(keep, path)


def _dice(a: npt.NDArray[Any], b: npt.NDArray[Any], value: int) -> float:
    x, y = a == value, b == value
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def predict_with_nnunet(model_folder: Path, image: sitk.Image, folds: Sequence[int],
                        *, mirroring: bool = True, checkpoint: str = "checkpoint_final.pth",
                        ) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """nnU-Net's own prediction of ``image`` (as its SimpleITK reader reads a NIfTI file):
    the label map ([z, y, x]), the fold-averaged logits on the model grid (float32, before
    resampling back, channels first) and the probabilities on the source grid.

    The network is built from the plan with the trainer class of the checkpoint imported
    directly (nnU-Net's lookup by name imports every trainer module, and some need
    torchvision)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import (
        determine_num_input_channels,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    plans = json.loads((model_folder / "plans.json").read_text())
    manager = PlansManager(plans)
    parameters = []
    meta: dict[str, Any] = {}
    for i, fold in enumerate(folds):
        ckpt = torch.load(model_folder / f"fold_{fold}" / checkpoint, map_location="cpu",
                          weights_only=False)
        if i == 0:
            meta = ckpt
        parameters.append(ckpt["network_weights"])
    config = manager.get_configuration(meta["init_args"]["configuration"])
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    labels = manager.get_label_manager(dataset_json)
    network = nnUNetTrainer.build_network_architecture(
        manager, config, determine_num_input_channels(manager, config, dataset_json),
        labels.num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(parameters[0])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, manager, config, parameters, dataset_json,
                                    meta["trainer_name"], meta["inference_allowed_mirroring_axes"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case_0000.nii.gz"
        sitk.WriteImage(image, str(path))
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        data, props = SimpleITKIO().read_images([str(path)])
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    adapter = PreprocessAdapterFromNpy([data], [None], [props], [None], manager, dataset_json,
                                       config, num_threads_in_multithreaded=1, verbose=False)
    item = next(adapter)
    logits = predictor.predict_logits_from_preprocessed_data(item["data"]).cpu()
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    seg, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, manager, config, labels, item["data_properties"], return_probabilities=True)
    return np.asarray(seg), logits.float().numpy(), np.asarray(probabilities)


def build(out: Path, *, cases: int = 12, epochs: int = 25, folds: Sequence[int] = (0, 1)) -> Path:
    """Build the model folders under ``out``; returns the trained model's folder."""
    import torch

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiny-nnunet-"))
    try:
        os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                          nnUNet_results=str(work / "results"), nnUNet_n_proc_DA="1",
                          nnUNet_compile="false", TINY_EPOCHS=str(epochs))
        _write_dataset(work / "raw" / DATASET_NAME, cases)
        # nnunetv2.paths reads the variables at import: import only now
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )

        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True,
                             clean=True, verbose=False)
        plan_experiments([DATASET_ID])
        pre = work / "pre" / DATASET_NAME
        _shrink_plan(pre / "nnUNetPlans.json")
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,),
                   verbose=False)
        os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process (planning needs >= 1)
        trainer_class = _trainer_class()
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((pre / "dataset.json").read_text())
        for fold in folds:
            t = time.perf_counter()
            trainer = trainer_class({**plans, "continue_training": False}, "3d_fullres", fold,
                                    dataset_json,
device=torch.device("cpu"))
            trainer.run_training()
            print(f"fold {fold}: {epochs} epochs in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
        trained = work / "results" / DATASET_NAME / f"{TRAINER}__nnUNetPlans__3d_fullres"
        target = out / trained.name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
            shutil.copy2(trained / name, target / name)
        (target / "LICENSE").write_text(
            "CC0-1.0: the synthetic dataset and these weights are dedicated to the public "
            "domain (dicomnode test data).\n")
        for fold in folds:
            (target / f"fold_{fold}").mkdir()
            shutil.copy2(trained / f"fold_{fold}" / "checkpoint_final.pth",
                         target / f"fold_{fold}" / "checkpoint_final.pth")
            _slim_checkpoint(target / f"fold_{fold}" / "checkpoint_final.pth")
        variant = out / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
        if variant.exists():
            shutil.rmtree(variant)
        shutil.copytree(target, variant)
        for fold in folds:
            _slim_checkpoint(variant / f"fold_{fold}" / "checkpoint_final.pth",
                             trainer_name="nnUNetTrainerNoMirroring",
                             inference_allowed_mirroring_axes=None)
        image, truth = held_out_case()
        seg, _, _ = predict_with_nnunet(target, image, folds)
        reference = sitk.GetArrayFromImage(truth)
        dice = {name: round(_dice(seg, reference, value), 4)
                for name, value in LABELS.items() if value}
        print(f"held-out Dice (nnUNetPredictor vs truth): {dice}", file=sys.stderr)
        (target / "held_out_dice.json").write_text(json.dumps(dice, indent=2))
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    build(args.out, cases=args.cases, epochs=args.epochs, folds=args.folds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
