#!/usr/bin/env python3
"""Triton round trip per window against the local ONNX Runtime session (issue 18).

A real ``tritonserver`` (the nvidia-pytriton wheel, ``tools/triton_server.py``) serves
``ct-body`` as ``dicomnode models export-triton --kind cpu`` writes it; the wheel has only
the Python backend, so the exported ``model.onnx`` runs there in ONNX Runtime on the CPU,
the same library and threads as the local session. The difference between the two is
therefore what Triton adds per window: serialising the batch, the KServe v2 request over
loopback (HTTP with binary tensors, or gRPC), Triton's scheduler, the Python backend's
shared-memory hand-over, and the response back.

Windows: ``ct-body`` runs axial slices in batches of ``batch_size`` (16); each case is one
``run(batch)`` of the given shape, timed ``--repeat`` times after ``--warmup`` runs, through
:func:`dicomnode.inference.runtime.open_card_session` exactly as a job calls it.

Usage::

    python tools/bench/triton.py [--repeat 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
from triton_server import TritonServer, python_repository  # noqa: E402

from dicomnode.inference import runtime  # noqa: E402
from dicomnode.inference.triton import ExportOptions, InstanceKind, export_repository  # noqa: E402
from dicomnode.models.card import load_card  # noqa: E402

SHAPES = ((1, 1, 512, 512), (16, 1, 512, 512), (16, 1, 256, 256))


def _time(session: Any, batch: np.ndarray, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        session.run(batch)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(batch)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    card = load_card(ROOT / "models" / "ct-body")
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        export_repository(card, base / "exported", ExportOptions(kind=InstanceKind.CPU))
        repo = python_repository(base / "exported", base / "repo")
        with TritonServer(repo, base / "server") as server:
            backends = {"local": None, "triton-http": ("http", server.http_url),
                        "triton-grpc": ("grpc", server.grpc_url)}
            for shape in SHAPES:
                batch = rng.uniform(-1100, 1600, shape).astype(np.float32)
                for backend, target in backends.items():
                    runtime.clear_cache()
                    triton = (runtime.TritonSettings(url=target[1], protocol=target[0])
                              if target else None)
                    runtime.configure(runtime.GpuSettings(), triton)
                    session = runtime.open_card_session(card)
                    times = _time(session, batch, args.repeat, args.warmup)
                    rows.append({"shape": list(shape), "backend": backend,
                                 "megabytes_in_out": round(batch.nbytes * 4 / 1e6, 1),
                                 "median_ms": round(1000 * statistics.median(times), 2),
                                 "p90_ms": round(1000 * sorted(times)[int(0.9 * len(times))],
                                                 2)})
                    print(f"{'x'.join(map(str, shape)):>14} {backend:<12} "
                          f"median {rows[-1]['median_ms']:8.2f} ms  "
                          f"p90 {rows[-1]['p90_ms']:8.2f} ms",
                          flush=True)
    runtime.clear_cache()
    local = {tuple(r["shape"]): r["median_ms"] for r in rows if r["backend"] == "local"}
    for r in rows:
        if r["backend"] != "local":
            r["added_ms"] = round(r["median_ms"] - local[tuple(r["shape"])], 2)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": platform.platform(), "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
