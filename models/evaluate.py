"""Validate a bundle on the held-out phantom family through the service's inference engine.

    python -m models.evaluate [--bundle DIR] [--previous DIR] [--phantoms 8] [--normals 4]
        [--profiles production ...] [--runtime torch] [--moves 0 2 4] [--calibrate] [--write-metadata]

The validation family (`models.phantoms`, family="validation": other lesion outlines, noise
model, grids and stored axis orders than the training family) is never trained on. Every scan
runs through `models.engine.InferenceEngine`, as a job does. Per profile: Dice (mean per scan,
over its lesion voxels), detection of lesions >= 10 mm, 5-10 mm and < 5 mm (a lesion is found
when a finding overlaps it), false positives a scan (findings touching no lesion), false
findings a lesion-free scan, finding-type agreement, seconds a scan. The previous bundle
(`--previous`, bundle 1.0 by default: the same weights without the tissue gating) runs on the
same scans for a side-by-side table. Both also run on the simple phantoms of the service's tests
(`models.phantom`), whose Dice must not regress; the report records what ran the networks.
With --moves, the scans with lesions run again with the scan moved that many voxels on every axis
against the network's windows (`positions`): a table per position and their mean, the measure of a
change that moves where the windows fall (a tiling, a crop), which shuffles the lesions near the
threshold at any one position.

Confidence: a finding's confidence is the mean of `prob` over it. The expected calibration error
(ECE) of the production findings is reported as shipped and after a fit of
confidence = sigmoid(a logit(score) + b ln(volume) + c + d elongation) (the score: the engine's
lesion score, `models.lesion_score`, as it recorded it; its mean probability without one) on a separate
calibration split (same family, other seeds), with the confidence floor below which findings are
dropped: the highest that keeps `--keep-true` of the split's true findings. Production's fit is
the bundle's own (research runs with it); every other profile evaluated gets a fit of its own on
its own findings of the same split (`profile_calibration`). --calibrate writes production's fit
into inference.json when it lowers the ECE on the reported findings; every other profile runs
with whichever of its own fit (written into profiles.json), production's or none measured the
lowest ECE on its own reported findings (`runs_with`). It writes only over a raw bundle
(identity calibration, no floor, no profile fits), so fits never compound, then measures the
bundle again with what it wrote. The report keeps the bundle's own
calibration and floor (`shipped_calibration`, `shipped_profile_calibration`); on a calibrated
bundle, the fit is one on top of it. --write-metadata records the report.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from scipy import optimize, special

from models import confidence_fit
from models.bundle import BundleSpec
from models.confidence_fit import IDENTITY
from models.device import cpu_flags, cpu_model
from models.engine import EngineOptions, InferenceEngine
from models.phantom import generate_phantom as simple_phantom
from models.phantom import job_phantom
from models.phantoms import Phantom, generate_phantom
from models.runtime import RUNTIMES
from models.train import as_spacing
from models.transforms import DROP_REASONS, Calibration, elongation
from schemas.jobs import Profile

DEFAULT_BUNDLE = Path(__file__).parent / "medical_segmentation_v1"
PREVIOUS_BUNDLE = Path(__file__).parent.parent / "tests" / "data" / "medical_segmentation_v1.0"
VALIDATION_SEED_BASE = 90_000
NORMAL_SEED_BASE = 95_000
CALIBRATION_SEED_BASE = 97_000
THRESHOLD = 0.55  # the service's default decision threshold
FLOORS = np.round(np.arange(0.0, 0.51, 0.025), 3)  # confidence floors tried, lowest first
SIZE_BINS = {"found_ge10mm": (10.0, math.inf), "found_5to10mm": (5.0, 10.0), "found_lt5mm": (0.0, 5.0)}
EXPECTED_TYPE = {"hypodense": "hypodense lesion", "hyperdense": "hyperdense lesion", "lung nodule": "lung nodule"}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    p, t = prediction.astype(bool), truth.astype(bool)
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(p, t).sum() / denominator)


@dataclass
class Finding:
    confidence: float  # mean of the engine's probability over the finding
    volume_mm3: float
    true: bool  # touches a true lesion
    elongation: float = 1.0  # length over width (`models.transforms.elongation`), on the scan's grid
    # (lesion score, volume mm3, elongation) as the engine measured them on the model grid, where
    # it applies the calibration; None when the bundle keeps no record of its findings. The score
    # is the mean probability where the bundle has no lesion score (`models.lesion_score`).
    engine: tuple[float, float, float] | None = None
    features: dict[str, float] | None = None  # the engine's measures of it (`lesion_score.FEATURES`)


@dataclass
class ScanResult:
    dice: float | None  # None on lesion-free scans
    found: dict[str, tuple[int, int]]  # size bin -> (found, total)
    false_positives: int
    typed_right: tuple[int, int]  # (right type, found lesions); (0, 0) for an untyped bundle
    seconds: float
    findings: list[Finding] = field(default_factory=list)
    # size bin -> why its lesions were missed -> how many: "unseen" (no recorded voxel of a dropped
    # candidate lies on it: the network stayed under the threshold there, or the candidate was
    # outside the body) or the reason the candidate with most recorded voxels on it was dropped.
    # A bundle that records no dropped candidates counts every miss as unseen.
    missed: dict[str, dict[str, int]] = field(default_factory=dict)


def engine_record(records: list[dict[str, Any]], painted: float) -> dict[str, Any] | None:
    """The engine's record of the finding whose confidence is painted on a component: the one
    record of that confidence, or None when none or several have it."""
    same = [r for r in records if abs(float(r.get("confidence", -1.0)) - painted) < 6e-5]
    if len(same) != 1 or not {"mean_probability", "volume_mm3", "elongation"} <= same[0].keys():
        return None
    return same[0]


def calibrated_on(record: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """(score, volume, elongation) of a record: what the engine's calibration took."""
    if record is None:
        return None
    score = record.get("lesion_score", record["mean_probability"])
    return float(score), float(record["volume_mm3"]), float(record["elongation"])


def score_findings(
    phantom: Phantom, labels: np.ndarray, prob: np.ndarray | None, records: list[dict[str, Any]] | None = None
) -> list[Finding]:
    truth = phantom.lesion_mask
    predicted = cc3d.connected_components(labels > 0, connectivity=26)
    spacing = as_spacing(phantom.spacing)
    voxel_mm3 = float(np.prod(spacing))
    findings = []
    for index, box in enumerate(cc3d.statistics(predicted)["bounding_boxes"][1:], start=1):
        inside = predicted[box] == index
        confidence = float(prob[box][inside].mean()) if prob is not None else 1.0
        true = bool(np.any(truth[box][inside]))
        painted = float(np.median(prob[box][inside])) if prob is not None else 1.0
        record = engine_record(records or [], painted)
        volume = float(inside.sum()) * voxel_mm3
        measures = record.get("features") if record else None
        findings.append(Finding(confidence, volume, true, elongation(inside, spacing), calibrated_on(record), measures))
    return findings


def dropped_on(phantom: Phantom, truth: np.ndarray, dropped: list[dict[str, Any]]) -> dict[int, str]:
    """Lesion number -> why the candidate with most recorded voxels on it was dropped (the bundle's
    records of dropped candidates: a reason and some of their voxels in RAS mm)."""
    inverse = np.linalg.inv(phantom.affine)
    votes: dict[int, Counter[str]] = {}
    for record in dropped:
        reason = str(record.get("reason"))
        reason = reason if reason in DROP_REASONS else "other"
        points = np.asarray(record.get("points_mm", []), dtype=float).reshape(-1, 3)
        index = np.rint(points @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        index = index[np.all((index >= 0) & (index < truth.shape), axis=1)]
        for number in truth[tuple(index.T)]:
            if number > 0:
                votes.setdefault(int(number), Counter())[reason] += 1
    return {number: tally.most_common(1)[0][0] for number, tally in votes.items()}


def size_bin(diameter_mm: float) -> str:
    for name, (lo, hi) in SIZE_BINS.items():
        if lo <= diameter_mm < hi:
            return name
    raise ValueError(f"a lesion of {diameter_mm} mm fits no size bin")


def score(
    phantom: Phantom,
    labels: np.ndarray,
    names: dict[int, str],
    prob: np.ndarray | None,
    seconds: float,
    records: list[dict[str, Any]] | None = None,
    dropped: list[dict[str, Any]] | None = None,
) -> ScanResult:
    truth = phantom.lesion_instances if phantom.lesion_instances is not None else phantom.lesion_mask
    findings = score_findings(phantom, labels, prob, records)
    lost = dropped_on(phantom, truth, dropped or [])
    missed: dict[str, Counter[str]] = {}
    found = {name: [0, 0] for name in SIZE_BINS}
    typed = set(names.values()) & set(EXPECTED_TYPE.values())
    right, detected = 0, 0
    for number, lesion in enumerate(phantom.lesions, start=1):
        overlap = labels[truth == number]
        hit = bool(np.any(overlap > 0))
        size = size_bin(lesion.diameter_mm)
        found[size][0] += hit
        found[size][1] += 1
        if not hit:
            missed.setdefault(size, Counter())[lost.get(number, "unseen")] += 1
        if hit and typed:
            detected += 1
            value = int(np.bincount(overlap[overlap > 0]).argmax())
            right += int(names.get(value) == EXPECTED_TYPE[lesion.density])
    return ScanResult(
        dice(labels > 0, phantom.lesion_mask) if phantom.lesions else None,
        {k: (v[0], v[1]) for k, v in found.items()},
        sum(not f.true for f in findings),
        (right, detected),
        seconds,
        findings,
        {size: dict(reasons) for size, reasons in missed.items()},
    )


def run_scan(
    engine: InferenceEngine, phantom: Phantom, profile: Profile, setup: str | None = None, move: int = 0
) -> ScanResult:
    """The scan through the profile as a job runs it (or through one of its setups, where given);
    with `move`, every pass moved that many voxels on each axis against the windows."""
    started = time.perf_counter()
    moved = (move,) * 3 if move else None
    prediction = engine.predict(phantom.image, phantom.affine, profile, THRESHOLD, setup=setup, move=moved)
    seconds = time.perf_counter() - started
    return score(
        phantom,
        prediction.labels,
        prediction.label_names,
        prediction.probability,
        seconds,
        prediction.findings,
        prediction.dropped,
    )


def _mean(values: list[float], digits: int = 4) -> float | None:
    return round(float(np.mean(values)), digits) if values else None


def summarise(results: list[ScanResult]) -> dict[str, float | int | None]:
    lesion_scans = [r for r in results if r.dice is not None]
    normal_scans = [r for r in results if r.dice is None]
    row: dict[str, float | int | None] = {
        "dice": _mean([r.dice for r in lesion_scans if r.dice is not None]),
        "dice_min": min((r.dice for r in lesion_scans if r.dice is not None), default=None),
    }
    for name in SIZE_BINS:
        found = sum(r.found[name][0] for r in lesion_scans)
        total = sum(r.found[name][1] for r in lesion_scans)
        row[name] = round(found / total, 4) if total else None
        row[name.replace("found", "lesions")] = total
        # Found, or crossed the threshold and dropped after: what the network itself saw.
        unseen = sum(r.missed.get(name, {}).get("unseen", 0) for r in lesion_scans)
        row[name.replace("found", "seen")] = round(1.0 - unseen / total, 4) if total else None
    row["false_positives_per_scan"] = _mean([r.false_positives for r in lesion_scans], 3)
    row["false_findings_per_normal_scan"] = _mean([r.false_positives for r in normal_scans], 3)
    right = sum(r.typed_right[0] for r in lesion_scans)
    detected = sum(r.typed_right[1] for r in lesion_scans)
    row["type_agreement"] = round(right / detected, 4) if detected else None
    row["seconds_per_scan"] = _mean([r.seconds for r in results], 2)
    return row


# -- calibration ------------------------------------------------------------------------------
def measured(finding: Finding) -> tuple[float, float, float]:
    """(lesion score, volume mm3, elongation) as the calibration sees them: the engine's own
    model-grid values when it recorded them, else what the scan's grid shows (mean probability)."""
    return finding.engine or (finding.confidence, finding.volume_mm3, finding.elongation)


def features(findings: list[Finding]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([measured(f) for f in findings], dtype=float).reshape(-1, 3)
    p = np.clip(values[:, 0], 1e-6, 1 - 1e-6)
    x = np.stack([np.log(p / (1 - p)), np.log(np.maximum(values[:, 1], 1e-3)), values[:, 2]], axis=1)
    return x, np.array([f.true for f in findings], dtype=float)


def fit_calibration(findings: list[Finding], prior: float = 1.0) -> dict[str, float]:
    """Logistic regression of "is a true lesion" on the features, pulled to identity.

    A few dozen findings with a handful of true ones are often separable, where the plain
    maximum-likelihood fit runs off to infinity (seen: a = 1450, c = -1e9 from 30 findings, 4
    true). A Gaussian prior of weight `prior` on (a - 1, b, c, d) keeps every fit finite and close to
    the raw confidence until the findings say otherwise. The penalised likelihood is convex, and
    L-BFGS minimises it from any start; undamped Newton steps did not (a = 16, b = 32 where the
    optimum is near 0, on findings of one volume).
    """
    if len(findings) < 4 or len({f.true for f in findings}) < 2:
        return dict(IDENTITY)  # nothing to learn from: keep the confidence as it is
    x, y = features(findings)
    design = np.concatenate([x[:, :2], np.ones((len(x), 1)), x[:, 2:]], axis=1)  # columns: a, b, c, d
    w = penalised_logistic(design, y, np.array([IDENTITY[k] for k in "abcd"]), prior)
    if not np.all(np.isfinite(w)):
        return dict(IDENTITY)
    return {k: round(float(v), 4) for k, v in zip("abcd", w, strict=True)}


def penalised_logistic(
    design: np.ndarray, y: np.ndarray, centre: np.ndarray, prior: float, penalised: np.ndarray | None = None
) -> np.ndarray:
    """The weights of a logistic regression of `y` on the columns of `design` under a Gaussian
    prior of weight `prior` around `centre` (on the `penalised` columns only, where given): convex,
    so L-BFGS finds it from the centre."""
    mask = np.ones(design.shape[1]) if penalised is None else penalised.astype(float)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ w
        pull = mask * (w - centre)
        value = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * prior * np.sum(pull**2)
        return float(value), design.T @ (special.expit(z) - y) + prior * pull

    weights: np.ndarray = optimize.minimize(loss, centre, jac=True, method="L-BFGS-B").x
    return weights


def apply_calibration(findings: list[Finding], params: dict[str, float]) -> np.ndarray:
    """The confidences the engine would report with `params` (the same function it calls)."""
    calibration = Calibration.of(params)
    return np.array([calibration.confidence(*measured(f)) for f in findings])


def expected_calibration_error(confidence: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """Sum over equal-width confidence bins of |accuracy - confidence| weighted by the bin's share."""
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(float(truth[members].mean()) - float(confidence[members].mean()))
    return round(total, 4)


def confidence_floor(findings: list[Finding], params: dict[str, float], keep_true: float) -> float:
    """The highest floor in `FLOORS` under which at most 1 - `keep_true` of the true findings fall."""
    confidence = apply_calibration(findings, params)
    true = confidence[[f.true for f in findings]]
    if len(true) == 0:
        return 0.0
    return max(float(t) for t in FLOORS if np.mean(true >= t) >= keep_true)


def kept(confidence: np.ndarray, truth: np.ndarray, floor: float) -> dict[str, list[int]]:
    """[kept, all] of the true and of the false findings over a confidence floor."""
    above = confidence >= floor
    return {
        "true": [int(np.sum(above & (truth > 0))), int(np.sum(truth > 0))],
        "false": [int(np.sum(above & (truth == 0))), int(np.sum(truth == 0))],
    }


def ece_under(params: dict[str, float], findings: list[Finding]) -> float:
    """The expected calibration error of `findings` under the fit `params`."""
    return expected_calibration_error(apply_calibration(findings, params), features(findings)[1])


def calibration_report(fit_on: list[Finding], measured_on: list[Finding], keep_true: float = 0.9) -> dict[str, Any]:
    params = fit_calibration(fit_on)
    floor = confidence_floor(fit_on, params, keep_true)
    report: dict[str, Any] = {
        "parameters": params,
        "min_confidence": floor,
        "keep_true": keep_true,
        "fit_findings": len(fit_on),
        "fit_true_findings": sum(f.true for f in fit_on),
    }
    if not measured_on:
        return report | {"findings": 0, "ece_shipped": None, "ece_fitted": None}
    _, truth = features(measured_on)
    shipped = np.array([f.confidence for f in measured_on])
    fitted = apply_calibration(measured_on, params)
    return report | {
        "findings": len(measured_on),
        "true_findings": int(truth.sum()),
        "ece_shipped": expected_calibration_error(shipped, truth),
        "ece_fitted": expected_calibration_error(fitted, truth),
        "kept_over_floor": kept(fitted, truth, floor),
    }


# -- the whole evaluation -----------------------------------------------------------------------
def scan_seeds(phantoms: int, normals: int) -> list[tuple[int, tuple[int, int]]]:
    return [(VALIDATION_SEED_BASE + i, (1, 5)) for i in range(phantoms)] + [
        (NORMAL_SEED_BASE + i, (0, 0)) for i in range(normals)
    ]


def evaluate(
    engines: dict[str, InferenceEngine], seeds: list[tuple[int, tuple[int, int]]], profiles: list[Profile]
) -> dict[str, dict[str, list[ScanResult]]]:
    """model -> profile -> results; each phantom is generated once and run by every engine."""
    results: dict[str, dict[str, list[ScanResult]]] = {m: {p.value: [] for p in profiles} for m in engines}
    for seed, lesions in seeds:
        phantom = generate_phantom(seed, family="validation", lesion_count=lesions)
        for model, engine in engines.items():
            for profile in profiles:
                result = run_scan(engine, phantom, profile)
                results[model][profile.value].append(result)
                shown = "-" if result.dice is None else f"{result.dice:.3f}"
                print(
                    f"  {model:<10} {profile.value:<10} seed {seed}: {len(phantom.lesions)} lesions, "
                    f"dice {shown}, false positives {result.false_positives}, {result.seconds:.1f} s",
                    flush=True,
                )
    return results


def positions(
    engines: dict[str, InferenceEngine],
    seeds: list[tuple[int, tuple[int, int]]],
    profiles: list[Profile],
    moves: list[int],
    results: dict[str, dict[str, list[ScanResult]]],
) -> dict[str, dict[str, dict[str, dict[str, float | int | None]]]]:
    """model -> profile -> move -> the summary of the scans with lesions, each run with the scan
    moved that many voxels on every axis against the windows (move 0: as it runs, the results
    already measured). A network with stride-2 levels answers otherwise at each position of the
    scan against its grid, and a lesion near the threshold is found at one and not another: the
    mean over positions measures a change to a model or its tiling better than one position."""
    rows: dict[str, dict[str, dict[str, dict[str, float | int | None]]]] = {}
    moved: dict[tuple[str, str, int], list[ScanResult]] = {
        (m, p.value, move): [] for m in engines for p in profiles for move in moves if move
    }
    for seed, lesions in seeds:
        phantom = generate_phantom(seed, family="validation", lesion_count=lesions)
        for model, profile, move in moved:
            moved[(model, profile, move)].append(run_scan(engines[model], phantom, Profile(profile), move=move))
        print(f"  positions: seed {seed} at moves {moves}", flush=True)
    for model in engines:
        for profile in profiles:
            at_zero = [r for r in results[model][profile.value] if r.dice is not None]
            by_move = {move: moved.get((model, profile.value, move), at_zero) for move in moves}
            row = {str(move): summarise(runs) for move, runs in by_move.items()}
            row["mean"] = summarise([r for runs in by_move.values() for r in runs])
            rows.setdefault(model, {})[profile.value] = row
    return rows


def positions_table(rows: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> str:
    head = "| model | profile | move (voxels) | Dice | >=10 mm found | 5-10 mm found | FP / scan |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for model, by_profile in rows.items():
        for profile, by_move in by_profile.items():
            for move, r in by_move.items():
                cells = [r["dice"], r["found_ge10mm"], r["found_5to10mm"]]
                shown = " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
                fp = r["false_positives_per_scan"]
                lines.append(f"| {model} | `{profile}` | {move} | {shown} | {'-' if fp is None else f'{fp:.2f}'} |")
    return "\n".join(lines)


def fitted_profiles(profiles: list[Profile]) -> list[Profile]:
    """Production's fit is the bundle's own, which research (3-7x its time a scan) runs with too;
    every other profile evaluated gets one of its own: a coarser grid measures findings otherwise."""
    return [Profile.PRODUCTION] + [p for p in profiles if p not in (Profile.PRODUCTION, Profile.RESEARCH)]


def calibration_findings(engine: InferenceEngine, count: int, profiles: list[Profile]) -> dict[str, list[Finding]]:
    """profile -> the findings of the calibration split; each phantom is generated once. A fit is
    written into the profile's own entry: a scan its setup for small patients would run (another
    network, or another grid) is left out of it."""
    findings: dict[str, list[Finding]] = {p.value: [] for p in profiles}
    for i in range(count):
        phantom = generate_phantom(CALIBRATION_SEED_BASE + i, family="validation", lesion_count=(1, 5))
        for profile in profiles:
            setup = engine.setup_for(profile, phantom.image, phantom.affine)
            if setup != profile.value:
                print(
                    f"  calibration seed {CALIBRATION_SEED_BASE + i}: {setup} runs it, left out of {profile.value}'s fit"
                )
                continue
            findings[profile.value] += run_scan(engine, phantom, profile, setup).findings
    return findings


def missed_lesions(results: list[ScanResult]) -> dict[str, dict[str, int]]:
    """Size bin -> why lesions of that size were missed -> how many, over all scans."""
    total: dict[str, Counter[str]] = {}
    for result in results:
        for name, reasons in result.missed.items():
            total.setdefault(name, Counter()).update(reasons)
    return {name: dict(reasons) for name, reasons in total.items()}


MISSED_COLUMNS = ("unseen", *DROP_REASONS, "other")  # other: a reason another bundle records


def missed_table(missed: dict[tuple[str, str], dict[str, dict[str, int]]]) -> str:
    """Where the missed lesions were lost, per model and profile (`missed_lesions`): never above
    the threshold (unseen), or dropped by a rule or the confidence floor (faint)."""
    head = "| model | profile | size | " + " | ".join(MISSED_COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for (model, profile), by_bin in missed.items():
        for name in SIZE_BINS:
            counts = by_bin.get(name, {})
            cells = " | ".join(str(counts.get(column, 0)) for column in MISSED_COLUMNS)
            lines.append(f"| {model} | `{profile}` | {name.removeprefix('found_')} | {cells} |")
    return "\n".join(lines)


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = (
        "| model | profile | Dice | worst | >=10 mm found | 5-10 mm found | <5 mm found | FP / scan "
        "| false findings / normal scan | type agreement | s / scan |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def fmt(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    for model, by_profile in rows.items():
        for profile, r in by_profile.items():
            lines.append(
                f"| {model} | `{profile}` | {fmt(r['dice'])} | {fmt(r['dice_min'])} | {fmt(r['found_ge10mm'])} | "
                f"{fmt(r['found_5to10mm'])} | {fmt(r['found_lt5mm'])} | {fmt(r['false_positives_per_scan'], 2)} | "
                f"{fmt(r['false_findings_per_normal_scan'], 2)} | {fmt(r['type_agreement'])} | "
                f"{fmt(r['seconds_per_scan'], 1)} |"
            )
    return "\n".join(lines)


def loaded_engine(bundle: Path, runtime: str = "torch") -> InferenceEngine:
    engine = InferenceEngine(BundleSpec.load(bundle), EngineOptions(runtime=runtime))
    engine.load()
    return engine


def runtime_line(engine: InferenceEngine) -> str:
    """What ran the networks, for the report: runtime, precision, threads and the CPU's deciding flags."""
    flags = " ".join(cpu_flags()) or "unknown"
    return f"{engine.runtime} {engine.precision}, {torch.get_num_threads()} threads, {cpu_model()} (flags: {flags})"


# The simple phantoms of the service's own tests: the job tests' phantom and three default ones.
SIMPLE_SEEDS = (90000, 90001, 90002)
SIMPLE_DESCRIPTION = (
    "models.phantom (the service's tests): the test phantom (seed 7, 192x192x64, 2 lesions of 16-30 mm) "
    f"and seeds {SIMPLE_SEEDS[0]}-{SIMPLE_SEEDS[-1]}"
)


def simple_phantom_dice(
    engines: dict[str, InferenceEngine], profiles: list[Profile]
) -> dict[str, dict[str, list[float]]]:
    """profile -> bundle version -> Dice on each simple phantom: the clean cases must not regress."""
    phantoms = [job_phantom(), *(simple_phantom(seed) for seed in SIMPLE_SEEDS)]
    versions = [engine.spec.version for engine in engines.values()]
    if len(set(versions)) < len(versions):
        raise SystemExit(f"the bundles compared share a version ({versions}): give the new one its own first")
    out: dict[str, dict[str, list[float]]] = {}
    for profile in profiles:
        by_version = out.setdefault(f"{profile.value}_dice", {})
        for engine in engines.values():
            by_version[engine.spec.version] = [
                round(dice(engine.predict(p.image, p.affine, profile, THRESHOLD).labels > 0, p.lesion_mask), 2)
                for p in phantoms
            ]
    return out


def merged_simple(earlier: dict[str, Any] | None, measured: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The simple-phantom rows of this run over those recorded for older versions (and profiles)."""
    earlier = earlier or {}
    measured_rows = {key: {**earlier.get(key, {}), **by_version} for key, by_version in measured.items()}
    return {**earlier, "generator": SIMPLE_DESCRIPTION, **measured_rows}


def calibration_helps(calibration: dict[str, Any]) -> bool:
    """A fit is written only when it lowers the ECE on findings it was not fitted on."""
    shipped, fitted = calibration.get("ece_shipped"), calibration.get("ece_fitted")
    return shipped is not None and fitted is not None and bool(fitted < shipped)  # a JSON bool, not numpy's


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--previous", type=Path, default=PREVIOUS_BUNDLE, help="'none' to skip it")
    parser.add_argument("--phantoms", type=int, default=8, help="validation scans with lesions")
    parser.add_argument("--normals", type=int, default=4, help="validation scans without lesions")
    parser.add_argument("--calibration-scans", type=int, default=30)
    parser.add_argument(
        "--keep-true", type=share, default=0.9, help="share of the calibration split's true findings the floor keeps"
    )
    parser.add_argument("--profiles", nargs="+", default=[p.value for p in Profile], choices=[p.value for p in Profile])
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="write the fitted calibrations and floors into the bundle (production's: inference.json; others: profiles.json)",
    )
    parser.add_argument(
        "--moves",
        nargs="+",
        type=move_voxels,
        default=[],
        help="also run the scans with lesions moved this many voxels against the windows (e.g. 0 2 4): a table per position and their mean",
    )
    parser.add_argument("--write-metadata", action="store_true", help="record the report in configs/metadata.json")
    add_runtime_argument(parser)
    return parser.parse_args()


def move_voxels(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 32:
        raise argparse.ArgumentTypeError(f"{text} is not a move of 0 to 32 voxels")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1]")
    return value


def add_runtime_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="what runs the network (ML_RUNTIME); torch measures the weights themselves",
    )


def kept_fit(
    earlier: dict[str, Any] | None, this_run: dict[str, Any], shipped: dict[str, Any]
) -> dict[str, Any] | None:
    """The record of the fit the bundle ships: this run's when it wrote one, else the one recorded
    before, as long as the bundle still has its parameters."""
    if this_run.get("written"):
        return this_run
    if earlier and earlier.get("parameters") == shipped["calibration"]:
        return earlier
    return None


def write_fits(bundle: Path, calibration: dict[str, Any], by_profile: dict[str, dict[str, Any]]) -> bool:
    """Each fit of what runs raw (new weights) that lowers the ECE on the reported findings (marked
    `written`); -> any was. A fit the bundle ships is kept (`runs_with`: "kept"): e.g. production's,
    when only a profile's own network was trained anew.

    Another profile runs with the fit that measured best on its own reported findings: its own
    (written into profiles.json), production's (nothing written: it inherits the bundle's), or
    none (written raw, so it never runs a fit that did not help it). `runs_with` says which.
    """
    production_raw = confidence_fit.runs_raw(bundle, Profile.PRODUCTION.value)
    raw = {name for name in by_profile if confidence_fit.runs_raw(bundle, name)}  # before production's is written
    calibration["written"] = production_raw and calibration_helps(calibration)
    if calibration["written"]:
        confidence_fit.write(bundle, calibration["parameters"], calibration["min_confidence"])
    production_fitted = calibration["written"] or not production_raw
    changed = calibration["written"]
    for name, fit in by_profile.items():
        # Production's fit was made on another network's findings than a profile's own network's.
        inheritable = production_fitted and name not in confidence_fit.own_networks(bundle)
        choice = _profile_choice(fit, inheritable) if name in raw else "kept"
        fit["written"], fit["runs_with"] = choice == "own", choice
        if choice == "own":
            confidence_fit.write_profile(bundle, name, fit["parameters"], fit["min_confidence"])
        elif choice == "raw" and production_fitted:
            confidence_fit.write_profile(bundle, name, IDENTITY, 0.0)
        elif choice == "production" and name in confidence_fit.profile_fits(bundle):
            confidence_fit.inherit(bundle, name)  # its raw entry (new weights) would hide production's
            changed = True
        changed = changed or fit["written"]
    return bool(changed)


def _profile_choice(fit: dict[str, Any], production_fitted: bool) -> str:
    """own | production | raw: the lowest ECE on the profile's reported findings."""
    inherited = fit.get("ece_production_fit") if production_fitted else None
    candidates = {"raw": fit.get("ece_shipped"), "own": fit.get("ece_fitted"), "production": inherited}
    measured = {name: ece for name, ece in candidates.items() if ece is not None}
    return min(measured, key=lambda name: (measured[name], name != "raw")) if "raw" in measured else "raw"


def kept_profile_fits(
    earlier: dict[str, Any] | None, this_run: dict[str, dict[str, Any]], bundle: Path
) -> dict[str, Any]:
    """profile -> the record of the fit it ships: this run's, or one recorded before for a
    profile this run did not measure, as long as the bundle still has its parameters."""
    earlier = earlier or {}
    records = {
        name: kept_fit(earlier.get(name), this_run.get(name, {}), confidence_fit.shipped(bundle, name))
        for name in {**earlier, **this_run}
    }
    return {name: record for name, record in records.items() if record is not None}


def refit(
    args: argparse.Namespace,
    calibration: dict[str, Any],
    by_profile: dict[str, dict[str, Any]],
    engines: dict[str, InferenceEngine],
    results: dict[str, dict[str, list[ScanResult]]],
    rows: dict[str, dict[str, dict[str, Any]]],
) -> InferenceEngine:
    """--calibrate: write each fit that helps (production's into inference.json, another profile's
    into profiles.json), then measure what ships (the same scans again, through the bundle with
    its fits and floors) in place of the raw results and rows; -> the current engine."""
    if not write_fits(args.bundle, calibration, by_profile):
        print("--calibrate: no fit lowers the ECE on the measured findings; the bundle is left as it is")
        return engines["current"]
    calibration["rows_uncalibrated"] = rows["current"]
    calibration["calibration_scans"] = args.calibration_scans
    current = engines["current"] = loaded_engine(args.bundle, args.runtime)
    profiles = [Profile(p) for p in args.profiles]
    again = evaluate({"current": current}, scan_seeds(args.phantoms, args.normals), profiles)["current"]
    results["current"] = again
    rows["current"] = {p: summarise(r) for p, r in again.items()}
    return current


def fit_confidences(
    args: argparse.Namespace, engine: InferenceEngine, results: dict[str, list[ScanResult]], profiles: list[Profile]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Production's calibration report and every other fitted profile's, each fitted on its own
    findings of the calibration split and measured on its reported ones (and under production's fit)."""
    fitted = fitted_profiles(profiles)
    split = calibration_findings(engine, args.calibration_scans, fitted)
    reported = {p.value: [f for r in results.get(p.value, []) for f in r.findings] for p in fitted}
    calibrations = {p.value: calibration_report(split[p.value], reported[p.value], args.keep_true) for p in fitted}
    calibration = calibrations.pop(Profile.PRODUCTION.value)
    # What production will run with: this run's fit (if it is written), else the one it ships.
    raw = confidence_fit.runs_raw(args.bundle, Profile.PRODUCTION.value)
    production = calibration["parameters"] if raw else confidence_fit.shipped(args.bundle, "production")["calibration"]
    for name, fit in calibrations.items():
        fit["ece_production_fit"] = ece_under(production, reported[name]) if reported[name] else None
    return calibration, calibrations


def record_in_metadata(bundle: Path, report: dict[str, Any], simple: dict[str, dict[str, list[float]]]) -> None:
    """The report as the bundle's `validation`, with what earlier runs recorded that still holds."""
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    earlier = metadata.get("validation", {})
    report["simple_phantoms"] = merged_simple(earlier.get("simple_phantoms"), simple)
    report["calibration_fit"] = kept_fit(
        earlier.get("calibration_fit"), report["calibration"], report["shipped_calibration"]
    )
    report["profile_calibration_fit"] = kept_profile_fits(
        earlier.get("profile_calibration_fit"), report["profile_calibration"], bundle
    )
    metadata["validation"] = report
    metadata_file.write_text(json.dumps(metadata, indent=2) + "\n")


def main() -> None:
    args = arguments()
    fitted = fitted_profiles([Profile(p) for p in args.profiles])
    raw = [p for p in fitted if confidence_fit.runs_raw(args.bundle, p.value)]
    if args.calibrate and not (confidence_fit.holds_fit(args.bundle) and raw):
        raise SystemExit(
            "--calibrate fits what runs raw (new weights: training resets their fits): inference.json needs "
            "calibration and min_confidence entries, and production or another profile evaluated an identity "
            "calibration and min_confidence 0"
        )
    started = time.perf_counter()
    profiles = [Profile(p) for p in args.profiles]
    engines = {"current": loaded_engine(args.bundle, args.runtime)}
    if str(args.previous) != "none":
        engines["previous"] = loaded_engine(args.previous, args.runtime)
    current = engines["current"]
    results = evaluate(engines, scan_seeds(args.phantoms, args.normals), profiles)
    rows = {model: {p: summarise(r) for p, r in by_profile.items()} for model, by_profile in results.items()}
    calibration, calibrations = fit_confidences(args, current, results["current"], profiles)
    if args.calibrate:
        current = refit(args, calibration, calibrations, engines, results, rows)
    missed = {model: {p: missed_lesions(r) for p, r in by.items()} for model, by in results.items()}
    report = base_report(args, current, rows["current"], missed["current"], calibration, calibrations)
    if "previous" in rows:
        report["previous_model"] = {"version": engines["previous"].spec.version, "profiles": rows["previous"]}
    names = {model: f"{model} ({engine.spec.version})" for model, engine in engines.items()}
    if args.moves:
        moved = positions(engines, scan_seeds(args.phantoms, 0), profiles, args.moves, results)
        report["positions"] = {"moves": args.moves, "rows": moved}
    simple = simple_phantom_dice(engines, profiles)
    print(table({names[m]: r for m, r in rows.items()}))
    print("lesions missed, and where:")
    print(missed_table({(names[m], p): by_bin for m, by in missed.items() for p, by_bin in by.items()}))
    if args.moves:
        print("at each position of the scans with lesions against the windows, and the mean over positions:")
        print(positions_table({names[m]: by for m, by in moved.items()}))
    print(f"simple phantoms (Dice per phantom): {json.dumps(simple)}")
    for name, fit in {Profile.PRODUCTION.value: calibration, **calibrations}.items():
        print(f"confidence ({name}): {json.dumps({k: v for k, v in fit.items() if k != 'rows_uncalibrated'})}")
    print(f"{time.perf_counter() - started:.0f} s")
    print(json.dumps(report, indent=2))
    if args.write_metadata:
        record_in_metadata(args.bundle, report, simple)


def base_report(
    args: argparse.Namespace,
    current: InferenceEngine,
    rows: dict[str, dict[str, Any]],
    missed: dict[str, dict[str, dict[str, int]]],
    calibration: dict[str, Any],
    calibrations: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "family": "validation (models.phantoms, never trained on)",
        "scans_with_lesions": args.phantoms,
        "scans_without_lesions": args.normals,
        "seed_bases": {
            "lesions": VALIDATION_SEED_BASE,
            "normal": NORMAL_SEED_BASE,
            "calibration": CALIBRATION_SEED_BASE,
        },
        "threshold": THRESHOLD,
        "precision": current.precision,
        "runtime": runtime_line(current),
        "profiles": rows,
        "missed_lesions": missed,
        "shipped_calibration": confidence_fit.shipped(args.bundle),
        "calibration": calibration,
        "shipped_profile_calibration": {name: confidence_fit.shipped(args.bundle, name) for name in calibrations},
        "profile_calibration": calibrations,
    }


if __name__ == "__main__":
    main()
