"""Agreement of a predicted mask with a reference mask on the same grid.

Voxel-wise: Dice, sensitivity, specificity, volume difference. Surface distances in millimetres
(MONAI's metric functions, spacing-aware): Hausdorff, its 95th percentile and the average
symmetric surface distance. Lesion-wise: each reference lesion (26-connected component) is
found when any predicted voxel touches it; each predicted component that touches no reference
lesion is a false positive. Foreground is any non-zero label on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cc3d
import numpy as np
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from schemas.results import Metric

# Surface distances need a margin around the masks' union so their borders are real borders.
_MARGIN = 2


@dataclass(frozen=True)
class LesionCounts:
    true_positives: int
    false_positives: int
    false_negatives: int


def reference_metrics(mask: np.ndarray, reference: np.ndarray, spacing: tuple[float, float, float]) -> list[Metric]:
    """Blocking: every metric against the reference, in a fixed order."""
    pred, ref = mask > 0, reference > 0
    voxel_mm3 = float(np.prod(spacing))
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = int(pred.size) - tp - fp - fn
    distances = surface_distances(pred, ref, spacing)
    lesions = lesion_counts(pred, ref)
    return [
        Metric(name="dice_score", value=_ratio(2 * tp, 2 * tp + fp + fn), description="Dice similarity coefficient"),
        Metric(name="sensitivity", value=_ratio(tp, tp + fn), description="Share of reference voxels found"),
        Metric(name="specificity", value=_ratio(tn, tn + fp), description="Share of background voxels left unmarked"),
        Metric(
            name="volume_difference",
            value=round((fp - fn) * voxel_mm3, 3),
            description="Predicted minus reference volume in mm3",
        ),
        Metric(name="hausdorff_distance", value=distances[0], description="Hausdorff distance in mm (symmetric)"),
        Metric(name="hausdorff_distance_95", value=distances[1], description="95th percentile Hausdorff distance, mm"),
        Metric(
            name="average_surface_distance", value=distances[2], description="Average symmetric surface distance, mm"
        ),
        Metric(
            name="lesions_true_positive",
            value=lesions.true_positives,
            description="Reference lesions touched by the prediction",
        ),
        Metric(
            name="lesions_false_positive",
            value=lesions.false_positives,
            description="Predicted findings that touch no reference lesion",
        ),
        Metric(
            name="lesions_false_negative",
            value=lesions.false_negatives,
            description="Reference lesions the prediction missed",
        ),
    ]


def _ratio(numerator: int, denominator: int) -> float:
    return round(numerator / denominator, 4) if denominator else 1.0


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[float | None, float | None, float | None]:
    """Hausdorff, HD95 and average symmetric surface distance in mm; None when either mask is empty
    (the distance to nothing is undefined) and 0 when both are."""
    if not pred.any() and not ref.any():
        return 0.0, 0.0, 0.0
    if not pred.any() or not ref.any():
        return None, None, None
    box = _union_box(pred, ref)
    y_pred = pred[box][None, None].astype(np.float32)
    y = ref[box][None, None].astype(np.float32)
    hd = compute_hausdorff_distance(y_pred, y, include_background=True, spacing=list(spacing))
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
    asd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True, spacing=list(spacing))
    return _mm(hd), _mm(hd95), _mm(asd)


def _mm(value: object) -> float | None:
    number = float(np.asarray(value).reshape(-1)[0])
    return round(number, 3) if math.isfinite(number) else None


def _union_box(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...]:
    where = np.nonzero(pred | ref)
    return tuple(
        slice(max(0, int(axis.min()) - _MARGIN), min(size, int(axis.max()) + 1 + _MARGIN))
        for axis, size in zip(where, pred.shape, strict=True)
    )


def lesion_counts(pred: np.ndarray, ref: np.ndarray) -> LesionCounts:
    ref_labels = cc3d.connected_components(ref, connectivity=26)
    pred_labels = cc3d.connected_components(pred, connectivity=26)
    found = np.unique(ref_labels[pred & ref])
    touching = np.unique(pred_labels[pred & ref])
    ref_count, pred_count = int(ref_labels.max()), int(pred_labels.max())
    true_positives = int(np.count_nonzero(found))
    return LesionCounts(
        true_positives=true_positives,
        false_positives=pred_count - int(np.count_nonzero(touching)),
        false_negatives=ref_count - true_positives,
    )
