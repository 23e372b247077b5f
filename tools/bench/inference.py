#!/usr/bin/env python3
"""Inference benchmark: the whole model run against the time inside ``session.run``.

Cases (each in a fresh Python process, so that its peak RSS is its own):

* ``brain-mr`` on the Colin27 T1 MR (181 x 217 x 181, 1 mm; Debian ``mricron-data``);
* ``ct-body`` on the synthetic 300-slice 512 x 512 CT of the receive benchmark;
* ``ct-body-600`` on a 600-slice 512 x 512 CT, for memory (``--large``).

For each case the series is written to a temporary folder first (not timed); then,
timed in the child process: reading the DICOM series into a volume (``read``),
pre-processing, ``session.run`` (summed over all calls), post-processing (decision,
resampling back onto the source grid, connected components, hole filling) and the
total of :func:`dicomnode.inference.segment.segment`.  ``overhead`` is everything
in ``segment`` outside ``session.run``, as a fraction of ``session.run`` (the target
is <= 20 %); ``overhead+read`` adds reading the series.  The first run in each
process loads the model; ``--repeat`` runs follow in the same process with the
session cached, and medians are reported.  Peak RSS is the child's ``ru_maxrss``.

Usage::

    python tools/bench/inference.py [--repeat 3] [--large] [--providers CPUExecutionProvider]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

CASES = {
    "brain-mr": ("brain-mr", "colin27"),
    "ct-body": ("ct-body", "ct300"),
    "ct-body-600": ("ct-body", "ct600"),
}


def _write_series(kind: str, folder: Path) -> list[Path]:
    import testdata

    if kind == "colin27":
        return testdata.colin27_mr(folder)
    slices = 300 if kind == "ct300" else 600
    return testdata.synthetic_ct(folder, slices=slices)


def _child(case: str, folder: Path, repeat: int, providers: list[str]) -> dict[str, Any]:
    from dicomnode.inference.segment import segment
    from dicomnode.inference.volume import read_series
    from dicomnode.models.card import load_card

    model, _ = CASES[case]
    card = load_card(ROOT / "models" / model)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        volume = read_series(files)
        read = time.perf_counter() - t0
        result = segment(card, [volume.image], providers=providers)
        t = result.timings
        runs.append({
            "read": read, "preprocess": t.preprocess, "session_run": t.session_run,
            "postprocess": t.postprocess, "segment_total": t.total,
            "overhead": t.total - t.session_run, "provider": result.provider,
            "volumes_ml": {s.label.name: round(s.volume_ml, 1) for s in result.structures},
        })
        del volume, result
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "instances": len(files), "runs": runs, "peak_rss_mb": rss_kib / 1024}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="also the 600-slice CT")
    parser.add_argument("--providers", default="TensorrtExecutionProvider,CUDAExecutionProvider,"
                        "CPUExecutionProvider")
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    if args.child:
        result = _child(args.child[0], Path(args.child[1]), args.repeat, providers)
        print(json.dumps(result))
        return 0
    names = args.cases.split(",") if args.cases else ["brain-mr", "ct-body"]
    if args.large and "ct-body-600" not in names:
        names.append("ct-body-600")
    results = []
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        for name in names:
            folder = Path(tmp) / name
            folder.mkdir()
            _write_series(CASES[name][1], folder)
            proc = subprocess.run(
                [sys.executable, __file__, "--repeat", str(args.repeat), "--providers",
                 ",".join(providers), "--child", name, str(folder)],
                capture_output=True, text=True, check=False,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for f in folder.iterdir():
                f.unlink()
    print(f"host: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    header = (f"{'case':<12} {'provider':<22} {'inst':>5} {'read s':>7} {'pre s':>7} "
              f"{'run s':>7} {'post s':>7} {'segment s':>9} {'overhead':>9} {'+read':>7} "
              f"{'peak RSS MB':>11}")
    print(header)
    for r in results:
        runs = r["runs"][1:] or r["runs"]  # the first run also loads the model
        run_s = _median(runs, "session_run")
        over = _median(runs, "overhead")
        read = _median(runs, "read")
        print(f"{r['case']:<12} {runs[0]['provider']:<22} {r['instances']:>5} {read:7.2f} "
              f"{_median(runs, 'preprocess'):7.2f} {run_s:7.2f} "
              f"{_median(runs, 'postprocess'):7.2f} {_median(runs, 'segment_total'):9.2f} "
              f"{over / run_s:8.0%} {(over + read) / run_s:7.0%} {r['peak_rss_mb']:11.0f}")
        r["median"] = {k: _median(runs, k) for k in
                       ("read", "preprocess", "session_run", "postprocess", "segment_total",
                        "overhead")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
