"""Label maps from what a bundle leaves in `pred`: the discreteness check, exact however it is sped up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import labels
from models.labels import is_discrete, to_label_maps


def test_a_fraction_the_sample_misses_still_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labels, "_CHUNK", 1000)  # several chunks
    values = torch.zeros(10_000)
    values[1] = 0.5  # between two sampled voxels
    assert not is_discrete(values)
    values[1] = 1.0
    assert is_discrete(values)
    assert is_discrete(values.to(torch.uint8))


def test_probability_maps_and_nan_are_not_discrete() -> None:
    assert not is_discrete(torch.rand(4, 5, 6))
    values = torch.zeros(3, 3)
    values[2, 2] = float("nan")
    assert not is_discrete(values)


def test_the_callers_check_is_used_as_given() -> None:
    pred = torch.tensor([[[[0.2, 0.7]]]])
    thresholded = to_label_maps(pred, None, 0.5)
    assert thresholded.labels.tolist() == [[[0, 1]]]
    assert thresholded.probability is not None
    as_labels = to_label_maps(torch.tensor([[[[0.0, 1.0]]]]), None, 0.5, discrete=True)
    assert as_labels.labels.tolist() == [[[0, 1]]] and as_labels.probability is None


def test_background_voxels_get_the_foreground_channels_summed() -> None:
    """Sigmoid channels need not sum to 1: a background voxel's foreground probability is the
    sum of the other channels (at most 1), not 1 - p(background)."""
    pred = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])  # one-hot labels 0 and 1 (two channels)
    captured = torch.tensor([[[[0.1, 0.2]]], [[[0.3, 0.9]]]])
    maps = to_label_maps(pred, captured, 0.5)
    assert maps.labels.tolist() == [[[0, 0]]]
    assert maps.probability is not None
    assert np.allclose(maps.probability, [[[0.3, 0.9]]])
    three = torch.tensor([[[[0.2]]], [[[0.7]]], [[[0.6]]]])
    clamped = to_label_maps(torch.zeros(1, 1, 1, 1), three, 0.5)
    assert clamped.probability is not None and clamped.probability.tolist() == [[[1.0]]]


def test_labels_the_bundle_made_are_never_probabilities() -> None:
    """After the bundle's own AsDiscreted, interpolation leaves floats between labels: one channel
    is rounded to the nearest label, one-hot channels give their largest; neither is a probability."""
    one = to_label_maps(torch.tensor([[[[0.0, 0.4, 1.6, 2.0]]]]), None, 0.5, labelled=True)
    assert one.labels.tolist() == [[[0, 0, 2, 2]]] and one.probability is None
    one_hot = torch.tensor([[[[0.8, 0.3]]], [[[0.2, 0.0]]], [[[0.0, 0.7]]]])
    several = to_label_maps(one_hot, None, 0.5, labelled=True)
    assert several.labels.tolist() == [[[0, 2]]] and several.probability is None
