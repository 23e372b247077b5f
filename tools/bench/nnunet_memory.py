#!/usr/bin/env python3
"""Peak memory of the ``nnunet`` profile with many classes (a TotalSegmentator-sized output).

A 118-class nnU-Net ``PlainConvUNet`` (random weights: this measures memory and time, not
segmentation; small features so that the CPU run stays minutes) is exported by the importer's
exporter, given a card whose profile is a TotalSegmentator-like plan (1.5 mm isotropic target,
CTNormalization, patch ``--patch``, no mirroring unless ``--mirror``), and run by
:func:`dicomnode.inference.profiles.nnunet.predict_label_map` on a synthetic 300 x 512 x 512
CT at 0.8 x 0.8 x 1.25 mm. Prints the peak RSS of this process (``ru_maxrss``) and the seconds
(total, preprocessing, ``session.run``), then goes on as the node does in the same process:
structures of the label map and a SEG and an RTSTRUCT written on a DICOM CT series of the same
grid, and prints the peak RSS of the whole run (``--label-map-only`` stops before).

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
from typing import Any

import numpy as np
import SimpleITK as sitk
import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=118)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--mirror", action="store_true")
    parser.add_argument("--label-map-only", action="store_true",
                        help="stop after the profile's label map (no structures, no objects)")
    args = parser.parse_args()

    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from dicomnode.inference.export import export_network
    from dicomnode.inference.profiles import nnunet as profile
    from dicomnode.models.card import load_card

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
        peak_mb = _peak_mb()
        print(f"{args.classes} classes, patch {args.patch}, CT {args.slices}x512x512: the "
              f"profile's label map with a peak RSS of {peak_mb:.0f} MB; {seconds:.1f} s "
              f"({timings['preprocess']:.1f} s preprocessing, {timings['session_run']:.1f} s "
              f"in session.run), {len(np.unique(labels))} labels", flush=True)
        if not args.label_map_only:
            del labels, image
            _write_objects(loaded, args.slices, Path(tmp))
    return 0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_objects(card: Any, slices: int, tmp: Path) -> None:
    """The rest of the node's run, in the same process: structures from a label map and the
    SEG (binary, every frame kept) and RTSTRUCT written from them, on a DICOM CT series.

    A random-weights network labels noise, so the label map written here is a synthetic one
    on the same grid in which every class is present: a partition of the body ellipse into
    ``classes`` slabs and sectors (the worst case for the writers: every segment has frames
    and contours)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import testdata

    from dicomnode.config import OutputsConfig
    from dicomnode.inference.segment import Geometry, Segmentation, structures_of_label_map
    from dicomnode.inference.volume import read_series
    from dicomnode.outputs.write import write_results

    files = testdata.synthetic_ct(tmp / "ct", slices=slices)
    volume = read_series(files)
    classes = len(card.outputs.labels)
    z, y, x = np.ogrid[:slices, :512, :512]
    inside = (x - 256) ** 2 / 230**2 + (y - 256) ** 2 / 180**2 <= 1
    bands = max(1, int(np.ceil(classes / 8)))
    sector = (np.floor((np.arctan2(y - 256, x - 256) + np.pi) / (2 * np.pi) * 8) % 8)
    band = np.minimum(z * bands // slices, bands - 1)
    label_map = np.where(inside, (band * 8 + sector) % classes + 1, 0).astype(np.uint8)
    del inside, sector, band
    t = time.perf_counter()
    structures = structures_of_label_map(card.outputs.labels, label_map,
                                         tuple(volume.image.GetSpacing()))
    segmentation = Segmentation(card, Geometry.of(volume.image), structures, "bench")
    written = write_results(segmentation, volume, files, tmp / "out",
                            OutputsConfig(seg=True, rtstruct=True))
    seconds = time.perf_counter() - t
    sizes = ", ".join(f"{o.kind} {o.path.stat().st_size / 1e6:.0f} MB" for o in written.objects)
    present = sum(1 for s in structures if s.voxel_count)
    print(f"whole run: {present} structures present, SEG and RTSTRUCT written in "
          f"{seconds:.1f} s ({sizes}); peak RSS of the whole run {_peak_mb():.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
