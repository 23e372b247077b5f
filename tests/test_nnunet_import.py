"""nnU-Net v2 models imported and reproduced exactly.

The judge is nnU-Net itself (``nnUNetPredictor``, torch, same folds, mirroring and step) on a
small TRAINED model (``tests/data/nnunet_tiny``, made by ``tools/build_tiny_nnunet.py``:
anisotropic synthetic CT, three organs, two folds): ``dicomnode models import nnunet`` then
``dicomnode models run`` on a DICOM series of a held-out case gives nnU-Net's labels (>= 99.9 %
of voxels, Dice >= 0.995 per structure) and its probabilities on the model grid (1e-3). Also:
the profile's pieces against nnU-Net's functions, a check that fails leaves no package, ``models
check`` prints the figures, a NoMirroring trainer variant, and the whole node path (C-STORE in,
SEG and RTSTRUCT out).

Needs the ``import`` extra (torch, nnunetv2); skipped without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
import yaml

pytest.importorskip("nnunetv2")
pytest.importorskip("torch")

import testdata
from conftest import DcmtkStoreSCP, NodeFactory, storescu, wait_until

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "nnunet_tiny"
TRAINED = TINY / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"
NO_MIRRORING = TINY / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
sys.path.insert(0, str(ROOT / "tools"))
import build_tiny_nnunet as tiny  # noqa: E402

# training and converting models: longer than the default bound (pyproject.toml)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("nnunet-env")
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, str(base / key))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _config(folder: Path, models: Path) -> Path:
    path = folder / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({"models_dir": str(models), "logging": {"level": "WARNING"}}))
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=900, env=_env())


def _ct_series(image: sitk.Image, out: Path, *, study_uid: str | None = None) -> list[Path]:
    """``image`` (HU, identity direction) as an axial CT Image Storage series."""
    hu = sitk.GetArrayFromImage(image).astype(np.int32)
    nz, ny, nx = hu.shape
    dx, dy, dz = image.GetSpacing()
    ds = testdata._common_dataset(
        sop_class=pydicom.uid.CTImageStorage, modality="CT",
        study_uid=study_uid or pydicom.uid.generate_uid(), series_uid=pydicom.uid.generate_uid(),
        frame_uid=pydicom.uid.generate_uid(), patient_id="DN-NNUNET-1",
        patient_name="Test^Nnunet", series_description="tiny nnU-Net held-out CT",
        series_number=3, study_description="dicomnode nnU-Net test")
    testdata._ct_attributes(ds, body_part="ABDOMEN", window=(40.0, 400.0))
    testdata._pixel_module(ds, rows=ny, columns=nx, bits_stored=16, signed=True)
    slices = ((k, (hu[k] + 1024).astype("<i2").tobytes()) for k in range(nz))
    return testdata._write_slices(ds, out, prefix="CT_", slices=slices,
                                  origin=image.GetOrigin(), row_dir=(1.0, 0.0, 0.0),
                                  col_dir=(0.0, 1.0, 0.0), step=(0.0, 0.0, dz),
                                  pixel_spacing=(dy, dx), slice_thickness=dz)


def _dice(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# --------------------------------------------------------------------------- the pieces


def test_gaussian_and_steps_are_nnunets(nnunet_env: None) -> None:
    import torch
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    from dicomnode.inference.profiles import nnunet as profile

    for tile in [(16, 48, 48), (7, 33, 20), (128, 128, 128)]:
        theirs = compute_gaussian(tile, sigma_scale=1.0 / 8, value_scaling_factor=10,
                                  device=torch.device("cpu")).numpy()
        ours = profile.compute_gaussian(tile)
        assert ours.dtype == np.float16
        assert np.array_equal(ours, theirs), tile
        for image in [(16, 48, 48), (17, 100, 49), (300, 273, 260)]:
            image = tuple(max(i, t) for i, t in zip(image, tile, strict=True))
            for step in (0.5, 0.3, 1.0):
                assert profile.compute_steps(image, tile, step) == \
                    compute_steps_for_sliding_window(image, tile, step)


@pytest.mark.parametrize(("shape", "spacing", "target"), [
    ((13, 40, 37), (3.3, 0.76, 0.76), (2.76, 0.8, 0.8)),   # separate z, in-plane order 3
    ((20, 30, 31), (1.0, 1.3, 1.2), (1.5, 1.5, 1.5)),      # isotropic: 3d order 3
    ((9, 25, 25), (5.0, 0.7, 0.7), (2.76, 0.7, 0.7)),      # only z changes (nearest)
])
def test_resampling_is_nnunets(nnunet_env: None, shape: tuple[int, ...],
                               spacing: tuple[float, ...], target: tuple[float, ...]) -> None:
    """The image onto the model grid (order 3, separate z) and logits back (order 1), bit
    for bit as nnU-Net's resample_data_or_seg_to_shape."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    from dicomnode.inference.profiles import nnunet as profile

    plan = profile.plan_of(_profile(spacing=list(target)))
    rng = np.random.default_rng(3)
    data = rng.normal(0, 100, (1, *shape)).astype(np.float32)
    new_shape = compute_new_shape(shape, spacing, target)
    theirs = resample_data_or_seg_to_shape(data, new_shape, spacing, target, is_seg=False,
                                           order=3, order_z=0, force_separate_z=None)
    ours = profile._resample_data(plan, data.copy(), [int(v) for v in new_shape], spacing,
                                  target)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    # back: float16 logits of 3 classes, streamed in bands of rows
    logits = rng.normal(0, 3, (3, *new_shape)).astype(np.float16)
    theirs_back = resample_data_or_seg_to_shape(logits, shape, target, spacing, is_seg=False,
                                                order=1, order_z=0, force_separate_z=None)
    back = profile._BackResampler(plan, new_shape, shape, spacing)
    rows: dict[int, Any] = {}
    for first in range(0, int(new_shape[0]), 4):
        rows.update(back.feed(first, logits[:, first:first + 4]))
    ours_back = np.stack([rows[k] for k in range(shape[0])], axis=1)
    assert ours_back.dtype == np.float16
    # separate z: nnU-Net's very operations; 3d linear: done separably (first axis, then the
    # plane, in bands), so a float16 rounding may land one unit in the last place apart
    diff = np.abs(ours_back.astype(np.float32) - theirs_back.astype(np.float32))
    ulp = np.spacing(np.abs(theirs_back)).astype(np.float32)
    assert (diff <= ulp).all()
    assert np.mean(diff == 0) >= (1.0 if max(spacing) / min(spacing) > 3 else 0.999)


def _profile(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "framework": "nnunet", "files": ["fold_0.onnx"], "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "spacing": [2.76, 0.8, 0.8], "patch_size": [16, 48, 48],
        "normalization": [{"scheme": "CTNormalization", "use_mask_for_norm": False,
                           "mean": 85.6, "std": 152.5, "percentile_00_5": -163.0,
                           "percentile_99_5": 302.0}],
        "resampling_data": {"order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_probabilities": {"order": 1, "order_z": 0, "force_separate_z": None},
        "labels": {"background": 0, "liver": 1}, "mirror_axes": [0, 1, 2],
    }
    base.update(overrides)
    return base


def test_profile_errors_name_the_key() -> None:
    from dicomnode.inference.profiles import nnunet as profile

    with pytest.raises(ValueError, match="misses patch_size"):
        profile.plan_of({k: v for k, v in _profile().items() if k != "patch_size"})
    with pytest.raises(ValueError, match="only 3d"):
        profile.plan_of(_profile(patch_size=[48, 48]))
    with pytest.raises(ValueError, match="CTNormalization needs"):
        profile.plan_of(_profile(normalization=[{"scheme": "CTNormalization"}]))
    with pytest.raises(ValueError, match="inverse permutations"):
        profile.plan_of(_profile(transpose_backward=[1, 0, 2], transpose_forward=[0, 2, 1]))


def test_structures_map_totalsegmentator_names(tmp_path: Path) -> None:
    from dicomnode.inference.structures import StructuresError, labels_for
    from dicomnode.models.card import LabelSpec

    labels, review = labels_for(["liver", "kidney_left", "lung_upper_lobe_right", "thing_x"])
    assert [label["type"]["value"] for label in labels[:3]] == ["10200004", "18639004",
                                                                "45653009"]
    assert review == ["thing_x"] and labels[3]["needs_review"] is True
    assert all(LabelSpec.model_validate(label) for label in labels)
    file = tmp_path / "codes.yaml"
    file.write_text("thing_x:\n  name: Thing\n  color: [1, 2, 3]\n"
                    "  type: {scheme: SCT, value: '123456', meaning: Thing}\n")
    labels, review = labels_for({"thing_x": 7}, file)
    assert review == [] and labels[0]["name"] == "Thing" and labels[0]["value"] == 7
    file.write_text("thing_x:\n  colour: [1, 2, 3]\n")
    with pytest.raises(StructuresError, match="unknown key"):
        labels_for(["thing_x"], file)


# --------------------------------------------------------------------------- import and run


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, nnunet_env: None) -> tuple[Path, Path]:
    """The tiny model imported by the CLI: (config, models_dir)."""
    base = tmp_path_factory.mktemp("nnunet-import")
    models = base / "models"
    config = _config(base, models)
    result = _cli(config, "models", "import", "nnunet", str(TRAINED), "--name", "tiny-ct")
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "voxel agreement" in result.stdout
    return config, models


@pytest.mark.slow
def test_models_run_gives_nnunets_labels(imported: tuple[Path, Path], tmp_path: Path) -> None:
    """``models run`` on a DICOM series of the held-out case vs nnUNetPredictor on the same
    image (as NIfTI): labels, Dice and model-grid probabilities."""
    from dicomnode.inference.importers.nnunet import _probabilities, reference_prediction
    from dicomnode.inference.profiles import nnunet as profile
    from dicomnode.inference.volume import read_series
    from dicomnode.models.card import load_card

    config, models = imported
    image, truth = tiny.held_out_case()
    files = _ct_series(image, tmp_path / "ct")
    out = tmp_path / "out"
    result = _cli(config, "models", "run", "tiny-ct", "-i", str(tmp_path / "ct"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert {"seg.dcm", "rtstruct.dcm", "labels.nii.gz"} <= {p.name for p in out.iterdir()}
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    volume = read_series(files).image  # the very image the node segmented
    reference, ref_logits, _ = reference_prediction(TRAINED, volume, ["0", "1"])
    assert ours.shape == reference.shape
    agreement = float(np.mean(ours == reference))
    dice = {v: _dice(ours == v, reference == v) for v in (1, 2, 3)}
    card = load_card(models / "tiny-ct")
    assert card.status.value == "research"  # imported: research until someone approves it
    logits = profile.model_grid_logits(card, [volume])
    dp = np.abs(_probabilities(logits, False) - _probabilities(ref_logits, False))
    print(f"\nnnU-Net agreement on the held-out series: {100 * agreement:.4f} % of "
          f"{ours.size} voxels; Dice per label {dice}; probabilities on the model grid "
          f"{list(logits.shape[1:])}: max |diff| {dp.max():.2e}, 99.9th percentile "
          f"{np.quantile(dp, 0.999):.2e}")
    truth_a = sitk.GetArrayFromImage(truth)
    print("nnU-Net vs truth Dice:", {v: round(_dice(reference == v, truth_a == v), 3)
                                     for v in (1, 2, 3)})
    # a decisive network: every organ found well
    assert all(_dice(reference == v, truth_a == v) > 0.7 for v in (1, 2, 3))
    assert agreement >= 0.999
    assert min(dice.values()) >= 0.995
    assert np.quantile(dp, 0.999) <= 1e-3
    assert dp.max() <= 2.5e-3  # at most one float16 rounding step of a logit apart
    report = json.loads((models / "tiny-ct" / "check_report.json").read_text())
    assert report["passed"] and report["framework_version"]


@pytest.mark.slow
def test_models_check_lists_framework_and_figures(imported: tuple[Path, Path]) -> None:
    config, _ = imported
    result = _cli(config, "models", "check", "tiny-ct")
    assert result.returncode == 0, result.stderr
    from importlib.metadata import version

    import nnunetv2  # noqa: F401

    assert f"checked against nnunetv2 {version('nnunetv2')}" in result.stdout
    assert "voxel agreement 100" in result.stdout or "voxel agreement 99.9" in result.stdout
    assert "min Dice" in result.stdout


@pytest.mark.slow
def test_a_failing_check_leaves_no_package(tmp_path: Path, nnunet_env: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported weights corrupted (noise on the segmentation head): the check against
    nnU-Net fails and nothing is left in models_dir."""
    import onnx
    from onnx import numpy_helper

    import dicomnode.inference.export as export
    from dicomnode.cli import main

    real = export.export_network

    def corrupting(module: Any, example: Any, path: Any, **kw: Any) -> Any:
        model = real(module, example, path, **kw)
        kernels = [i for i in model.graph.initializer if len(i.dims) == 5]
        head = kernels[-1]  # the segmentation head's 1x1x1 convolution (no norm after it)
        array = numpy_helper.to_array(head)
        noise = np.random.default_rng(0).normal(0, 0.3 * array.std(), array.shape)
        head.CopyFrom(numpy_helper.from_array((array + noise).astype(np.float32), head.name))
        onnx.save(model, str(path))
        return model

    monkeypatch.setattr(export, "export_network", corrupting)
    models = tmp_path / "models"
    config = _config(tmp_path, models)
    code = main(["models", "import", "nnunet", str(TRAINED), "--name", "broken", "--folds", "0",
                 "--config", str(config)])
    assert code == 1
    assert not (models / "broken").exists()
    assert [p.name for p in models.iterdir()] == []  # no staging folder left either


@pytest.mark.slow
def test_no_mirroring_variant(tmp_path: Path, nnunet_env: None) -> None:
    """nnUNetTrainerNoMirroring's checkpoints: no mirroring in the card, and still nnU-Net's
    output (which differs from the mirrored one)."""
    from dicomnode.inference.importers.nnunet import compare
    from dicomnode.models.card import load_card

    models = tmp_path / "models"
    config = _config(tmp_path, models)
    result = _cli(config, "models", "import", "nnunet", str(NO_MIRRORING), "--name", "nomirror",
                  "--folds", "0")
    assert result.returncode == 0, result.stderr
    card = load_card(models / "nomirror")
    assert card.profile is not None
    assert card.profile["mirror_axes"] is None
    assert card.profile["trainer"] == "nnUNetTrainerNoMirroring"
    image, _ = tiny.held_out_case()
    figures, _, _ = compare(card, NO_MIRRORING, image)
    print(f"\nNoMirroring: agreement {figures.voxel_agreement:.6f}, Dice {figures.dice}, "
          f"max |dp| {figures.max_probability_difference:.2e}")
    assert not figures.problems
    # nnU-Net with mirroring (the same weights, TRAINED's checkpoint) is not what this
    # package computes: the card's mirroring is what makes the agreement
    mirrored, _, _ = compare(card, TRAINED, image)
    assert mirrored.max_logit_difference > 1e-2


def _variant(tmp_path: Path, change: str) -> Path:
    """A copy of the tiny model with its plan changed (both nnU-Net and the package read the
    changed plan: this tests the reproduction of nnU-Net's pipeline, not the model)."""
    folder = tmp_path / TRAINED.name
    shutil.copytree(TRAINED, folder)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    if change == "transpose":
        plans["transpose_forward"], plans["transpose_backward"] = [1, 0, 2], [1, 0, 2]
        config["spacing"] = [config["spacing"][i] for i in (1, 0, 2)]
        config["patch_size"] = [config["patch_size"][i] for i in (1, 0, 2)]
    elif change == "zscore-mask":
        config["normalization_schemes"] = ["ZScoreNormalization"]
        config["use_mask_for_norm"] = [True]
    elif change == "isotropic":
        config["spacing"] = [1.6, 1.1, 1.1]
    elif change == "postprocessing":
        (folder / "postprocessing.json").write_text(json.dumps({
            "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 2,
            "postprocessing_kwargs": [{"labels_or_regions": [1, 2, 3]},
                                      {"labels_or_regions": 2}]}))
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("change", ["transpose", "zscore-mask", "isotropic", "postprocessing",
                                    "orientation"])
def test_plan_variants_are_reproduced(tmp_path: Path, nnunet_env: None, change: str) -> None:
    """transpose_forward, ZScore inside the nonzero mask (with a zero border cropped),
    isotropic resampling (3d order 3 / order 1 back), nnU-Net's postprocessing and a
    reorientation (RAS, as TotalSegmentator feeds its networks): the
    package still gives nnU-Net's labels, and the preprocessed input is nnU-Net's bit for bit
    where nnU-Net's own arithmetic is reused."""
    from dicomnode.inference.importers.nnunet import import_model

    folder = _variant(tmp_path, change)
    image, _ = tiny.held_out_case()
    figures, _ = import_model(folder, tmp_path / "pkg", name="pkg", folds=["0"],
                              check_image=image,
                              orientation="RAS" if change == "orientation" else None)
    print(f"\n{change}: agreement {figures.voxel_agreement:.6f}, Dice {figures.dice}, "
          f"max |dp| {figures.max_probability_difference:.2e}, input difference "
          f"{figures.input_difference:.1e}")
    assert not figures.problems
    assert figures.input_difference == 0.0


@pytest.mark.slow
def test_region_based_model(tmp_path: Path, nnunet_env: None) -> None:
    """A region-based model (labels as lists of labels, regions_class_order, sigmoid per
    region): made from the tiny model by keeping 3 of its 4 output channels as the regions
    "abdominal organs" [1, 2, 3], "spleen" [2] and "kidney_left" [3]. The card thresholds
    each region's channel; the labels are nnU-Net's."""
    import torch

    from dicomnode.inference.importers.nnunet import import_model
    from dicomnode.models.card import load_card

    folder = tmp_path / TRAINED.name
    shutil.copytree(TRAINED, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "abdominal_organs": [1, 2, 3], "spleen": [2],
                         "kidney_left": [3]}
    dataset["regions_class_order"] = [1, 2, 3]
    (folder / "dataset.json").write_text(json.dumps(dataset))
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    for key, value in list(checkpoint["network_weights"].items()):
        if "seg_layers" in key:
            checkpoint["network_weights"][key] = value[1:].clone()
    torch.save(checkpoint, path)
    image, _ = tiny.held_out_case()
    figures, review = import_model(folder, tmp_path / "regions", name="regions", folds=["0"],
                                   check_image=image)
    print(f"\nregions: agreement {figures.voxel_agreement:.6f}, Dice {figures.dice}, "
          f"max |dp| {figures.max_probability_difference:.2e}")
    assert not figures.problems
    assert review == ["abdominal_organs"]
    card = load_card(tmp_path / "regions")
    assert card.outputs.decision == "threshold" and card.outputs.activation == "sigmoid"
    assert [(label.value, label.channel) for label in card.outputs.labels] == [
        (1, 0), (2, 1), (3, 2)]
    assert len(figures.dice) >= 2  # regions found, not an empty agreement


# --------------------------------------------------------------------------- the node path


@pytest.mark.slow
def test_node_runs_the_imported_model(imported: tuple[Path, Path], tmp_path: Path,
                                      node_factory: NodeFactory) -> None:
    """A CT series in by C-STORE (storescu) to a running node whose rule uses the imported
    package; SEG and RTSTRUCT come out to the peer, with the model's structures."""
    _, models = imported
    scp = DcmtkStoreSCP(tmp_path / "received")
    try:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text("""rules:
  - name: tiny-organs
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: tiny-ct
    send_to: [dest]
""")
        key = tmp_path / "deid.key"
        key.write_bytes(b"nnunet-node-test-key-0123456789")
        node = node_factory(
            # an imported model is research (card status): its results go to research peers
            peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": scp.port,
                            "research": True}},
            rules_dir=str(rules), models_dir=str(models), deid={"key_file": str(key)},
            outbox={"retry_initial_seconds": 1, "check_interval_seconds": 0.5})
        image, _ = tiny.held_out_case()
        files = _ct_series(image, tmp_path / "ct")
        assert storescu(node.port, *files).returncode == 0
        wait_until(lambda: scp.counts("Modality") == Counter({"SEG": 1, "RTSTRUCT": 1}), 240,
                   f"SEG and RTSTRUCT at the peer; node log:\n{node.log()[-3000:]}")
        seg = next(pydicom.dcmread(p) for p in scp.folder.iterdir()
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")
        names = {s.SegmentLabel for s in seg.SegmentSequence}
        assert names == {"Liver", "Spleen", "Kidney L"}
        codes = {s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
        assert codes == {"10200004", "78961009", "18639004"}
    finally:
        scp.close()


def test_committed_tiny_model_is_small() -> None:
    """The committed model stays small (< 5 MB) and holds what the importer reads."""
    total = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024
    for folder in (TRAINED, NO_MIRRORING):
        assert (folder / "dataset.json").is_file() and (folder / "plans.json").is_file()
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file()


def test_import_refuses_what_is_not_an_nnunet_folder(tmp_path: Path, capsys: Any) -> None:
    from dicomnode.cli import main

    models = tmp_path / "models"
    config = _config(tmp_path, models)
    (tmp_path / "notamodel").mkdir()
    code = main(["models", "import", "nnunet", str(tmp_path / "notamodel"), "--name", "x",
                 "--config", str(config)])
    assert code == 1
    assert "no dataset.json" in capsys.readouterr().err
    assert not (models / "x").exists() and list(models.iterdir()) == []
    (models / "taken").mkdir()
    code = main(["models", "import", "nnunet", str(TRAINED), "--name", "taken",
                 "--config", str(config)])
    assert code == 2
    assert "exists" in capsys.readouterr().err
