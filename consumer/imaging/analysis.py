"""From a probability map to a mask and findings: threshold, connected components, measurements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cc3d
import numpy as np

from schemas.results import BoundingBox, Finding, Metric, Point


@dataclass(frozen=True)
class Analysis:
    mask: np.ndarray  # uint8, Fortran order (NIfTI's own layout), input grid
    findings: list[Finding]
    total_volume_mm3: float
    confidence: float


def analyse(
    probability: np.ndarray,
    intensity: np.ndarray,
    affine: np.ndarray,
    threshold: float,
    min_volume_mm3: float,
) -> Analysis:
    """Blocking: lesions are 26-connected components of `probability >= threshold` of at least min_volume_mm3."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    labels = cc3d.connected_components(probability >= threshold, connectivity=26)
    n = int(labels.max())
    if n == 0:
        return Analysis(
            np.zeros(probability.shape, dtype=np.uint8, order="F"), [], 0.0, _no_finding_confidence(probability)
        )
    components = _Components.of(labels, n, probability, intensity)
    keep = [label for label in range(1, n + 1) if components.counts[label] * voxel_mm3 >= min_volume_mm3]
    keep.sort(key=lambda label: -components.counts[label])
    findings = [
        components.finding(label, f"lesion_{index}", affine, voxel_mm3) for index, label in enumerate(keep, start=1)
    ]
    lookup = np.zeros(n + 1, dtype=np.uint8)
    lookup[keep] = 1
    mask = np.asfortranarray(lookup[labels])
    total = float(sum(f.volume for f in findings))
    if findings:
        confidence = float(sum(f.confidence * f.volume for f in findings) / total)
    else:
        confidence = _no_finding_confidence(probability)
    return Analysis(mask, findings, round(total, 3), round(confidence, 4))


@dataclass(frozen=True)
class _Components:
    """Per-label statistics of the connected components (index = label, 0 the background)."""

    boxes: Any  # cc3d's bounding boxes: a tuple of slices per label
    centroids: Any  # cc3d's centroids, in voxels
    counts: np.ndarray
    prob_sum: np.ndarray
    prob_max: np.ndarray
    intensity_sum: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, n: int, probability: np.ndarray, intensity: np.ndarray) -> _Components:
        stats = cc3d.statistics(labels)
        # Sums over lesion voxels only (a few thousand, not the whole volume); coordinates index
        # every array the same way whatever its memory layout.
        where = np.nonzero(labels)
        flat = labels[where]
        prob = probability[where]
        prob_max = np.zeros(n + 1, dtype=np.float64)
        np.maximum.at(prob_max, flat, prob)
        return cls(
            boxes=stats["bounding_boxes"],
            centroids=stats["centroids"],
            counts=np.asarray(stats["voxel_counts"], dtype=np.int64),
            prob_sum=np.bincount(flat, weights=prob, minlength=n + 1),
            prob_max=prob_max,
            intensity_sum=np.bincount(flat, weights=intensity[where], minlength=n + 1),
        )

    def finding(self, label: int, name: str, affine: np.ndarray, voxel_mm3: float) -> Finding:
        count = self.counts[label]
        bbox = self.boxes[label]
        centroid = np.asarray(self.centroids[label], dtype=np.float64)
        world = affine[:3, :3] @ centroid + affine[:3, 3]
        volume = float(count * voxel_mm3)
        return Finding(
            id=name,
            type="lesion",
            volume=round(volume, 3),
            confidence=round(float(self.prob_sum[label] / count), 4),
            max_probability=round(float(self.prob_max[label]), 4),
            voxel_count=int(count),
            location=Point(x=round(centroid[0], 2), y=round(centroid[1], 2), z=round(centroid[2], 2)),
            location_mm=Point(x=round(world[0], 2), y=round(world[1], 2), z=round(world[2], 2)),
            bounding_box=BoundingBox(
                min_x=bbox[0].start,
                max_x=bbox[0].stop - 1,
                min_y=bbox[1].start,
                max_y=bbox[1].stop - 1,
                min_z=bbox[2].start,
                max_z=bbox[2].stop - 1,
            ),
            diameter_mm=round(float((6.0 * volume / np.pi) ** (1.0 / 3.0)), 2),
            mean_intensity=round(float(self.intensity_sum[label] / count), 2),
        )


def _no_finding_confidence(probability: np.ndarray) -> float:
    return round(1.0 - float(probability.max(initial=0.0)), 4)


def reference_metrics(mask: np.ndarray, reference: np.ndarray, voxel_mm3: float) -> list[Metric]:
    """Voxel-wise agreement of the predicted mask with a reference mask on the same grid."""
    pred, ref = mask.astype(bool), reference > 0
    tp = int(np.logical_and(pred, ref).sum())
    fp = int(np.logical_and(pred, ~ref).sum())
    fn = int(np.logical_and(~pred, ref).sum())
    tn = int(pred.size - tp - fp - fn)
    dice = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)
    return [
        Metric(
            name="dice_score", value=round(dice, 4), description="Dice similarity coefficient with the reference mask"
        ),
        Metric(
            name="sensitivity",
            value=round(tp / (tp + fn), 4) if tp + fn else 1.0,
            description="Share of reference lesion voxels found",
        ),
        Metric(
            name="specificity",
            value=round(tn / (tn + fp), 4) if tn + fp else 1.0,
            description="Share of reference background voxels left unmarked",
        ),
        Metric(
            name="volume_difference",
            value=round((tp + fp - tp - fn) * voxel_mm3, 3),
            description="Predicted minus reference lesion volume in mm3",
        ),
    ]
