"""From probabilities to findings (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.imaging.analysis import analyse, reference_metrics


def ball(shape: tuple[int, int, int], center: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)) <= radius**2


@pytest.fixture
def scene():  # type: ignore[no-untyped-def]
    shape = (40, 40, 20)
    probability = np.zeros(shape, np.float32)
    big, small = ball(shape, (10, 10, 10), 5), ball(shape, (30, 30, 10), 2)
    probability[big] = 0.9
    probability[small] = 0.7
    probability[0, 0, 0] = 0.99  # a one-voxel speck
    intensity = np.full(shape, 50.0, np.float32)
    intensity[big] = 10.0
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    affine[:3, 3] = [100.0, 50.0, -20.0]
    return probability, intensity, affine, big, small


def test_components_become_findings(scene) -> None:  # type: ignore[no-untyped-def]
    probability, intensity, affine, big, small = scene
    voxel = 0.5 * 0.5 * 2.0
    result = analyse(probability, intensity, affine, threshold=0.55, min_volume_mm3=1.0)
    assert [f.id for f in result.findings] == ["lesion_1", "lesion_2"]
    first, second = result.findings
    assert first.voxel_count == big.sum() and first.volume == pytest.approx(big.sum() * voxel)
    assert second.voxel_count == small.sum()
    assert first.confidence == pytest.approx(0.9) and second.confidence == pytest.approx(0.7)
    assert first.mean_intensity == pytest.approx(10.0)
    assert (first.location.x, first.location.y, first.location.z) == pytest.approx((10, 10, 10))
    assert (first.location_mm.x, first.location_mm.y, first.location_mm.z) == pytest.approx((95.0, 45.0, 0.0))
    box = first.bounding_box
    assert (box.min_x, box.max_x, box.min_z, box.max_z) == (5, 15, 5, 15)
    assert result.total_volume_mm3 == pytest.approx((big.sum() + small.sum()) * voxel)
    # The speck is below the minimum volume: not a finding, and not in the mask either.
    assert result.mask[0, 0, 0] == 0
    assert result.mask.sum() == big.sum() + small.sum()
    assert result.mask.flags.f_contiguous and result.mask.dtype == np.uint8


def test_threshold_decides(scene) -> None:  # type: ignore[no-untyped-def]
    probability, intensity, affine, *_ = scene
    assert len(analyse(probability, intensity, affine, threshold=0.8, min_volume_mm3=1.0).findings) == 1
    assert len(analyse(probability, intensity, affine, threshold=0.95, min_volume_mm3=0.1).findings) == 1


def test_nothing_found(scene) -> None:  # type: ignore[no-untyped-def]
    probability, intensity, affine, *_ = scene
    result = analyse(probability * 0.1, intensity, affine, threshold=0.55, min_volume_mm3=1.0)
    assert result.findings == [] and result.total_volume_mm3 == 0.0
    assert result.confidence == pytest.approx(1 - 0.099, abs=1e-3)
    assert result.mask.sum() == 0


def test_reference_metrics() -> None:
    pred = np.zeros((10, 10, 10), np.uint8)
    ref = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = 1
    ref[3:7, 2:6, 2:6] = 1
    metrics = {m.name: m.value for m in reference_metrics(pred, ref, voxel_mm3=2.0)}
    assert metrics["dice_score"] == pytest.approx(0.75)
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["volume_difference"] == 0.0
