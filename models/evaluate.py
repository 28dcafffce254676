"""Validate a bundle on held-out phantoms through the real inference engine.

    python -m models.evaluate [--bundle DIR] [--phantoms 8] [--write-metadata]

For each profile: lesion Dice (per phantom, over all its lesion voxels, then averaged), lesion
detection sensitivity and false positives per scan, on phantoms the training never saw, on
their own acquisition grids (the mask is compared in the input geometry, as a user sees it).
It also compares the chosen reduced precision with fp32 on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np

from models.engine import InferenceEngine
from models.phantom import Phantom, generate_phantom
from schemas.jobs import Profile

VALIDATION_SEED_BASE = 90_000
DEFAULT_BUNDLE = Path(__file__).parent / "medical_segmentation_v1"
THRESHOLD = 0.55


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    p, t = prediction.astype(bool), truth.astype(bool)
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(p, t).sum() / denominator)


@dataclass
class Detection:
    found: int
    missed: int
    false_positives: int


def detection(prediction: np.ndarray, truth: np.ndarray) -> Detection:
    """A true lesion is found when any predicted component overlaps it."""
    truth_labels = cc3d.connected_components(truth.astype(np.uint8), connectivity=26)
    pred_labels = cc3d.connected_components(prediction.astype(np.uint8), connectivity=26)
    n_truth, n_pred = int(truth_labels.max()), int(pred_labels.max())
    hit_truth = np.unique(truth_labels[(pred_labels > 0) & (truth_labels > 0)])
    hit_pred = np.unique(pred_labels[(pred_labels > 0) & (truth_labels > 0)])
    return Detection(found=len(hit_truth), missed=n_truth - len(hit_truth), false_positives=n_pred - len(hit_pred))


def validation_phantoms(count: int) -> list[Phantom]:
    return [generate_phantom(VALIDATION_SEED_BASE + i) for i in range(count)]


def evaluate_profile(engine: InferenceEngine, phantoms: list[Phantom], profile: Profile) -> dict[str, float]:
    dices, found, missed, fps, seconds = [], 0, 0, 0, 0.0
    overlap, volume = 0, 0
    for phantom in phantoms:
        started = time.perf_counter()
        prediction = engine.predict(phantom.image, phantom.affine, profile)
        seconds += time.perf_counter() - started
        mask = prediction.probability >= THRESHOLD
        dices.append(dice(mask, phantom.lesion_mask))
        overlap += 2 * int(np.logical_and(mask, phantom.lesion_mask).sum())
        volume += int(mask.sum()) + int(phantom.lesion_mask.sum())
        det = detection(mask, phantom.lesion_mask)
        found, missed, fps = found + det.found, missed + det.missed, fps + det.false_positives
    return {
        "lesion_dice": round(float(np.mean(dices)), 4),
        "lesion_dice_min": round(float(np.min(dices)), 4),
        "lesion_dice_pooled": round(overlap / max(volume, 1), 4),
        "sensitivity": round(found / max(found + missed, 1), 4),
        "false_positives_per_scan": round(fps / len(phantoms), 3),
        "seconds_per_scan": round(seconds / len(phantoms), 3),
    }


def precision_agreement(bundle: Path, phantoms: list[Phantom], precision: str) -> dict[str, float]:
    """Share of voxels whose thresholded decision matches fp32, and the largest probability gap."""
    reference = InferenceEngine(bundle, precision="fp32")
    reduced = InferenceEngine(bundle, precision=precision)
    reference.load()
    reduced.load()
    agree, total, gap, dices = 0, 0, 0.0, []
    for phantom in phantoms:
        a = reference.predict(phantom.image, phantom.affine, Profile.PRODUCTION).probability
        b = reduced.predict(phantom.image, phantom.affine, Profile.PRODUCTION).probability
        agree += int(((a >= THRESHOLD) == (b >= THRESHOLD)).sum())
        total += a.size
        gap = max(gap, float(np.abs(a - b).max()))
        dices.append(dice(b >= THRESHOLD, phantom.lesion_mask) - dice(a >= THRESHOLD, phantom.lesion_mask))
    return {
        "voxel_agreement": round(agree / total, 6),
        "max_probability_gap": round(gap, 4),
        "dice_change": round(float(np.mean(dices)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--phantoms", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--write-metadata", action="store_true", help="record the numbers in configs/metadata.json")
    args = parser.parse_args()

    phantoms = validation_phantoms(args.phantoms)
    engine = InferenceEngine(args.bundle, precision=args.precision)
    engine.load()
    results = {profile.value: evaluate_profile(engine, phantoms, profile) for profile in Profile}
    report: dict[str, object] = {
        "phantoms": args.phantoms,
        "seed_base": VALIDATION_SEED_BASE,
        "threshold": THRESHOLD,
        "precision": engine.precision,
        "profiles": results,
    }
    if engine.precision != "fp32":
        report["precision_vs_fp32"] = precision_agreement(args.bundle, phantoms[:3], engine.precision)

    print(f"{'profile':<12} {'dice':>7} {'min':>7} {'sens':>6} {'fp/scan':>8} {'s/scan':>7}")
    for name, row in results.items():
        print(
            f"{name:<12} {row['lesion_dice']:>7.4f} {row['lesion_dice_min']:>7.4f} {row['sensitivity']:>6.3f} "
            f"{row['false_positives_per_scan']:>8.3f} {row['seconds_per_scan']:>7.2f}"
        )
    print(json.dumps(report, indent=2))
    if args.write_metadata:
        metadata_file = args.bundle / "configs" / "metadata.json"
        metadata = json.loads(metadata_file.read_text())
        metadata["validation"] = report
        metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")


if __name__ == "__main__":
    main()
