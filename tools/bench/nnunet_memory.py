#!/usr/bin/env python3
"""Peak memory of the ``nnunet`` profile with many classes (a TotalSegmentator-sized output).

A 118-class nnU-Net ``PlainConvUNet`` (random weights: this measures memory and time, not
segmentation; small features so that the CPU run stays minutes) is exported by the importer's
exporter, given a card whose profile is a TotalSegmentator-like plan (1.5 mm isotropic target,
CTNormalization, patch ``--patch``, no mirroring unless ``--mirror``), and run by
:func:`dicomnode.inference.profiles.nnunet.predict_label_map` on a synthetic 300 x 512 x 512
CT at 0.8 x 0.8 x 1.25 mm. Prints the peak RSS of this process (``ru_maxrss``) and the seconds
(total, preprocessing, ``session.run``). Measured (2 shared CPU cores, 118 classes, patch
64 x 128 x 128, no mirroring): 3.66 GB peak for the label map, 365 s. Turning it into a
``Segmentation`` (one boolean mask per structure on the source grid) adds 118 x 79 MB = 9.3 GB:
that representation, not the profile, is what a 118-class model needs changed.

The profile holds float16 scores for one band of windows along the first axis
(``(folds + 1) x classes x patch[0] x rows x columns``) and one window's float32 scores, never
the whole grid times the classes: for 118 classes that would be 4.4 GB in float16 and 8.8 GB in
float32 on this grid.

Needs the ``import`` extra (torch, nnunetv2, onnx). Usage::

    python tools/bench/nnunet_memory.py [--classes 118] [--patch 64 128 128] [--slices 300]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=118)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--mirror", action="store_true")
    args = parser.parse_args()

    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from dicomnode.inference.card import load_card
    from dicomnode.inference.export import export_network
    from dicomnode.inference.profiles import nnunet as profile

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1),
                        args.classes + 1, (1, 1), conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                        nonlin=torch.nn.LeakyReLU, deep_supervision=False).eval()
    with torch.no_grad():  # distinct norm parameters: the exporter folds identical ones
        for module in net.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "many"
        export_network(net, torch.zeros(1, 1, *args.patch), package / "fold_0.onnx")
        (package / "LICENSE").write_text("benchmark\n")
        labels = [{"value": i, "name": f"class {i}", "color": [i % 256, 0, 0],
                   "category": {"scheme": "SCT", "value": "123037004",
                                "meaning": "Anatomical Structure"},
                   "type": {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}}
                  for i in range(1, args.classes + 1)]
        card = {
            "name": "many", "version": "1", "description": "benchmark", "intended_use": "none",
            "license": "benchmark", "authors": ["bench"], "source": "bench",
            "file": "fold_0.onnx", "onnx_input": "input", "onnx_output": "logits",
            "inputs": [{"name": "ct", "modality": "CT"}],
            "preprocessing": {"patch_size": args.patch},
            "outputs": {"activation": "softmax", "decision": "argmax", "labels": labels},
            "profile": {
                "framework": "nnunet", "files": ["fold_0.onnx"], "folds": ["0"],
                "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                "spacing": [1.5, 1.5, 1.5], "patch_size": args.patch,
                "normalization": [{"scheme": "CTNormalization", "use_mask_for_norm": False,
                                   "mean": 50.0, "std": 200.0, "percentile_00_5": -1000.0,
                                   "percentile_99_5": 1500.0}],
                "resampling_data": {"order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_probabilities": {"order": 1, "order_z": 0,
                                             "force_separate_z": None},
                "mirror_axes": [0, 1, 2] if args.mirror else None,
                "labels": {"background": 0, **{f"c{i}": i for i in range(1, args.classes + 1)}},
                "num_segmentation_heads": args.classes + 1,
            },
        }
        (package / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        loaded = load_card(package)
        _z, y, x = np.ogrid[:args.slices, :512, :512]
        hu = np.where((x - 256) ** 2 / 230**2 + (y - 256) ** 2 / 180**2 <= 1, 40, -1000)
        hu = np.broadcast_to(hu, (args.slices, 512, 512)).astype(np.int16)
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((0.8, 0.8, 1.25))
        del hu
        t = time.perf_counter()
        labels, timings, _ = profile.predict_label_map(loaded, [image])
        seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.classes} classes, patch {args.patch}, CT {args.slices}x512x512: the "
          f"profile's label map with a peak RSS of {peak_mb:.0f} MB; {seconds:.1f} s "
          f"({timings['preprocess']:.1f} s preprocessing, {timings['session_run']:.1f} s in "
          f"session.run), {len(np.unique(labels))} labels")
    print(f"(a Segmentation's boolean mask per structure adds {args.classes} x "
          f"{labels.size / 1e6:.0f} MB = {args.classes * labels.size / 1e9:.1f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
