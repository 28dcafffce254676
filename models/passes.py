"""Running the network over a scan: test-time flips and shifts, their spread as uncertainty, and progress.

Research runs the inferer on the scan and on its flips along each axis and averages the
network outputs (logits, before the bundle's own activation), so the bundle's post-processing
sees one output as usual. A setup may also name shifts (`"shifts": [[4, 4, 4]]` in its
configs/profiles.json entry): passes over the scan moved by that many voxels of the model grid
against every window (`Placement`), each pass for every flip. A network that downsamples by
strides answers otherwise for each position of the scan against its stride grid (aliasing);
averaging positions smooths that out. The spread of the activated outputs across the passes is
the voxel-wise uncertainty (variance, summed over channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Activationsd
from monai.utils import ensure_tuple_rep

from models.pipeline import Pipeline
from models.windows import WindowFit, fitted_inferer

ProgressFn = Callable[[float], None]
# Dims of a (batch, channel, x, y, z) tensor: no flip, then one flip per spatial axis.
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))
NO_SHIFT = (0, 0, 0)
Shift = tuple[int, ...]  # voxels of padding before each spatial axis


@dataclass
class NetworkOutput:
    logits: torch.Tensor  # (1, C, ...) on the model grid, averaged over the passes
    uncertainty: torch.Tensor | None  # (1, 1, ...) on the model grid, with flips or shifts only


class _Counter:
    """Counts the network calls the inferer makes and reports the share done."""

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], report: ProgressFn | None, calls: int):
        self.network = network
        self.report = report
        self.calls = max(1, calls)
        self.done = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        self.done += 1
        if self.report is not None:
            self.report(min(1.0, self.done / self.calls))
        return out


def expected_calls(inferer: object, spatial: Sequence[int]) -> int:
    """How many network calls a sliding window makes (MONAI's scan: windows every roi*(1-overlap))."""
    if not isinstance(inferer, SlidingWindowInferer):
        return 1
    # roi_size and overlap may be one number for every axis; a roi of 0 or less spans its axis.
    rois = ensure_tuple_rep(inferer.roi_size, len(spatial))
    overlaps = ensure_tuple_rep(inferer.overlap, len(spatial))
    windows = 1
    for size, roi, overlap in zip(spatial, rois, overlaps, strict=True):
        r = int(roi) if int(roi) > 0 else size
        step = max(1, int(r * (1 - float(overlap)))) if r < size else r
        windows *= 1 if size <= r else math.ceil((size - r) / step) + 1
    return math.ceil(windows / max(1, int(inferer.sw_batch_size)))


def activation(pipeline: Pipeline, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bundle's own output activation (its first Activationsd), else sigmoid/softmax by channels."""
    for _, transform in pipeline.postprocessing:
        if isinstance(transform, Activationsd):
            if any(transform.softmax):
                return lambda t: torch.softmax(t, dim=1)
            if any(transform.sigmoid):
                return torch.sigmoid
            return lambda t: t
    return torch.sigmoid if channels == 1 else (lambda t: torch.softmax(t, dim=1))


def run_passes(
    pipeline: Pipeline,
    network: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    flips: Sequence[tuple[int, ...]],
    progress: ProgressFn | None,
    shifts: Sequence[Shift] = (NO_SHIFT,),
    fit: WindowFit | None = None,
) -> NetworkOutput:
    """The mean network output over every flip of every shift, with the window fitted to the scan
    where the setup fits its windows. With shifts, every pass (the unshifted one too) is placed on
    a whole grid of windows (`Placement`), so that a shift moves the scan by exactly that much
    against every window."""
    inferer = pass_inferer(pipeline.inferer, inputs.shape[2:], shifts, fit)
    run = pipeline if inferer is pipeline.inferer else replace(pipeline, inferer=inferer)
    passes = len(flips) * len(shifts)

    def infer(index: int, x: torch.Tensor) -> torch.Tensor:
        report = None if progress is None else _share_of(progress, index, passes)
        return run.infer(x, _Counter(network, report, expected_calls(run.inferer, x.shape[2:])))

    total: torch.Tensor | None = None
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    for out in pass_outputs(inputs, flips, shifts, run.inferer, infer):
        out = out.float()
        total = _with_meta_of(inputs, out) if total is None else total.add_(out)
        if passes > 1:
            activated = activation(pipeline, out.shape[1])(out.as_tensor() if isinstance(out, MetaTensor) else out)
            moments = (
                (activated, activated**2) if moments is None else (moments[0] + activated, moments[1] + activated**2)
            )
    assert total is not None
    logits = total.div_(passes)
    if moments is None:
        return NetworkOutput(logits, None)
    mean, mean_sq = moments[0] / passes, moments[1] / passes
    variance = (mean_sq - mean**2).clamp_(min=0.0).sum(dim=1, keepdim=True)
    return NetworkOutput(logits, variance)


def run_moved(
    move: Shift,
    pipeline: Pipeline,
    network: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    flips: Sequence[tuple[int, ...]],
    progress: ProgressFn | None,
    shifts: Sequence[Shift] = (NO_SHIFT,),
    fit: WindowFit | None = None,
) -> NetworkOutput:
    """`run_passes` over the scan without its first `move` voxels of each axis: the scan falls that
    much earlier against every window, tiled as the inferer tiles any scan (nothing is padded, so
    no window reads a slab the scan does not have). The planes left out repeat the output next to
    them. For evaluation (`models.evaluate --moves`): how an answer depends on where the patient
    lies against the network's windows; a bundle that crops to the patient with a margin of at
    least `move` loses only margin."""
    if tuple(move) == NO_SHIFT:
        return run_passes(pipeline, network, inputs, flips, progress, shifts, fit)
    plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
    window = (slice(None), slice(None), *(slice(int(m), None) for m in move))
    output = run_passes(pipeline, network, plain[window], flips, progress, shifts, fit)
    sides = [p for m in reversed(move) for p in (int(m), 0)]

    def back(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t.as_tensor() if isinstance(t, MetaTensor) else t, sides, mode="replicate")

    uncertainty = None if output.uncertainty is None else back(output.uncertainty)
    return NetworkOutput(_with_meta_of(inputs, back(output.logits)), uncertainty)


def pass_outputs(
    inputs: torch.Tensor,
    flips: Sequence[tuple[int, ...]],
    shifts: Sequence[Shift],
    inferer: Any,
    infer: Callable[[int, torch.Tensor], torch.Tensor],
) -> Iterator[torch.Tensor]:
    """Each pass's output on the scan's own grid: the scan moved (placed once per shift), flipped,
    run by `infer(pass index, input)`, then unflipped and cropped back."""
    spatial = tuple(int(n) for n in inputs.shape[2:])
    value = padding_value(inferer, inputs)
    for number, shift in enumerate(shifts):
        placed = Placement.of(spatial, shift, inferer) if len(shifts) > 1 else None
        moved = placed.pad(inputs, value) if placed else inputs
        for index, dims in enumerate(flips, start=number * len(flips)):
            out = infer(index, torch.flip(moved, dims) if dims else moved)
            out = torch.flip(out, dims) if dims else out
            yield placed.crop(out) if placed else out


def _share_of(progress: ProgressFn, index: int, passes: int) -> ProgressFn:
    return lambda share: progress((index + share) / passes)


def pass_inferer(inferer: Any, spatial: Sequence[int], shifts: Sequence[Shift], fit: WindowFit | None) -> Any:
    """The inferer every pass runs: the setup's, or its window fitted once to the scan and its
    largest shift."""
    if fit is None:
        return inferer
    largest = [n + max(int(s[k]) for s in shifts) for k, n in enumerate(spatial)]
    return fitted_inferer(inferer, largest, fit)


def padding_value(inferer: object, inputs: torch.Tensor) -> float:
    """What a pass is padded with: the sliding window's own padding value, else the scan's lowest
    value (its background: air in CT)."""
    if isinstance(inferer, SlidingWindowInferer):
        return float(inferer.cval)
    return float(inputs.min())


def _with_meta_of(inputs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A placed pass's output carries the scan's meta, as MONAI's inferer gives it (Invertd needs it)."""
    if isinstance(inputs, MetaTensor) and not isinstance(out, MetaTensor):
        return MetaTensor(out).copy_meta_from(inputs, copy_attr=False)
    return out


@dataclass(frozen=True)
class Placement:
    """Where one pass puts the scan: `before` voxels of padding before each axis (its shift) and
    `after` after it, so that the sliding window's windows fall on a whole grid from the padded
    volume's origin. MONAI centres a scan smaller than its window and pins the last window of an
    axis to the scan's end: padding before alone would move the scan by half the shift against a
    window that spans the axis, and not at all against the last of several."""

    before: Shift
    after: Shift

    @classmethod
    def of(cls, spatial: Sequence[int], shift: Shift, inferer: object) -> Placement:
        if not isinstance(inferer, SlidingWindowInferer):
            return cls(tuple(int(s) for s in shift), (0,) * len(spatial))
        rois = ensure_tuple_rep(inferer.roi_size, len(spatial))
        overlaps = ensure_tuple_rep(inferer.overlap, len(spatial))
        after = []
        for n, s, roi, overlap in zip(spatial, shift, rois, overlaps, strict=True):
            padded, r = int(n) + int(s), int(roi)
            step = max(1, int(r * (1 - float(overlap))))
            whole = r if padded <= r else r + step * math.ceil((padded - r) / step)
            after.append(whole - padded if r > 0 else 0)  # a roi of 0 or less spans the axis
        return cls(tuple(int(s) for s in shift), tuple(after))

    def pad(self, inputs: torch.Tensor, value: float) -> torch.Tensor:
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        sides = [p for b, a in zip(reversed(self.before), reversed(self.after), strict=True) for p in (b, a)]
        return torch.nn.functional.pad(plain, sides, value=value)

    def crop(self, output: torch.Tensor) -> torch.Tensor:
        """The pass's output where the scan lies (flips already undone)."""
        stops = [output.shape[2 + k] - a for k, a in enumerate(self.after)]
        (x0, y0, z0), (x1, y1, z1) = self.before, stops
        return output[..., x0:x1, y0:y1, z0:z1]
