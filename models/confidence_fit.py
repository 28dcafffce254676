"""A bundle's confidence fit and floor as its configs/inference.json holds them.

`calibration` ({"a", "b", "c", "d"}: see `models.transforms.Calibration`) and `min_confidence` are
top-level entries that the post-processing reads by reference. A fit belongs to the weights it
was made on: training resets it to the identity (raw mean probabilities, no floor), and
`models.evaluate --calibrate` fits and writes it again.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from models.transforms import Calibration

IDENTITY = dataclasses.asdict(Calibration())  # the raw mean probability


def _config_file(bundle: Path) -> Path:
    return bundle / "configs" / "inference.json"


def shipped(bundle: Path) -> dict[str, Any]:
    """The bundle's own calibration and confidence floor, as its config has them."""
    config = json.loads(_config_file(bundle).read_text())
    return {"calibration": config.get("calibration"), "min_confidence": config.get("min_confidence", 0.0)}


def is_raw(bundle: Path) -> bool:
    """The bundle reports raw mean probabilities: identity calibration (missing terms count as
    such), no confidence floor."""
    own = shipped(bundle)
    return Calibration.of(own["calibration"]) == Calibration() and float(own["min_confidence"]) == 0.0


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
    config_file.write_text(text)


def reset(bundle: Path) -> None:
    """New weights in `bundle`: its fit belongs to the old ones, so it reports raw probabilities
    until `models.evaluate --calibrate` fits again (a bundle without the entries is left alone)."""
    if holds_fit(bundle):
        write(bundle, IDENTITY, 0.0)
