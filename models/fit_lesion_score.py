"""Fit the default bundle's lesion score (`models.lesion_score`) on training-family phantoms.

    python -m models.fit_lesion_score [--bundle DIR] [--profile production] [--scans 60]
        [--runtime auto] [--write] [--if-unfitted]

Every phantom (training family, seeds from `FIT_SEED_BASE`, which no training run draws) runs
through the profile as a job does (production: the bundle's network; a profile with a network of
its own, such as fast_debug: that network, and phantoms its setup for small patients would run
are left out), in a copy of the bundle that keeps every candidate the rules keep (no score, no
calibration, no confidence floor). A candidate is a lesion when it touches one. The score is a
logistic regression of that on the candidates' `FEATURES`, each standardised and pulled to 0 by
a Gaussian prior, then written back in raw units. --write puts it where the profile reads it (the
bundle's `lesion_score`, or the profile's entry in configs/profiles.json) and resets the fits made
on the score before (that calibration and floor: `models.evaluate --calibrate` fits them again on
the held-out family). Training a network resets its score (`confidence_fit.reset`,
`models.train.reset_fit`); `make train` fits it again (`--if-unfitted` leaves a score that was
not reset). 60 scans: about 8 minutes on 2 cores for production, 3 for fast_debug.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from models import confidence_fit
from models.bundle import BundleSpec
from models.engine import EngineOptions, InferenceEngine
from models.evaluate import DEFAULT_BUNDLE, Finding, penalised_logistic, run_scan
from models.lesion_score import BIAS, FEATURES
from models.phantoms import generate_phantom
from models.runtime import RUNTIMES
from schemas.jobs import Profile

FIT_SEED_BASE = 81_000  # training family; runs draw from models.train.TRAIN_SEED_BASE + 100_000 k
PRIOR = 1.0  # on standardised weights
MIN_EACH = 4  # true and false candidates a fit needs at least


def raw_copy(bundle: Path, into: Path, entry: str | None) -> Path:
    """The bundle without score, calibration or floor where the profile reads them (`entry`):
    every candidate the rules keep is reported."""
    copy = into / bundle.name
    shutil.copytree(bundle, copy)
    confidence_fit.reset(copy)
    if entry is not None:
        confidence_fit.reset_profile(copy, entry)
    return copy


def score_entry(bundle: Path, profile: Profile) -> str | None:
    """The profile's own entry when it runs a network of its own (its score is its own), else
    None: the bundle's score, production's."""
    return profile.value if profile.value in confidence_fit.own_networks(bundle) else None


def candidates(bundle: Path, scans: int, runtime: str, profile: Profile) -> list[Finding]:
    """The candidates of training-family phantoms that the profile's own setup runs."""
    engine = InferenceEngine(BundleSpec.load(bundle), EngineOptions(runtime=runtime))
    engine.load()
    found: list[Finding] = []
    for seed in range(FIT_SEED_BASE, FIT_SEED_BASE + scans):
        phantom = generate_phantom(seed, family="train", lesion_count=(1, 5))
        if engine.setup_for(profile, phantom.image, phantom.affine) != profile.value:
            print(f"  seed {seed}: a small patient's setup runs it, left out", flush=True)
            continue
        result = run_scan(engine, phantom, profile)
        kept = [f for f in result.findings if f.features is not None]
        found += kept
        print(f"  seed {seed}: {len(phantom.lesions)} lesions, {len(kept)} candidates", flush=True)
    return found


def write(bundle: Path, profile: Profile, params: dict[str, float]) -> None:
    """The score where the profile reads it, and the fits made on the old one reset."""
    entry = score_entry(bundle, profile)
    if entry is not None:
        confidence_fit.reset_profile(bundle, entry)
    else:  # every fit of the bundle's network, in whichever profile, was made on the old score
        confidence_fit.reset(bundle)
    confidence_fit.write_score(bundle, params, entry)


def fit(findings: list[Finding]) -> dict[str, float]:
    """Penalised logistic regression on standardised features -> weights in raw units + bias;
    {} (no score) from fewer than `MIN_EACH` true or false candidates: the bias of a fit without
    a true one runs off to "never a lesion"."""
    measured = [f.features for f in findings if f.features]
    y = np.array([f.true for f in findings if f.features], dtype=float)
    if min(y.sum(), len(y) - y.sum()) < MIN_EACH:
        return {}
    x = np.array([[m[name] for name in FEATURES] for m in measured], dtype=float)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    design = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    free_bias = np.r_[np.ones(len(FEATURES)), 0.0]
    w = penalised_logistic(design, y, np.zeros(design.shape[1]), PRIOR, free_bias)
    weights = w[:-1] / scale
    bias = w[-1] - float(np.sum(weights * mean))
    return {BIAS: round(float(bias), 4)} | {n: round(float(v), 4) for n, v in zip(FEATURES, weights, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--scans", type=int, default=60)
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES)
    parser.add_argument(
        "--profile",
        type=Profile,
        default=Profile.PRODUCTION,
        help="production: the bundle's network; a profile with a network of its own: its score",
    )
    parser.add_argument("--write", action="store_true", help="write it into the bundle and reset its fits")
    parser.add_argument(
        "--if-unfitted", action="store_true", help="do nothing when the bundle has a score (make train)"
    )
    args = parser.parse_args()
    entry = score_entry(args.bundle, args.profile)
    if args.profile != Profile.PRODUCTION and entry is None:
        parser.error(f"{args.profile.value} runs the bundle's network: its score is production's")
    if args.if_unfitted and confidence_fit.score_of(args.bundle, entry):
        print(f"{args.bundle} has a lesion score (its network was not trained anew): left as it is")
        return
    with tempfile.TemporaryDirectory() as tmp:
        findings = candidates(raw_copy(args.bundle, Path(tmp), entry), args.scans, args.runtime, args.profile)
    params = fit(findings)
    if not params:
        raise SystemExit(f"{len(findings)} candidates: too few true or false ones (< {MIN_EACH}) to fit a score")
    print(f"{len(findings)} candidates, {sum(f.true for f in findings)} on a lesion: lesion_score {json.dumps(params)}")
    if args.write:
        write(args.bundle, args.profile, params)
        print(
            f"written into {args.bundle}; {args.profile.value}'s calibration and floor reset: run models.evaluate --calibrate"
        )


if __name__ == "__main__":
    main()
