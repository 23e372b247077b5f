"""ONNX Runtime sessions: provider choice in the configured order, one log line, cached.

onnxruntime-gpu lists the CUDA and TensorRT providers even where their libraries
are missing, and then falls back to the CPU with pages of error output.  Before a
session is created each GPU provider is checked here by loading the shared
libraries it needs (CUDA 13 and cuDNN 9 for the CUDA provider of onnxruntime
1.31, plus TensorRT 10 for TensorRT); a provider whose libraries are missing is
skipped without being tried, and one line says which provider runs and why the
others were skipped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# onnxruntime ships a telemetry client that writes a device id under ~/.cache; a node in a
# hospital network sends nothing anywhere unasked (an operator may still set it to 0)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort

if TYPE_CHECKING:
    from dicomnode.inference.card import Card

__all__ = ["ModelSession", "ProviderChoice", "choose_providers", "clear_cache",
           "open_card_session", "open_session"]

log = logging.getLogger("dicomnode.inference")

_LIBRARIES: dict[str, tuple[tuple[str, ...], ...]] = {
    # Each inner tuple: alternative file names of one library that must load.
    "CUDAExecutionProvider": (
        ("libcudart.so.13",),
        ("libcublas.so.13",),
        ("libcudnn.so.9",),
    ),
    "TensorrtExecutionProvider": (
        ("libcudart.so.13",),
        ("libnvinfer.so.10",),
    ),
}
_WINDOWS_LIBRARIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "CUDAExecutionProvider": (("cudart64_13.dll",), ("cudnn64_9.dll",)),
    "TensorrtExecutionProvider": (("cudart64_13.dll",), ("nvinfer_10.dll",)),
}


@dataclass(frozen=True)
class ProviderChoice:
    """The providers to try, in order, and why each configured one was left out."""

    providers: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


_PRELOADED: list[bool] = []


def _preload_pip_libraries() -> None:
    """Load CUDA, cuDNN (and the MSVC runtime on Windows) installed from pip wheels
    (``onnxruntime-gpu[cuda,cudnn]``): they are not on the loader's path, so without this
    the probe below, and the CUDA provider itself, would not find them. Once per process;
    a machine without them loses nothing."""
    if _PRELOADED:
        return
    _PRELOADED.append(True)
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime 1.21+
    if preload is None or not _pip_cuda_installed():
        return  # (it prints a line per library it misses: only where there are some)
    try:
        preload()
    except Exception as exc:  # a broken wheel must not stop the CPU fallback
        log.debug("onnxruntime.preload_dlls failed: %s", type(exc).__name__)


def _pip_cuda_installed() -> bool:
    """Whether CUDA or cuDNN wheels (the ``nvidia`` namespace package) are installed."""
    import importlib.util

    return importlib.util.find_spec("nvidia") is not None


def _missing_library(provider: str) -> str | None:
    table = _WINDOWS_LIBRARIES if sys.platform == "win32" else _LIBRARIES
    if provider in table:
        _preload_pip_libraries()
    for alternatives in table.get(provider, ()):
        for name in alternatives:
            try:
                ctypes.CDLL(name)
            except OSError:
                continue
            break
        else:
            return alternatives[0]
    return None


def choose_providers(configured: Sequence[str]) -> ProviderChoice:
    """Keep the configured providers this onnxruntime build has and can load, in order.

    The CPU provider is always appended last as the fallback.
    """
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in configured:
        if name not in available:
            skipped.append((name, f"not in this onnxruntime build ({ort.__version__})"))
            continue
        missing = _missing_library(name)
        if missing is not None:
            needs = "TensorRT 10" if name.startswith("Tensorrt") else "CUDA 13 and cuDNN 9"
            skipped.append((name, f"needs {needs}; {missing} not found"))
            continue
        chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return ProviderChoice(tuple(chosen), tuple(skipped))


@dataclass
class ModelSession:
    """An ONNX Runtime session with the provider it actually runs on.

    ``input_shape`` and ``output_shape`` are the model's declared shapes: ints for
    fixed dimensions, strings or None for dynamic ones.
    """

    session: ort.InferenceSession
    provider: str
    input_name: str
    output_name: str
    input_shape: tuple[int | str | None, ...]
    output_shape: tuple[int | str | None, ...]
    lock: threading.Lock

    def run(self, batch: Any) -> Any:
        """Run one batch (numpy float32) and return the chosen output (numpy)."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]


_cache: dict[tuple[str, int, int, tuple[str, ...], int], ModelSession] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached session (tests, or after a model package changed)."""
    with _cache_lock:
        _cache.clear()


def _shape(dims: Sequence[Any]) -> tuple[int | str | None, ...]:
    return tuple(d if isinstance(d, int | str) or d is None else None for d in dims)


def open_session(
    model_path: str | Path,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    input_name: str | None = None,
    output_name: str | None = None,
    intra_op_threads: int = 0,
    label: str | None = None,
) -> ModelSession:
    """Open (or reuse) a session for ``model_path``; cached per process.

    The cache key includes the file's size and modification time, so a replaced
    model file is loaded again.  One INFO line names the provider that runs and
    why the configured ones before it were skipped.

    Raises:
        ValueError: ``input_name``/``output_name`` not in the model, or a model with
            several inputs and no ``input_name``.
        onnxruntime's exceptions for a file that is not a loadable model.
    """
    path = Path(model_path).resolve()
    stat = path.stat()
    choice = choose_providers(providers)
    key = (str(path), stat.st_size, stat.st_mtime_ns, choice.providers, intra_op_threads)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        session = ort.InferenceSession(str(path), options, providers=list(choice.providers))
        running = session.get_providers()
        provider = running[0] if running else "CPUExecutionProvider"
        skipped = list(choice.skipped)
        for name in choice.providers:
            if name == provider:
                break
            skipped.append((name, "failed to initialise (see onnxruntime's log above)"))
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if input_name is None:
            if len(inputs) != 1:
                raise ValueError(
                    f"{path.name} has {len(inputs)} inputs ({', '.join(inputs)}): "
                    "the card must name one as onnx_input"
                )
            input_name = next(iter(inputs))
        if input_name not in inputs:
            raise ValueError(
                f"{path.name} has no input {input_name!r} (inputs: {', '.join(inputs)})"
            )
        if output_name is None:
            output_name = next(iter(outputs))
        if output_name not in outputs:
            raise ValueError(
                f"{path.name} has no output {output_name!r} (outputs: {', '.join(outputs)})"
            )
        why = "; ".join(f"{name} skipped: {reason}" for name, reason in skipped)
        log.info(
            "model %s runs on %s (onnxruntime %s)%s",
            label or path.parent.name,
            provider,
            ort.__version__,
            f"; {why}" if why else "",
        )
        result = ModelSession(
            session=session,
            provider=provider,
            input_name=input_name,
            output_name=output_name,
            input_shape=_shape(inputs[input_name].shape),
            output_shape=_shape(outputs[output_name].shape),
            lock=threading.Lock(),
        )
        _cache[key] = result
        return result


def open_card_session(card: Card, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                      intra_op_threads: int = 0) -> ModelSession:
    """:func:`open_session` for the model of ``card`` (its file, input and output names),
    so that every caller - a job, a worker's warm-up, ``models check`` - shares one cached
    session per model and settings."""
    return open_session(
        Path(card.model_path),
        providers=providers,
        input_name=card.onnx_input,
        output_name=card.onnx_output,
        intra_op_threads=intra_op_threads,
        label=f"{card.name} {card.version}",
    )
