"""A candidate's lesion score: its features, the score, its fit and where the fit is written (pure logic)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.confidence_fit import reset, write_score
from models.evaluate import Finding
from models.fit_lesion_score import fit
from models.lesion_score import FEATURES, LesionScore, measure

BUNDLE = Path(__file__).parent.parent / "models" / "medical_segmentation_v1"


def test_without_weights_the_lesion_score_is_the_mean_probability() -> None:
    features = measure(np.array([0.6, 0.8, 0.7]), 100.0, 1.5, np.array([40.0, 60.0]), False)
    assert LesionScore.of({}).score(features) == pytest.approx(0.7, abs=1e-9)
    assert features["logit_max"] == pytest.approx(math.log(0.8 / 0.2)) and features["shell_hu_sd"] == 0.1
    thin = LesionScore.of({"bias": 0.0, "elongation": -1.0})
    assert thin.score(features) == pytest.approx(1.0 / (1.0 + math.exp(1.5)))
    with pytest.raises(ValueError, match="unknown features"):
        LesionScore.of({"colour": 1.0})


def test_the_fit_weighs_what_tells_lesions_apart_and_writes_into_the_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    findings = []
    for i in range(200):
        true = i % 4 == 0
        values = {name: float(rng.normal()) for name in FEATURES}
        values["elongation"] = float(rng.normal(1.4 if true else 2.4, 0.3))  # look-alikes are thin
        findings.append(Finding(0.7, 100.0, true, features=values))
    params = fit(findings)
    assert params["elongation"] < -1.0 and all(abs(params[n]) < 0.5 for n in FEATURES if n != "elongation")
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    write_score(bundle, params)
    assert json.loads((bundle / "configs" / "inference.json").read_text())["lesion_score"] == params
    reset(bundle)  # new weights: the score belongs to the old ones' candidates
    assert json.loads((bundle / "configs" / "inference.json").read_text())["lesion_score"] == {}


def test_the_post_processing_calibrates_the_score_and_records_what_it_measured() -> None:
    from tests.test_transforms import run, scene

    hu, spots = scene()
    plain = run(hu, spots)["findings"]
    assert all(f["lesion_score"] == pytest.approx(f["mean_probability"], abs=1e-4) for f in plain)
    assert all(set(f["features"]) == set(FEATURES) for f in plain)
    # A score that calls nothing a lesion: every finding falls under a floor the mean would pass.
    doubted = run(hu, spots, lesion_score={"bias": -5.0}, min_confidence=0.05)
    assert doubted["findings"] == [] and {d["reason"] for d in doubted["dropped"]} >= {"faint"}


def test_too_few_true_candidates_fit_no_score() -> None:
    findings = [Finding(0.7, 100.0, i < 3, features=dict.fromkeys(FEATURES, float(i))) for i in range(50)]
    assert fit(findings) == {}


def test_a_new_production_score_resets_every_fit_made_on_the_old_one(tmp_path: Path) -> None:
    from models import confidence_fit
    from models.fit_lesion_score import write
    from schemas.jobs import Profile

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    profiles = json.loads((bundle / "configs" / "profiles.json").read_text())
    profiles["research"] |= {"calibration": {"a": 2.0}, "min_confidence": 0.2}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    fast_before = confidence_fit.shipped(bundle, "fast_debug")
    write(bundle, Profile.PRODUCTION, {"bias": 0.5, "elongation": -2.0})
    assert confidence_fit.score_of(bundle) == {"bias": 0.5, "elongation": -2.0}
    assert confidence_fit.runs_raw(bundle, "production") and confidence_fit.runs_raw(bundle, "research")
    # fast_debug's own network keeps its fit and its choice of no score.
    assert confidence_fit.shipped(bundle, "fast_debug") == fast_before
    assert confidence_fit.score_of(bundle, "fast_debug") == {}
