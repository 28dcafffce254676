"""The phantom generator: determinism, anatomy, lesions, both families, stored layouts."""

from __future__ import annotations

import numpy as np
import pytest

from models.phantoms import acquisition as acq
from models.phantoms import anatomy, generate_phantom
from models.phantoms.lesions import KINDS, cluster_outline, radial_outline

SMALL = ((128, 128, 48), (2.6, 2.6, 4.0))  # 333 mm in-plane, 192 mm along z: quick to generate


def phantom(seed: int, **kwargs):  # type: ignore[no-untyped-def]
    return generate_phantom(seed, *SMALL, **kwargs)


def test_same_seed_same_phantom_and_other_seed_other_phantom() -> None:
    a, b, c = phantom(3), phantom(3), phantom(4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lesion_mask, b.lesion_mask)
    assert not np.array_equal(a.image, c.image)


def test_families_differ_for_the_same_seed() -> None:
    train, validation = phantom(3), phantom(3, family="validation")
    assert not np.array_equal(train.image, validation.image)
    with pytest.raises(ValueError, match="family"):
        phantom(3, family="test")


def test_lesion_mask_instances_and_list_agree() -> None:
    for seed in range(3):
        p = phantom(seed, lesion_count=(3, 3))
        assert p.lesion_instances is not None
        ids = set(np.unique(p.lesion_instances)) - {0}
        assert ids == set(range(1, p.lesion_count + 1))
        assert np.array_equal(p.lesion_mask > 0, p.lesion_instances > 0)
        for lesion in p.lesions:
            assert lesion.kind in KINDS and 3.0 * 0.8 <= lesion.diameter_mm <= 40.0 * 1.2


def test_normal_phantoms_have_no_lesions() -> None:
    p = phantom(5, lesion_count=(0, 0))
    assert p.lesion_count == 0 and p.lesion_mask.sum() == 0


def test_anatomy_a_lesion_model_must_leave_alone() -> None:
    """Bone with marrow, the table outside the body, fat, lungs with vessels, gas, contrast."""
    tissues: dict[int, list[float]] = {}
    for seed in range(4):
        p = phantom(seed, lesion_count=(0, 0))
        assert p.tissue is not None
        for label in np.unique(p.tissue):
            tissues.setdefault(int(label), []).append(float(np.median(p.image[p.tissue == label])))
    for label in (anatomy.BONE, anatomy.OUTSIDE, anatomy.FAT, anatomy.SOFT, anatomy.LUNG, anatomy.LIVER):
        assert label in tissues, f"tissue {label} never drawn"
    assert np.median(tissues[anatomy.FAT]) < -50
    assert np.median(tissues[anatomy.LUNG]) < -600
    assert np.median(tissues[anatomy.BONE]) > 150  # marrow and cortex together


def test_lesions_sit_in_their_organ_and_nodules_in_lung() -> None:
    seen = set()
    for seed in range(8):
        p = phantom(seed, lesion_count=(4, 4))
        assert p.tissue is not None and p.lesion_instances is not None
        for index, lesion in enumerate(p.lesions, start=1):
            inside = p.tissue[p.lesion_instances == index]
            organ = anatomy.ORGAN_LABELS[lesion.organ]
            # Drawn over its own organ (the organ label stays under the lesion).
            assert (inside == organ).mean() >= 0.8
            assert (lesion.kind.endswith("nodule")) == (lesion.organ == "lung")
            seen.add(lesion.kind)
    assert {"hypodense", "hyperdense", "solid_nodule"} <= seen


def test_lesion_centres_map_through_the_affine_into_their_masks() -> None:
    """Lesion centres are RAS mm: the affine (any stored layout) must take them to their voxels."""
    for family in ("train", "validation"):
        p = phantom(11, lesion_count=(3, 3), family=family)
        assert p.lesion_instances is not None
        inverse = np.linalg.inv(p.affine)
        for index, lesion in enumerate(p.lesions, start=1):
            voxel = inverse @ np.array([*lesion.center_mm, 1.0])
            near = np.argwhere(p.lesion_instances == index)
            assert np.min(np.linalg.norm(near - voxel[:3], axis=1)) <= 1.5


@pytest.mark.parametrize("seed", range(6))
def test_any_stored_layout_keeps_patient_space(seed: int) -> None:
    """A marker voxel lands at the same RAS position whatever the stored axis order and flips."""
    rng = np.random.default_rng(seed)
    canonical = acq.Acquisition((10, 12, 7), (0.7, 0.9, 2.0), np.array([[0, 1], [1, 1], [2, 1]], dtype=float))
    layout = np.stack([rng.permutation(3).astype(float), rng.choice([-1.0, 1.0], 3)], axis=1)
    stored = acq.Acquisition(canonical.shape, canonical.spacing, layout)
    array = np.zeros(canonical.shape)
    array[2, 9, 5] = 1.0
    world = canonical.affine() @ np.array([2, 9, 5, 1.0])
    moved = stored.store(array)
    position = np.argwhere(moved == 1.0)[0]
    assert np.allclose(stored.affine() @ np.array([*position, 1.0]), world)
    assert sorted(stored.stored_spacing) == sorted(canonical.spacing)


def test_the_two_outline_generators_draw_different_shapes() -> None:
    axis = np.linspace(-12.0, 12.0, 25)
    local = tuple(np.meshgrid(axis, axis, axis, indexing="ij", sparse=True))
    radii = np.array([8.0, 8.0, 8.0])
    train = [radial_outline(local, radii, np.random.default_rng(s)) for s in range(6)]
    validation = [cluster_outline(local, radii, np.random.default_rng(s)) for s in range(6)]
    assert all(m.sum() > 100 for m in train + validation)
    assert min(float((a != b).mean()) for a, b in zip(train, validation, strict=True)) > 0.0


def test_validation_grids_are_not_training_grids() -> None:
    rng = np.random.default_rng(0)
    train = [acq.random_acquisition(rng, "train") for _ in range(20)]
    validation = [acq.random_acquisition(rng, "validation") for _ in range(20)]
    assert max(a.shape[0] for a in train) < min(a.shape[0] for a in validation)
    assert all(np.array_equal(a.layout, acq.lps_like(a.shape, a.spacing).layout) for a in train)
    assert any(not np.array_equal(a.layout, train[0].layout) for a in validation)


def _block_ratio(field: np.ndarray, block: int = 4) -> float:
    """Variance of 4x4 in-plane block means over that of white noise's: below 1 where the grain is
    finer than white (a sharp kernel's ramp), above 1 where it is coarse (a smooth kernel)."""
    x, y = field.shape[0] // block, field.shape[1] // block
    means = field[: x * block, : y * block].reshape(x, block, y, block, -1).mean(axis=(1, 3))
    return float(means.var()) * block * block / float(field.var())


def test_training_noise_spans_smooth_to_sharp_kernels() -> None:
    # Real scans come with any reconstruction kernel; the training family must not know only one.
    shape, spacing, body = (96, 96, 8), (0.8, 0.8, 2.0), np.ones((96, 96), dtype=bool)
    ratios = [_block_ratio(acq.noise(shape, spacing, 10.0, np.random.default_rng(s), "train", body)) for s in range(12)]
    assert min(ratios) < 0.8 and max(ratios) > 1.5
    gain = acq._central_gain(np.pad(np.ones((60, 40), dtype=bool), 18), 0.6)
    assert gain[48, 38] == pytest.approx(1.3, abs=0.02) and gain[0, 0] == pytest.approx(0.7)
