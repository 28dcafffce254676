"""From a model's label map to findings: the connected components of each label, measured.

A finding is a 26-connected component of one label value, at least the model's minimum volume
for the profile; smaller components are taken out of the mask too. Confidence is the mean
probability of its label inside it (when the model gives probabilities), uncertainty the mean
variance across test-time flips (research).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import cc3d
import numpy as np

from models.geometry import nonzero_box
from schemas.results import BoundingBox, Finding, LabelVolume, Point


@dataclass(frozen=True)
class LabelMap:
    """What a model gave, on the input grid."""

    labels: np.ndarray  # uint8/uint16
    names: dict[int, str]  # label value -> name (0 the background)
    probability: np.ndarray | None = None  # float32, of each voxel's label
    uncertainty: np.ndarray | None = None  # float32
    min_volume_mm3: float = 0.0


@dataclass(frozen=True)
class Analysis:
    mask: np.ndarray  # the label map without the components below the minimum volume; Fortran order
    findings: list[Finding]
    volumes: list[LabelVolume]
    total_volume_mm3: float
    confidence: float | None


def analyse(label_map: LabelMap, intensity: np.ndarray, affine: np.ndarray) -> Analysis:
    """Blocking: findings of every label, largest first within a label."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    # Components are found and measured in the box that holds every labelled voxel: findings
    # fill a small part of a scan (a 512 x 512 x 300 map took 2.5 s whole).
    box = nonzero_box(label_map.labels) or (slice(0, 1), slice(0, 1), slice(0, 1))
    crop = replace(
        label_map,
        labels=label_map.labels[box],
        probability=None if label_map.probability is None else label_map.probability[box],
        uncertainty=None if label_map.uncertainty is None else label_map.uncertainty[box],
    )
    components = cc3d.connected_components(crop.labels, connectivity=26)
    n = int(components.max())
    stats = _Components.of(components, n, crop, intensity[box], np.array([s.start for s in box]))
    keep = [c for c in range(1, n + 1) if stats.counts[c] * voxel_mm3 >= label_map.min_volume_mm3]
    # Equal sizes are ordered by place (slice, then row, column): not by the components' numbering,
    # which depends on the map's memory layout.
    keep.sort(key=lambda c: (int(stats.values[c]), -int(stats.counts[c]), *np.asarray(stats.centroids[c])[::-1]))
    findings = _findings(keep, stats, label_map.names, affine, voxel_mm3)
    lookup = np.zeros(n + 1, dtype=label_map.labels.dtype)
    lookup[keep] = stats.values[keep]
    mask = np.zeros(label_map.labels.shape, dtype=label_map.labels.dtype, order="F")
    mask[box] = lookup[components]
    total = round(float(sum(f.volume for f in findings)), 3)
    return Analysis(
        mask=mask,
        findings=findings,
        volumes=_volumes(findings, label_map.names),
        total_volume_mm3=total,
        confidence=_summary_confidence(findings, label_map.probability),
    )


def _findings(
    keep: list[int], stats: _Components, names: dict[int, str], affine: np.ndarray, voxel_mm3: float
) -> list[Finding]:
    findings: list[Finding] = []
    index: dict[int, int] = {}
    for component in keep:
        value = int(stats.values[component])
        index[value] = index.get(value, 0) + 1
        name = names.get(value, f"label {value}")
        findings.append(stats.finding(component, f"{_slug(name)}_{index[value]}", name, affine, voxel_mm3))
    return findings


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "label"


def _volumes(findings: list[Finding], names: dict[int, str]) -> list[LabelVolume]:
    volumes = []
    for value, name in sorted(names.items()):
        if value == 0:
            continue
        of_label = [f for f in findings if f.label == value]
        volume = float(sum(f.volume for f in of_label))
        volumes.append(
            LabelVolume(
                label=value,
                name=name,
                volume=round(volume, 3),
                volume_ml=round(volume / 1000.0, 3),
                count=len(of_label),
            )
        )
    return volumes


def _summary_confidence(findings: list[Finding], probability: np.ndarray | None) -> float | None:
    if probability is None:
        return None
    scored = [f for f in findings if f.confidence is not None]
    total = sum(f.volume for f in scored)
    if scored and total > 0:
        return round(float(sum(f.confidence * f.volume for f in scored if f.confidence is not None) / total), 4)
    return round(1.0 - float(probability.max(initial=0.0)), 4)


def _mean(sums: np.ndarray | None, counts: np.ndarray, component: int) -> float | None:
    return None if sums is None else round(float(sums[component] / counts[component]), 4)


@dataclass(frozen=True)
class _Components:
    """Statistics per connected component (index = component, 0 the background)."""

    boxes: Any  # cc3d's bounding boxes: a tuple of slices per component
    centroids: Any  # cc3d's centroids, in voxels
    counts: np.ndarray
    values: np.ndarray  # the label value of each component
    intensity_sum: np.ndarray
    prob_sum: np.ndarray | None
    prob_max: np.ndarray | None
    uncertainty_sum: np.ndarray | None
    origin: np.ndarray  # where the components' box starts in the scan, in voxels

    @classmethod
    def of(
        cls, components: np.ndarray, n: int, label_map: LabelMap, intensity: np.ndarray, origin: np.ndarray
    ) -> _Components:
        stats = cc3d.statistics(components)
        # Sums over labelled voxels only; coordinates index every array the same way whatever
        # its memory layout.
        where = np.nonzero(components)
        flat = components[where]
        values = np.zeros(n + 1, dtype=np.int64)
        values[flat] = label_map.labels[where]

        def sums(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else np.bincount(flat, weights=array[where], minlength=n + 1)

        prob_max = None
        if label_map.probability is not None:
            prob_max = np.zeros(n + 1, dtype=np.float64)
            np.maximum.at(prob_max, flat, label_map.probability[where])
        return cls(
            boxes=stats["bounding_boxes"],
            centroids=stats["centroids"],
            counts=np.asarray(stats["voxel_counts"], dtype=np.int64),
            values=values,
            intensity_sum=np.bincount(flat, weights=intensity[where], minlength=n + 1),
            prob_sum=sums(label_map.probability),
            prob_max=prob_max,
            uncertainty_sum=sums(label_map.uncertainty),
            origin=origin,
        )

    def finding(self, component: int, finding_id: str, name: str, affine: np.ndarray, voxel_mm3: float) -> Finding:
        count = self.counts[component]
        bbox = [
            slice(int(s.start) + int(o), int(s.stop) + int(o))
            for s, o in zip(self.boxes[component], self.origin, strict=True)
        ]
        centroid = np.asarray(self.centroids[component], dtype=np.float64) + self.origin
        world = affine[:3, :3] @ centroid + affine[:3, 3]
        volume = float(count * voxel_mm3)
        return Finding(
            id=finding_id,
            type=name,
            label=int(self.values[component]),
            volume=round(volume, 3),
            confidence=_mean(self.prob_sum, self.counts, component),
            max_probability=None if self.prob_max is None else round(float(self.prob_max[component]), 4),
            uncertainty=_mean(self.uncertainty_sum, self.counts, component),
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
            mean_intensity=round(float(self.intensity_sum[component] / count), 2),
        )
