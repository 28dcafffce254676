"""Benchmark: every hosted bundle on its own: load time, inference time per profile, peak memory.

    python -m bench.models [--models medical_segmentation_v1,mr_brain_extraction] [--runtime auto]

Each bundle runs in a fresh process (so its peak RSS is its own, with torch and MONAI loaded)
on a scan of its kind: a 256x256x128 CT phantom for CT bundles, the MNI152 T1 template for MR.
Load is timed twice: the first load may export the network (ML_RUNTIME=auto), the second finds
the export in its cache. Inference is timed after one warm-up job, per profile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from consumer.settings import Settings
from schemas.jobs import Profile


def _scan(modality: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    if (modality or "").upper() == "MR":
        from models.mr_reference import load_template

        image = load_template()
        return np.asarray(image.get_fdata(dtype=np.float32)), image.affine, "MNI152 T1 197x233x189 @ 1 mm"
    from models.phantom import generate_phantom

    phantom = generate_phantom(2024, (256, 256, 128), (0.8, 0.8, 2.5))
    return phantom.image, phantom.affine, "CT phantom 256x256x128 @ 0.8x0.8x2.5 mm"


def measure(name: str, runtime: str) -> dict[str, object]:
    """In this process: load twice, then one warm-up and one timed prediction per profile."""
    from models.bundle import BundleSpec
    from models.engine import EngineOptions, InferenceEngine

    settings = Settings(ml_runtime=runtime)  # type: ignore[call-arg]
    spec = BundleSpec.load(settings.model_path / name, name)
    options = EngineOptions(runtime=runtime, export_cache=settings.ml_export_cache, threads=settings.ml_torch_threads)
    loads = []
    for _ in range(2):
        engine = InferenceEngine(spec, options)
        started = time.perf_counter()
        engine.load()
        loads.append(round(time.perf_counter() - started, 2))
    volume, affine, scan = _scan(spec.modality)
    engine.predict(volume, affine, Profile.FAST_DEBUG, 0.55)
    seconds = {}
    for profile in Profile:
        started = time.perf_counter()
        engine.predict(volume, affine, profile, 0.55)
        seconds[profile.value] = round(time.perf_counter() - started, 2)
    return {
        "model": name,
        "scan": scan,
        "runtime": f"{engine.runtime} {engine.precision}",
        "load_s": loads,
        "seconds": seconds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated; default: MODEL_NAME")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure one model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.runtime)))
        return
    names = args.models.split(",") if args.models else Settings().model_names  # type: ignore[call-arg]
    rows = []
    for name in names:
        child = [sys.executable, "-m", "bench.models", "--one", name, "--runtime", args.runtime]
        done = subprocess.run(child, capture_output=True, text=True, check=True, env=os.environ)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        "| model | scan | runtime | load s (first, cached) | fast_debug s | production s | research s | peak RSS MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        s = row["seconds"]
        first, cached = row["load_s"]
        print(
            f"| {row['model']} | {row['scan']} | {row['runtime']} | {first} / {cached} | {s['fast_debug']} | "
            f"{s['production']} | {s['research']} | {row['peak_rss_mb']} |"
        )
    Path("bench-models.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
