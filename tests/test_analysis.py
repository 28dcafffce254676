"""From label maps to findings, and metrics against a reference (pure logic)."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.imaging.analysis import LabelMap, analyse
from consumer.imaging.reference import lesion_counts, reference_metrics

LESION = {0: "background", 1: "lesion"}


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


def labels_of(probability: np.ndarray, threshold: float = 0.55) -> np.ndarray:
    return (probability >= threshold).astype(np.uint8)


def test_components_become_findings(scene) -> None:  # type: ignore[no-untyped-def]
    probability, intensity, affine, big, small = scene
    voxel = 0.5 * 0.5 * 2.0
    label_map = LabelMap(labels_of(probability), LESION, probability, min_volume_mm3=1.0)
    result = analyse(label_map, intensity, affine)
    assert [f.id for f in result.findings] == ["lesion_1", "lesion_2"]
    first, second = result.findings
    assert first.type == "lesion" and first.label == 1
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
    assert [(v.label, v.count) for v in result.volumes] == [(1, 2)]
    assert result.volumes[0].volume_ml == pytest.approx(result.total_volume_mm3 / 1000, abs=1e-3)


def test_findings_away_from_the_corner_keep_scan_coordinates(scene) -> None:  # type: ignore[no-untyped-def]
    # Components are measured in the box around the labelled voxels: what comes out must still
    # be in the scan's voxels, and equal sizes come in order of place, not of numbering.
    _, intensity, affine, big, _ = scene
    labels = np.zeros(big.shape, np.uint8)
    labels[big] = 1
    twin = np.roll(big, (22, 3, 0), axis=(0, 1, 2))  # the same size, further along x
    labels[twin] = 1
    probability = labels.astype(np.float32) * 0.8
    result = analyse(LabelMap(labels, LESION, probability, min_volume_mm3=1.0), intensity, affine)
    assert [(f.location.x, f.location.y, f.location.z) for f in result.findings] == [(10, 10, 10), (32, 13, 10)]
    box = result.findings[1].bounding_box
    assert (box.min_x, box.max_x, box.min_y, box.max_y, box.min_z, box.max_z) == (27, 37, 8, 18, 5, 15)
    assert np.array_equal(result.mask, labels) and result.mask.flags.f_contiguous
    assert result.findings[0].mean_intensity == pytest.approx(10.0)


def test_nothing_found(scene) -> None:  # type: ignore[no-untyped-def]
    probability, intensity, affine, *_ = scene
    weak = probability * 0.1
    result = analyse(LabelMap(labels_of(weak), LESION, weak, min_volume_mm3=1.0), intensity, affine)
    assert result.findings == [] and result.total_volume_mm3 == 0.0
    assert result.confidence == pytest.approx(1 - 0.099, abs=1e-3)
    assert result.mask.sum() == 0


def test_several_labels_each_with_their_name(scene) -> None:  # type: ignore[no-untyped-def]
    _, intensity, affine, big, small = scene
    labels = np.zeros(big.shape, np.uint16)
    labels[big] = 300  # past 255: the map stays uint16
    labels[small] = 2
    names = {0: "background", 2: "left kidney", 300: "liver"}
    result = analyse(LabelMap(labels, names), intensity, affine)
    assert [(f.id, f.label, f.type) for f in result.findings] == [
        ("left_kidney_1", 2, "left kidney"),
        ("liver_1", 300, "liver"),
    ]
    assert all(f.confidence is None for f in result.findings) and result.confidence is None
    assert result.mask.dtype == np.uint16 and set(np.unique(result.mask)) == {0, 2, 300}
    assert [(v.name, v.count) for v in result.volumes] == [("left kidney", 1), ("liver", 1)]


def test_uncertainty_is_averaged_per_finding(scene) -> None:  # type: ignore[no-untyped-def]
    probability, intensity, affine, big, _ = scene
    uncertainty = np.zeros_like(probability)
    uncertainty[big] = 0.04
    result = analyse(LabelMap(labels_of(probability), LESION, probability, uncertainty, 1.0), intensity, affine)
    assert result.findings[0].uncertainty == pytest.approx(0.04)


def test_reference_metrics_with_surface_distances() -> None:
    pred = np.zeros((20, 20, 20), np.uint8)
    ref = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = 1
    ref[3:7, 2:6, 2:6] = 1
    metrics = {m.name: m.value for m in reference_metrics(pred, ref, (1.0, 1.0, 2.0))}
    assert metrics["dice_score"] == pytest.approx(0.75)
    assert metrics["sensitivity"] == pytest.approx(0.75)
    assert metrics["volume_difference"] == 0.0
    # The masks differ by a one-voxel shift along x (1 mm): every surface distance is 1 mm or less.
    assert metrics["hausdorff_distance"] == pytest.approx(1.0)
    assert 0 < metrics["average_surface_distance"] <= 1.0  # type: ignore[operator]
    assert metrics["lesions_true_positive"] == 1 and metrics["lesions_false_negative"] == 0


def test_surface_distances_follow_the_spacing() -> None:
    pred = np.zeros((10, 10, 30), np.uint8)
    ref = np.zeros_like(pred)
    pred[4:6, 4:6, 5:8] = 1
    ref[4:6, 4:6, 10:13] = 1  # 5 slices apart along z, at 2.5 mm
    metrics = {m.name: m.value for m in reference_metrics(pred, ref, (1.0, 1.0, 2.5))}
    assert metrics["hausdorff_distance"] == pytest.approx(12.5)
    assert metrics["dice_score"] == 0.0


def test_surface_distance_to_an_empty_mask_is_undefined() -> None:
    pred = np.zeros((8, 8, 8), np.uint8)
    ref = np.zeros_like(pred)
    ref[2:4, 2:4, 2:4] = 1
    metrics = {m.name: m.value for m in reference_metrics(pred, ref, (1.0, 1.0, 1.0))}
    assert metrics["hausdorff_distance"] is None and metrics["lesions_false_negative"] == 1


def test_lesion_wise_counts() -> None:
    shape = (30, 30, 10)
    ref = ball(shape, (5, 5, 5), 3) | ball(shape, (20, 20, 5), 3)
    pred = ball(shape, (6, 5, 5), 3) | ball(shape, (25, 5, 5), 2)
    counts = lesion_counts(pred, ref)
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (1, 1, 1)
