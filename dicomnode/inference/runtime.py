"""ONNX Runtime sessions: provider choice in the configured order, one log line, cached.

onnxruntime-gpu lists the CUDA and TensorRT providers even where their libraries
are missing, and then falls back to the CPU with pages of error output.  Before a
session is created each GPU provider is checked here by loading the shared
libraries it needs (CUDA 13 and cuDNN 9 for the CUDA provider of onnxruntime
1.31, plus TensorRT 10 for TensorRT); a provider whose libraries are missing is
skipped without being tried, and one line says which provider runs and why the
others were skipped.

On a GPU the providers get their options from :class:`GpuSettings` (set once per process
from the configuration with :func:`configure`): the device, TensorRT's engine and timing
caches (an engine is built once per model and shape, then loaded), half precision where
the model card allows it (``runtime.fp16``), and TensorRT optimisation profiles for the
dynamic axes when the window shape is known (a sliding-window model runs one shape).
Batches then go through IO binding: the output is allocated on the device by ONNX Runtime
and copied back once.

With ``inference.backend: triton`` (:func:`configure` given :class:`TritonSettings`),
:func:`open_session` returns a :class:`~dicomnode.inference.triton.TritonSession` instead:
the same ``run(batch)``, names, shapes and lock, the windows run on the Triton server. This
is the one place the backend is chosen; the profiles do not know it.
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
from typing import TYPE_CHECKING, Any, TypeAlias

# onnxruntime ships a telemetry client that writes a device id under ~/.cache; a node in a
# hospital network sends nothing anywhere unasked (an operator may still set it to 0)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort

from dicomnode.inference.triton import TritonSession, TritonSettings

if TYPE_CHECKING:
    from dicomnode.config import Config
    from dicomnode.models.card import Card

__all__ = ["GpuSettings", "ModelSession", "OrtSession", "ProviderChoice", "TritonSettings",
           "WindowShape", "choose_providers", "clear_cache", "configure", "configure_from",
           "open_card_session", "open_session", "provider_options", "window_shape"]

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


@dataclass(frozen=True)
class GpuSettings:
    """How the GPU providers run (the ``inference`` section of the configuration).

    Attributes:
        device_id: the CUDA device (``nvidia-smi`` numbering).
        engine_cache: folder for TensorRT's engines and timing cache (None: no cache, every
            process builds its engines again: minutes for a large network).
        fp16: let TensorRT run in half precision the models whose card allows it
            (``runtime.fp16: true``); False keeps every model in float32.
        io_binding: run GPU batches through IO binding (output allocated on the device).
    """

    device_id: int = 0
    engine_cache: Path | None = None
    fp16: bool = True
    io_binding: bool = True


@dataclass(frozen=True)
class WindowShape:
    """The input shapes a model is run with: ``channels`` x ``spatial`` windows in batches
    of 1 to ``max_batch`` (a sliding-window model sees no other shape)."""

    max_batch: int
    channels: int
    spatial: tuple[int, ...]


_settings: list[GpuSettings] = [GpuSettings()]
_triton: list[TritonSettings | None] = [None]


def configure(settings: GpuSettings, triton: TritonSettings | None = None) -> None:
    """Set this process's GPU settings, and the Triton server its models run on (None:
    ONNX Runtime in this process); sessions opened later use them."""
    _settings[0] = settings
    _triton[0] = triton


def configure_from(config: Config) -> GpuSettings:
    """:func:`configure` from a node configuration's ``inference`` section (the TensorRT
    cache defaults to ``tensorrt-cache`` under the storage folder); returns the settings."""
    inference = config.inference
    settings = GpuSettings(
        device_id=inference.device_id,
        engine_cache=inference.tensorrt_cache or config.storage.path / "tensorrt-cache",
        fp16=inference.tensorrt_fp16, io_binding=inference.io_binding)
    triton = None
    if inference.backend.value == "triton" and inference.triton.url is not None:
        triton = TritonSettings(
            url=inference.triton.url, protocol=inference.triton.protocol.value,
            timeout_seconds=inference.triton.timeout_seconds,
            model_prefix=inference.triton.model_prefix)
    configure(settings, triton)
    return settings


def window_shape(card: Card) -> WindowShape | None:
    """The fixed window shape of ``card``'s model, or None when its input size varies
    (whole volumes, slices of the source's size)."""
    profile = card.profile or {}
    channels = card.input_channels
    if profile.get("framework") == "nnunet" and profile.get("patch_size"):
        return WindowShape(1, channels, tuple(int(v) for v in profile["patch_size"]))
    inferer = profile.get("inferer") if isinstance(profile.get("inferer"), dict) else None
    if profile.get("framework") == "monai" and inferer and inferer.get("roi_size"):
        return WindowShape(int(inferer.get("sw_batch_size", 1)), channels,
                           tuple(int(v) for v in inferer["roi_size"]))
    patch = card.preprocessing.patch_size
    if card.profile is None and patch is not None:
        return WindowShape(card.preprocessing.batch_size, channels, tuple(int(v) for v in patch))
    return None


def provider_options(provider: str, settings: GpuSettings, *, input_name: str | None,
                     window: WindowShape | None, fp16: bool) -> dict[str, str]:
    """ONNX Runtime options for ``provider`` (empty for the CPU).

    ``fp16``: the card allows half precision. TensorRT gets an optimisation profile
    (batch 1 to ``window.max_batch``) when the window shape and the input name are known.
    """
    device = str(settings.device_id)
    if provider == "CUDAExecutionProvider":
        return {"device_id": device, "cudnn_conv_algo_search": "EXHAUSTIVE",
                "cudnn_conv_use_max_workspace": "1", "do_copy_in_default_stream": "1",
                "arena_extend_strategy": "kSameAsRequested"}
    if provider != "TensorrtExecutionProvider":
        return {}
    options = {"device_id": device, "trt_fp16_enable": "1" if fp16 and settings.fp16 else "0",
               "trt_max_workspace_size": str(4 << 30)}
    if settings.engine_cache is not None:
        cache = str(settings.engine_cache)
        options.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
                        "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache})
    if window is not None and input_name is not None:
        def shape(batch: int) -> str:
            dims = "x".join(str(v) for v in (batch, window.channels, *window.spatial))
            return f"{input_name}:{dims}"

        options.update({"trt_profile_min_shapes": shape(1),
                        "trt_profile_opt_shapes": shape(window.max_batch),
                        "trt_profile_max_shapes": shape(window.max_batch)})
    return options


@dataclass
class OrtSession:
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
    io_binding: bool = False
    device_id: int = 0

    def run(self, batch: Any) -> Any:
        """Run one batch (numpy float32) and return the chosen output (numpy)."""
        if self.io_binding:
            return self.run_bound(batch)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def run_bound(self, batch: Any) -> Any:
        """:meth:`run` through IO binding: the input copied to the provider's device once,
        the output allocated there by ONNX Runtime and copied back once."""
        device = "cpu" if self.provider == "CPUExecutionProvider" else "cuda"
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, device, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


#: what :func:`open_session` returns: a local ONNX Runtime session or a model on Triton,
#: alike for their users (``run(batch)``, ``lock``, names, declared shapes, ``provider``)
ModelSession: TypeAlias = OrtSession | TritonSession

_cache: dict[tuple[Any, ...], OrtSession] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached session (tests, or after a model package changed)."""
    from dicomnode.inference import triton

    with _cache_lock:
        _cache.clear()
    triton.clear_cache()


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
    window: WindowShape | None = None,
    fp16: bool = False,
) -> ModelSession:
    """Open (or reuse) a session for ``model_path``; cached per process.

    ``window`` (the model's fixed input shape) and ``fp16`` (the card allows half
    precision) shape the GPU providers' options (:func:`provider_options`).

    The cache key includes the file's size and modification time, so a replaced
    model file is loaded again.  One INFO line names the provider that runs and
    why the configured ones before it were skipped.

    With a Triton server configured (:func:`configure`) the session is the package's model
    on that server (:func:`~dicomnode.inference.triton.open_triton_session`): the providers,
    threads and GPU options are then the server's business.

    Raises:
        ValueError: ``input_name``/``output_name`` not in the model, or a model with
            several inputs and no ``input_name``.
        onnxruntime's exceptions for a file that is not a loadable model.
        InferenceError: (Triton) the server is unreachable or lacks the model.
    """
    path = Path(model_path).resolve()
    triton = _triton[0]
    if triton is not None:
        from dicomnode.inference.triton import open_triton_session

        return open_triton_session(path, triton, input_name=input_name,
                                   output_name=output_name)
    stat = path.stat()
    choice = choose_providers(providers)
    settings = _settings[0]
    key = (str(path), stat.st_size, stat.st_mtime_ns, choice.providers, intra_op_threads,
           settings, window, fp16, input_name, output_name)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if settings.engine_cache is not None and "TensorrtExecutionProvider" in choice.providers:
            settings.engine_cache.mkdir(parents=True, exist_ok=True)
        session = ort.InferenceSession(
            str(path), options, providers=[
                (name, provider_options(name, settings, input_name=input_name, window=window,
                                        fp16=fp16))
                for name in choice.providers])
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
        result = OrtSession(
            session=session,
            provider=provider,
            input_name=input_name,
            output_name=output_name,
            input_shape=_shape(inputs[input_name].shape),
            output_shape=_shape(outputs[output_name].shape),
            lock=threading.Lock(),
            io_binding=settings.io_binding and provider != "CPUExecutionProvider",
            device_id=settings.device_id,
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
        window=window_shape(card),
        fp16=card.runtime.fp16,
    )
