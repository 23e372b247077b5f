"""MONAI bundles: ``models import monai-bundle`` and the MONAI profile against MONAI itself.

The bundles are built here: a tiny UNet (InstanceNorm) and a tiny SegResNet (GroupNorm),
each trained for a few hundred iterations on synthetic ellipsoid volumes so that their
argmax is decisive, with a pipeline using Orientation, Spacing to another spacing,
ScaleIntensityRange onto [-1, 1], CropForeground, a Gaussian SlidingWindowInferer whose window
is smaller than the image along some axes and larger along another, Activations softmax,
Invertd, AsDiscrete argmax and KeepLargestConnectedComponent. The judge is the bundle's
``inference.json`` run through MONAI on a NIfTI of the same image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

sys.modules.setdefault("torchvision", None)  # type: ignore[arg-type]  # a CUDA build here

import testdata  # noqa: E402  (tests/conftest.py puts tools/ on the path)

from dicomnode.inference.importers.monai import (  # noqa: E402
    BundleError,
    compare,
    import_bundle,
    read_bundle,
    run_bundle_with_monai,
    translate,
)
from dicomnode.inference.profiles.monai import (  # noqa: E402
    importance_map,
    run_profile,
    window_starts,
)

# training and converting models: longer than the default bound (pyproject.toml)
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
ROI = [24, 24, 32]
# HU of air, body, organ 1, organ 2; ScaleIntensityRange maps -200..300 HU onto -1..1
AIR, BODY, ORGAN1, ORGAN2 = -1000, 50, 200, 450


def _scaled(hu: float) -> float:
    return float(np.clip((hu + 200) / 500 * 2 - 1, -1, 1))


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray
               ) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) < 1


def _training_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One model-grid sample ([x, y, z] = ROI): scaled intensities and labels."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in ROI], indexing="ij")
    size = np.asarray(ROI, dtype=np.float32)
    image = np.full(ROI, _scaled(AIR), dtype=np.float32)
    labels = np.zeros(ROI, dtype=np.int64)
    body = _ellipsoid(grid, size / 2 + rng.uniform(-3, 3, 3), size * rng.uniform(0.35, 0.6, 3))
    image[body] = _scaled(BODY)
    for value, hu in ((1, ORGAN1), (2, ORGAN2)):
        organ = _ellipsoid(grid, size / 2 + rng.uniform(-6, 6, 3) * size / 24,
                           rng.uniform(2.5, 6, 3) * size / 24) & body
        image[organ] = _scaled(hu)
        labels[organ] = value
    image += rng.normal(0, 0.05, ROI).astype(np.float32)
    if rng.uniform() < 0.3:  # zero padding as the inferer and the crop add it
        axis, width = int(rng.integers(3)), int(rng.integers(2, 8))
        index = [slice(None)] * 3
        index[axis] = slice(0, width) if rng.uniform() < 0.5 else slice(ROI[axis] - width, None)
        image[tuple(index)], labels[tuple(index)] = 0.0, 0
    return image, labels


def _network_def(kind: str) -> dict[str, Any]:
    if kind == "unet":
        return {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
                "norm": "instance"}
    return {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
            "init_filters": 8, "blocks_down": [1, 2], "blocks_up": [1]}


def _train(kind: str, iterations: int) -> Any:
    import torch
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(1)
    parser = ConfigParser({"net": _network_def(kind)})
    net = parser.get_parsed_content("net")
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)  # both small organs weigh
    net.train()
    for _ in range(iterations):
        pairs = [_training_pair(rng) for _ in range(2)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
        optimiser.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimiser.step()
    print(f"{kind}: trained {iterations} iterations, last loss {loss.item():.4f}")
    return net.eval()


def _inference_config(kind: str, extra_pre: list[dict[str, Any]] | None = None
                      ) -> dict[str, Any]:
    pre = [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 2.0],
         "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -200, "a_max": 300,
         "b_min": -1.0, "b_max": 1.0, "clip": True},
        {"_target_": "CropForegroundd", "keys": "@image_key", "source_key": "@image_key",
         "margin": 3},
        *(extra_pre or []),
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
         "orig_keys": "@image_key", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
         "applied_labels": [1, 2]},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "$@bundle_root + '/eval'",
         "output_postfix": "seg", "resample": False, "separate_folder": False},
    ]
    return {
        "bundle_root": ".",
        "image_key": "image",
        "network_def": _network_def(kind),
        "network": "$@network_def.to('cpu')",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 2,
                    "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.2},
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def _write_bundle(folder: Path, kind: str, net: Any, config: dict[str, Any]) -> Path:
    import torch

    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
    metadata = {
        "version": "0.1.0", "monai_version": "1.6.1", "authors": "dicomnode tests",
        "description": f"a tiny {kind} trained on synthetic ellipsoids", "license": "Apache-2.0",
        "intended_use": "tests only",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1}},
            "outputs": {"pred": {"type": "image", "num_channels": 3,
                                 "channel_def": {"0": "background", "1": "spleen",
                                                 "2": "blob"}}}},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    (folder / "LICENSE").write_text("Apache License 2.0 (test bundle)\n")
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.fixture(scope="session")
def trained() -> dict[str, Any]:
    """The two trained networks, once per test session (about a minute on two cores)."""
    return {"unet": _train("unet", 120), "segresnet": _train("segresnet", 100)}


def _bundle(tmp_path: Path, trained: dict[str, Any], kind: str,
            extra_pre: list[dict[str, Any]] | None = None) -> Path:
    return _write_bundle(tmp_path / f"bundle-{kind}", kind, trained[kind],
                         _inference_config(kind, extra_pre))


def _volume(direction: tuple[float, ...] | None = None) -> sitk.Image:
    """A CT-like volume (int16 HU, LPS) whose model grid is larger than the window along x,
    equal-ish along y and shorter along z."""
    rng = np.random.default_rng(7)
    size = (44, 36, 14)  # x, y, z voxels
    spacing = (1.1, 1.2, 2.5)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    centre = np.asarray(size[::-1], dtype=np.float32) / 2
    hu = np.full(size[::-1], AIR, dtype=np.float32)
    body = _ellipsoid(grid, centre, centre * np.array([0.8, 0.7, 0.85]))
    hu[body] = BODY
    hu[_ellipsoid(grid, centre + np.array([1, -4, 8]), np.array([3.0, 6.0, 7.0])) & body] = ORGAN1
    hu[_ellipsoid(grid, centre + np.array([-1, 5, -9]), np.array([3.0, 5.0, 6.0])) & body] = ORGAN2
    hu += rng.normal(0, 12, hu.shape)
    image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-24.0, -20.0, 30.0))
    if direction is not None:
        image.SetDirection(direction)
    return image


def _dicom_series(image: sitk.Image, folder: Path) -> list[Path]:
    """``image`` (axial, identity direction, int16 HU) as a CT Image Storage series."""
    from pydicom.uid import CTImageStorage, generate_uid

    array = sitk.GetArrayFromImage(image)
    slices, rows, columns = array.shape
    dx, dy, dz = image.GetSpacing()
    ds = testdata._common_dataset(
        sop_class=CTImageStorage, modality="CT", study_uid=generate_uid(),
        series_uid=generate_uid(), frame_uid=generate_uid(), patient_id="DN-MONAI-1",
        patient_name="Test^Monai", series_description="MONAI import", series_number=3,
        study_description="dicomnode MONAI import")
    testdata._ct_attributes(ds, body_part="ABDOMEN", window=(40.0, 400.0))
    testdata._pixel_module(ds, rows=rows, columns=columns, bits_stored=16, signed=True)
    stored = (array.astype(np.int32) + 1024).astype("<i2")
    return testdata._write_slices(
        ds, folder, prefix="CT_", slices=((k, stored[k].tobytes()) for k in range(slices)),
        origin=image.GetOrigin(), row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0),
        step=(0.0, 0.0, dz), pixel_spacing=(dy, dx), slice_thickness=dz)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True,
                          text=True, cwd=ROOT, check=False, timeout=600, env=env)


# ---------------------------------------------------------------------------------------
# pieces against MONAI's own functions (fast)


def test_window_starts_and_importance_map_are_monais() -> None:
    import torch
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size, roi, overlap in [(40, 24, 0.5), (24, 24, 0.25), (97, 32, 0.6), (33, 8, 0.0)]:
        interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
        theirs = [s[0].start for s in dense_patch_slices((size,), (roi,), interval)]
        assert window_starts(size, roi, overlap) == theirs, (size, roi, overlap)
    for roi, sigma in [([24, 24, 32], 0.2), ([7, 16, 5], 0.125), ([96, 96, 96], [0.1, 0.2, 0.3])]:
        theirs = compute_importance_map(tuple(roi), mode="gaussian", sigma_scale=sigma,
                                        dtype=torch.float32).numpy()
        np.testing.assert_allclose(importance_map(roi, "gaussian", sigma), theirs, rtol=1e-6)


@pytest.mark.parametrize("direction", [
    None,
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # permuted axes
    (-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0),  # flips and a swap
    tuple(np.array([[np.cos(0.2), -np.sin(0.2), 0.0], [np.sin(0.2), np.cos(0.2), 0.0],
                    [0.0, 0.0, 1.0]]).ravel().tolist()),  # oblique: 11.5 degrees about z
    tuple(np.array([[np.cos(0.2), 0.0, -np.sin(0.2)], [0.0, 1.0, 0.0],
                    [np.sin(0.2), 0.0, np.cos(0.2)]]).ravel().tolist()),  # about y
])
def test_preprocessing_is_monais(direction: tuple[float, ...] | None, tmp_path: Path) -> None:
    """The model input built here equals the one MONAI's transforms build (identity network:
    the sliding window then gives back the input, Invert brings it onto the source grid)."""
    from monai.bundle import ConfigParser

    image = _volume(direction)
    nifti = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(nifti))
    image = sitk.ReadImage(str(nifti))
    config = _inference_config("unet", [{"_target_": "SpatialPadd", "keys": "@image_key",
                                         "spatial_size": [48, 40, 40]}])
    parser = ConfigParser(config)
    data = parser.get_parsed_content("preprocessing")({"image": str(nifti)})
    theirs = data["image"].numpy()
    folder = _write_bundle(tmp_path / "b", "unet", _FakeNet(), config)
    profile = translate(read_bundle(folder))
    profile["inferer"]["roi_size"] = [-1, -1, -1]  # one window: the whole model input
    captured: list[np.ndarray] = []

    def capture(batch: np.ndarray) -> np.ndarray:
        captured.append(batch)
        return np.concatenate([batch, -batch, 0 * batch], axis=1)

    ours = run_profile(profile, image, capture)
    assert len(captured) == 1
    print(f"model input {list(theirs.shape)}, largest difference "
          f"{np.abs(captured[0][0] - theirs).max():.2e}")
    np.testing.assert_allclose(captured[0][0], theirs, atol=1e-5)
    assert ours.labels.shape == sitk.GetArrayFromImage(image).shape[::-1]


class _FakeNet:
    """A stand-in 'network' whose state dict is empty (only the config is read here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}


def test_export_of_affine_free_instance_norm_on_air(tmp_path: Path) -> None:
    """MONAI's instance norm has no affine: torch exports its scale and bias as Constant
    nodes, which the precise (float64) rewrite must take; on a mostly-air input the ONNX
    model then stays with torch."""
    import onnxruntime as ort
    import torch

    from dicomnode.inference.export import export_network

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1),
                              torch.nn.InstanceNorm3d(4, affine=False),
                              torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    x = torch.full((1, 1, 32, 32, 32), -1.0)
    x[:, :, 12:16, 12:18, 10:14] = 0.6
    model = export_network(net, x, tmp_path / "m.onnx")
    assert not any(n.op_type == "InstanceNormalization" for n in model.graph.node)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        theirs = net(x).numpy()
    print(f"affine-free instance norm on air: {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.slow
def test_unsupported_transform_is_refused_with_its_line(tmp_path: Path) -> None:
    config = _inference_config("unet", [{"_target_": "RandFlipd", "keys": "@image_key",
                                         "prob": 0.5}])
    folder = _write_bundle(tmp_path / "b", "unet", _FakeNet(), config)
    text = (folder / "configs" / "inference.json").read_text().splitlines()
    line = next(i + 1 for i, t in enumerate(text) if "RandFlipd" in t)
    with pytest.raises(BundleError) as caught:
        translate(read_bundle(folder))
    message = str(caught.value)
    print(message)
    assert "RandFlipd" in message
    assert f"inference.json:{line}:" in message
    # the command says the same and leaves nothing behind
    models = tmp_path / "models"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"models_dir: {models}\n")
    proc = _cli("models", "import", "monai-bundle", str(folder), "--name", "refused",
                "--config", str(config_file))
    assert proc.returncode == 1
    assert f"inference.json:{line}: transform RandFlipd is not supported" in proc.stderr
    assert not models.exists() or list(models.iterdir()) == []
    # a supported transform with an unsupported parameter names that parameter's line
    config = _inference_config("unet")
    config["preprocessing"]["transforms"][3]["diagonal"] = True
    folder = _write_bundle(tmp_path / "c", "unet", _FakeNet(), config)
    text = (folder / "configs" / "inference.json").read_text().splitlines()
    line = next(i + 1 for i, t in enumerate(text) if '"diagonal"' in t)
    with pytest.raises(BundleError, match=rf"inference.json:{line}: Spacingd: .*'diagonal'"):
        translate(read_bundle(folder))


def test_bad_name_and_existing_package_are_refused_before_any_work(tmp_path: Path) -> None:
    folder = _write_bundle(tmp_path / "b", "unet", _FakeNet(), _inference_config("unet"))
    models = tmp_path / "models"
    (models / "taken").mkdir(parents=True)
    with pytest.raises(BundleError, match="is not a model name"):
        import_bundle(folder, "Bad Name", models)
    with pytest.raises(BundleError, match="exists"):
        import_bundle(folder, "taken", models)
    assert [p.name for p in models.iterdir()] == ["taken"]


def test_yaml_config_lines(tmp_path: Path) -> None:
    import yaml

    config = _inference_config("unet")
    config["inferer"]["_target_"] = "SimpleInferer"
    folder = _write_bundle(tmp_path / "b", "unet", _FakeNet(), config)
    (folder / "configs" / "inference.json").unlink()
    (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    text = (folder / "configs" / "inference.yaml").read_text().splitlines()
    line = next(i + 1 for i, t in enumerate(text) if "SimpleInferer" in t)
    with pytest.raises(BundleError, match=rf"inference.yaml:{line}: inferer SimpleInferer"):
        translate(read_bundle(folder))


# ---------------------------------------------------------------------------------------
# trained bundles end to end (slow: training, export, MONAI runs)


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, dict[int, float]]:
    figures = compare(ours, theirs, {1: "spleen", 2: "blob"}, None, None)
    return figures.voxel_agreement, {1: figures.dice["spleen"], 2: figures.dice["blob"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "segresnet"])
def test_import_then_run_on_dicom_matches_monai(kind: str, trained: dict[str, Any],
                                                tmp_path: Path) -> None:
    folder = _bundle(tmp_path, trained, kind)
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"models_dir: {models}\nstorage:\n  path: {tmp_path / 'store'}\n")
    proc = _cli("models", "import", "monai-bundle", str(folder), "--name", f"tiny-{kind}",
                "--config", str(config))
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr
    package = models / f"tiny-{kind}"
    report = json.loads((package / "check_report.json").read_text())
    assert report["passed"] and report["monai"]
    assert {"card.yaml", "model.onnx", "LICENSE", "provenance.json"} <= {
        p.name for p in package.iterdir()}

    proc = _cli("models", "check", f"tiny-{kind}", "--config", str(config))
    assert proc.returncode == 0, proc.stderr

    image = _volume()
    series = tmp_path / "series"
    _dicom_series(image, series)
    nifti = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(nifti))
    out = tmp_path / "out"
    proc = _cli("models", "run", f"tiny-{kind}", "--input", str(series), "--output", str(out),
                "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert (out / "seg.dcm").is_file() and (out / "rtstruct.dcm").is_file()
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz"))).transpose(2, 1, 0)
    theirs, their_grid = run_bundle_with_monai(read_bundle(folder), nifti)
    agreement, dice = _agreement(ours, theirs)

    # probabilities on the model grid, from the package run on the same file
    from dicomnode.inference.runtime import open_card_session
    from dicomnode.models.card import load_card

    card = load_card(package)
    assert card.status.value == "research"  # imported: research until someone approves it
    session = open_card_session(card)
    assert card.profile is not None
    run = run_profile(card.profile, sitk.ReadImage(str(nifti)),
                      lambda b: np.asarray(session.run(b), dtype=np.float32),
                      keep_model_grid=True)
    assert run.model_grid is not None and their_grid is not None
    diff = float(np.abs(run.model_grid - their_grid).max())
    counts = {v: int((theirs == v).sum()) for v in (1, 2)}
    print(f"{kind}: DICOM run vs MONAI: {agreement:.5%} of {theirs.size} voxels agree, "
          f"Dice {dice[1]:.5f} / {dice[2]:.5f} (MONAI voxels {counts}), max probability "
          f"difference on the model grid {diff:.2e}")
    assert counts[1] > 50 and counts[2] > 50  # decisive: the structures are found
    assert agreement >= 0.999
    assert min(dice.values()) >= 0.995
    assert diff <= 1e-3


def test_failing_check_leaves_no_package(tmp_path: Path) -> None:
    """A package whose ONNX network differs from what MONAI runs (here: one channel halved
    before export) fails its check, and nothing is left in models_dir."""
    import torch

    from dicomnode.inference.importers import monai as importer

    folder = _scripted_bundle(tmp_path / "bundle", softmax=True)
    models = tmp_path / "models"
    models.mkdir()

    original = importer._network
    calls = {"n": 0}

    def perturbed(bundle: Any, parser: Any) -> Any:
        calls["n"] += 1
        net = original(bundle, parser)
        if calls["n"] > 1:
            return net
        return torch.jit.script(torch.nn.Sequential(net, _halve_network()))

    importer._network = perturbed
    try:
        with pytest.raises(BundleError, match="check failed") as caught:
            import_bundle(folder, "broken", models, check_image=_volume())
    finally:
        importer._network = original
    print(caught.value)
    assert calls["n"] == 2
    assert list(models.iterdir()) == []


def _fixed_network(three: bool) -> Any:
    """A 'network' that is a fixed function of the smoothed intensity (three softmax channels,
    or one sigmoid channel): decisive by construction, no training."""
    import torch

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            smooth = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)
            return torch.cat([-4 * smooth, 4 * smooth - 2, 8 * smooth - 9], dim=1)

    class FixedOne(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 6 * torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1) - 3

    return Fixed() if three else FixedOne()


def _halve_network() -> Any:
    import torch

    class Halve(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tensor([1.0, 1.0, 0.5]).reshape(1, 3, 1, 1, 1)

    return Halve()


def _scripted_bundle(folder: Path, *, softmax: bool, nearest: bool = True) -> Path:
    """A TorchScript bundle (models/model.ts) whose 'network' is a fixed function of the
    intensity (decisive by construction, no training), with NormalizeIntensity, SpatialPad
    and Invertd with nearest interpolation."""
    import torch

    config = _inference_config("unet", [
        {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True,
         "channel_wise": True},
        {"_target_": "SpatialPadd", "keys": "@image_key", "spatial_size": [40, 44, 36],
         "method": "end"}])
    del config["network_def"], config["network"]
    config["inferer"].update({"mode": "constant", "overlap": 0.25, "sw_batch_size": 3})
    post = config["postprocessing"]["transforms"]
    post[1]["nearest_interp"] = nearest
    if not softmax:
        post[0] = {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
        post[2] = {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}
        post[3] = {"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
                   "connectivity": 1}
    folder = _write_bundle(folder, "scripted", _FakeNet(), config)
    (folder / "models" / "model.pt").unlink()
    torch.jit.script(_fixed_network(softmax)).save(str(folder / "models" / "model.ts"))
    if not softmax:
        metadata = json.loads((folder / "configs" / "metadata.json").read_text())
        metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {
            "0": "background", "1": "liver"}
        (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    return folder


_OBLIQUE_Y = tuple(np.array([[np.cos(0.2), 0.0, -np.sin(0.2)], [0.0, 1.0, 0.0],
                             [np.sin(0.2), 0.0, np.cos(0.2)]]).ravel().tolist())


@pytest.mark.parametrize(("softmax", "direction", "nearest"), [
    (True, (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0), True),  # permuted axes
    (False, (-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0), True),  # flips and a swap
    (True, _OBLIQUE_Y, False),  # oblique, resampled back bilinearly
])
def test_torchscript_bundle(softmax: bool, direction: tuple[float, ...], nearest: bool,
                            tmp_path: Path) -> None:
    folder = _scripted_bundle(tmp_path / "bundle", softmax=softmax, nearest=nearest)
    models = tmp_path / "models"
    models.mkdir()
    structures = {"blob": {"name": "Blob", "color": [1, 2, 3],
                           "category": {"scheme": "SCT", "value": "123037004",
                                        "meaning": "Anatomical Structure"},
                           "type": {"scheme": "SCT", "value": "91723000",
                                    "meaning": "Anatomical structure"}}}
    image = _volume(direction)
    package, figures = import_bundle(folder, "scripted", models, structures=structures,
                                     check_image=image)
    print(f"softmax={softmax} nearest={nearest}: {figures.as_dict()}")
    assert figures.passed
    assert figures.voxel_agreement == 1.0
    assert all(count > 50 for count in figures.counts.values())  # not agreement on nothing
    from dicomnode.models.card import load_card

    card = load_card(package)
    names = [label.name for label in card.outputs.labels]
    assert card.profile is not None
    if softmax:
        assert names == ["Spleen", "Blob"]  # the shared table's display name, the file's
        assert "needs_review" not in card.profile
    else:
        assert names == ["Liver"] and card.outputs.labels[0].type.meaning == "Liver"
    assert any(s["transform"] == "Invert" and s["nearest"] == nearest
               for s in card.profile["postprocessing"])
    from dicomnode.inference.profiles.monai import facts

    lines = facts(card)
    print("\n".join(lines))
    assert lines[0].startswith("framework MONAI 1.")
    assert "100.000 % voxels agree" in lines[1]
