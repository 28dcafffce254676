"""The inference engine and its bundle, on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import Bundle, BundleError
from models.engine import InferenceEngine, choose_device
from models.evaluate import DEFAULT_BUNDLE
from models.phantom import generate_phantom
from schemas.jobs import Profile


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    loaded = InferenceEngine(DEFAULT_BUNDLE, device="cpu", threads=2)
    loaded.load()
    return loaded


@pytest.fixture(scope="module")
def small_phantom():  # type: ignore[no-untyped-def]
    return generate_phantom(77, (96, 96, 40), (1.6, 1.6, 3.0), lesion_count=(2, 2), lesion_diameter_mm=(15.0, 25.0))


def test_bundle_is_a_monai_bundle() -> None:
    bundle = Bundle.load(DEFAULT_BUNDLE)
    assert bundle.name == "medical_segmentation_v1"
    assert bundle.metadata["version"] == bundle.version
    assert "network_data_format" in bundle.metadata
    for profile in Profile:
        config = bundle.profile(profile)
        assert config.spacing_mm[0] > 0 and 0 <= config.overlap < 1
    assert bundle.profile(Profile.FAST_DEBUG).spacing_mm > bundle.profile(Profile.PRODUCTION).spacing_mm
    assert bundle.profile(Profile.FAST_DEBUG).overlap == 0.0
    assert (DEFAULT_BUNDLE / "models" / "model.pt").stat().st_size < 8 * 2**20


def test_bundle_without_weights_is_refused(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_BUNDLE / "configs", tmp_path / "configs")
    with pytest.raises(BundleError, match=r"model\.pt"):
        Bundle.load(tmp_path)


def test_device_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "auto" follows what torch finds, on any machine; "cpu" is the CPU even with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto").type == "cuda"
    assert choose_device("cpu").type == "cpu"


def test_prediction_is_in_the_input_grid(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    prediction = engine.predict(small_phantom.image, small_phantom.affine, Profile.FAST_DEBUG)
    probability = prediction.probability
    assert probability.shape == small_phantom.image.shape
    assert probability.dtype == np.float32
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    assert set(prediction.timings) == {"preprocess", "network", "postprocess"}


def test_prediction_follows_the_anatomy_not_the_array_layout(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    """The same scan stored with flipped and swapped axes gives the same answer in patient space."""
    image, affine = small_phantom.image, small_phantom.affine
    base = engine.predict(image, affine, Profile.FAST_DEBUG).probability

    # Swap the first two axes and flip the new first one; adjust the affine to match.
    stored = np.flip(np.swapaxes(image, 0, 1), axis=0).copy()
    permute = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = stored.shape[0] - 1
    stored_affine = affine @ permute @ flip
    other = engine.predict(stored, stored_affine, Profile.FAST_DEBUG).probability
    back = np.swapaxes(np.flip(other, axis=0), 0, 1)
    assert np.abs(back - base).max() < 1e-3


def test_lesions_are_found(engine: InferenceEngine, small_phantom) -> None:  # type: ignore[no-untyped-def]
    from models.evaluate import dice

    probability = engine.predict(small_phantom.image, small_phantom.affine, Profile.PRODUCTION).probability
    assert dice(probability >= 0.55, small_phantom.lesion_mask) > 0.7


def test_phantom_refuses_a_field_of_view_too_small_for_an_abdomen() -> None:
    import pytest

    from models.phantom import generate_phantom

    with pytest.raises(ValueError, match="field of view"):
        generate_phantom(7, (96, 80, 24), (0.9, 0.9, 2.5))
