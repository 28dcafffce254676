"""Training's own logic: the world it draws phantoms from and the pool a second process refreshes
(pure logic and a real child process; no training is run)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from models.train import Recipe, Sample, World, cosine_lr, patch_center
from models.train_pool import SamplePool

FINE, COARSE = (1.25, 1.25, 1.25), (2.0, 2.0, 2.0)


def test_the_world_mixes_grids_between_production_and_fast_debug_and_both_phantom_kinds() -> None:
    world = World(FINE, COARSE, realistic_share=0.75)
    draws = [world.draw(np.random.default_rng(seed)) for seed in range(400)]
    spacings = [d[0] for d in draws]
    assert 0.4 < spacings.count(FINE) / 400 < 0.6 and 0.2 < spacings.count(COARSE) / 400 < 0.4
    between = [s for s in spacings if s not in (FINE, COARSE)]
    assert between and all(FINE[0] < s[0] < COARSE[0] for s in between)
    assert 0.65 < np.mean([d[1] for d in draws]) < 0.85


def _sample(seed: int, lesion: bool = True) -> Sample:
    image = torch.full((8, 8, 8), float(seed))
    label = torch.zeros((8, 8, 8), dtype=torch.uint8)
    lesions = np.array([[1, 1, 1]]) if lesion else np.zeros((0, 3), dtype=np.int64)
    return Sample(image, label, lesions, np.array([[2, 2, 2]]), np.array([[3, 3, 3]]))


@dataclass(frozen=True)
class TinyMaker:
    """A picklable stand-in for SampleMaker: the seed is the image's value."""

    def __call__(self, seed: int) -> Sample:
        return _sample(seed)


def test_the_pool_swaps_fresh_samples_in_from_its_producer() -> None:
    pool = SamplePool(TinyMaker(), size=3, first_seed=100, sample_type=Sample)
    try:
        assert [float(s.image[0, 0, 0]) for s in pool.samples] == [100.0, 101.0, 102.0]
        assert isinstance(pool.samples[0].image, torch.Tensor) and pool.samples[0].lesion_voxels.shape == (1, 3)
        deadline = time.monotonic() + 30
        while pool.replaced < 4 and time.monotonic() < deadline:
            pool.refresh()
            time.sleep(0.05)
        seen = sorted(float(s.image[0, 0, 0]) for s in pool.samples)
        assert pool.replaced >= 4 and seen[0] >= 103.0  # the first three are gone, oldest first
    finally:
        pool.close()
    assert not pool._process.is_alive()


@dataclass(frozen=True)
class BrokenMaker:
    def __call__(self, seed: int) -> Sample:
        raise ValueError(f"phantom {seed} has no body")


def test_a_producer_that_fails_stops_training_instead_of_freezing_the_pool() -> None:
    with pytest.raises(RuntimeError, match="producer exited"):
        SamplePool(BrokenMaker(), size=2, first_seed=0, sample_type=Sample)


def test_the_learning_rate_follows_a_cosine_to_the_floor() -> None:
    recipe = Recipe(lr=1e-3)
    assert cosine_lr(0.0, recipe) == pytest.approx(1e-3)
    assert cosine_lr(0.5, recipe) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(1.0, recipe) == cosine_lr(1.7, recipe) == pytest.approx(1e-5)


def test_patches_centre_on_lesions_body_or_look_alikes_as_the_shares_say() -> None:
    rng = np.random.default_rng(0)
    sample = _sample(0)
    assert (patch_center(sample, 4, rng, (0.0, 1.0, 0.0, 0.0)) == [2, 2, 2]).all()
    assert (patch_center(sample, 4, rng, (0.0, 0.0, 1.0, 0.0)) == [3, 3, 3]).all()
    centre = patch_center(sample, 4, rng, (1.0, 0.0, 0.0, 0.0))
    assert (np.abs(centre - 1) <= 1).all()  # a lesion voxel, shifted by up to a quarter patch
    # A phantom without lesions (organs out of view) falls through to the other kinds.
    assert (patch_center(_sample(0, lesion=False), 4, rng, (0.5, 0.5, 0.0, 0.0)) == [2, 2, 2]).all()
