"""A bundle's confidence fit and floor as its configs/inference.json holds them.

`calibration` ({"a", "b", "c", "d"}: see `models.transforms.Calibration`) and `min_confidence` are
top-level entries that the post-processing reads by reference. A profile may have its own in
configs/profiles.json (the same ids, overridden for that profile): a coarser grid measures a
finding otherwise, so one fit does not suit every profile. A fit belongs to the weights it was
made on: training the bundle's network resets its fits to the identity (raw scores, no floor)
and its lesion score (`models.lesion_score`, fitted by `models.fit_lesion_score`) to none (the
score is then the mean probability), training a profile's own network (configs/profiles.json
names its "weights") that profile's alone, and `models.evaluate --calibrate` fits and writes what
runs raw again. A
profile's setup for small patients ("<profile>@small", its entry's `small_patients`) is an entry
of its own here: a fit written there by hand belongs to the network that setup runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from models.bundle import PROFILE_WEIGHTS, SMALL_PATIENTS, SMALL_SETUP, profile_of
from models.transforms import Calibration

IDENTITY = dataclasses.asdict(Calibration())  # the raw score
FIT_KEYS = ("calibration", "min_confidence")


def _config_file(bundle: Path) -> Path:
    return bundle / "configs" / "inference.json"


def _profiles_file(bundle: Path) -> Path:
    return bundle / "configs" / "profiles.json"


def _profiles(bundle: Path) -> dict[str, Any]:
    profiles_file = _profiles_file(bundle)
    return json.loads(profiles_file.read_text()) if profiles_file.is_file() else {}


def shipped(bundle: Path, profile: str | None = None) -> dict[str, Any]:
    """The calibration and confidence floor the bundle runs with (in `profile`, a profile or a
    setup, where given): its config's, under profiles.json's "all" (which the bundle loader applies
    to every profile), under the profile's own (a setup for small patients: its own entry's)."""
    config = json.loads(_config_file(bundle).read_text())
    own = {"calibration": config.get("calibration"), "min_confidence": config.get("min_confidence", 0.0)}
    profiles = _profiles(bundle)
    for layer in ["all"] + ([profile] if profile is not None else []):
        overrides = _entry(profiles, layer)
        own |= {key: overrides[key] for key in FIT_KEYS if key in overrides}
    return own


def _entry(profiles: dict[str, Any], setup: str) -> dict[str, Any]:
    if setup.endswith(SMALL_SETUP):
        inner: dict[str, Any] = profiles.get(profile_of(setup), {}).get(SMALL_PATIENTS, {})
        return inner
    outer: dict[str, Any] = profiles.get(setup, {})
    return outer


def _without_fit(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in FIT_KEYS}


def own_networks(bundle: Path) -> set[str]:
    """The profiles that run a network of their own: a fit of production's network is not theirs."""
    return {name for name, overrides in _profiles(bundle).items() if PROFILE_WEIGHTS in overrides}


def profile_fits(bundle: Path) -> list[str]:
    """The profiles and setups with a fit of their own ("all" counts: it is one for every profile)."""
    profiles = _profiles(bundle)
    names = [*profiles, *(name + SMALL_SETUP for name, o in profiles.items() if SMALL_PATIENTS in o)]
    return [name for name in names if any(key in _entry(profiles, name) for key in FIT_KEYS)]


def runs_raw(bundle: Path, profile: str | None = None) -> bool:
    """The bundle (or `profile`) reports raw scores: identity calibration, no floor."""
    own = shipped(bundle, profile)
    return Calibration.of(own["calibration"]) == Calibration() and float(own["min_confidence"]) == 0.0


def is_raw(bundle: Path) -> bool:
    """The bundle reports raw scores in every profile: identity calibration (missing
    terms count as such), no confidence floor, no profile with a fit of its own."""
    return runs_raw(bundle) and not profile_fits(bundle)


def holds_fit(bundle: Path) -> bool:
    """The config has both entries, so a fit can be written (and must be reset with new weights)."""
    config_file = _config_file(bundle)
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return "calibration" in config and "min_confidence" in config


def write(bundle: Path, params: dict[str, float], floor: float) -> None:
    """Rewrite the two entries in place (the rest of the file keeps its layout), and check that
    the file now says what was asked: a config laid out otherwise fails here, not silently."""
    config_file = _config_file(bundle)
    text = re.sub(
        r'"calibration"\s*:\s*\{[^{}]*\}', '"calibration": ' + json.dumps(params), config_file.read_text(), count=1
    )
    text = re.sub(r'"min_confidence"\s*:\s*[0-9.eE+-]+', f'"min_confidence": {floor}', text, count=1)
    config = json.loads(text)
    if config.get("calibration") != params or float(config.get("min_confidence", 0.0)) != floor:
        raise ValueError(
            f"{config_file}: could not set calibration {params} and min_confidence {floor}: it needs both as "
            "top-level entries (the post-processing passes @calibration and @min_confidence to LesionFindingsd)"
        )
    _replace(config_file, text)


def write_profile(bundle: Path, profile: str, params: dict[str, float], floor: float) -> None:
    """A fit of `profile`'s own, in configs/profiles.json (kept one line per profile)."""
    profiles = _profiles(bundle)
    profiles[profile] = profiles.get(profile, {}) | {"calibration": params, "min_confidence": floor}
    _write_profiles(bundle, profiles)


def write_score(bundle: Path, params: dict[str, float], profile: str | None = None) -> None:
    """`lesion_score` (`models.lesion_score`) in inference.json, in place like `write`; or in
    `profile`'s own entry of profiles.json (a profile with a network of its own)."""
    if profile is not None:
        profiles = _profiles(bundle)
        profiles[profile] = profiles.get(profile, {}) | {"lesion_score": params}
        _write_profiles(bundle, profiles)
        return
    config_file = _config_file(bundle)
    entry = '"lesion_score": ' + json.dumps(params)
    text, count = re.subn(r'"lesion_score"\s*:\s*\{[^{}]*\}', entry, config_file.read_text(), count=1)
    if count != 1 or json.loads(text).get("lesion_score") != params:
        raise ValueError(f"{config_file}: no top-level lesion_score entry to write {params} into")
    _replace(config_file, text)


def reset_profile(bundle: Path, profile: str) -> None:
    """New weights of `profile`'s own network: its fit raw (identity, no floor) and no score."""
    profiles = _profiles(bundle)
    raw = {"calibration": IDENTITY, "min_confidence": 0.0, "lesion_score": {}}
    profiles[profile] = profiles.get(profile, {}) | raw
    _write_profiles(bundle, profiles)


def inherit(bundle: Path, profile: str) -> None:
    """`profile` runs with production's fit: its own entries go (and an entry left empty)."""
    profiles = _profiles(bundle)
    own = {key: value for key, value in profiles.get(profile, {}).items() if key not in FIT_KEYS}
    _write_profiles(
        bundle, {name: own if name == profile else o for name, o in profiles.items() if name != profile or own}
    )


def _write_profiles(bundle: Path, profiles: dict[str, Any]) -> None:
    lines = [f"  {json.dumps(name)}: {json.dumps(overrides)}" for name, overrides in profiles.items()]
    _replace(_profiles_file(bundle), "{\n" + ",\n".join(lines) + "\n}\n")


def _replace(target: Path, text: str) -> None:
    """Written beside `target` under a name of this process's and renamed over it: the bundle
    loader never reads a half-written config, whoever else writes one at the same time."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(target)


def score_of(bundle: Path, profile: str | None = None) -> dict[str, float]:
    """The lesion score `profile` (or the bundle's network) runs with; {} is none."""
    own = json.loads(_config_file(bundle).read_text()).get("lesion_score") or {}
    entry = _profiles(bundle).get(profile, {}) if profile is not None else {}
    return dict(entry.get("lesion_score", own))


def reset(bundle: Path) -> None:
    """New weights of the bundle's network: its fits belong to the old ones, so it reports raw
    probabilities in every profile that runs it until `models.evaluate --calibrate` fits again
    (a profile with a network of its own keeps its fit). A config without the two entries keeps its
    layout; profiles lose their fits, and an entry left empty goes."""
    if holds_fit(bundle):
        write(bundle, IDENTITY, 0.0)
    if score_of(bundle):
        write_score(bundle, {})  # fitted on the old weights' candidates too
    if profile_fits(bundle):
        own = own_networks(bundle)
        unfitted = {
            name: _small_unfitted(o if name in own else _without_fit(o)) for name, o in _profiles(bundle).items()
        }
        _write_profiles(bundle, {name: overrides for name, overrides in unfitted.items() if overrides})


def _small_unfitted(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its setup for small patients unfitted where that setup runs the bundle's network."""
    inner = entry.get(SMALL_PATIENTS)
    if not isinstance(inner, dict) or PROFILE_WEIGHTS in inner:
        return entry
    return entry | {SMALL_PATIENTS: _without_fit(inner)}
