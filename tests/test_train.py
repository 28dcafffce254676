"""Training's own logic: the world it draws phantoms from and the pool a second process refreshes
(pure logic and a real child process; no training is run)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models import confidence_fit
from models.evaluate import DEFAULT_BUNDLE
from models.phantom import MIN_FOV_MM, small_body_acquisition
from models.train import (
    Batch,
    Recipe,
    Sample,
    SampleMaker,
    Target,
    World,
    blob_dice_loss,
    cosine_lr,
    draw_batch,
    lesion_loss,
    number_lesions,
    patch_center,
)
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


def test_small_bodies_are_simple_phantoms_whose_trunk_is_a_childs() -> None:
    fields = [n[0] * s[0] for n, s in (small_body_acquisition(np.random.default_rng(k)) for k in range(50))]
    assert all(max(150.0, MIN_FOV_MM) <= f <= 250.0 for f in fields) and max(fields) - min(fields) > 50
    # The trunk fills the field of view: at 2 mm a small body is at most 125 voxels across.
    world = World(COARSE, COARSE, realistic_share=0.0)
    small, usual = SampleMaker(world, small_body_share=1.0)(7), SampleMaker(world)(7)
    assert max(small.image.shape[:2]) <= 126 < max(usual.image.shape[:2])


def test_a_profile_network_trains_at_its_grid_alone_into_its_own_weights(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    # fast_debug on the bundle's network: that network trains at production's grid and fast_debug's.
    profiles = {"fast_debug": {"spacing": [1.5, 1.5, 1.5]}, "production": {"min_volume_mm3": 5.0}}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    whole = Target.of(bundle, 0.75)
    assert whole.weights == bundle / "models" / "model.pt" and whole.world.coarse == (1.5, 1.5, 1.5) != whole.world.fine
    with pytest.raises(ValueError, match="no network of its own"):
        Target.of(bundle, 0.75, "fast_debug")
    profiles["fast_debug"] = {"spacing": [2.5, 2.5, 2.5], "weights": "models/fast.pt"}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    own = Target.of(bundle, 0.75, "fast_debug")
    assert own.weights == bundle / "models" / "fast.pt"
    assert {own.world.draw(np.random.default_rng(seed))[0] for seed in range(50)} == {(2.5, 2.5, 2.5)}
    assert own.network().windows == whole.network().windows  # type: ignore[union-attr]
    # Its config ids reach network_def as the engine's parser resolves them ("@windows").
    profiles["fast_debug"]["windows"] = [[-160.0, 240.0]]
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    assert Target.of(bundle, 0.75, "fast_debug").network().windows == [(-160.0, 240.0)]  # type: ignore[union-attr]
    # The bundle's own network no longer serves fast_debug's grid: production's alone.
    assert {Target.of(bundle, 0.75).world.draw(np.random.default_rng(s))[0] for s in range(50)} == {whole.world.fine}
    # Unless fast_debug's setup for small patients runs it (as the default bundle's does): its grid too.
    small = {"below_mm": 200, "body_above": -350.0, "spacing": [1.75, 1.75, 1.75]}
    (bundle / "configs" / "profiles.json").write_text(
        json.dumps(profiles | {"fast_debug": profiles["fast_debug"] | {"small_patients": small}})
    )
    assert Target.of(bundle, 0.75).world.coarse == (1.75, 1.75, 1.75)
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    # New weights of fast_debug's: its fit and score go raw; production's (other weights) stay.
    before = confidence_fit.shipped(bundle)
    confidence_fit.write_score(bundle, {"bias": -1.0, "elongation": -2.0}, "fast_debug")
    own.reset_fit()
    assert confidence_fit.shipped(bundle) == before
    assert confidence_fit.score_of(bundle, "fast_debug") == {}
    assert confidence_fit.shipped(bundle, "fast_debug") == {
        "calibration": confidence_fit.IDENTITY,
        "min_confidence": 0.0,
    }


def _sample(seed: int, lesion: bool = True) -> Sample:
    image = torch.full((8, 8, 8), float(seed))
    label = torch.zeros((8, 8, 8), dtype=torch.uint8)
    lesions = [np.array([[1, 1, 1]])] if lesion else []
    label[1, 1, 1] = int(lesion)
    return Sample(
        image, label, lesions, np.array([[2, 2, 2]]), np.array([[3, 3, 3]]), np.ones(1 + int(lesion), np.float32)
    )


@dataclass(frozen=True)
class TinyMaker:
    """A picklable stand-in for SampleMaker: the seed is the image's value."""

    def __call__(self, seed: int) -> Sample:
        return _sample(seed)


def test_the_pool_swaps_fresh_samples_in_from_its_producer() -> None:
    pool = SamplePool(TinyMaker(), size=3, first_seed=100, sample_type=Sample)
    try:
        assert [float(s.image[0, 0, 0]) for s in pool.samples] == [100.0, 101.0, 102.0]
        assert isinstance(pool.samples[0].image, torch.Tensor) and pool.samples[0].lesions[0].shape == (1, 3)
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


def test_lesions_are_numbered_and_small_ones_weigh_more() -> None:
    label = np.zeros((40, 40, 40), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1  # 8 voxels of 1 mm3: about 2.5 mm across
    label[10:30, 10:30, 10:30] = 1  # 8000 voxels: about 25 mm across
    numbers, lesions, weights = number_lesions(label, voxel_mm3=1.0)
    assert numbers.dtype == np.uint8 and set(np.unique(numbers)) == {0, 1, 2}
    assert sorted(len(v) for v in lesions) == [8, 8000]
    for k, voxels in enumerate(lesions, start=1):
        assert (numbers[tuple(voxels.T)] == k).all()
    small, large = (1, 2) if len(lesions[0]) == 8 else (2, 1)
    assert weights[0] == 1.0 and weights[large] == 1.0 and weights[small] == 3.0  # capped
    # In between, the weight is 15 mm over the equivalent diameter: a cube of 1000 mm3 is 12.4 mm.
    mid = np.zeros((12, 12, 12), np.uint8)
    mid[1:11, 1:11, 1:11] = 1
    assert number_lesions(mid, 1.0)[2][1] == pytest.approx(15.0 / np.cbrt(6000.0 / np.pi), rel=1e-5)
    # More than 255 lesions: the rest share number 255 (a byte a voxel), none is lost.
    dots = np.zeros((40, 40, 2), np.uint8)
    dots[::2, ::2, 0] = 1  # 400 isolated voxels
    numbers, lesions, weights = number_lesions(dots, 1.0)
    assert numbers.max() == 255 and len(lesions) == len(weights) - 1 == 255 and (numbers > 0).sum() == 400
    assert number_lesions(np.zeros((4, 4, 4), np.uint8), 1.0)[1] == []


def test_patches_visit_every_lesion_alike_whatever_its_size() -> None:
    label = np.zeros((40, 40, 40), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1
    label[10:30, 10:30, 10:30] = 1
    numbers, lesions, weights = number_lesions(label, 1.0)
    sample = Sample(
        torch.zeros(label.shape), torch.from_numpy(numbers), lesions, np.zeros((0, 3)), np.zeros((0, 3)), weights
    )
    rng = np.random.default_rng(0)
    centres = np.array([patch_center(sample, 4, rng, (1.0, 0.0, 0.0, 0.0)) for _ in range(400)])
    near_small = (np.abs(centres - 2.5) <= 2.5).all(axis=1).mean()
    assert 0.4 < near_small < 0.6  # by voxels it would be 1 in 1000


def test_the_loss_weighs_a_missed_small_lesion_voxel_by_its_size_weight() -> None:
    loss = lesion_loss(positive_weight=2.0)
    logits = torch.full((1, 1, 2, 1, 1), -4.0)
    labels = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    numbers = labels.long()
    light, heavy = (loss(logits, Batch(logits, labels, torch.full_like(labels, w), numbers)) for w in (1.0, 3.0))
    # Only the lesion voxel's BCE term changes: 2 x 3 against 2 x 1 times softplus(4), over 2 voxels.
    assert float(heavy - light) == pytest.approx(
        (6.0 - 2.0) * float(torch.nn.functional.softplus(torch.tensor(4.0))) / 2, rel=1e-5
    )


def test_a_batch_weighs_each_voxel_by_its_own_lesion_after_flips_and_padding() -> None:
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[1:3, 1:3, 1:3] = 1
    label[8:18, 8:18, 8:18] = 1
    numbers, lesions, weights = number_lesions(label, 1.0)
    image = torch.from_numpy(numbers.astype(np.float32) * 100.0)  # the lesion's number, readable after flips
    sample = Sample(image, torch.from_numpy(numbers), lesions, np.zeros((0, 3)), np.zeros((0, 3)), weights)
    images, labels, sizes, patch_numbers = draw_batch([sample], 16, 24, np.random.default_rng(0), (1.0, 0.0, 0.0, 0.0))
    number = torch.round(images / 100.0).long()  # the HU shift is a few HU; padding is -1000 HU
    inside = number > 0
    assert torch.equal(labels > 0, inside)
    assert torch.equal(patch_numbers, torch.where(inside, number, 0))
    assert torch.equal(sizes[inside], torch.from_numpy(weights)[number[inside]])
    assert (sizes[~inside] == 1.0).all() and set(np.unique(sizes[inside].numpy())) == set(weights[1:].tolist())


def test_volume_weighting_gives_a_small_lesion_the_weight_of_a_15_mm_one_in_all() -> None:
    label = np.zeros((40, 40, 40), dtype=np.uint8)
    label[2:8, 2:8, 2:8] = 1  # 216 mm3: 7.4 mm across
    label[10:12, 10:12, 30:32] = 1  # 8 mm3: 2.5 mm across, over the cap
    label[15:39, 15:39, 2:26] = 1  # 13824 mm3: 29.8 mm across
    _, lesions, weights = number_lesions(label, 1.0, "volume")
    by_size = {len(v): float(weights[k]) for k, v in enumerate(lesions, start=1)}
    reference_mm3 = np.pi / 6.0 * 15.0**3
    assert by_size[216] * 216 == pytest.approx(reference_mm3, rel=1e-4)
    assert by_size[8] == 30.0 and by_size[13824] == 1.0
    assert number_lesions(label, 1.0)[2].max() == 3.0  # "diameter" stays the default


def test_the_blob_term_counts_a_missed_small_lesion_as_much_as_a_missed_large_one() -> None:
    numbers = torch.zeros((1, 1, 20, 20, 20), dtype=torch.long)
    numbers[..., 2:4, 2:4, 2:4] = 1  # 8 voxels
    numbers[..., 8:18, 8:18, 8:18] = 2  # 1000 voxels
    sure = torch.where(numbers > 0, 20.0, -20.0)
    assert float(blob_dice_loss(sure, numbers)) == pytest.approx(0.0, abs=1e-6)
    missed_small, missed_large = sure.clone(), sure.clone()
    missed_small[numbers == 1] = -20.0
    missed_large[numbers == 2] = -20.0
    # Each lesion is half of the mean, whatever its size; the voxels' Dice barely sees the small one.
    assert float(blob_dice_loss(missed_small, numbers)) == pytest.approx(0.5, abs=1e-4)
    assert float(blob_dice_loss(missed_large, numbers)) == pytest.approx(0.5, abs=1e-4)
    # A false finding in the background lowers every lesion's Dice; the other lesion's voxels do not.
    false = sure.clone()
    false[..., 0, 10:18, 0:8] = 20.0  # 64 voxels
    assert float(blob_dice_loss(false, numbers)) > 0.05
    assert float(blob_dice_loss(torch.full_like(sure, -20.0), torch.zeros_like(numbers))) == 0.0


def test_the_blob_term_backpropagates_to_the_missed_lesion() -> None:
    numbers = torch.zeros((2, 1, 8, 8, 8), dtype=torch.long)
    numbers[0, 0, 1:3, 1:3, 1:3] = 3  # numbers need not start at 1 in a patch
    logits = torch.zeros(numbers.shape, requires_grad=True)
    loss = lesion_loss(1.0, blob_weight=1.0)(
        logits, Batch(logits, (numbers > 0).float(), torch.ones(numbers.shape), numbers)
    )
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad[numbers == 3] < 0).all()  # raise the lesion
    assert (logits.grad[numbers == 0] > 0).all()  # lower the rest
