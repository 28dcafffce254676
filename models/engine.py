"""The inference engine: loads a bundle once, chooses the device once, predicts lesion probability.

`predict` is blocking and CPU/GPU bound: callers run it in a worker thread. One prediction
runs at a time (a lock), because two would only fight over the same cores or GPU memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from models.bundle import Bundle, ProfileConfig
from models.geometry import ModelGrid, normalise_intensity
from schemas.jobs import Profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    probability: np.ndarray  # float32 lesion probability, in the input array's own grid
    profile: ProfileConfig
    model_grid: tuple[int, int, int]  # the grid the network saw
    timings: dict[str, float]


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware instead of being emulated (slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


class InferenceEngine:
    def __init__(self, bundle_dir: Path, device: str = "auto", precision: str = "auto", threads: int | None = None):
        self.bundle_dir = bundle_dir
        self.device = choose_device(device)
        self.precision = choose_precision(self.device, precision)
        self._threads = threads
        self._lock = threading.Lock()
        self._network: torch.nn.Module | None = None
        self.bundle: Bundle | None = None

    @property
    def loaded(self) -> bool:
        return self._network is not None

    def load(self) -> None:
        """Blocking: read the bundle and put the network on the device."""
        started = time.perf_counter()
        if self._threads:
            torch.set_num_threads(self._threads)
        bundle = Bundle.load(self.bundle_dir)
        network = bundle.build_network().to(self.device).eval()
        self.bundle, self._network = bundle, network
        log.info(
            "model %s %s loaded on %s (%s) in %.2f s",
            bundle.name,
            bundle.version,
            self.device,
            self.precision,
            time.perf_counter() - started,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if self.precision not in dtypes:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtypes[self.precision])

    def predict(self, volume: np.ndarray, affine: np.ndarray, profile: Profile) -> Prediction:
        """Lesion probability for a 3-D volume (any orientation, any spacing)."""
        if self._network is None or self.bundle is None:
            raise RuntimeError("model not loaded")
        config = self.bundle.profile(profile)
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            with _timer(timings, "preprocess"):
                grid = ModelGrid.for_input(volume.shape, affine, config.spacing_mm)
                image = normalise_intensity(grid.to_model(volume, self.device), *self.bundle.intensity_window)
            with _timer(timings, "network"), self._autocast():
                logits = sliding_window_inference(
                    image,
                    roi_size=self.bundle.roi_size,
                    sw_batch_size=config.sw_batch_size,
                    predictor=self._network,
                    overlap=config.overlap,
                    mode=config.blend,
                )
            with _timer(timings, "postprocess"):
                assert isinstance(logits, torch.Tensor)
                probability = torch.sigmoid(logits.float())
                result = grid.from_model(probability)
        return Prediction(np.ascontiguousarray(result, dtype=np.float32), config, grid.size, timings)


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
