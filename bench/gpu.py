"""python -m bench.gpu [--device cuda|cpu] [--quick] [--json bench-gpu.json]

The GPU check, ready for when a CUDA machine is: every hosted bundle (MODEL_NAME under
MODEL_PATH) loaded on the GPU as the service loads it (torch, AMP in the precision the GPU
supports), then per profile and size, the engine's time with its split (pre-processing, network,
post-processing) and the peak GPU memory of the prediction (torch.cuda.max_memory_allocated).
No broker and no S3 server: the engine alone, on phantoms made here. Sized to run in under five
minutes on one data-centre GPU; the first prediction per bundle is a warm-up and not reported.

Without CUDA it says so and exits with status 2, unless `--device cpu` is given (a dry run of
the same code on the CPU; with --quick, small volumes and one profile, for a check in minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.report import markdown
from consumer.settings import Settings
from models.bundle import BundleError, BundleSpec
from models.engine import EngineOptions, InferenceEngine, InferenceFailed
from models.phantom import generate_phantom
from schemas.jobs import Profile

SIZES = {"256x256x128": ((256, 256, 128), (0.8, 0.8, 2.5)), "512x512x300": ((512, 512, 300), (0.8, 0.8, 1.5))}
QUICK_SIZES = {"96x96x48": ((96, 96, 48), (1.6, 1.6, 3.0))}
NO_CUDA_EXIT = 2


@dataclass
class GpuRun:
    bundle: str
    size: str
    profile: str
    seconds: float
    preprocess: float
    network: float
    postprocess: float
    peak_memory_mb: float | None  # torch.cuda.max_memory_allocated during the prediction


@dataclass
class Loaded:
    bundle: str
    device: str
    runtime: str
    precision: str
    load_seconds: float
    error: str = ""


def volume(modality: str | None, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """A CT phantom for CT bundles; for others an MR-like head (a bright ellipsoid in a darker
    one): their cost depends on the grid and the box they find, not on fine anatomy."""
    if (modality or "CT").upper() == "CT":
        return generate_phantom(2024, shape, spacing).image
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2
    head = np.where(radius < 1.0, 300.0, 0.0) + np.where(radius < 0.7, 500.0, 0.0)
    return head.astype(np.float32)


def affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0]).astype(np.float64)


def load(path: Path, device: str, export_cache: Path) -> tuple[InferenceEngine | None, Loaded]:
    """The bundle loaded as the service loads it (on CUDA: torch with AMP; on the CPU: its runtime)."""
    options = EngineOptions(device=device, runtime="torch" if device == "cuda" else "auto", export_cache=export_cache)
    try:
        spec = BundleSpec.load(path)
        engine = InferenceEngine(spec, options)
        engine.load()
    except (BundleError, RuntimeError, OSError) as error:
        return None, Loaded(path.name, device, "-", "-", 0.0, str(error).splitlines()[0])
    return engine, Loaded(spec.name, str(engine.device), engine.runtime, engine.precision, engine.load_seconds)


def predict(
    engine: InferenceEngine, image: np.ndarray, spacing: tuple[float, float, float], profile: Profile
) -> GpuRun:
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    prediction = engine.predict(image, affine(spacing), profile, 0.5)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    t = prediction.timings
    size = "x".join(str(n) for n in image.shape)
    return GpuRun(engine.name, size, profile.value, seconds, t["preprocess"], t["network"], t["postprocess"], peak)


def run(
    device: str, sizes: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]], profiles: list[Profile]
):  # type: ignore[no-untyped-def]
    settings = Settings()
    loaded, runs = [], []
    for name in settings.model_names:
        engine, info = load(settings.model_path / name, device, settings.ml_export_cache)
        loaded.append(info)
        print(
            f"{info.bundle}: {info.error or f'{info.runtime} {info.precision} on {info.device}, {info.load_seconds:.1f} s'}"
        )
        if engine is None:
            continue
        for shape, spacing in sizes.values():
            image = volume(engine.spec.modality, shape, spacing)
            try:
                predict(engine, image, spacing, profiles[0])  # warm-up: kernels, autotuning, allocator
                for profile in profiles:
                    runs.append(predict(engine, image, spacing, profile))
                    print(f"  {runs[-1].size} {profile.value}: {runs[-1].seconds:.2f} s", flush=True)
            except (InferenceFailed, RuntimeError) as error:  # one bundle's failure is reported, the rest runs
                info.error = f"{'x'.join(map(str, shape))}: {str(error).splitlines()[0]}"
                print(f"  {info.error}")
                break
        engine.unload()
        if device == "cuda":
            torch.cuda.empty_cache()
    return loaded, runs


def table(runs: list[GpuRun]) -> str:
    headers = ["bundle", "size", "profile", "seconds", "preprocess", "network", "postprocess", "peak GPU MB"]
    rows = [
        [r.bundle, r.size, r.profile, r.seconds, r.preprocess, r.network, r.postprocess, r.peak_memory_mb] for r in runs
    ]
    return markdown(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="one small volume and the fast_debug profile")
    parser.add_argument("--json", type=Path, default=Path("bench-gpu.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")  # MONAI's deprecation notes
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): nothing to check; --device cpu for a dry run")
        return NO_CUDA_EXIT
    sizes = QUICK_SIZES if args.quick else SIZES
    profiles = [Profile.FAST_DEBUG] if args.quick else list(Profile)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (CPU dry run)"
    started = time.perf_counter()
    loaded, runs = run(args.device, sizes, profiles)
    seconds = time.perf_counter() - started
    print(f"\nGPU: {gpu}; torch {torch.__version__}; {seconds:.0f} s in all\n\n{table(runs)}")
    record = {
        "gpu": gpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(seconds, 1),
        "bundles": [asdict(info) for info in loaded],
        "runs": [asdict(r) for r in runs],
    }
    args.json.write_text(json.dumps(record, indent=1))
    failed = [info.bundle for info in loaded if info.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
