"""Compare a training run's checkpoints on a selection split, before the validation scans see any.

    python -m models.checkpoints --bundle DIR [--runtime auto] CANDIDATE [CANDIDATE ...]

A candidate is a weights file (run in --bundle's configs, e.g. a run's stepNNNNN.pt) or a whole
bundle directory (e.g. the shipped bundle, as the baseline). Each runs through the service's
engine on the selection split: validation-family scans with seeds of their own (neither the
reported scans of `models.evaluate` nor its calibration split, so choosing a checkpoint here
leaves both unseen), a lesion-free one, training-family scans no run draws (runs draw from
`TRAIN_SEED_BASE + 100_000 * seed`), and the service tests' phantom. Prints one row per
candidate and profile: pick on these, then report with `models.evaluate`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from models.evaluate import (
    CALIBRATION_SEED_BASE,
    NORMAL_SEED_BASE,
    THRESHOLD,
    VALIDATION_SEED_BASE,
    ScanResult,
    dice,
    loaded_engine,
    run_scan,
    summarise,
    table,
)
from models.phantom import job_phantom
from models.phantoms import Phantom, generate_phantom
from schemas.jobs import Profile

SELECTION_SEED_BASE = 98_000  # validation family, lesions
SELECTION_NORMAL_SEED = 98_500  # validation family, no lesions
SELECTION_TRAIN_SEEDS = (80_001, 80_002, 80_003)  # training family, never drawn by a run
REPORTED_RANGES = (
    (VALIDATION_SEED_BASE, NORMAL_SEED_BASE),
    (NORMAL_SEED_BASE, CALIBRATION_SEED_BASE),
    (CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + 1_000),
)


def selection_seeds(scans: int = 3) -> list[tuple[str, int, tuple[int, int]]]:
    """(family, seed, lesion count range) of the selection split."""
    validation = [("validation", SELECTION_SEED_BASE + i, (1, 5)) for i in range(scans)]
    normal = [("validation", SELECTION_NORMAL_SEED, (0, 0))]
    train = [("train", seed, (1, 5)) for seed in SELECTION_TRAIN_SEEDS]
    return validation + normal + train


def selection_phantoms(scans: int = 3) -> list[Phantom]:
    return [
        generate_phantom(seed, family=family, lesion_count=lesions) for family, seed, lesions in selection_seeds(scans)
    ]


def candidate_bundle(candidate: Path, bundle: Path, scratch: Path) -> Path:
    """A bundle directory running `candidate`: itself if it is one, else `bundle` with its weights."""
    if candidate.is_dir():
        return candidate
    target = scratch / candidate.stem
    shutil.copytree(bundle, target)
    shutil.copy(candidate, target / "models" / "model.pt")
    return target


def compare(
    candidates: list[Path], bundle: Path, profiles: list[Profile], runtime: str, scans: int
) -> dict[str, dict[str, dict]]:
    phantoms = selection_phantoms(scans)
    test_phantom = job_phantom()
    rows: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for candidate in candidates:
            engine = loaded_engine(candidate_bundle(candidate, bundle, Path(scratch)), runtime)
            name = candidate.name if candidate.is_dir() else candidate.stem
            rows[name] = {}
            for profile in profiles:
                results: list[ScanResult] = [run_scan(engine, phantom, profile) for phantom in phantoms]
                row = summarise(results)
                labels = engine.predict(test_phantom.image, test_phantom.affine, profile, THRESHOLD).labels
                row["test_phantom_dice"] = round(dice(labels > 0, test_phantom.lesion_mask), 3)
                row["lesions_found"] = sum(sum(v[0] for v in r.found.values()) for r in results)
                row["lesions"] = sum(sum(v[1] for v in r.found.values()) for r in results)
                rows[name][profile.value] = row
                print(
                    f"  {name} {profile.value}: dice {row['dice']}, found {row['lesions_found']}/{row['lesions']}, "
                    f"FP/scan {row['false_positives_per_scan']}, test phantom {row['test_phantom_dice']}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", type=Path, nargs="+", help="weights files or bundle directories")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).parent / "medical_segmentation_v1")
    parser.add_argument(
        "--profiles", nargs="+", default=["production", "fast_debug"], choices=[p.value for p in Profile]
    )
    parser.add_argument("--runtime", default="auto", choices=["torch", "auto", "openvino", "onnxruntime"])
    parser.add_argument("--scans", type=int, default=3, help="validation-family scans with lesions")
    args = parser.parse_args()
    rows = compare(args.candidates, args.bundle, [Profile(p) for p in args.profiles], args.runtime, args.scans)
    print(table(rows))
    print("| candidate | profile | lesions found | test phantom Dice |\n| --- | --- | --- | --- |")
    for name, by_profile in rows.items():
        for profile, row in by_profile.items():
            print(
                f"| {name} | `{profile}` | {row['lesions_found']}/{row['lesions']} | {row['test_phantom_dice']:.3f} |"
            )
    best = max(rows, key=lambda n: float(np.mean([r["dice"] or 0.0 for r in rows[n].values()])))
    print(f"highest mean Dice over the profiles: {best}")


if __name__ == "__main__":
    main()
