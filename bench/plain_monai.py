"""The plain MONAI script the service is compared with: one scan, the bundle as a MONAI user runs it.

    python -m bench.plain_monai SCAN.nii.gz OUT_DIR [--bundle DIR] [--profile production]
                                [--threshold 0.55] [--json times.json]

Same weights and same settings as the service: the config overrides are the ones the service's
engine applies for the profile (`InferenceEngine.profile_run`), test-time flips and shifts included
(the shifts through the service's own `models.passes`), and the
window the setup fits to the scan where it fits its windows (`fit_windows`), in the
setup the service picks for the scan (a profile's setup for small patients, where the bundle has
one: the pick is made before the clock starts, as it costs the service tens of milliseconds). What
differs is everything around the network: the bundle's LoadImaged reads the NIfTI from disk, the
bundle's preprocessing, its inferer with the network in torch fp32 (no export, no autocast),
its postprocessing, and its SaveImaged writes the mask. Per-stage seconds are printed (and
written as JSON): `setup` (config, network, weights, one warm-up batch) is not part of `total`,
as the service's model load is not part of a job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose
from monai.utils import ensure_tuple

from models.bundle import BundleSpec
from models.engine import EngineOptions, InferenceEngine, ProfileRun
from models.evaluate import DEFAULT_BUNDLE
from models.network import build_network, bundle_imports
from models.passes import pass_inferer, pass_outputs
from models.pipeline import is_writer
from models.windows import WindowFit
from schemas.jobs import Profile

STAGES = ("read", "preprocess", "network", "postprocess", "write")


@dataclass
class PlainRun:
    """The bundle's parts, instantiated from one parser (Invertd refers to this preprocessing)."""

    network: torch.nn.Module
    preprocessing: list[Any]
    inferer: Any
    postprocessing: list[Any]
    flips: tuple[tuple[int, ...], ...]
    shifts: tuple[tuple[int, ...], ...]
    fit: WindowFit | None = None  # the setup's window is fitted to each scan (models.windows)
    times: dict[str, float] = field(default_factory=dict)


def service_run(bundle: Path, setup: str, threshold: float) -> ProfileRun:
    """How the service runs this setup: config overrides, test-time flips and shifts."""
    engine = InferenceEngine(BundleSpec.load(bundle), EngineOptions(device="cpu", precision="fp32"))
    return engine.profile_run(setup, threshold)


def plain_overrides(bundle: Path, setup: str, threshold: float, output_dir: Path) -> tuple[dict[str, Any], bool]:
    """The config overrides the service uses for this setup (and the output folder), and whether
    it runs test-time flips."""
    run = service_run(bundle, setup, threshold)
    return {**run.overrides, "output_dir": str(output_dir)}, len(run.flips) > 1


def service_setup(bundle: Path, profile: Profile, scan: Path) -> str:
    """The setup the service runs this scan in."""
    engine = InferenceEngine(BundleSpec.load(bundle), EngineOptions(device="cpu", precision="fp32"))
    image = nib.load(scan)
    assert isinstance(image, nib.Nifti1Image | nib.Nifti2Image), f"{scan} is not a NIfTI file"
    return engine.setup_for(profile, np.asanyarray(image.dataobj), image.affine)


def setup(bundle: Path, name: str, threshold: float, output_dir: Path) -> PlainRun:
    """The bundle's parts for one setup (a profile's name, or its setup for small patients)."""
    started = time.perf_counter()
    service = service_run(bundle, name, threshold)
    spec = BundleSpec.load(bundle)
    parser = spec.parser({**service.overrides, "output_dir": str(output_dir)})
    with bundle_imports(spec.path):
        network = build_network(spec, parser, torch.device("cpu"), spec.weights_of(name))
        run = PlainRun(
            network=network,
            preprocessing=_transforms(parser, "preprocessing"),
            inferer=parser.get_parsed_content("inferer"),
            postprocessing=_transforms(parser, "postprocessing"),
            flips=service.flips,
            shifts=service.shifts,
            fit=spec.window_fits.get(name),
        )
    _warm_up(run)
    run.times["setup"] = time.perf_counter() - started
    return run


def _transforms(parser: ConfigParser, config_id: str) -> list[Any]:
    item = parser.get_parsed_content(config_id)
    return list(item.transforms) if isinstance(item, Compose) else list(item)


def _warm_up(run: PlainRun) -> None:
    """One batch of windows through the network, as a script's first scan would pay for it."""
    inferer = run.inferer
    roi = [int(r) for r in ensure_tuple(getattr(inferer, "roi_size", ()))]
    if isinstance(inferer, SlidingWindowInferer) and roi and all(r > 0 for r in roi):
        batch = torch.zeros((int(inferer.sw_batch_size), 1, *roi))
        with torch.inference_mode():
            run.network(batch)


def process(run: PlainRun, scan: Path) -> dict[str, float]:
    """Read, preprocess, infer, postprocess and write one scan; seconds per stage and in total."""
    times = run.times
    with _timed(times, "read"):
        data = run.preprocessing[0]({"image": str(scan)})
    with _timed(times, "preprocess"):
        for transform in run.preprocessing[1:]:
            data = transform(data)
    with _timed(times, "network"), torch.inference_mode():
        data["pred"] = _infer(run, data["image"][None])[0]
    for transform in run.postprocessing:
        with _timed(times, "write" if is_writer(transform) else "postprocess"):
            data = transform(data)
    times["total"] = sum(times.get(stage, 0.0) for stage in STAGES)
    return times


def _infer(run: PlainRun, image: torch.Tensor) -> torch.Tensor:
    """The inferer in fp32; with flips (and shifts), the mean of the logits over the passes."""
    inferer = pass_inferer(run.inferer, image.shape[2:], run.fit)
    outputs = pass_outputs(image, run.flips, run.shifts, inferer, lambda _, x: inferer(x, run.network))
    return sum(outputs) / (len(run.flips) * len(run.shifts))  # type: ignore[return-value]


@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scan", type=Path, help="a NIfTI scan")
    parser.add_argument("output", type=Path, help="folder the bundle's SaveImaged writes the mask to")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--profile", type=Profile, default=Profile.PRODUCTION, choices=list(Profile))
    parser.add_argument("--threshold", type=float, default=0.55)
    parser.add_argument("--json", type=Path, help="write the per-stage seconds here")
    args = parser.parse_args()
    run = setup(args.bundle, service_setup(args.bundle, args.profile, args.scan), args.threshold, args.output)
    times = process(run, args.scan)
    print(" ".join(f"{stage} {times.get(stage, 0.0):.2f} s" for stage in ("setup", *STAGES, "total")))
    if args.json:
        args.json.write_text(json.dumps({k: round(v, 4) for k, v in times.items()}))


if __name__ == "__main__":
    main()
