"""CPU inference runtimes: the network exported to OpenVINO or ONNX Runtime when that agrees with
torch and is faster on this machine, else torch itself.

`auto` decides at load, per bundle and per machine: the network is exported (or the export is
read from a cache keyed by the weights' sha256 and the network's definition, the runtime's version and the CPU), a fixed
input is run through torch and the runtime, and the runtime is used only when at least 99.9 %
of voxels get the same decision and it is faster (the agreement is checked at every load; the
speed is measured once per export, precision, thread count and torch version, and kept beside
the export). On CUDA, torch (with AMP) is always used.
Networks that do not export (custom Python in forward, whole-volume inferers) stay on torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.bundle import first_line
from models.device import autocast, cpu_fields

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
MIN_AGREEMENT = 0.999
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
Predictor = Callable[[torch.Tensor], torch.Tensor]


class Exporter(Protocol):
    name: str

    def version(self) -> str: ...

    def build(
        self, network: torch.nn.Module, example: torch.Tensor, cache: Path, precision: str, any_size: bool
    ) -> Predictor: ...


@dataclass(frozen=True)
class RuntimeChoice:
    name: str  # torch | openvino | onnxruntime
    precision: str
    predictor: Predictor
    agreement: float | None = None  # share of voxels with torch's decision, on the check input
    speedup: float | None = None  # torch seconds / runtime seconds on the check input
    reason: str = ""

    def release(self) -> None:
        """Give back the runtime's working memory between predictions, where it keeps any."""
        release = getattr(self.predictor, "release", None)
        if callable(release):
            release()


@dataclass(frozen=True)
class RuntimeRequest:
    requested: str
    device: torch.device
    precision: str
    threads: int
    cache_dir: Path
    network_key: str  # weights and network definition (BundleSpec.network_key)
    input_shape: tuple[int, ...] | None  # (channels, *roi) of one window; None: no fixed window
    any_size: bool = False  # the export takes windows of any size (models.windows)
    other_shape: tuple[int, ...] | None = None  # a second window such an export is checked on


def cpu_signature() -> str:
    """A short key for the CPU: exports and compiled blobs are not portable between CPU kinds."""
    fields = cpu_fields()
    if not fields:
        return "unknown"
    return hashlib.sha256(f"{fields.get('model name', '')}|{fields.get('flags', '')}".encode()).hexdigest()[:12]


def check_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A fixed, smooth input in [0, 1] with blobs: closer to an image than white noise, so
    decisions are not coin flips on which runtimes may legitimately differ."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((1, *shape), generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, kernel_size=5, stride=1, padding=2)
    return ((smooth - smooth.min()) / (smooth.max() - smooth.min() + 1e-6)).float()


def decisions(logits: torch.Tensor) -> torch.Tensor:
    return logits.max(1).indices if logits.shape[1] > 1 else logits[:, 0] > 0


def torch_predictor(network: torch.nn.Module, device: torch.device, precision: str) -> Predictor:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return network(x)  # type: ignore[no-any-return]

    return predict


def choose_runtime(network: torch.nn.Module, request: RuntimeRequest) -> RuntimeChoice:
    torch_choice = RuntimeChoice(
        "torch", request.precision, torch_predictor(network, request.device, request.precision)
    )
    if request.device.type != "cpu" or request.requested == "torch":
        return torch_choice
    if request.input_shape is None:
        return _keep_torch(torch_choice, request, "the bundle's inferer has no fixed window to export for")
    names = ["openvino", "onnxruntime"] if request.requested == "auto" else [request.requested]
    for name in names:
        choice = _try(name, network, request, torch_choice)
        if choice is not None:
            return choice
    return _keep_torch(
        torch_choice, request, "no runtime both exported and agreed with torch (and was faster, for auto)"
    )


def _keep_torch(choice: RuntimeChoice, request: RuntimeRequest, reason: str) -> RuntimeChoice:
    if request.requested not in ("auto", "torch"):
        log.warning("ML_RUNTIME=%s not used: %s; running torch", request.requested, reason)
    return RuntimeChoice(choice.name, choice.precision, choice.predictor, reason=reason)


def _try(
    name: str, network: torch.nn.Module, request: RuntimeRequest, reference: RuntimeChoice
) -> RuntimeChoice | None:
    exporter = _exporter(name)
    if exporter is None:
        log.info("runtime %s is not installed", name)
        return None
    assert request.input_shape is not None
    # Exported from one input and checked on another: a trace that froze data-dependent
    # behaviour into constants shows up as disagreement.
    example, check = check_input(request.input_shape, seed=1), check_input(request.input_shape, seed=0)
    window = "x".join(str(v) for v in request.input_shape) + ("-any" if request.any_size else "")
    cache = request.cache_dir / f"{request.network_key[:16]}-{window}-{name}-{exporter.version()}-{cpu_signature()}"
    try:
        with warnings.catch_warnings():
            # Exporters trace the network and warn about what tracing cannot see (and that
            # tracing itself is deprecated); the agreement check below is what decides.
            warnings.simplefilter("ignore")
            predictor = exporter.build(network, example, cache, request.precision, request.any_size)
    except Exception as error:  # noqa: BLE001 - exporters raise many types; torch stays the answer
        log.warning("runtime %s: the network does not export (%s); running torch", name, first_line(error))
        return None
    truth = torch_predictor(network, request.device, "fp32")
    speed_file = beside(cache, f".speed-{request.precision}-{request.threads}t-torch{torch.__version__}.json")
    try:
        agreement = _agreement(truth, predictor, check)
        if request.any_size and request.other_shape is not None:  # sizes frozen into the export show here
            agreement = min(agreement, _agreement(truth, predictor, check_input(request.other_shape, seed=2)))
        speedup = _cached_speedup(speed_file) or _speedup(reference.predictor, predictor, check, speed_file)
    except Exception as error:  # noqa: BLE001 - an export that cannot even run its check input
        log.warning("runtime %s: the export does not run (%s); running torch", name, first_line(error))
        return None
    # `auto` takes a runtime only when it is faster; a runtime asked for by name only has to agree.
    if agreement < MIN_AGREEMENT or (request.requested == "auto" and speedup <= 1.0):
        log.warning(
            "runtime %s not used: %.4f %% of voxels agree with torch, %.2fx its speed",
            name,
            100 * agreement,
            speedup,
        )
        return None
    log.info("runtime %s: %.4f %% agreement with torch, %.2fx faster", name, 100 * agreement, speedup)
    precision = "fp32" if name == "onnxruntime" else request.precision  # ONNX Runtime's CPU provider: fp32
    return RuntimeChoice(name, precision, predictor, agreement, speedup)


def _timed(predictor: Predictor, x: torch.Tensor) -> float:
    predictor(x)  # the first call of any runtime pays for allocation and kernel selection
    started = time.perf_counter()
    predictor(x)
    return time.perf_counter() - started


def _agreement(truth: Predictor, candidate: Predictor, x: torch.Tensor) -> float:
    """Share of voxels where the candidate decides as torch in fp32 (the decisions the weights
    were validated with); checked at every load."""
    with torch.inference_mode():
        expected, got = truth(x).float(), candidate(x).float()
    if got.shape != expected.shape:
        return 0.0
    return float((decisions(expected) == decisions(got)).float().mean())


def _speedup(reference: Predictor, candidate: Predictor, x: torch.Tensor, record: Path) -> float:
    """torch's time (in the precision it would run in otherwise) over the candidate's, written to
    `record` for the next load: it is the same export on the same CPU kind, threads and versions,
    and timing torch again took most of a load (2-3 s of 5 here)."""
    with torch.inference_mode():
        speedup = _timed(reference, x) / max(_timed(candidate, x), 1e-9)
    with contextlib.suppress(OSError):
        record.write_text(json.dumps({"speedup": speedup}))
    return speedup


def _cached_speedup(record: Path) -> float | None:
    try:
        return float(json.loads(record.read_text())["speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _exporter(name: str) -> Exporter | None:
    try:
        if name == "openvino":
            return OpenVinoExporter()
        if name == "onnxruntime":
            return OnnxRuntimeExporter()
    except ImportError:
        return None
    raise ValueError(f"unknown runtime {name!r}; one of {', '.join(RUNTIMES)}")


class _OpenVinoPredictor:
    """A compiled model run one window a call: OpenVINO keeps the buffers of the largest batch it
    has run (170 MB more RSS for 4 windows of 96^3), and a window costs the same in batches of 1
    and 4 here (measured 296 against 301 ms in bf16, 282 against 287 in f32)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        windows = _plain(x)
        outputs = [self.compiled(windows[i : i + 1])[0] for i in range(windows.shape[0])]
        return torch.from_numpy(np.concatenate(outputs)).to(x.device)

    def release(self) -> None:
        """Its intermediate buffers go back (a 112^3 window's: ~260 MB in f32, ~150 MB in bf16):
        held between jobs, every network a replica loads keeps its own. Allocated again by the
        next call, in milliseconds."""
        self.compiled.release_memory()


def beside(cache: Path, suffix: str) -> Path:
    """`cache` with `suffix` appended: its name holds versions with dots (2026.4.1), which
    `with_suffix` would take for a suffix and cut, with the CPU's key after them."""
    return cache.parent / f"{cache.name}{suffix}"


def _plain(x: torch.Tensor) -> np.ndarray:
    plain = x.as_tensor() if hasattr(x, "as_tensor") else x
    return np.ascontiguousarray(plain.detach().float().cpu().numpy())


class OpenVinoExporter:
    name = "openvino"

    def __init__(self) -> None:
        import openvino

        self.ov: Any = openvino

    def version(self) -> str:
        return str(self.ov.__version__).split("-")[0]

    def build(
        self, network: torch.nn.Module, example: torch.Tensor, cache: Path, precision: str, any_size: bool
    ) -> Predictor:
        xml = beside(cache, "-f32.xml")
        core = self.ov.Core()
        if xml.is_file():
            model = core.read_model(str(xml))
        else:
            # Any number of windows a call; of any size too where the windows are fitted to the
            # scan (as fast at a given size as a static shape: 130 ms for 112^3 both, bf16 here).
            window = [-1] * (example.dim() - 2) if any_size else list(example.shape[2:])
            shape = self.ov.PartialShape([-1, example.shape[1], *window])
            model = self.ov.convert_model(network.cpu(), example_input=example, input=[shape])
            self._save(model, xml)
        compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": _OV_PRECISION.get(precision, "f32"),
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "CACHE_DIR": str(cache.parent / "openvino-blobs"),
            },
        )

        return _OpenVinoPredictor(compiled)

    def _save(self, model: Any, xml: Path) -> None:
        """Weights kept in fp32 (`save_model` halves them by default, so every load after the
        first would run other weights than the one that converted), written under other names and
        renamed into place, the weights first: a half-written export is never read as finished."""
        partial = xml.with_name(f"{xml.stem}.{os.getpid()}.partial.xml")  # replicas may share the cache
        xml.parent.mkdir(parents=True, exist_ok=True)
        self.ov.save_model(model, str(partial), compress_to_fp16=False)
        partial.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        partial.replace(xml)


class OnnxRuntimeExporter:
    name = "onnxruntime"

    def __init__(self) -> None:
        import onnxruntime

        self.ort: Any = onnxruntime

    def version(self) -> str:
        return str(self.ort.__version__)

    def build(
        self, network: torch.nn.Module, example: torch.Tensor, cache: Path, precision: str, any_size: bool
    ) -> Predictor:
        path = beside(cache, ".onnx")
        spatial = {axis: f"side{axis}" for axis in range(2, example.dim())} if any_size else {}
        if not path.is_file():
            # Written beside the export and renamed into place: an export that fails half-way
            # leaves no file that the next load would take for a finished one.
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            path.parent.mkdir(parents=True, exist_ok=True)
            # The TorchScript-based exporter: it needs no onnxscript and handles MONAI's UNets.
            torch.onnx.export(
                network.cpu(),
                (example,),
                str(partial),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "windows", **spatial}, "output": {0: "windows", **spatial}},
            )
            partial.replace(path)
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def predict(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": _plain(x)})[0]).to(x.device)

        del precision  # the CPU provider runs the graph in fp32
        return predict
