"""Validate the mr_brain_extraction bundle on the MNI152 T1 template with MONAI's own bundle tools.

    python -m models.validate_mr [--bundle DIR] [--write-metadata]

The bundle runs as a generic host runs it: `monai.bundle.ConfigParser` builds its `preprocessing`
(without the leading LoadImaged, which is fed the scan as MONAI's NibabelReader loads it), `network`,
`inferer` and `postprocessing` (without writers); the batch is collated, inferred, decollated and
post-processed. The mask is compared on the input's own grid with the reference brain
(models.mr_reference), on the template and on resampled, reoriented copies of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.inferers import Inferer
from monai.transforms import Compose, LoadImage, LoadImaged, SaveImage, SaveImaged

from models.fetch_weights import sha256_of
from models.mr_reference import (
    TEMPLATE_MEMBER,
    dice,
    load_template,
    nilearn_wheel,
    reference_brain,
    resampled_copy,
    template_file,
    voxel_volume_ml,
)

BUNDLE_DIR = Path(__file__).parent / "mr_brain_extraction"
MIN_DICE = 0.95
MAX_VOLUME_DIFFERENCE_PCT = 5.0
WRITERS = (SaveImaged, SaveImage)


@contextlib.contextmanager
def bundle_imports(bundle_dir: Path) -> Iterator[None]:
    """The bundle root on sys.path while its config is parsed, and its `scripts` package kept private.

    Every Model Zoo bundle calls its code `scripts`: whatever `scripts` modules were imported before
    are set aside and restored afterwards, and this bundle's are dropped from sys.modules (the objects
    built from them keep their classes), so that the next bundle imports its own.
    """

    def scripts_modules() -> dict[str, Any]:
        return {name: module for name, module in sys.modules.items() if name.split(".")[0] == "scripts"}

    saved = scripts_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(bundle_dir))
    try:
        yield
    finally:
        sys.path.remove(str(bundle_dir))
        for name in scripts_modules():
            del sys.modules[name]
        sys.modules.update(saved)


@dataclass(frozen=True)
class BundleRun:
    """The parts of a bundle that a host runs, built by ConfigParser from the bundle's own config."""

    preprocessing: Compose  # without its LoadImaged
    network: torch.nn.Module
    inferer: Inferer
    postprocessing: Compose  # without writers
    device: torch.device

    @classmethod
    def load(cls, bundle_dir: Path = BUNDLE_DIR) -> BundleRun:
        parser = ConfigParser()
        parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
        parser.read_config(str(bundle_dir / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle_dir)
        with bundle_imports(bundle_dir):
            parser.parse()
            preprocessing = parser.get_parsed_content("preprocessing")
            network = parser.get_parsed_content("network")
            inferer = parser.get_parsed_content("inferer")
            postprocessing = parser.get_parsed_content("postprocessing")
            device = parser.get_parsed_content("device")
        loader, *transforms = preprocessing.transforms
        if not isinstance(loader, LoadImaged):
            raise ValueError(f"{bundle_dir.name}: preprocessing starts with {type(loader).__name__}, not LoadImaged")
        # The same transform objects: Invertd (which holds the full Compose) matches them by identity.
        return cls(
            preprocessing=Compose(transforms),
            network=network.eval(),
            inferer=inferer,
            postprocessing=Compose([t for t in postprocessing.transforms if not isinstance(t, WRITERS)]),
            device=device,
        )

    def __call__(self, image: MetaTensor) -> MetaTensor:
        """`pred` after postprocessing for one channel-less image, as LoadImaged would give it."""
        with torch.inference_mode():
            batch = list_data_collate([self.preprocessing({"image": image})])
            batch["pred"] = self.inferer(batch["image"].to(self.device), self.network)
            item = self.postprocessing(decollate_batch(batch)[0])
        return item["pred"]


@dataclass(frozen=True)
class CaseResult:
    case: str
    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    axcodes: str
    dice: float
    predicted_ml: float
    reference_ml: float
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of this process, all threads: less swayed by other load on the machine

    @property
    def volume_difference_pct(self) -> float:
        return 100.0 * (self.predicted_ml - self.reference_ml) / self.reference_ml

    @property
    def passed(self) -> bool:
        return self.dice >= MIN_DICE and abs(self.volume_difference_pct) <= MAX_VOLUME_DIFFERENCE_PCT

    def as_dict(self) -> dict[str, Any]:
        digits = {"dice": 4, "predicted_ml": 1, "reference_ml": 1, "seconds": 2, "cpu_seconds": 2}
        rounded = {k: round(v, digits[k]) if k in digits else v for k, v in asdict(self).items()}
        return {**rounded, "volume_difference_pct": round(self.volume_difference_pct, 2)}


def run_case(run: BundleRun, case: str, image: nib.Nifti1Image, workdir: Path) -> CaseResult:
    """One job: the image saved as NIfTI and loaded as LoadImaged loads it, then the bundle, timed."""
    path = workdir / f"{case.split()[0]}.nii"
    nib.save(image, path)
    loaded = LoadImage(reader="NibabelReader", image_only=True)(path)
    started, started_cpu = time.perf_counter(), time.process_time()
    pred = run(loaded)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    if tuple(pred.shape) != (1, *image.shape[:3]):
        raise AssertionError(f"{case}: pred has shape {tuple(pred.shape)}, input {image.shape}")
    brain = pred[0].cpu().numpy() == 1
    reference = reference_brain(image)
    return CaseResult(
        case=case,
        shape=tuple(int(n) for n in image.shape[:3]),
        spacing_mm=tuple(round(float(z), 3) for z in image.header.get_zooms()[:3]),
        axcodes="".join(nib.aff2axcodes(image.affine)),
        dice=dice(brain, reference),
        predicted_ml=float(brain.sum()) * voxel_volume_ml(image),
        reference_ml=float(reference.sum()) * voxel_volume_ml(image),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )


def cases(template: nib.Nifti1Image) -> list[tuple[str, nib.Nifti1Image]]:
    """The template as shipped, copies on grids a scanner might give, then the template again.

    The first job after loading also pays TorchScript's profiling runs; the repeat shows the time of a
    later job.
    """
    return [
        ("template (1 mm), first job", template),
        ("resampled (1.5 mm, axes permuted and flipped)", resampled_copy(template, "PIL", 1.5)),
        ("resampled (1.5 mm, PIL, oblique 15 deg)", resampled_copy(template, "PIL", 1.5, tilt_deg=15.0)),
        ("template (1 mm), again", template),
    ]


def validate(run: BundleRun) -> list[CaseResult]:
    template = load_template()
    with tempfile.TemporaryDirectory(prefix="validate_mr_") as workdir:
        return [run_case(run, case, image, Path(workdir)) for case, image in cases(template)]


def table(results: Sequence[CaseResult]) -> str:
    header = f"{'case':<47} {'grid':<15} {'axes':<4} {'Dice':>6} {'pred ml':>8} {'ref ml':>8} {'diff %':>7} {'s':>6} {'cpu s':>6}"
    rows = [
        f"{r.case:<47} {'x'.join(map(str, r.shape)):<15} {r.axcodes:<4} {r.dice:>6.4f} {r.predicted_ml:>8.1f} "
        f"{r.reference_ml:>8.1f} {r.volume_difference_pct:>+7.2f} {r.seconds:>6.2f} {r.cpu_seconds:>6.2f}"
        for r in results
    ]
    return "\n".join([header, *rows])


def write_metadata(bundle_dir: Path, run: BundleRun, load_seconds: float, results: Sequence[CaseResult]) -> None:
    """Record the numbers in the bundle's metadata.json `validation` block."""
    metadata_file = bundle_dir / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    template = template_file()
    metadata["validation"] = {
        "data": f"MNI152 2009a T1 template, {TEMPLATE_MEMBER} in {nilearn_wheel().name} (PyPI)",
        "template_sha256": sha256_of(template),
        "reference": "template / template.max() > 0.2 (nilearn's MNI152 brain mask), on each case's own grid",
        "acceptance": {"dice_min": MIN_DICE, "volume_difference_pct_max": MAX_VOLUME_DIFFERENCE_PCT},
        "measured_with": "python -m models.validate_mr --write-metadata",
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(run.device),
            "machine": platform.machine(),
            # The machines are shared: wall-clock seconds grow with other work, CPU seconds much less.
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "load_seconds": round(load_seconds, 2),
        "cases": [r.as_dict() for r in results],
    }
    metadata_file.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=BUNDLE_DIR)
    parser.add_argument("--write-metadata", action="store_true", help="record the numbers in metadata.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    run = BundleRun.load(args.bundle)
    load_seconds = time.perf_counter() - started
    results = validate(run)
    print(f"bundle loaded in {load_seconds:.2f} s on {run.device}, {torch.get_num_threads()} threads")
    print(table(results))
    if args.write_metadata:
        write_metadata(args.bundle, run, load_seconds, results)
    failed = [r.case for r in results if not r.passed]
    if failed:
        print(f"below Dice {MIN_DICE} or beyond {MAX_VOLUME_DIFFERENCE_PCT} % volume: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
