"""The validation report's own arithmetic: lesion-wise scoring, calibration error and the record
kept in the bundle's metadata (pure logic on small arrays; no network is run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from models.confidence_fit import (
    IDENTITY,
    holds_fit,
    is_raw,
    own_networks,
    profile_fits,
    reset,
    runs_raw,
    shipped,
    write,
    write_profile,
)
from models.evaluate import (
    DEFAULT_BUNDLE,
    SIMPLE_DESCRIPTION,
    Finding,
    apply_calibration,
    calibration_helps,
    calibration_report,
    confidence_floor,
    expected_calibration_error,
    features,
    fit_calibration,
    kept_fit,
    kept_profile_fits,
    merged_simple,
    missed_lesions,
    positions,
    positions_table,
    score,
    summarise,
    write_fits,
)
from models.phantoms import Lesion, Phantom
from schemas.jobs import Profile


def _phantom() -> Phantom:
    instances = np.zeros((30, 30, 30), dtype=np.uint8)
    instances[2:6, 2:6, 2:6] = 1  # found below
    instances[20:28, 20:28, 20:28] = 2  # missed below
    lesions = [
        Lesion("liver", "hypodense", (0.0, 0.0, 0.0), (3.0, 3.0, 3.0), 20.0),  # 6 mm
        Lesion("lung", "solid_nodule", (0.0, 0.0, 0.0), (6.0, 6.0, 6.0), 30.0),  # 12 mm
    ]
    return Phantom(
        np.zeros(instances.shape, np.float32),
        (instances > 0).astype(np.uint8),
        np.eye(4),
        (1.0, 1.0, 1.0),
        lesions,
        instances,
    )


def test_a_scan_is_scored_lesion_by_lesion() -> None:
    phantom = _phantom()
    labels = np.zeros(phantom.image.shape, dtype=np.uint8)
    labels[3:6, 3:6, 3:6] = 1  # inside lesion 1, typed hypodense
    labels[12:14, 12:14, 12:14] = 2  # touches no lesion: a false positive
    names = {1: "hypodense lesion", 2: "hyperdense lesion"}
    result = score(phantom, labels, names, np.full(labels.shape, 0.8, np.float32), seconds=1.0)
    assert result.found["found_5to10mm"] == (1, 1) and result.found["found_ge10mm"] == (0, 1)
    assert result.false_positives == 1 and result.typed_right == (1, 1)
    assert result.dice == pytest.approx(2 * 27 / (27 + 8 + 64 + 512))
    assert sorted(f.true for f in result.findings) == [False, True]


def test_a_missed_lesion_is_told_unseen_or_dropped_by_the_candidate_on_it() -> None:
    phantom = _phantom()
    # The records are in mm, the truth in voxels: a flipped first axis and an origin of its own.
    phantom.affine = np.array([[-2.0, 0, 0, 100.0], [0, 2.0, 0, -10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1.0]])
    labels = np.zeros(phantom.image.shape, dtype=np.uint8)
    on_lesion_2 = [[56.0, 34.0, 49.0], [54.0, 38.0, 55.0]]  # voxels (22, 22, 22) and (23, 24, 25)
    dropped = [
        {"reason": "faint", "points_mm": on_lesion_2},
        {"reason": "small", "points_mm": on_lesion_2[:1]},  # fewer of its voxels on it: not the reason
        {"reason": "bone", "points_mm": [[100.0, 50.0, 5.0]]},  # voxel (0, 30, 0): on no lesion
    ]
    result = score(phantom, labels, {}, None, 1.0, None, dropped)
    assert result.missed == {"found_5to10mm": {"unseen": 1}, "found_ge10mm": {"faint": 1}}
    row = summarise([result, result])
    assert row["seen_ge10mm"] == 1.0 and row["seen_5to10mm"] == 0.0 and row["found_ge10mm"] == 0.0
    assert missed_lesions([result, result])["found_ge10mm"] == {"faint": 2}


class _MovedEngine:
    """Finds the 6 mm lesion wherever the scan falls, the 12 mm one only with the scan moved by 2."""

    def __init__(self) -> None:
        self.moves: list[tuple[int, ...] | None] = []

    def predict(self, image: np.ndarray, affine: np.ndarray, *args: Any, **kwargs: Any) -> SimpleNamespace:
        move = kwargs.get("move")
        self.moves.append(move)
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[2:6, 2:6, 2:6] = 1
        if move == (2, 2, 2):
            labels[20:28, 20:28, 20:28] = 1
        else:
            labels[12:14, 12:14, 12:14] = 1  # a false positive
        names = {1: "hypodense lesion"}
        return SimpleNamespace(labels=labels, label_names=names, probability=None, findings=None, dropped=None)


def test_positions_rerun_the_lesion_scans_moved_and_average_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("models.evaluate.generate_phantom", lambda *args, **kwargs: _phantom())
    engine = _MovedEngine()
    as_run = score(_phantom(), engine.predict(_phantom().image, np.eye(4)).labels, {}, None, 1.0)
    engine.moves.clear()
    seeds = [(90000, (1, 5)), (90001, (1, 5))]
    results = {"current": {"production": [as_run, as_run]}}
    rows = positions({"current": engine}, seeds, [Profile.PRODUCTION], [0, 2], results)  # type: ignore[dict-item]
    assert engine.moves == [(2, 2, 2), (2, 2, 2)]  # move 0 is the run already measured
    at = rows["current"]["production"]
    assert at["0"]["found_ge10mm"] == 0.0 and at["0"]["false_positives_per_scan"] == 1.0
    assert at["2"]["found_ge10mm"] == 1.0 and at["2"]["false_positives_per_scan"] == 0.0
    assert at["mean"]["found_ge10mm"] == 0.5 and at["mean"]["found_5to10mm"] == 1.0
    assert "| current | `production` | mean | " in positions_table(rows)


def test_the_calibration_error_is_zero_for_honest_confidences_and_large_for_overconfident_ones() -> None:
    truth = np.array([1.0, 0.0] * 50)
    assert expected_calibration_error(np.full(100, 0.5), truth) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(100, 0.95), truth) == pytest.approx(0.45)


def test_simple_phantom_rows_of_older_versions_are_kept_and_this_runs_rows_replace_theirs() -> None:
    earlier = {"generator": "old words", "production_dice": {"1.2.0": [0.8], "1.3.0": [0.5]}}
    merged = merged_simple(
        earlier, {"production_dice": {"1.3.0": [0.6], "1.4.0": [0.9]}, "fast_debug_dice": {"1.4.0": [0.7]}}
    )
    assert merged == {
        "generator": SIMPLE_DESCRIPTION,
        "production_dice": {"1.2.0": [0.8], "1.3.0": [0.6], "1.4.0": [0.9]},
        "fast_debug_dice": {"1.4.0": [0.7]},
    }
    assert merged_simple(None, {"production_dice": {"1.4.0": [0.9]}})["production_dice"] == {"1.4.0": [0.9]}
    # A run of one profile keeps the other profile's rows.
    assert merged_simple(merged, {"production_dice": {"1.5.0": [0.9]}})["fast_debug_dice"] == {"1.4.0": [0.7]}


def test_checkpoints_are_picked_on_scans_neither_reported_nor_calibrated_nor_trained_on() -> None:
    from models.checkpoints import selection_seeds
    from models.evaluate import CALIBRATION_SEED_BASE, scan_seeds
    from models.train import TRAIN_SEED_BASE, Recipe

    reported = {seed for seed, _ in scan_seeds(phantoms=100, normals=100)}
    calibration = {CALIBRATION_SEED_BASE + i for i in range(100)}
    selection = selection_seeds(scans=100)
    assert {family for family, _, _ in selection} == {"validation", "train"}
    assert any(lesions == (0, 0) for _, _, lesions in selection)
    assert not {seed for _, seed, _ in selection} & (reported | calibration)
    # A run of seed s draws TRAIN_SEED_BASE + 100_000 s onwards: its pool, then a fresh phantom
    # at most every refresh_every steps.
    drawn = Recipe().pool + Recipe().steps // Recipe().refresh_every
    for family, seed, _ in selection:
        if family == "train":
            assert (seed - TRAIN_SEED_BASE) % 100_000 > drawn
    with pytest.raises(ValueError):
        selection_seeds(scans=501)


def test_a_calibration_fit_on_separable_findings_stays_finite_and_lowers_the_false_ones() -> None:
    # As in 1.6.0's run: 30 findings, 4 true, every true one more confident than every false one.
    rng = np.random.default_rng(0)
    false = [
        Finding(float(c), float(v), False)
        for c, v in zip(rng.uniform(0.56, 0.85, 26), rng.uniform(5, 900, 26), strict=True)
    ]
    true = [
        Finding(float(c), float(v), True)
        for c, v in zip(rng.uniform(0.9, 0.99, 4), rng.uniform(300, 3000, 4), strict=True)
    ]
    params = fit_calibration(false + true)
    assert all(abs(v) < 20.0 for v in params.values()), params
    fitted = apply_calibration(false + true, params)
    raw = np.array([f.confidence for f in false + true])
    assert fitted[:26].mean() < raw[:26].mean()  # the false findings were overconfident
    assert fitted[26:].mean() > 2.0 * fitted[:26].mean()  # and still tells true from false
    truth = np.array([f.true for f in false + true], dtype=float)
    assert expected_calibration_error(fitted, truth) < expected_calibration_error(raw, truth)


def test_a_calibration_fit_is_written_only_when_it_lowers_the_error_on_findings_it_was_not_fitted_on() -> None:
    rng = np.random.default_rng(1)
    overconfident = [Finding(float(c), 100.0, bool(rng.random() < 0.2)) for c in rng.uniform(0.8, 0.99, 40)]
    honest = [Finding(0.2, 100.0, i % 5 == 0) for i in range(40)]
    # Fitted on overconfident findings and measured on such: the fit pulls confidence down and helps.
    assert calibration_helps(calibration_report(overconfident, overconfident[:20])) is True  # goes into JSON
    # Measured on findings whose confidence was right already, the same fit only makes it worse.
    assert not calibration_helps(calibration_report(overconfident, honest))
    # Nothing measured, nothing to judge the fit by.
    assert not calibration_helps(calibration_report(overconfident, []))


def test_the_confidence_floor_keeps_the_true_findings_asked_for_and_drops_thin_faint_false_ones() -> None:
    # Most false findings are faint and elongated (vessels, organ rims); true ones compact.
    rng = np.random.default_rng(2)
    false = [
        Finding(float(c), 80.0, False, float(e))
        for c, e in zip(rng.uniform(0.56, 0.8, 60), rng.uniform(1.8, 2.9, 60), strict=True)
    ]
    true = [
        Finding(float(c), 800.0, True, float(e))
        for c, e in zip(rng.uniform(0.6, 0.98, 20), rng.uniform(1.0, 1.6, 20), strict=True)
    ]
    report = calibration_report(false + true, false[:30] + true[:10], keep_true=0.9)
    assert report["parameters"]["d"] < 0  # longer: less likely a lesion
    floor = report["min_confidence"]
    assert floor > 0
    confidence = apply_calibration(true, report["parameters"])
    assert np.mean(confidence >= floor) >= 0.9
    kept_true, kept_false = report["kept_over_floor"]["true"], report["kept_over_floor"]["false"]
    assert kept_true[1] == 10 and kept_false[1] == 30
    assert kept_true[0] >= 9 and kept_false[0] <= 15
    # Asking to keep every true finding gives a floor no higher.
    assert confidence_floor(false + true, report["parameters"], 1.0) <= floor
    # No true findings to keep: no floor.
    assert confidence_floor(false, report["parameters"], 0.9) == 0.0


def test_a_fit_and_floor_are_written_into_the_bundle_and_a_reset_makes_it_raw_again(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(DEFAULT_BUNDLE / "configs" / "inference.json", configs / "inference.json")
    before = json.loads((configs / "inference.json").read_text())
    assert holds_fit(tmp_path)
    write(tmp_path, IDENTITY, 0.0)  # what training does to the weights it replaces
    assert is_raw(tmp_path)
    fit = {"a": 1.5, "b": -0.2, "c": -1.0, "d": -0.9}
    write(tmp_path, fit, 0.15)
    after = json.loads((configs / "inference.json").read_text())
    assert after["calibration"] == fit and after["min_confidence"] == 0.15 and not is_raw(tmp_path)
    assert {k: v for k, v in after.items() if k not in ("calibration", "min_confidence")} == {
        k: v for k, v in before.items() if k not in ("calibration", "min_confidence")
    }
    # The post-processing reads both entries, so what was written is what runs.
    (findings,) = [t for t in after["postprocessing"]["transforms"] if t["_target_"].endswith("LesionFindingsd")]
    assert findings["calibration"] == "@calibration" and findings["min_confidence"] == "@min_confidence"


def test_a_profile_fit_goes_into_profiles_json_and_a_reset_removes_it_only(tmp_path: Path) -> None:
    configs = _shared_network_configs(tmp_path) / "configs"
    reset(tmp_path)
    profiles_before = json.loads((configs / "profiles.json").read_text())
    assert is_raw(tmp_path)
    fit = {"a": 1.2, "b": -0.1, "c": -0.5, "d": -1.0}
    write_profile(tmp_path, "fast_debug", fit, 0.2)
    assert profile_fits(tmp_path) == ["fast_debug"] and not is_raw(tmp_path)  # --calibrate would refuse it
    assert shipped(tmp_path, "fast_debug") == {"calibration": fit, "min_confidence": 0.2}
    assert shipped(tmp_path, "production") == shipped(tmp_path) == {"calibration": IDENTITY, "min_confidence": 0.0}
    profiles = json.loads((configs / "profiles.json").read_text())
    assert profiles["fast_debug"] == profiles_before["fast_debug"] | {"calibration": fit, "min_confidence": 0.2}
    reset(tmp_path)  # new weights: every fit goes, the profile's own settings stay
    assert json.loads((configs / "profiles.json").read_text()) == profiles_before and is_raw(tmp_path)


def _shared_network_configs(bundle: Path) -> Path:
    """The default bundle's configs with every profile on the bundle's network (no "weights"), and
    so with production's fit (none of a profile's own: that belonged to its own network)."""
    shutil.copytree(DEFAULT_BUNDLE / "configs", bundle / "configs")
    profiles = json.loads((bundle / "configs" / "profiles.json").read_text())
    own = {"weights", "calibration", "min_confidence"}
    shared = {name: {k: v for k, v in o.items() if k not in own} for name, o in profiles.items()}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(shared))
    return bundle


def _raw_configs(bundle: Path) -> Path:
    _shared_network_configs(bundle)
    reset(bundle)
    return bundle


def _fit(ece_fitted: float, c: float) -> dict[str, Any]:
    return {"parameters": {"a": 1.0, "b": 0.0, "c": c, "d": 0.0}, "min_confidence": 0.1} | {
        "ece_shipped": 0.5,
        "ece_fitted": ece_fitted,
    }


def test_a_profile_whose_own_fit_does_not_help_runs_raw_not_on_production_s_fit(tmp_path: Path) -> None:
    bundle = _raw_configs(tmp_path / "a")
    production, fast = _fit(0.1, -1.0), _fit(0.7, -2.0)
    assert write_fits(bundle, production, {"fast_debug": fast})
    assert production["written"] and not fast["written"]
    assert shipped(bundle) == {"calibration": production["parameters"], "min_confidence": 0.1}
    assert shipped(bundle, "research") == shipped(bundle)  # research runs with production's fit
    assert shipped(bundle, "fast_debug") == {"calibration": IDENTITY, "min_confidence": 0.0}
    # The other way round: production stays raw, fast_debug gets its own.
    bundle = _raw_configs(tmp_path / "b")
    production, fast = _fit(0.7, -1.0), _fit(0.1, -2.0)
    assert write_fits(bundle, production, {"fast_debug": fast})
    assert shipped(bundle) == {"calibration": IDENTITY, "min_confidence": 0.0}
    assert shipped(bundle, "fast_debug") == {"calibration": fast["parameters"], "min_confidence": 0.1}
    assert not write_fits(_raw_configs(tmp_path / "c"), _fit(0.7, -1.0), {"fast_debug": _fit(0.6, -2.0)})
    assert is_raw(tmp_path / "c")
    # Production's fit measured better on fast_debug's own findings than fast_debug's: it inherits.
    bundle = _raw_configs(tmp_path / "d")
    production, fast = _fit(0.1, -1.0), _fit(0.3, -2.0) | {"ece_production_fit": 0.2}
    assert write_fits(bundle, production, {"fast_debug": fast})
    assert fast["runs_with"] == "production" and not fast["written"] and profile_fits(bundle) == []
    assert (
        shipped(bundle, "fast_debug")
        == shipped(bundle)
        == {"calibration": production["parameters"], "min_confidence": 0.1}
    )
    bundle = _raw_configs(tmp_path / "e")
    fast = _fit(0.1, -2.0) | {"ece_production_fit": 0.3}
    write_fits(bundle, _fit(0.1, -1.0), {"fast_debug": fast})
    assert fast["runs_with"] == "own" and shipped(bundle, "fast_debug")["calibration"] == fast["parameters"]


def _own_fast_debug_configs(bundle: Path) -> Path:
    """Configs where fast_debug runs a network of its own, fresh from training (its fit raw)."""
    _shared_network_configs(bundle)
    profiles = json.loads((bundle / "configs" / "profiles.json").read_text())
    profiles["fast_debug"] |= {"weights": "models/fast.pt"}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    write_profile(bundle, "fast_debug", IDENTITY, 0.0)
    return bundle


def test_a_profile_network_keeps_its_fit_when_the_bundle_s_network_is_retrained(tmp_path: Path) -> None:
    bundle = _own_fast_debug_configs(tmp_path)
    fit = {"a": 1.2, "b": -0.1, "c": -0.5, "d": -1.0}
    write_profile(bundle, "fast_debug", fit, 0.2)
    reset(bundle)
    assert shipped(bundle) == {"calibration": IDENTITY, "min_confidence": 0.0}
    assert shipped(bundle, "fast_debug") == {"calibration": fit, "min_confidence": 0.2}


def test_a_profile_network_never_inherits_production_s_fit(tmp_path: Path) -> None:
    """Production's fit (and floor) was made on another network's findings: even when it measures
    better on fast_debug's own network's findings, that network runs its own fit or none."""
    bundle = _own_fast_debug_configs(tmp_path / "a")
    fast = _fit(0.3, -2.0) | {"ece_production_fit": 0.2}
    assert write_fits(bundle, _fit(0.01, -9.0), {"fast_debug": fast})
    assert fast["runs_with"] == "own" and shipped(bundle, "fast_debug")["calibration"] == fast["parameters"]
    bundle = _own_fast_debug_configs(tmp_path / "b")
    fast = _fit(0.7, -2.0) | {"ece_production_fit": 0.2}
    assert not write_fits(bundle, _fit(0.01, -9.0), {"fast_debug": fast})  # nothing to measure again
    assert fast["runs_with"] == "raw" and shipped(bundle, "fast_debug")["calibration"] == IDENTITY


def test_new_weights_of_a_profile_are_fitted_and_production_keeps_the_fit_it_ships(tmp_path: Path) -> None:
    """Only fast_debug's own network was trained anew (its fit made raw): production's shipped fit
    stays whatever this run's refit of it says, and fast_debug chooses among its own fit,
    production's shipped one and none."""
    bundle = _shared_network_configs(tmp_path / "a")
    write_profile(bundle, "fast_debug", IDENTITY, 0.0)
    production_before = shipped(bundle)
    assert production_before["calibration"] != IDENTITY and shipped(bundle, "fast_debug")["calibration"] == IDENTITY
    production, fast = _fit(0.01, -9.0), _fit(0.1, -2.0) | {"ece_production_fit": 0.3}
    assert write_fits(bundle, production, {"fast_debug": fast})
    assert not production["written"] and shipped(bundle) == production_before
    assert fast["runs_with"] == "own" and shipped(bundle, "fast_debug")["calibration"] == fast["parameters"]
    # Production's shipped fit measured better on fast_debug's findings: fast_debug inherits it.
    bundle = _shared_network_configs(tmp_path / "b")
    entry = json.loads((bundle / "configs" / "profiles.json").read_text())["fast_debug"]
    write_profile(bundle, "fast_debug", IDENTITY, 0.0)
    fast = _fit(0.3, -2.0) | {"ece_production_fit": 0.2}
    assert write_fits(bundle, _fit(0.01, -9.0), {"fast_debug": fast})
    assert fast["runs_with"] == "production" and not fast["written"]
    assert shipped(bundle, "fast_debug") == shipped(bundle) == production_before  # its raw entry went
    assert json.loads((bundle / "configs" / "profiles.json").read_text())["fast_debug"] == entry
    # A profile whose own fit the bundle ships (not raw) is kept as it is.
    bundle = _shared_network_configs(tmp_path / "c")
    write_profile(bundle, "fast_debug", {"a": 2.0, "b": 0.0, "c": 0.0, "d": 0.0}, 0.1)
    fast = _fit(0.01, -2.0)
    assert not write_fits(bundle, _fit(0.01, -9.0), {"fast_debug": fast})
    assert fast["runs_with"] == "kept" and shipped(bundle, "fast_debug")["min_confidence"] == 0.1


def test_profile_fit_records_outlive_runs_that_do_not_measure_that_profile(tmp_path: Path) -> None:
    bundle = _raw_configs(tmp_path)
    fast = _fit(0.1, -2.0)
    write_fits(bundle, _fit(0.1, -1.0), {"fast_debug": fast})
    recorded = kept_profile_fits(None, {"fast_debug": fast}, bundle)
    assert recorded == {"fast_debug": fast}
    assert kept_profile_fits(recorded, {}, bundle) == recorded  # a later run of production only
    reset(bundle)
    assert kept_profile_fits(recorded, {}, bundle) == {}  # new weights: the record goes with the fit


def test_a_fit_for_every_profile_under_all_counts_and_a_created_entry_goes_with_its_reset(tmp_path: Path) -> None:
    bundle = _raw_configs(tmp_path)
    (bundle / "configs" / "profiles.json").unlink()
    fit = {"a": 1.0, "b": 0.0, "c": -1.0, "d": 0.0}
    write_profile(bundle, "all", fit, 0.3)
    assert shipped(bundle, "production") == shipped(bundle) == {"calibration": fit, "min_confidence": 0.3}
    assert not is_raw(bundle)
    reset(bundle)
    assert json.loads((bundle / "configs" / "profiles.json").read_text()) == {} and is_raw(bundle)
    assert not [p for p in (bundle / "configs").iterdir() if "partial" in p.name]


def test_a_config_without_the_entries_is_refused_not_silently_left_as_it_was(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    config = json.loads((DEFAULT_BUNDLE / "configs" / "inference.json").read_text())
    del config["min_confidence"]
    (configs / "inference.json").write_text(json.dumps(config))
    assert not holds_fit(tmp_path)
    with pytest.raises(ValueError, match="min_confidence"):
        write(tmp_path, {"a": 1.5, "b": -0.2, "c": -1.0, "d": -0.9}, 0.15)
    assert json.loads((configs / "inference.json").read_text()) == config


def test_the_record_of_the_shipped_fit_outlives_runs_that_do_not_refit() -> None:
    earlier = {"parameters": {"a": 1.5, "b": 0.0, "c": -1.0, "d": -1.0}, "min_confidence": 0.1}
    shipped = {"calibration": earlier["parameters"], "min_confidence": 0.1}
    assert kept_fit(earlier, {"parameters": IDENTITY}, shipped) == earlier  # a plain evaluation
    refit = {"parameters": {"a": 1.2, "b": 0.0, "c": -1.0, "d": -0.5}, "written": True}
    assert kept_fit(earlier, refit, shipped) == refit
    assert kept_fit(earlier, {"parameters": IDENTITY}, {"calibration": IDENTITY, "min_confidence": 0.0}) is None


def test_a_checkpoint_runs_raw_in_a_copy_of_the_bundle_and_a_bundle_as_it_ships(tmp_path: Path) -> None:
    from models.checkpoints import candidate_bundle

    weights = tmp_path / "run" / "step00500.pt"
    weights.parent.mkdir()
    shutil.copy(DEFAULT_BUNDLE / "models" / "model.pt", weights)
    copy = candidate_bundle(weights, DEFAULT_BUNDLE, tmp_path)
    # The shipped fit belongs to the shipped weights; a profile's own network keeps its own.
    assert copy != DEFAULT_BUNDLE and runs_raw(copy, "production") and runs_raw(copy, "research")
    assert all(shipped(copy, name) == shipped(DEFAULT_BUNDLE, name) for name in own_networks(copy))
    assert not is_raw(DEFAULT_BUNDLE)
    assert candidate_bundle(DEFAULT_BUNDLE, DEFAULT_BUNDLE, tmp_path) == DEFAULT_BUNDLE


def test_a_checkpoint_of_a_profile_network_replaces_its_weights_and_its_fit_alone(tmp_path: Path) -> None:
    from models.checkpoints import candidate_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    profiles = json.loads((bundle / "configs" / "profiles.json").read_text())
    profiles["fast_debug"] |= {"weights": "models/fast.pt"}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    shutil.copy(bundle / "models" / "model.pt", bundle / "models" / "fast.pt")
    weights = tmp_path / "run" / "step00500.pt"
    weights.parent.mkdir()
    torch.save({"other": torch.zeros(1)}, weights)
    copy = candidate_bundle(weights, bundle, tmp_path / "scratch", "fast_debug")
    assert (copy / "models" / "fast.pt").read_bytes() == weights.read_bytes()
    assert (copy / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    assert shipped(copy) == shipped(bundle) and not is_raw(copy)  # production keeps the fit of its weights
    assert shipped(copy, "fast_debug") == {"calibration": IDENTITY, "min_confidence": 0.0}


def test_the_calibration_reads_each_finding_as_the_engine_measured_it_on_the_model_grid() -> None:
    phantom = _phantom()
    labels = np.zeros(phantom.image.shape, dtype=np.uint8)
    labels[3:6, 3:6, 3:6] = 1
    labels[12:14, 12:14, 12:14] = 2
    prob = np.zeros(labels.shape, np.float32)
    prob[3:6, 3:6, 3:6] = np.float32(0.8123)  # each finding's confidence, painted as the engine does
    prob[12:14, 12:14, 12:14] = np.float32(0.6001)
    records = [
        {"confidence": 0.8123, "mean_probability": 0.74, "volume_mm3": 31.0, "elongation": 1.2},
        {"confidence": 0.6001, "mean_probability": 0.58, "volume_mm3": 9.5, "elongation": 2.6},
    ]
    result = score(phantom, labels, {1: "hypodense lesion", 2: "hyperdense lesion"}, prob, 1.0, records)
    by_truth = {f.true: f for f in result.findings}
    assert by_truth[True].engine == (0.74, 31.0, 1.2) and by_truth[False].engine == (0.58, 9.5, 2.6)
    x, _ = features([by_truth[True]])
    assert x[0].tolist() == pytest.approx([np.log(0.74 / 0.26), np.log(31.0), 1.2])
    # Two records of one confidence: which is which cannot be told, so the scan's grid is read.
    twins = [dict(records[0]), dict(records[0], elongation=2.0)]
    again = score(phantom, labels, {1: "hypodense lesion", 2: "hyperdense lesion"}, prob, 1.0, twins)
    assert all(f.engine is None for f in again.findings)
    x, _ = features([f for f in again.findings if f.true])
    assert x[0, 0] == pytest.approx(np.log(0.8123 / 0.1877), abs=1e-4) and x[0, 1] == pytest.approx(np.log(27.0))


def test_a_fit_in_a_setup_for_small_patients_belongs_to_the_network_that_setup_runs(tmp_path: Path) -> None:
    """fast_debug runs a network of its own for adults and the bundle's for small patients, each
    with a fit: new weights of the bundle's network reset the small setup's fit, not fast_debug's."""
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE / "configs", bundle / "configs")
    adults, children = {"a": 0.8, "b": 0.1, "c": -0.3, "d": -1.0}, {"a": 1.2, "b": 0.0, "c": -0.5, "d": 0.0}
    small = {"below_mm": 200, "body_above": -350.0, "calibration": children, "min_confidence": 0.2}
    entry = {"weights": "models/fast_debug.pt", "calibration": adults, "min_confidence": 0.1, "small_patients": small}
    (bundle / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": entry}))
    assert profile_fits(bundle) == ["fast_debug", "fast_debug@small"] and not is_raw(bundle)
    assert shipped(bundle, "fast_debug@small") == {"calibration": children, "min_confidence": 0.2}
    assert shipped(bundle, "fast_debug")["calibration"] == adults
    reset(bundle)
    assert shipped(bundle, "fast_debug") == {"calibration": adults, "min_confidence": 0.1}
    assert shipped(bundle, "fast_debug@small") == shipped(bundle) == {"calibration": IDENTITY, "min_confidence": 0.0}
    after = json.loads((bundle / "configs" / "profiles.json").read_text())["fast_debug"]
    assert after["small_patients"] == {"below_mm": 200, "body_above": -350.0}
    # A small setup with weights of its own keeps its fit.
    entry["small_patients"] = small | {"weights": "models/small.pt"}
    (bundle / "configs" / "profiles.json").write_text(json.dumps({"fast_debug": entry}))
    reset(bundle)
    assert shipped(bundle, "fast_debug@small") == {"calibration": children, "min_confidence": 0.2}
