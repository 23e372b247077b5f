"""Models on an NVIDIA Triton Inference Server: the session that sends windows there, and
the model repository ``dicomnode models export-triton`` writes.

With ``inference.backend: triton`` the worker still reads, resamples, normalises and cuts
the windows, and still post-processes the outputs; only the batches of windows travel to
Triton over the KServe v2 protocol (HTTP or gRPC, the ``tritonclient`` package: the
``dicomnode[triton]`` extra, imported only when a Triton session opens). A
:class:`TritonSession` has the interface of :class:`~dicomnode.inference.runtime.ModelSession`
(``run(batch)``, names, shapes, ``lock``), and :func:`~dicomnode.inference.runtime.open_session`
picks it, so no profile knows where its windows run.

Model names: a package's model is ``<prefix><name>-<version>``; a package with several ONNX
files (nnU-Net folds) has one model per file, ``<prefix><name>-<version>-<file stem>``
(:func:`model_name`); the exporter and the session derive them the same way.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.inference.predict import InferenceError

if TYPE_CHECKING:
    from dicomnode.models.card import Card

__all__ = ["ExportOptions", "InstanceKind", "TritonSession", "TritonSettings", "TritonUnavailable",
           "clear_cache",
           "config_pbtxt", "export_repository", "max_batch_size", "model_files", "model_name",
           "open_triton_session"]

#: the ``provider`` a Triton session reports (logs, results' provenance)
PROVIDER = "Triton"


class TritonUnavailable(InferenceError):
    """Triton cannot be reached, has not (yet) loaded the model, timed out or failed a
    batch: transient, a job is tried again (``pipeline.max_attempts``)."""

    transient = True


class InstanceKind(str, Enum):
    """Where Triton runs a model's instances (``instance_group.kind``)."""

    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class TritonSettings:
    """How to reach Triton (the ``inference.triton`` section of the configuration).

    Attributes:
        url: ``host:port``, optionally with a scheme (``https://``/``grpcs://``: TLS).
        protocol: ``http`` or ``grpc``.
        timeout_seconds: connecting, and each request (one batch of windows), in seconds.
        model_prefix: prepended to every model name.
    """

    url: str
    protocol: str = "http"
    timeout_seconds: float = 60.0
    model_prefix: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in ("http", "grpc"):
            raise ValueError(f"protocol {self.protocol!r}: http or grpc")
        if not self.timeout_seconds > 0:
            raise ValueError(f"timeout_seconds {self.timeout_seconds}: must be > 0")

    @property
    def address(self) -> str:
        """``host:port`` without the scheme (what tritonclient takes)."""
        return self.url.split("://", 1)[-1]

    @property
    def tls(self) -> bool:
        return self.url.startswith(("https://", "grpcs://"))


# ---------------------------------------------------------------------------- names

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def model_files(card: Card) -> tuple[str, ...]:
    """The package's ONNX files that run: each nnU-Net fold, else the card's file."""
    profile = card.profile or {}
    files = profile.get("files") if profile.get("framework") == "nnunet" else None
    if isinstance(files, list) and files and all(isinstance(f, str) for f in files):
        return tuple(files)
    return (card.file,)


def model_name(card: Card, file: str | None = None, prefix: str = "") -> str:
    """Triton's name for ``file`` (default: the card's) of ``card``'s package."""
    file = file or card.file
    base = f"{prefix}{card.name}-{card.version}"
    if len(model_files(card)) > 1:
        base += f"-{Path(file).stem}"
    return _NAME_CHARS.sub("_", base)


# ---------------------------------------------------------------------------- session

def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as exc:
        raise InferenceError(
            f"inference.backend triton needs the tritonclient package ({exc.name} missing): "
            "pip install 'dicomnode[triton]'") from None
    return module


def _unreachable(settings: TritonSettings, exc: BaseException) -> TritonUnavailable:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TritonUnavailable(f"Triton at {settings.url} ({settings.protocol}) is not reachable: "
                          f"{reason[:300]}")


@dataclass
class TritonSession:
    """A model on a Triton server, run like a :class:`~dicomnode.inference.runtime.ModelSession`.

    ``input_shape``/``output_shape`` come from the server's model metadata (None for the
    dynamic axes, the batch axis included).
    """

    settings: TritonSettings
    model: str
    input_name: str
    output_name: str
    input_datatype: str
    input_shape: tuple[int | str | None, ...]
    output_shape: tuple[int | str | None, ...]
    client: Any
    module: Any
    provider: str = PROVIDER
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, batch: Any) -> Any:
        """Send one batch (numpy) to Triton and return the chosen output (numpy float32).

        Raises:
            TritonUnavailable: the server is gone, timed out or refused the request.
        """
        from tritonclient.utils import triton_to_np_dtype

        data = np.ascontiguousarray(batch, dtype=triton_to_np_dtype(self.input_datatype))
        inp = self.module.InferInput(self.input_name, list(data.shape), self.input_datatype)
        if self.settings.protocol == "grpc":
            inp.set_data_from_numpy(data)
            out = self.module.InferRequestedOutput(self.output_name)
            extra: dict[str, Any] = {"client_timeout": self.settings.timeout_seconds}
        else:
            inp.set_data_from_numpy(data, binary_data=True)
            out = self.module.InferRequestedOutput(self.output_name, binary_data=True)
            extra = {}
        try:
            result = self.client.infer(self.model, [inp], outputs=[out], **extra)
        except Exception as exc:  # tritonclient's, gevent's and socket errors alike
            raise TritonUnavailable(
                f"Triton at {self.settings.url}: model {self.model} failed on a batch of "
                f"{data.shape[0]}: {_first_line(exc)}") from None
        array = result.as_numpy(self.output_name)
        if array is None:
            raise InferenceError(f"Triton at {self.settings.url}: model {self.model} "
                                 f"returned no output {self.output_name}")
        return array


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


_cache: dict[tuple[Any, ...], TritonSession] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached Triton session."""
    with _cache_lock:
        _cache.clear()


def _connect(settings: TritonSettings, module: Any) -> Any:
    if settings.protocol == "grpc":
        return module.InferenceServerClient(settings.address, ssl=settings.tls)
    return module.InferenceServerClient(
        settings.address, connection_timeout=settings.timeout_seconds,
        network_timeout=settings.timeout_seconds, ssl=settings.tls)


def _metadata(settings: TritonSettings, client: Any, model: str) -> dict[str, Any]:
    grpc = {"client_timeout": settings.timeout_seconds} if settings.protocol == "grpc" else {}
    try:
        live = client.is_server_live(**grpc)
    except Exception as exc:
        raise _unreachable(settings, exc) from None
    if not live:
        raise TritonUnavailable(f"Triton at {settings.url} is not live")
    try:
        ready = client.is_model_ready(model, **grpc)
    except Exception as exc:
        raise _unreachable(settings, exc) from None
    if not ready:
        raise TritonUnavailable(
            f"Triton at {settings.url} has no model {model} ready (export it with "
            "'dicomnode models export-triton' into the server's model repository)")
    try:
        if settings.protocol == "grpc":
            meta: dict[str, Any] = client.get_model_metadata(model, as_json=True, **grpc)
        else:
            meta = client.get_model_metadata(model)
    except Exception as exc:
        raise _unreachable(settings, exc) from None
    return meta


def _dims(tensor: dict[str, Any]) -> tuple[int | str | None, ...]:
    return tuple(None if int(d) < 0 else int(d) for d in tensor.get("shape", ()))


def open_triton_session(model_path: Path, settings: TritonSettings, *,
                        input_name: str | None = None, output_name: str | None = None,
                        ) -> TritonSession:
    """The Triton session for the ONNX file ``model_path`` of a package (its card beside
    it names the model); cached per process and server.

    Raises:
        TritonUnavailable: server unreachable or model not ready (transient).
        InferenceError: tritonclient missing, no card beside the file, or the card's
            input/output names not in the model's metadata.
    """
    from dicomnode.models.card import CardError, cached_card

    try:
        card = cached_card(model_path.parent, verify_files=False)
    except CardError as exc:
        raise InferenceError(f"{model_path}: no valid card beside it: {exc}") from None
    model = model_name(card, model_path.name, settings.model_prefix)
    key = (settings, model, input_name, output_name)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        module = _client_module(settings.protocol)
        try:
            client = _connect(settings, module)
        except Exception as exc:
            raise _unreachable(settings, exc) from None
        meta = _metadata(settings, client, model)
        inputs = {t["name"]: t for t in meta.get("inputs", ())}
        outputs = {t["name"]: t for t in meta.get("outputs", ())}
        if input_name is None:
            if len(inputs) != 1:
                raise InferenceError(f"Triton model {model} has {len(inputs)} inputs "
                                     f"({', '.join(inputs)}): the card must name one")
            input_name = next(iter(inputs))
        if input_name not in inputs:
            raise InferenceError(f"Triton model {model} has no input {input_name!r} "
                                 f"(inputs: {', '.join(inputs)})")
        if output_name is None:
            output_name = next(iter(outputs))
        if output_name not in outputs:
            raise InferenceError(f"Triton model {model} has no output {output_name!r} "
                                 f"(outputs: {', '.join(outputs)})")
        session = TritonSession(
            settings=settings, model=model, input_name=input_name, output_name=output_name,
            input_datatype=str(inputs[input_name]["datatype"]),
            input_shape=_dims(inputs[input_name]), output_shape=_dims(outputs[output_name]),
            client=client, module=module)
        _cache[key] = session
        return session


# ---------------------------------------------------------------------------- export

_DATATYPES = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64", "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32", "tensor(int16)": "TYPE_INT16",
    "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL",
}


@dataclass(frozen=True)
class ExportOptions:
    """What ``export-triton`` writes besides the inputs and outputs.

    Attributes:
        kind: where the instances run (``KIND_GPU``/``KIND_CPU``).
        count: instances per GPU (or on the CPU).
        gpus: the GPUs (Triton's numbering) of GPU instances; empty: all.
        tensorrt: run through ONNX Runtime's TensorRT provider (GPU only).
        fp16: let TensorRT use half precision for the models whose card allows it.
        max_batch_size: override of the batch size derived from the card.
        dynamic_batching: let Triton gather requests of several workers into one batch.
        prefix: prepended to every model name (``inference.triton.model_prefix``).
    """

    kind: InstanceKind = InstanceKind.GPU
    count: int = 1
    gpus: tuple[int, ...] = ()
    tensorrt: bool = False
    fp16: bool = True
    max_batch_size: int | None = None
    dynamic_batching: bool = False
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count {self.count}: at least 1 instance")
        if self.kind is InstanceKind.CPU and (self.tensorrt or self.gpus):
            raise ValueError("TensorRT and GPU ids need GPU instances (kind gpu)")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size {self.max_batch_size}: at least 1")
        if self.prefix and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: letters, digits, '_', '.', '-' only")


def max_batch_size(card: Card) -> int:
    """The largest batch the node sends for ``card``'s model: the window batch (times the
    mirrored copies nnU-Net runs together), else the card's ``batch_size``."""
    from dicomnode.inference.runtime import window_shape

    window = window_shape(card)
    profile = card.profile or {}
    if profile.get("framework") == "nnunet":
        from dicomnode.models.plans import plan_of

        axes = plan_of(profile).mirror_axes or ()
        return int((window.max_batch if window else 1) * 2 ** len(axes))
    if window is not None:
        return window.max_batch
    return max(1, card.preprocessing.batch_size)


def _tensor(name: str, datatype: str, dims: Sequence[int]) -> str:
    return (f'  {{\n    name: "{name}"\n    data_type: {datatype}\n'
            f'    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}')


def _onnx_tensors(path: Path) -> tuple[list[tuple[str, str, list[int]]],
                                       list[tuple[str, str, list[int]]]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def describe(items: Sequence[Any]) -> list[tuple[str, str, list[int]]]:
        out = []
        for t in items:
            if t.type not in _DATATYPES:
                raise ValueError(f"{path.name}: {t.name} has type {t.type}, which Triton's "
                                 "onnxruntime backend is not given here")
            out.append((t.name, _DATATYPES[t.type],
                        [d if isinstance(d, int) and d > 0 else -1 for d in t.shape]))
        return out

    return describe(session.get_inputs()), describe(session.get_outputs())


def config_pbtxt(card: Card, file: str, options: ExportOptions) -> str:
    """Triton's ``config.pbtxt`` for ``file`` of ``card``'s package (the ONNX file read for
    its inputs and outputs; a dynamic first axis becomes Triton's batch axis)."""
    inputs, outputs = _onnx_tensors(card.package / file)
    batched = all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
    batch = (options.max_batch_size or max_batch_size(card)) if batched else 0
    if batched:
        inputs = [(n, t, d[1:]) for n, t, d in inputs]
        outputs = [(n, t, d[1:]) for n, t, d in outputs]
    lines = [f'name: "{model_name(card, file, options.prefix)}"',
             'platform: "onnxruntime_onnx"',
             f"max_batch_size: {batch}",
             "input [\n" + ",\n".join(_tensor(*t) for t in inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(*t) for t in outputs) + "\n]"]
    group = f"    count: {options.count}\n    kind: KIND_{options.kind.name}\n"
    if options.gpus:
        group += f"    gpus: [ {', '.join(str(g) for g in options.gpus)} ]\n"
    lines.append("instance_group [\n  {\n" + group + "  }\n]")
    if batched and options.dynamic_batching:
        lines.append("dynamic_batching { }")
    if options.tensorrt:
        precision = "FP16" if options.fp16 and card.runtime.fp16 else "FP32"
        params = [("precision_mode", precision), ("max_workspace_size_bytes", str(4 << 30))]
        rendered = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}'
                             for k, v in params)
        lines.append("optimization {\n  execution_accelerators {\n"
                     "    gpu_execution_accelerator : [ {\n"
                     f'        name : "tensorrt"\n{rendered}\n    }} ]\n  }}\n}}')
    return "\n".join(lines) + "\n"


def export_repository(card: Card, out_dir: Path, options: ExportOptions) -> list[Path]:
    """Write one Triton model per ONNX file of ``card``'s package under ``out_dir``
    (``<model>/config.pbtxt`` and ``<model>/1/model.onnx``); returns the model folders.

    Raises:
        FileExistsError: a model folder is already there (another export of this version).
        ValueError: an input or output type Triton is not given here.
    """
    folders = []
    for file in model_files(card):
        folder = out_dir / model_name(card, file, options.prefix)
        if folder.exists():
            raise FileExistsError(f"{folder} exists: remove it to export again")
        folders.append(folder)
    written = []
    for file, folder in zip(model_files(card), folders, strict=True):
        config = config_pbtxt(card, file, options)
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(card.package / file, folder / "1" / "model.onnx")
        (folder / "config.pbtxt").write_text(config, encoding="utf-8")
        written.append(folder)
    return written
