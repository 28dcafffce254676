"""A candidate's lesion score: how lesion-like the post-processing finds what the network drew.

The network's mean probability over a candidate tells lesions from look-alikes only in part: on
unseen training-family phantoms the candidates it drew at the threshold were 1 lesion in 7, and
the look-alikes among them are thin (vessels, an organ's rim), sit where the tissue around them
varies (organ edges, bowel) or peak in one voxel. The score weighs what the post-processing
measures of a candidate (`FEATURES`) by a logistic regression fitted on training-family
phantoms (`python -m models.fit_lesion_score`); the confidence calibration then maps the score,
where it mapped the mean probability, on the held-out family. Without weights (`{}` in the
bundle's `lesion_score`) the score is the mean probability, as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# What a candidate is measured by (each a number the score weighs):
FEATURES = (
    "logit_mean",  # logit of the network's mean probability over it
    "logit_max",  # ... and of its highest
    "log_volume",  # ln of its volume in mm3
    "elongation",  # length over width (`models.transforms.elongation`)
    "shell_hu_sd",  # spread of the HU just around it, in 100 HU: uneven surroundings are edges
    "lung",  # 1 when it lies in lung parenchyma
)
BIAS = "bias"


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-min(max(z, -500.0), 500.0)))  # a steep fit must not overflow exp


def measure(
    prob: np.ndarray, volume_mm3: float, length: float, shell_hu: np.ndarray, in_lung: bool
) -> dict[str, float]:
    """The features of a candidate from its probabilities and the HU of the shell around it."""
    return {
        "logit_mean": logit(float(prob.mean())),
        "logit_max": logit(float(prob.max())),
        "log_volume": math.log(max(volume_mm3, 1e-3)),
        "elongation": length,
        "shell_hu_sd": float(shell_hu.std()) / 100.0 if shell_hu.size else 0.0,
        "lung": float(in_lung),
    }


@dataclass(frozen=True)
class LesionScore:
    """sigmoid(bias + sum of weight x feature); no weights and no bias (`{}`): the mean probability."""

    weights: Mapping[str, float] = field(default_factory=dict)
    bias: float = 0.0

    @classmethod
    def of(cls, params: Mapping[str, float] | None) -> LesionScore:
        params = dict(params or {})
        unknown = set(params) - {BIAS, *FEATURES}
        if unknown:
            raise ValueError(f"lesion_score: unknown features {sorted(unknown)}; known: {list(FEATURES)}")
        bias = float(params.pop(BIAS, 0.0))
        return cls({k: float(v) for k, v in params.items()}, bias)

    def score(self, features: Mapping[str, float]) -> float:
        if not self.weights and self.bias == 0.0:
            return sigmoid(features["logit_mean"])
        return sigmoid(self.bias + sum(w * features[name] for name, w in self.weights.items()))
