"""MONAI transforms of the default bundle: radiologist-style findings out of a lesion probability.

`LesionFindingsd` turns the network's lesion
probability into findings a reader expects: only inside the body, never in air, gas, bone or the
table, none below a minimum volume, each typed (hypodense, hyperdense, lung nodule), with a
calibrated confidence, in the model grid; `InvertToInputd` and `PaintFindingsd` bring the
results to the input's own grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cc3d
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from models.geometry import nonzero_box
from models.lesion_score import LesionScore, logit, measure, sigmoid

# Labels of the output map; metadata.json's label_def carries the same names.
BACKGROUND, HYPODENSE, HYPERDENSE, LUNG_NODULE = 0, 1, 2, 3
_SLAB = 16  # input slices per slab of the inversion and of the painting
INPUT_META = ("filename_or_obj", "original_affine", "spatial_shape", "original_channel_dim", "space")
LABEL_NAMES = {
    BACKGROUND: "background",
    HYPODENSE: "hypodense lesion",
    HYPERDENSE: "hyperdense lesion",
    LUNG_NODULE: "lung nodule",
}


class InvertToInputd(MapTransform):
    """Model-grid maps -> the input's own grid by the affines in the meta data (nearest, or linear
    for `linear_channels`).

    Does what `Invertd` (nearest) does after Orientationd + Spacingd, without building a sampling
    grid of the input's size: when the model grid and the input grid are axis-aligned (always,
    after Orientationd, unless the input is oblique) each input axis maps to one model axis by a
    scale and an offset, so three index gathers (two each, blended, when linear) do it. Measured here on a 512 x 512 x 56 input:
    Invertd's grid took ~1.9 s of a 12 s scan. Oblique inputs fall back to MONAI's resampling.

    `linear_within`: the key of a model-grid map (the findings' numbers); linear channels are
    interpolated only where the input samples the box of one of its numbers (each finding's
    own), and nearest elsewhere. Linear values are what outlines are drawn from, and only near
    findings; everywhere else they cost the most of the inversion (1.5-2.5 s of a 512 x 512 x 300
    scan; the one box around all findings, a few of them far apart, took most of the scan) for
    a map capped below the threshold either way. Axis-aligned grids only (an oblique input is
    linear everywhere).
    """

    def __init__(
        self,
        keys: KeysCollection,
        orig_key: str = "image",
        linear_channels: Sequence[int] = (),
        linear_within: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.orig_key = orig_key
        self.linear_channels = tuple(int(c) for c in linear_channels)
        self.linear_within = linear_within

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = d[self.orig_key]
        model_affine = np.asarray(reference.affine, dtype=np.float64)
        input_affine = np.asarray(reference.meta["original_affine"], dtype=np.float64)
        nx, ny, nz = (int(n) for n in np.asarray(reference.meta["spatial_shape"]).ravel()[:3])
        # What writers name and place the output by, as Invertd leaves it.
        carried = {k: reference.meta[k] for k in INPUT_META if k in reference.meta}
        within = None if self.linear_within is None else plain_tensor(d[self.linear_within])[0]
        for key in self.key_iterator(d):
            inverted = to_input_grid(d[key], model_affine, input_affine, (nx, ny, nz), self.linear_channels, within)
            inverted.meta.update(carried)
            d[key] = inverted
        return d


def to_input_grid(
    image: torch.Tensor,
    model_affine: np.ndarray,
    input_affine: np.ndarray,
    input_shape: tuple[int, int, int],
    linear: Sequence[int] = (),
    linear_within: torch.Tensor | None = None,
) -> MetaTensor:
    """(C, *model grid) -> (C, *input_shape); channels in `linear` interpolated (where the input
    samples the box of a number of `linear_within`, when given: nearest elsewhere), the others nearest."""
    tensor = torch.as_tensor(image)
    plain = tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor
    grid = _AxisMap.of(model_affine, input_affine)
    if grid is None:
        out = _resampled(plain, model_affine, input_affine, input_shape, linear)
    else:
        out = _gathered(plain, grid, input_shape, linear, linear_within)
    return MetaTensor(out, affine=torch.as_tensor(input_affine))


@dataclass(frozen=True)
class _AxisMap:
    """An input grid axis-aligned with the model grid: input axis k reads model axis `axes[k]` at
    coordinate `scale[k] * i + offset[k]` (always so after Orientationd, unless the input is oblique)."""

    axes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(cls, model_affine: np.ndarray, input_affine: np.ndarray) -> _AxisMap | None:
        """The map, or None when the grids are not axis-aligned."""
        mapping = np.linalg.solve(model_affine, input_affine)  # input index -> model index
        matrix = mapping[:3, :3]
        axes = np.abs(matrix).argmax(axis=0)  # model axis of each input axis
        aligned = sorted(axes.tolist()) == [0, 1, 2] and np.allclose(
            np.abs(matrix), np.abs(matrix) * (np.arange(3)[:, None] == axes[None, :]), atol=1e-6
        )
        if not aligned:
            return None
        return cls(axes, matrix[axes, np.arange(3)], mapping[axes, 3])

    def coordinate(self, k: int, index: np.ndarray) -> np.ndarray:
        """Model coordinates (along model axis `axes[k]`) of input indices along input axis k."""
        return self.scale[k] * index + self.offset[k]


def _resampled(
    plain: torch.Tensor,
    model_affine: np.ndarray,
    input_affine: np.ndarray,
    input_shape: tuple[int, int, int],
    linear: Sequence[int],
) -> torch.Tensor:
    """An oblique input: MONAI's resampling, channel by channel."""
    from monai.transforms import SpatialResample

    source = MetaTensor(plain, affine=torch.as_tensor(model_affine))
    return torch.cat(
        [
            torch.as_tensor(
                SpatialResample(mode="bilinear" if c in linear else "nearest")(
                    source[c : c + 1], dst_affine=torch.as_tensor(input_affine), spatial_size=input_shape
                )
            )
            for c in range(plain.shape[0])
        ]
    )


def _gathered(
    plain: torch.Tensor,
    grid: _AxisMap,
    input_shape: tuple[int, int, int],
    linear: Sequence[int],
    linear_within: torch.Tensor | None,
) -> torch.Tensor:
    """An axis-aligned input: index gathers, in the regions each channel needs."""
    dtype = torch.promote_types(plain.dtype, torch.float32) if linear else plain.dtype
    # Linear channels are written everywhere (nearest where not linear): only the others need zeros.
    result = torch.empty((plain.shape[0], *input_shape), dtype=dtype)
    everywhere = [(0, n) for n in input_shape]
    # Where linear channels are interpolated; nearest first wherever that is not everywhere.
    regions = [everywhere] if linear_within is None else _spans_of_numbers(linear_within, grid, input_shape)
    for c in range(plain.shape[0]):
        channel = plain[c : c + 1]
        if c in linear:
            if regions != [everywhere]:
                _fill(result[c], channel, grid, everywhere, False)
            for spans in regions:
                _fill(result[c], channel, grid, spans, True)
            continue
        # A nearest channel that is zero outside a box (findings' numbers) is only gathered where
        # input voxels take their value from inside it.
        result[c].zero_()
        box = nonzero_box(plain[c].numpy())
        if (spans_of_box := _spans_of_box(box, tuple(plain[c].shape), grid, input_shape)) is not None:
            _fill(result[c], channel, grid, spans_of_box, False)
    return result


def _spans_of_numbers(
    numbers: torch.Tensor, grid: _AxisMap, input_shape: tuple[int, int, int]
) -> list[list[tuple[int, int]]]:
    """The input spans of each number's own box in a map of non-negative integers (findings); a
    map of another type is one box, that of its non-zero voxels."""
    array = numbers.numpy()
    boxes = ndimage.find_objects(array) if array.dtype.kind in "iu" else [nonzero_box(array)]
    spans = (_spans_of_box(box, tuple(numbers.shape), grid, input_shape) for box in boxes if box)
    return [s for s in spans if s is not None]


def _spans_of_box(
    box: tuple[slice, ...] | None, model_shape: tuple[int, ...], grid: _AxisMap, input_shape: tuple[int, int, int]
) -> list[tuple[int, int]] | None:
    """Per input axis, the span of input indices whose nearest model voxel lies in `box` (of a
    model grid of `model_shape`); None when there is no box or the input samples none of it."""
    if box is None:
        return None
    spans = []
    for k, n in enumerate(input_shape):
        j = int(grid.axes[k])
        nearest = _sampled(grid.coordinate(k, np.arange(n)), model_shape[j])
        hit = np.flatnonzero((nearest >= box[j].start) & (nearest < box[j].stop))
        if len(hit) == 0:
            return None
        spans.append((int(hit[0]), int(hit[-1]) + 1))  # nearest is monotonic in the input index
    return spans


def _fill(
    target: torch.Tensor, source: torch.Tensor, grid: _AxisMap, spans: list[tuple[int, int]], interpolate: bool
) -> None:
    """One channel, `spans` of the input grid, in slabs of the last input axis: a scan-sized map
    is 315 MB at 512 x 512 x 300 in float32, so no copy of a whole channel is ever made. The
    slab's own axis is gathered first, so that each slab only reads the model-grid rows it needs."""
    order = [2, *(k for k in np.argsort(grid.axes) if k != 2)]
    (x0, x1), (y0, y1), (z0, z1) = spans
    for start in range(z0, z1, _SLAB):
        stop = min(start + _SLAB, z1)
        out = source
        for k in order:
            j = int(grid.axes[k])
            index = np.arange(start, stop) if k == 2 else np.arange(*spans[k])
            out = _gather(out, 1 + j, grid.coordinate(k, index), source.shape[1 + j], interpolate)
        # Dimension j now runs over input axis k where j = axes[k]: put input axes in order.
        target[x0:x1, y0:y1, start:stop] = out[0].permute(*(int(a) for a in grid.axes))


def _sampled(coordinate: np.ndarray, size: int) -> np.ndarray:
    """`_nearest`, but -1 where the input lies more than a voxel past the model grid: outside the
    bundle's crop (CropForegroundd), which an edge finding must not be stretched into. Within a
    voxel of the edge it repeats the edge, as MONAI's resampling does (the grid's own rim)."""
    rounded = np.rint(coordinate)
    return np.where((rounded >= -1) & (rounded <= size), np.clip(rounded, 0, size - 1), -1).astype(np.int64)


def _nearest(coordinate: np.ndarray, size: int) -> np.ndarray:
    """The model-grid index a nearest-neighbour sample at `coordinate` reads (edges repeated)."""
    return np.clip(np.rint(coordinate), 0, size - 1).astype(np.int64)


def _gather(array: torch.Tensor, dim: int, coordinate: np.ndarray, size: int, interpolate: bool) -> torch.Tensor:
    if not interpolate:
        return array.index_select(dim, torch.from_numpy(_nearest(coordinate, size)))
    coordinate = np.clip(coordinate, 0.0, size - 1.0)
    low = np.floor(coordinate).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    shape = [1] * array.dim()
    shape[dim] = len(coordinate)
    weight = torch.from_numpy((coordinate - low).astype(np.float32)).view(shape)
    a = array.index_select(dim, torch.from_numpy(low)).float()
    b = array.index_select(dim, torch.from_numpy(high)).float()
    return b.sub_(a).mul_(weight).add_(a)  # in place: the last gather is scan-sized


class PaintFindingsd(MapTransform):
    """The maps of `LesionFindingsd(index_key=...)`, in the input grid -> labels + confidence.

    In: pred (1, ...) float, the linearly interpolated probability of kept findings (capped below
    the threshold elsewhere); `index_key` (1, ...) each finding's number, grown by a voxel and
    inverted nearest; `findings_key` the findings in number order. Out: pred (1, ...) uint8, the
    finding's label where the probability reaches the threshold, so that outlines are drawn at the
    input's resolution, not in model-grid steps; `prob_key` (1, ...) float32, the finding's
    confidence on its voxels, elsewhere the probability capped below the threshold. Works in slabs
    and in place: each map is scan-sized, so it consumes pred and the index (their tensors become
    the outputs) and must not be given tensors its caller still reads. One key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        index_key: str = "finding_index",
        findings_key: str = "findings",
        prob_key: str = "prob",
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.index_key, self.findings_key, self.prob_key = index_key, findings_key, prob_key
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            return d
        source = d.pop(key)
        probability = plain_tensor(source).float()  # the source's storage when it is float32
        labels = self.paint(probability, plain_tensor(d.pop(self.index_key)), d[self.findings_key])
        # With the source's meta data: writers name and place the outputs by it.
        d[self.prob_key] = _like(source, probability)
        d[key] = _like(source, labels)
        return d

    def paint(self, probability: torch.Tensor, index: torch.Tensor, findings: list[dict[str, Any]]) -> torch.Tensor:
        """-> labels; `probability` becomes the confidence map in place."""
        kinds = torch.tensor([BACKGROUND, *(f["label"] for f in findings)], dtype=torch.uint8)
        confidence = torch.tensor([0.0, *(f["confidence"] for f in findings)], dtype=torch.float32)
        below = float(np.nextafter(np.float32(self.threshold), np.float32(0.0)))
        # The labels overwrite the numbers slab by slab when both are bytes (the usual case).
        labels = index if index.dtype == torch.uint8 else torch.zeros(index.shape, dtype=torch.uint8)
        # Lookups only in the box where findings are: a scan is mostly background.
        box = nonzero_box(index[0].numpy())
        for start in range(0, probability.shape[-1], _SLAB):
            slab = slice(start, start + _SLAB)
            if box is None or start >= box[2].stop or start + _SLAB <= box[2].start:
                probability[..., slab].clamp_(max=below)
                continue
            part = (slice(None), box[0], box[1], slab)
            p = probability[part]
            found = (p >= self.threshold) & (index[part] > 0)
            numbers = index[part][found].long()
            labels[part] = 0
            labels[part][found] = kinds[numbers]
            probability[..., slab].clamp_(max=below)
            p[found] = confidence[numbers]
        return labels


@dataclass(frozen=True)
class TissueRules:
    """HU limits that tell body, air and bone apart (defaults: the bundle's config can override)."""

    body_hu: float = -350.0  # above: patient (and table/blankets, removed by the largest component)
    air_hu: float = -800.0  # a finding whose mean is below is air, not a lesion
    bone_hu: float = 300.0  # a finding whose mean is above is bone, contrast or metal
    cortex_hu: float = 500.0  # bone cortex; what it encloses in an axial slice is marrow
    bone_fraction: float = 0.5  # a finding with more of its voxels in bone (cortex or marrow) is dropped
    lung_hu: float = -400.0  # a finding whose surroundings are below sits in lung parenchyma
    # Outside lung, a finding whose mean is below is gas or fat (bowel gas, a fat plane): solid
    # lesions and cysts are above it; only lung nodules (part-solid ones) are this dark.
    gas_hu: float = -150.0
    # A finding longer than this many times its width is a tube or a sheet (a vessel, bowel, an
    # organ's rim), not a focal lesion: those are compact (lobulated ones up to ~2.4 measured).
    max_elongation: float = 3.0


class LesionFindingsd(MapTransform):
    """Lesion probability + HU (both in the model grid) -> typed label map and confidence map.

    In: `keys[0]` (pred) a one-channel probability (sigmoid applied), `hu_key` the HU image in
    the same grid. Out: pred = label map (0 background, 1 hypodense, 2 hyperdense, 3 lung
    nodule); `prob_key` = the probability map with each kept finding's voxels set to its
    calibrated confidence and everything else capped below the threshold, so any mean or max of
    `prob` over a finding reads its confidence; `findings_key` = a list of per-finding dicts.
    With `index_key` they travel to the input grid as the findings' numbers (see `PaintFindingsd`).
    `dropped_key` = a record of each candidate not kept: why (`DROP_REASONS`), its volume, and up
    to `DROPPED_POINTS` of its voxels in RAS mm, so that a validation can tell a lesion the network
    never saw from one a rule or the confidence floor dropped (`models.evaluate`).

    Confidence: see `Calibration`, fitted on the validation family (models.evaluate), of the
    candidate's lesion score (`models.lesion_score`; the mean probability without one). A candidate
    whose confidence is below `min_confidence` is dropped as the tissue rules drop one: most false
    findings are faint, thin or small, and the calibrated confidence weighs all three.
    """

    def __init__(
        self,
        keys: KeysCollection,
        hu_key: str = "hu",
        prob_key: str = "prob",
        findings_key: str = "findings",
        threshold: float = 0.5,
        min_volume_mm3: float = 10.0,
        calibration: Mapping[str, float] | None = None,
        min_confidence: float = 0.0,
        rules: Mapping[str, float] | None = None,
        body_voxel_mm: float = 4.0,
        index_key: str | None = None,
        dropped_key: str | None = "dropped",
        lesion_score: Mapping[str, float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.hu_key, self.prob_key, self.findings_key = hu_key, prob_key, findings_key
        self.dropped_key = dropped_key
        self.index_key = index_key
        self.threshold = float(threshold)
        self.min_volume_mm3 = float(min_volume_mm3)
        self.calibration = Calibration.of(calibration)
        self.lesion_score = LesionScore.of(lesion_score)
        self.min_confidence = float(min_confidence)
        self.rules = TissueRules(**{k: float(v) for k, v in (rules or {}).items()})
        self.body_voxel_mm = float(body_voxel_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        if key == []:
            return d
        prob_t = d[key]
        prob = torch.as_tensor(prob_t, dtype=torch.float32).detach().cpu().numpy()[0]
        hu_t = d[self.hu_key]
        hu = torch.as_tensor(hu_t, dtype=torch.float32).detach().cpu().numpy()[0]
        # The HU image carries the model grid's affine for sure; pred may have lost its meta.
        grid = hu_t if isinstance(hu_t, MetaTensor) else prob_t
        spacing = _spacing(grid)
        dropped: list[dict[str, Any]] | None = [] if self.dropped_key is not None else None
        numbers, painted, findings = self.findings(prob, hu, spacing, dropped, _affine(grid))
        if self.index_key is not None:
            # For the input grid (`PaintFindingsd`): the probability of kept findings (to be
            # interpolated and thresholded there for sub-voxel outlines) and the findings'
            # numbers grown by a voxel (nearest). A number per finding, not a confidence map:
            # a byte a voxel instead of four where the scan is largest.
            np.copyto(painted, prob, where=numbers > 0)  # in place: no third grid of floats
            d[key] = _like(prob_t, painted[None])
            d[self.index_key] = _like(prob_t, grow_findings(numbers)[None])
        else:
            labels = np.array([BACKGROUND, *(f["label"] for f in findings)], dtype=np.float32)[numbers]
            d[key] = _like(prob_t, labels[None])
            d[self.prob_key] = _like(prob_t, painted[None])
        d[self.findings_key] = findings
        if self.dropped_key is not None:
            d[self.dropped_key] = dropped
        return d

    def findings(
        self,
        prob: np.ndarray,
        hu: np.ndarray,
        spacing: tuple[float, float, float],
        dropped: list[dict[str, Any]] | None = None,
        affine: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """-> each kept finding's number (1, 2, ... in the order of the list), the probability
        with findings painted at their confidence and the rest capped below the threshold, and
        the findings; each candidate not kept is recorded in `dropped` where given."""
        voxel_mm3 = float(np.prod(spacing))
        above = prob >= self.threshold
        components, candidates = cc3d.connected_components(
            self.in_body(above, hu, spacing), connectivity=26, return_N=True
        )
        # A byte a voxel unless more than 255 findings could be kept: no full-grid narrowing after.
        numbers = np.zeros(prob.shape, dtype=np.uint8 if candidates <= 255 else np.int32)
        # Outside a kept finding the probability stays, capped just below the threshold.
        painted = np.minimum(prob, np.float32(np.nextafter(np.float32(self.threshold), np.float32(0.0))))
        findings: list[dict[str, Any]] = []
        stats = cc3d.statistics(components)
        # Made at the first candidate large enough to judge: the bone mask is most of this time.
        bone = functools.cache(lambda: coarse_bone(hu, spacing, self.rules.cortex_hu, self.body_voxel_mm / 2.0))
        for index in range(1, candidates + 1):
            count = int(stats["voxel_counts"][index])
            small = count * voxel_mm3 < self.min_volume_mm3
            if small and dropped is None:
                continue
            box = _grow(stats["bounding_boxes"][index], prob.shape, margin=3)
            inside = components[box] == index
            finding = "small" if small else self.judge(inside, prob[box], hu[box], bone()[box], spacing)
            if isinstance(finding, str):
                if dropped is not None:
                    dropped.append(_dropped(finding, count * voxel_mm3, box, inside, affine))
                continue
            findings.append(finding)
            numbers[box][inside] = len(findings)
            painted[box][inside] = finding["confidence"]
        narrow = numbers.dtype != np.uint8 and len(findings) <= 255
        return numbers.astype(np.uint8) if narrow else numbers, painted, findings

    def in_body(self, above: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """`above` where it lies in the body (looked up at its voxels only); no candidate, no body mask."""
        points = np.nonzero(above)
        if len(points[0]) == 0:
            return above
        gated = np.zeros_like(above)
        gated[points] = coarse_body(hu, spacing, self.rules.body_hu, self.body_voxel_mm).at(points)
        return gated

    def judge(
        self,
        inside: np.ndarray,
        prob: np.ndarray,
        hu: np.ndarray,
        bone: np.ndarray,
        spacing: tuple[float, float, float],
    ) -> dict[str, Any] | str:
        """A candidate in its box -> the finding, or why it is none (one of `DROP_REASONS`)."""
        if float(bone[inside].mean()) > self.rules.bone_fraction:
            return "bone"
        length = elongation(inside, spacing)
        if length > self.rules.max_elongation:
            return "elongated"
        finding = self.describe(inside, prob, hu, float(inside.sum()) * float(np.prod(spacing)), length)
        if isinstance(finding, dict) and finding["confidence"] < self.min_confidence:
            return "faint"
        return finding

    def describe(
        self, inside: np.ndarray, prob: np.ndarray, hu: np.ndarray, volume_mm3: float, length: float
    ) -> dict[str, Any] | str:
        """Type a candidate from its HU and its surroundings; why it is none when it is air, dense or gas."""
        rules = self.rules
        mean_hu = float(hu[inside].mean())
        if mean_hu < rules.air_hu or mean_hu > rules.bone_hu:
            return "air" if mean_hu < rules.air_hu else "dense"
        shell = ndimage.binary_dilation(inside, iterations=2) & ~inside
        around = hu[shell] if shell.any() else hu[inside]
        surround = float(np.median(around))
        if surround >= rules.lung_hu and mean_hu < rules.gas_hu:
            return "gas"
        label = LUNG_NODULE if surround < rules.lung_hu else HYPODENSE if mean_hu < surround else HYPERDENSE
        p = prob[inside]
        features = measure(p, volume_mm3, length, around, label == LUNG_NODULE)
        score = self.lesion_score.score(features)
        return {
            "label": label,
            "type": LABEL_NAMES[label],
            "volume_mm3": round(volume_mm3, 2),
            "mean_hu": round(mean_hu, 1),
            "surrounding_hu": round(surround, 1),
            "elongation": round(length, 3),
            "mean_probability": round(float(p.mean()), 4),
            "lesion_score": round(score, 4),
            "features": {name: round(value, 4) for name, value in features.items()},
            "confidence": round(self.calibration.confidence(score, volume_mm3, length), 4),
        }


# Why a candidate is not a finding: below the minimum volume, mostly bone, a tube or a sheet, air,
# denser than any lesion (bone, contrast, metal), gas or fat outside lung, below the confidence floor.
DROP_REASONS = ("small", "bone", "elongated", "air", "dense", "gas", "faint")
DROPPED_POINTS = 64  # voxels of a dropped candidate recorded (evenly spaced through it)


def _dropped(
    reason: str, volume_mm3: float, box: tuple[slice, ...], inside: np.ndarray, affine: np.ndarray | None
) -> dict[str, Any]:
    """A dropped candidate's record: why, how big, and where (RAS mm) a few of its voxels lie."""
    record: dict[str, Any] = {"reason": reason, "volume_mm3": round(volume_mm3, 2)}
    if affine is not None:
        voxels = np.argwhere(inside)
        voxels = voxels[np.linspace(0, len(voxels) - 1, min(len(voxels), DROPPED_POINTS)).round().astype(int)]
        voxels = voxels + np.array([s.start for s in box])
        record["points_mm"] = np.round(voxels @ affine[:3, :3].T + affine[:3, 3], 1).tolist()
    return record


def elongation(inside: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Length over width of a component: the square root of its largest over its smallest
    principal variance in mm^2, each voxel counted as the box it fills (its own variance s^2/12
    per axis), so that a few voxels in a row do not read as a tube."""
    points = np.argwhere(inside) * np.asarray(spacing)
    covariance = np.cov(points.T, bias=True) if len(points) > 1 else np.zeros((3, 3))
    covariance += np.diag(np.asarray(spacing) ** 2 / 12.0)
    variances = np.linalg.eigvalsh(covariance)
    return float(np.sqrt(variances[-1] / variances[0]))


def grow_findings(numbers: np.ndarray) -> np.ndarray:
    """`ndimage.grey_dilation(numbers, size=3)`, computed only around the findings (a few boxes,
    not the whole grid: seconds on a 512 x 512 x 300 scan). Equal to the whole-grid dilation: a
    voxel next to a finding lies inside that finding's box grown by one."""
    grown = np.zeros_like(numbers)
    for box in ndimage.find_objects(numbers):
        if box is None:
            continue
        box = _grow(box, numbers.shape, margin=1)
        np.maximum(grown[box], ndimage.grey_dilation(numbers[box], size=3), out=grown[box])
    return grown


@dataclass(frozen=True)
class Calibration:
    """A finding's confidence, the chance that it is a lesion, from what the engine measures of it:
    sigmoid(a logit(score) + b ln(volume mm3) + c + d elongation), the score its lesion score
    (`models.lesion_score`; the mean probability without one). The identity (a=1, b=c=d=0) is the
    score; `models.evaluate --calibrate` fits the rest."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0

    @classmethod
    def of(cls, params: Mapping[str, float] | None) -> Calibration:
        return cls(**{k: float(v) for k, v in (params or {}).items()})

    def confidence(self, score: float, volume_mm3: float, length: float) -> float:
        z = self.a * logit(score) + self.b * math.log(max(volume_mm3, 1e-3)) + self.c + self.d * length
        return sigmoid(z)


@dataclass(frozen=True)
class CoarseMask:
    """A mask made on a coarse grid (blocks of `factors` voxels) and read on the full grid as its
    nearest upsampling, without making the full grid (its float copy alone is 155 MB and 0.2 s
    on a 512 x 512 x 300 scan at 1.25 mm): what a few boxes or points need is looked up."""

    coarse: np.ndarray
    factors: tuple[int, ...]
    shape: tuple[int, ...]

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        index = [np.arange(*s.indices(n)) // f for s, n, f in zip(box, self.shape, self.factors, strict=True)]
        return self.coarse[np.ix_(*index)]

    def at(self, points: tuple[np.ndarray, ...]) -> np.ndarray:
        """The mask at full-grid voxels (as np.nonzero gives them)."""
        return self.coarse[tuple(p // f for p, f in zip(points, self.factors, strict=True))]

    def full(self) -> np.ndarray:
        return self[tuple(slice(None) for _ in self.shape)]


def above_or_all(image: Any, level: float) -> torch.Tensor:
    """A `select_fn` for CropForegroundd: the voxels above `level` (in CT, the patient and what
    lies with them), or every voxel where none is (a scan of air), so that the crop never empties
    a scan; what it leaves out is what the findings may never be in anyway. (An MR under a CT
    rule is above -350 everywhere: it is not cropped.)"""
    selected = torch.as_tensor(image) > level
    return selected if bool(selected.any()) else torch.ones_like(selected)


def coarse_body(hu: np.ndarray, spacing: tuple[float, float, float], body_hu: float, voxel_mm: float) -> CoarseMask:
    """The patient: the largest 3-D component above body_hu on a coarse grid, holes filled per slice.

    The table and blankets are separate components (a foam mattress or an air gap lies between);
    lungs and bowel gas are holes inside the body in every axial slice, so filling keeps them.
    """
    factors = tuple(max(1, round(voxel_mm / s)) for s in spacing)
    dense = (_coarse_max(hu, factors) > body_hu).numpy()
    # A thin opening breaks one-voxel bridges (a blanket touching the skin).
    dense = ndimage.binary_opening(dense, iterations=1)
    body = largest_component(dense)
    if body is None:
        return CoarseMask(np.zeros_like(dense), factors, hu.shape)
    return CoarseMask(fill_holes_per_slice(body), factors, hu.shape)


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest face-connected component of a 3-D mask; None when the mask is empty."""
    components = cc3d.connected_components(mask, connectivity=6)
    if components.max() == 0:
        return None
    counts = np.bincount(components.ravel())
    counts[0] = 0
    return np.asarray(components == int(counts.argmax()))


def coarse_bone(hu: np.ndarray, spacing: tuple[float, float, float], cortex_hu: float, voxel_mm: float) -> CoarseMask:
    """Cortex and what it encloses in axial slices (marrow of vertebrae, ribs, pelvis), coarse grid.

    Marrow (150-300 HU) looks like a hyperdense lesion by its HU alone; being enclosed by
    cortex is what tells it apart.
    """
    factors = tuple(max(1, round(voxel_mm / s)) for s in spacing)
    cortex = ndimage.binary_closing((_coarse_max(hu, factors) > cortex_hu).numpy(), iterations=1)
    return CoarseMask(fill_holes_per_slice(cortex), factors, hu.shape)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """`ndimage.binary_fill_holes` of each axial slice (its default cross: background joined
    4-way in-plane), by labelling each slice's background once instead of eroding from the
    border until nothing changes (3x faster)."""
    filled = mask.copy()
    for k in range(mask.shape[2]):
        background, n = cc3d.connected_components(~mask[:, :, k], connectivity=4, return_N=True)
        hole = np.ones(n + 1, dtype=bool)
        hole[0] = False  # the mask itself
        hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
        filled[:, :, k] |= hole[background]
    return filled


def _coarse_max(hu: np.ndarray, factors: tuple[int, ...]) -> torch.Tensor:
    """The maximum over blocks of `factors` voxels (the volume itself when they are all 1)."""
    volume = torch.from_numpy(np.ascontiguousarray(hu))
    if all(f == 1 for f in factors):
        return volume
    return F.max_pool3d(volume[None, None], factors, ceil_mode=True)[0, 0]


def _grow(box: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, shape, strict=True))


def _affine(image: Any) -> np.ndarray | None:
    return image.affine.detach().cpu().numpy().astype(np.float64) if isinstance(image, MetaTensor) else None


def _spacing(image: Any) -> tuple[float, float, float]:
    affine = _affine(image)
    if affine is None:
        return (1.0, 1.0, 1.0)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


def plain_tensor(tensor: Any) -> torch.Tensor:
    """The tensor without MONAI's meta (a numpy array as a tensor)."""
    tensor = torch.as_tensor(tensor)
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _like(reference: Any, array: np.ndarray | torch.Tensor) -> Any:
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(reference, MetaTensor):
        return MetaTensor(tensor, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))
    return tensor
