"""Compare a training run's checkpoints on a selection split, before the validation scans see any.

    python -m models.checkpoints --bundle DIR [--runtime torch] CANDIDATE [CANDIDATE ...]

A candidate is a weights file (run in --bundle's configs, e.g. a run's stepNNNNN.pt) or a whole
bundle directory (e.g. the shipped bundle, as the baseline). Each runs through the service's
engine on the selection split: validation-family scans with seeds of their own (neither the
reported scans of `models.evaluate` nor its calibration split, so choosing a checkpoint here
leaves both unseen) and a lesion-free one; training-family scans no run draws (runs draw from
`TRAIN_SEED_BASE + 100_000 * seed`); the service tests' phantom. Prints a row per candidate,
profile and family: pick on these (lesions found and false positives as much as Dice), then
report with `models.evaluate`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from models.evaluate import (
    THRESHOLD,
    ScanResult,
    add_runtime_argument,
    dice,
    loaded_engine,
    run_scan,
    summarise,
    table,
)
from models.phantom import job_phantom
from models.phantoms import Phantom, generate_phantom
from models.train import reset_fit, weights_file
from schemas.jobs import Profile

SELECTION_SEED_BASE = 98_000  # validation family, lesions
SELECTION_NORMAL_SEED = 98_500  # validation family, no lesions
SELECTION_TRAIN_SEEDS = (80_001, 80_002, 80_003)  # training family, never drawn by a run

Rows = dict[str, dict[str, dict[str, Any]]]  # "candidate (family)" -> profile -> summary row


def selection_seeds(scans: int = 3) -> list[tuple[str, int, tuple[int, int]]]:
    """(family, seed, lesion count range) of the selection split."""
    if not 0 < scans <= SELECTION_NORMAL_SEED - SELECTION_SEED_BASE:
        raise ValueError(f"scans must be 1 to {SELECTION_NORMAL_SEED - SELECTION_SEED_BASE}")
    validation = [("validation", SELECTION_SEED_BASE + i, (1, 5)) for i in range(scans)]
    normal = [("validation", SELECTION_NORMAL_SEED, (0, 0))]
    train = [("train", seed, (1, 5)) for seed in SELECTION_TRAIN_SEEDS]
    return validation + normal + train


def selection_phantoms(scans: int = 3) -> dict[str, list[Phantom]]:
    """family -> its phantoms."""
    phantoms: dict[str, list[Phantom]] = {}
    for family, seed, lesions in selection_seeds(scans):
        phantoms.setdefault(family, []).append(generate_phantom(seed, family=family, lesion_count=lesions))
    return phantoms


def candidate_name(candidate: Path) -> str:
    # Runs name their checkpoints alike (stepNNNNN.pt): the folder tells two runs apart.
    return candidate.name if candidate.is_dir() else f"{candidate.parent.name}/{candidate.stem}"


def candidate_bundle(candidate: Path, bundle: Path, scratch: Path, profile: str | None = None) -> Path:
    """A bundle directory running `candidate`: itself if it is one (as it ships), else `bundle` with
    its weights (or `profile`'s own network with them) and no confidence fit or floor for them."""
    if candidate.is_dir():
        return candidate
    target = scratch / candidate_name(candidate).replace("/", "-")
    shutil.copytree(bundle, target)
    shutil.copy(candidate, weights_file(target, profile))
    reset_fit(target, profile)  # a fit belongs to the weights it was made on: a checkpoint runs raw
    return target


def row_of(results: list[ScanResult], test_phantom_dice: float) -> dict[str, Any]:
    row: dict[str, Any] = summarise(results)
    row["lesions_found"] = sum(sum(v[0] for v in r.found.values()) for r in results)
    row["lesions"] = sum(sum(v[1] for v in r.found.values()) for r in results)
    row["test_phantom_dice"] = round(test_phantom_dice, 3)
    return row


def compare(
    candidates: list[Path], bundle: Path, profiles: list[Profile], runtime: str, scans: int, own: str | None = None
) -> Rows:
    names = [candidate_name(c) for c in candidates]
    if len(set(names)) < len(names):
        raise SystemExit(f"candidates share a name: {names}")
    phantoms = selection_phantoms(scans)
    test_phantom = job_phantom()
    rows: Rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for candidate, name in zip(candidates, names, strict=True):
            engine = loaded_engine(candidate_bundle(candidate, bundle, Path(scratch), own), runtime)
            for profile in profiles:
                # The candidate weights are the profile's own network: every scan runs it, whatever
                # the profile's setup for small patients would take.
                setup = profile.value if own == profile.value else None
                labels = engine.predict(test_phantom.image, test_phantom.affine, profile, THRESHOLD, setup=setup).labels
                test_dice = dice(labels > 0, test_phantom.lesion_mask)
                for family, members in phantoms.items():
                    row = row_of([run_scan(engine, phantom, profile, setup) for phantom in members], test_dice)
                    rows.setdefault(f"{name} ({family})", {})[profile.value] = row
                    print(f"  {name} {profile.value} {family}: {row}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", type=Path, nargs="+", help="weights files or bundle directories")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).parent / "medical_segmentation_v1")
    parser.add_argument(
        "--profiles", nargs="+", default=["production", "fast_debug"], choices=[p.value for p in Profile]
    )
    add_runtime_argument(parser)
    parser.add_argument("--scans", type=int, default=3, help="validation-family scans with lesions")
    parser.add_argument(
        "--network-of", choices=[p.value for p in Profile], help="weights files are this profile's own network's"
    )
    args = parser.parse_args()
    profiles = [Profile(p) for p in args.profiles]
    rows = compare(args.candidates, args.bundle, profiles, args.runtime, args.scans, args.network_of)
    print(table(rows))
    print("| candidate | profile | lesions found | test phantom Dice |\n| --- | --- | --- | --- |")
    for name, by_profile in rows.items():
        for profile, row in by_profile.items():
            print(
                f"| {name} | `{profile}` | {row['lesions_found']}/{row['lesions']} | {row['test_phantom_dice']:.3f} |"
            )


if __name__ == "__main__":
    main()
