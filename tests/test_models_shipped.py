"""The shipped models on real data, through the whole path (DICOM in, label map on the
DICOM grid out), and the ``dicomnode models`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import testdata
import yaml

from dicomnode.inference.segment import segment
from dicomnode.inference.volume import read_series
from dicomnode.models.card import load_card

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True,
                          text=True, cwd=ROOT, check=False, timeout=300)


@pytest.fixture(scope="module")
def cranium_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cranium")
    testdata.cranium_ct(folder)
    return folder


def test_brain_mr_on_colin27_matches_ch2bet(tmp_path: Path) -> None:
    if not CH2BET.is_file():
        pytest.skip(f"{CH2BET} missing: install the Debian package mricron-data")
    files = testdata.colin27_mr(tmp_path)
    volume = read_series(files)
    result = segment(load_card(MODELS / "brain-mr"), [volume.image])
    mask = result.structures[0].mask
    assert mask.shape == volume.array().shape
    bet, affine = testdata._read_nifti(CH2BET)
    reference, _ = testdata._nifti_to_lps_axial(bet, affine)
    dice = _dice(mask, reference > 0)
    print(f"brain-mr Dice against ch2bet: {dice:.4f}, {result.structures[0].volume_ml:.0f} mL")
    assert dice >= 0.92
    assert result.timings.session_run > 0


@pytest.mark.slow
def test_ct_body_on_cranium_through_the_command(cranium_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli("models", "run", "ct-body", "--input", str(cranium_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "External" in proc.stdout and "Bone" in proc.stdout
    labels = sitk.ReadImage(str(out / "labels.nii.gz"))
    source = read_series(sorted(cranium_dir.iterdir())).image
    # The label map lies exactly on the source grid.
    assert labels.GetSize() == source.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), source.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(labels.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), source.GetDirection(), atol=1e-6)
    label_map = sitk.GetArrayFromImage(labels)
    _hu, bone_mask, (dz, dy, dx) = testdata.cranium_arrays()
    bone = label_map == 2
    dice = _dice(bone, bone_mask > 0)
    external = label_map > 0  # Bone and Lungs are drawn over External
    voxel_ml = dz * dy * dx / 1000
    report = json.loads((out / "volumes.json").read_text())
    by_name = {s["name"]: s for s in report["structures"]}
    print(f"ct-body on Cranium: Bone Dice {dice:.4f}, External {by_name['External']['volume_ml']}"
          f" mL, Lungs {by_name['Lungs']['volume_ml']} mL")
    assert dice >= 0.97
    assert np.count_nonzero(external & (bone_mask > 0)) >= 0.99 * np.count_nonzero(bone_mask)
    # External covers the head: every slice's head section, and air around it stays out.
    assert not external[:, 0, :].any() and not external[:, :, 0].any()
    assert 1500 < by_name["External"]["volume_ml"] < 6000
    assert by_name["Bone"]["voxel_count"] == int(np.count_nonzero(bone))
    assert abs(by_name["Bone"]["volume_ml"] - np.count_nonzero(bone) * voxel_ml) < 0.01
    assert by_name["Lungs"]["volume_ml"] == 0  # a head CT: sinuses and airways are too small
    assert report["provider"] == "CPUExecutionProvider" or "CUDA" in report["provider"]
    assert report["timings_seconds"]["session_run"] > 0
    # the DICOM results beside them (judged in test_outputs.py)
    kinds = {o["kind"]: o for o in report["objects"]}
    assert set(kinds) == {"SEG", "RTSTRUCT"}
    for obj in kinds.values():
        ds = pydicom.dcmread(out / obj["file"], stop_before_pixels=True)
        assert ds.SOPInstanceUID == obj["sop_instance_uid"]
        assert ds.StudyInstanceUID == pydicom.dcmread(
            sorted(cranium_dir.iterdir())[0], stop_before_pixels=True).StudyInstanceUID


def test_ct_body_gives_the_same_masks_on_compressed_input(cranium_dir: Path,
                                                          tmp_path: Path) -> None:
    slices = sorted(cranium_dir.iterdir())[40:60]
    compressed = testdata.transcode(slices, tmp_path / "jpegls", "jpeg-ls")
    card = load_card(MODELS / "ct-body")
    plain = segment(card, [read_series(slices).image])
    packed = segment(card, [read_series(compressed).image])
    for a, b in zip(plain.structures, packed.structures, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    assert plain.structures[1].voxel_count > 1000


@pytest.mark.slow
def test_models_list_and_check() -> None:
    proc = _cli("models", "list")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "brain-mr" in proc.stdout and "ct-body" in proc.stdout
    assert "rule-based" in proc.stdout
    for name in ("brain-mr", "ct-body"):
        proc = _cli("models", "check", name)
        assert proc.returncode == 0, proc.stderr
        assert f"model {name}" in proc.stdout and ": ok" in proc.stdout


def test_models_check_reports_a_card_that_does_not_fit_its_model(tmp_path: Path) -> None:
    package = tmp_path / "brain-mr"
    package.mkdir()
    for name in ("model.onnx", "LICENSE"):
        (package / name).write_bytes((MODELS / "brain-mr" / name).read_bytes())
    card = yaml.safe_load((MODELS / "brain-mr" / "card.yaml").read_text())
    card["inputs"].append({"name": "t2", "modality": "MR"})
    card["preprocessing"]["resize"] = [96, 96, 96]
    (package / "card.yaml").write_text(yaml.safe_dump(card))
    proc = _cli("models", "check", str(package))
    assert proc.returncode == 1
    assert "takes 1 input channel(s); the card feeds 2" in proc.stderr
    assert "differs from what the card feeds [96, 96, 96]" in proc.stderr


def test_models_run_refuses_the_wrong_modality(cranium_dir: Path, tmp_path: Path) -> None:
    proc = _cli("models", "run", "brain-mr", "--input", str(cranium_dir), "--output",
                str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "input t1 of model brain-mr takes MR images; the series is CT" in proc.stderr
    assert not (tmp_path / "o").exists()
