#!/usr/bin/env python3
"""Where the time of an nnU-Net-sized model goes in the ``nnunet`` profile.

An nnU-Net ``PlainConvUNet`` of the default 3d size (6 stages, 32 base features doubling up to
320, two 3x3x3 convolutions per stage, instance norm, LeakyReLU; random weights: this measures
time, not segmentation) is exported by the importer's exporter and run by
:func:`dicomnode.inference.profiles.nnunet.predict_label_map` on a synthetic 300 x 512 x 512 CT
(0.8 x 0.8 x 1.25 mm), without and with nnU-Net's 8-fold mirroring. The plan's target spacing
(``--spacing``, default 3 mm, nnU-Net's low-resolution stage for such a CT) and patch
(``--patch``, default 128 x 128 x 128) set how many windows run: on the 2-CPU VM a 1.5 mm grid
would need 48 windows of about 10 s each, 64 minutes with mirroring.

Reported per run: seconds in ``session.run`` (the model), preprocessing (crop, normalisation,
resampling), and the rest (window placement, Gaussian blending, flips, float16 bands, the way
back onto the source grid and the argmax): the host-side bookkeeping, as a share of the model
time (target: under 10 %).

Needs the ``import`` extra (torch, nnunetv2, onnx). Usage::

    python tools/bench/nnunet_speed.py [--spacing 3.0] [--patch 128 128 128] [--classes 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _network(classes: int) -> object:
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    features = (32, 64, 128, 256, 320, 320)
    net = PlainConvUNet(1, 6, features, torch.nn.Conv3d, 3, (1, 2, 2, 2, 2, 2),
                        (2, 2, 2, 2, 2, 2), classes + 1, (2, 2, 2, 2, 2), conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                        deep_supervision=False).eval()
    return net


def _card(package: Path, args: argparse.Namespace, mirror: bool) -> None:
    labels = [{"value": i, "name": f"class {i}", "color": [60 * i % 256, 0, 0],
               "category": {"scheme": "SCT", "value": "123037004",
                            "meaning": "Anatomical Structure"},
               "type": {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}}
              for i in range(1, args.classes + 1)]
    card = {
        "name": package.name, "version": "1", "description": "benchmark",
        "intended_use": "none", "license": "benchmark", "authors": ["bench"],
        "source": "bench", "file": "fold_0.onnx", "onnx_input": "input",
        "onnx_output": "logits", "inputs": [{"name": "ct", "modality": "CT"}],
        "preprocessing": {"patch_size": list(args.patch)},
        "outputs": {"activation": "softmax", "decision": "argmax", "labels": labels},
        "profile": {
            "framework": "nnunet", "files": ["fold_0.onnx"], "folds": ["0"],
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "spacing": [args.spacing] * 3, "patch_size": list(args.patch),
            "normalization": [{"scheme": "CTNormalization", "use_mask_for_norm": False,
                               "mean": 50.0, "std": 200.0, "percentile_00_5": -1000.0,
                               "percentile_99_5": 1500.0}],
            "resampling_data": {"order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_probabilities": {"order": 1, "order_z": 0, "force_separate_z": None},
            "mirror_axes": [0, 1, 2] if mirror else None,
            "labels": {"background": 0, **{f"c{i}": i for i in range(1, args.classes + 1)}},
            "num_segmentation_heads": args.classes + 1,
        },
    }
    (package / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


def _ct(slices: int) -> sitk.Image:
    _z, y, x = np.ogrid[:slices, :512, :512]
    body = (x - 256) ** 2 / 230**2 + (y - 256) ** 2 / 180**2 <= 1
    organ = (x - 300) ** 2 / 60**2 + (y - 240) ** 2 / 50**2 <= 1
    hu = np.where(organ, 60, np.where(body, 0, -1000))
    hu = np.broadcast_to(hu, (slices, 512, 512)).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.8, 1.25))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--spacing", type=float, default=3.0, help="plan spacing (mm)")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--no-mirror-only", action="store_true",
                        help="skip the run with mirroring (8 times the model time)")
    args = parser.parse_args()

    import torch

    from dicomnode.inference.export import export_network
    from dicomnode.inference.profiles import nnunet as profile
    from dicomnode.models.card import load_card

    print(f"machine: {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; CT {args.slices}x512x512 at "
          f"0.8x0.8x1.25 mm, plan spacing {args.spacing} mm, patch {args.patch}, "
          f"{args.classes} classes")
    image = _ct(args.slices)
    net = _network(args.classes)
    print("network: 6 stages, features 32-64-128-256-320-320, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters")  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "fold_0.onnx"
        export_network(net, torch.zeros(1, 1, *args.patch), onnx_file)
        runs = [False] if args.no_mirror_only else [False, True]
        print(f"{'mirroring':<10} {'windows':>7} {'total':>8} {'model':>8} {'prep':>7} "
              f"{'other':>7} {'other/model':>11}")
        for mirror in runs:
            package = Path(tmp) / f"speed-{'m' if mirror else 'n'}"
            package.mkdir()
            (package / "fold_0.onnx").symlink_to(onnx_file)
            (package / "LICENSE").write_text("benchmark\n")
            _card(package, args, mirror)
            card = load_card(package)
            t = time.perf_counter()
            labels, timings, provider = profile.predict_label_map(card, [image])
            total = time.perf_counter() - t
            model, prep = timings["session_run"], timings["preprocess"]
            other = total - model - prep
            windows = int(timings["windows"])
            print(f"{'yes (8x)' if mirror else 'no':<10} {windows:>7} {total:8.1f} "
                  f"{model:8.1f} {prep:7.1f} {other:7.1f} {100 * other / model:10.1f}%"
                  f"  [{provider}, {len(np.unique(labels))} labels]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
