"""Running the network over a scan: test-time flips and shifts, their spread as uncertainty, and progress.

Research runs the inferer on the scan and on its flips along each axis and averages the
network outputs (logits, before the bundle's own activation), so the bundle's post-processing
sees one output as usual. A setup may also name shifts (`"shifts": [[4, 4, 4]]` in its
configs/profiles.json entry): passes over the scan moved that many voxels of the model grid
earlier against the windows (`Move`: without padding that the scan as it runs does not have;
this network read twice the false findings in windows holding a slab of padding), each pass
for every flip. A network that downsamples by
strides answers otherwise for each position of the scan against its stride grid (aliasing);
averaging positions smooths that out. With test-time flips, the spread of the activated outputs
across the passes is the voxel-wise uncertainty (variance, summed over channels); shifts alone
give none: two positions' disagreement is the network's aliasing, not doubt about the scan, and a
scan-sized map would cost every job of such a setup its inversion and writing.
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
from monai.utils import PytorchPadMode, ensure_tuple_rep, look_up_option

from models.pipeline import Pipeline
from models.transforms import plain_tensor
from models.windows import WindowFit, fitted_inferer

ProgressFn = Callable[[float], None]
# Dims of a (batch, channel, x, y, z) tensor: no flip, then one flip per spatial axis.
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))
NO_SHIFT = (0, 0, 0)
Shift = tuple[int, ...]  # voxels the scan moves earlier against the windows, on each spatial axis


@dataclass
class NetworkOutput:
    logits: torch.Tensor  # (1, C, ...) on the model grid, averaged over the passes
    uncertainty: torch.Tensor | None  # (1, 1, ...) on the model grid, with test-time flips only


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
    where the setup fits its windows. A shift moves the scan that much earlier against the windows
    (`Move`: nothing padded that the scan as it runs does not pad)."""
    inferer = pass_inferer(pipeline.inferer, inputs.shape[2:], fit)
    run = pipeline if inferer is pipeline.inferer else replace(pipeline, inferer=inferer)
    passes = len(flips) * len(shifts)
    spread = len(flips) > 1

    def infer(index: int, x: torch.Tensor) -> torch.Tensor:
        report = None if progress is None else _share_of(progress, index, passes)
        return run.infer(x, _Counter(network, report, expected_calls(run.inferer, x.shape[2:])))

    total: torch.Tensor | None = None
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    for out in pass_outputs(inputs, flips, shifts, run.inferer, infer):
        out = out.float()
        total = _with_meta_of(inputs, out) if total is None else total.add_(out)
        if spread:
            activated = activation(pipeline, out.shape[1])(plain_tensor(out))
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


def pass_outputs(
    inputs: torch.Tensor,
    flips: Sequence[tuple[int, ...]],
    shifts: Sequence[Shift],
    inferer: Any,
    infer: Callable[[int, torch.Tensor], torch.Tensor],
) -> Iterator[torch.Tensor]:
    """Each pass's output on the scan's own grid: the scan moved (once per shift), flipped, run by
    `infer(pass index, input)`, then unflipped and put back."""
    spatial = tuple(int(n) for n in inputs.shape[2:])
    for number, shift in enumerate(shifts):
        move = Move.of(spatial, shift, inferer) if tuple(shift) != NO_SHIFT else None
        scan = move.apply(inputs, inferer) if move else inputs
        for index, dims in enumerate(flips, start=number * len(flips)):
            out = infer(index, torch.flip(scan, dims) if dims else scan)
            out = torch.flip(out, dims) if dims else out
            yield move.undo(out) if move else out


def _share_of(progress: ProgressFn, index: int, passes: int) -> ProgressFn:
    return lambda share: progress((index + share) / passes)


def pass_inferer(inferer: Any, spatial: Sequence[int], fit: WindowFit | None) -> Any:
    """The inferer every pass runs: the setup's, or its window fitted once to the scan (a moved
    pass is no larger)."""
    return inferer if fit is None else fitted_inferer(inferer, spatial, fit)


def padded(inputs: torch.Tensor, pad: list[int], inferer: object) -> torch.Tensor:
    """`inputs` padded after the scan as the inferer pads a scan smaller than its window: with the
    sliding window's `cval` where its mode is constant, else with the edge planes repeated
    (reflect or circular would need more scan than a short axis has, and would not read what MONAI
    reads of a scan it centres); a whole-volume inferer: the lowest value (the background: air in
    CT)."""
    if not isinstance(inferer, SlidingWindowInferer):
        return torch.nn.functional.pad(inputs, pad, value=float(inputs.min()))
    if look_up_option(inferer.padding_mode, PytorchPadMode) == PytorchPadMode.CONSTANT:
        return torch.nn.functional.pad(inputs, pad, value=float(inferer.cval))
    return torch.nn.functional.pad(inputs, pad, mode="replicate")  # torch refuses a value here


def _with_meta_of(inputs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A moved pass's output carries the scan's meta, as MONAI's inferer gives it (Invertd needs it)."""
    if isinstance(inputs, MetaTensor) and not isinstance(out, MetaTensor):
        return MetaTensor(out).copy_meta_from(inputs, copy_attr=False)
    return out


@dataclass(frozen=True)
class Move:
    """One pass with the scan `by` voxels earlier against the windows, padded nowhere the scan as
    it runs is not: its first `by` voxels of each axis are left out (their output repeats the
    plane next to them). On an axis that the move leaves shorter than a window, as many voxels go
    after the scan, padded as the inferer pads (`padded`), so that it keeps its length and MONAI,
    which centres a scan smaller than its window, moves it by the whole shift, not part of it.
    Windows holding a slab of padding the scan as it runs never has made this network read twice
    the false findings (README)."""

    by: Shift
    refill: Shift

    @classmethod
    def of(cls, spatial: Sequence[int], shift: Shift, inferer: object) -> Move:
        if isinstance(inferer, SlidingWindowInferer):
            rois = ensure_tuple_rep(inferer.roi_size, len(spatial))
        else:
            rois = (0,) * len(spatial)  # one call on the whole scan: it keeps its size
        by = tuple(min(int(s), int(n) - 1) for s, n in zip(shift, spatial, strict=True))  # a voxel stays
        short = [int(r) <= 0 or int(n) - b < int(r) for n, r, b in zip(spatial, rois, by, strict=True)]
        return cls(by, tuple(b if w else 0 for b, w in zip(by, short, strict=True)))

    def apply(self, inputs: torch.Tensor, inferer: object) -> torch.Tensor:
        """The scan as this pass reads it; the refill is padded as `inferer` pads (`padded`)."""
        plain = plain_tensor(inputs)
        kept = plain[:, :, self.by[0] :, self.by[1] :, self.by[2] :]
        if not any(self.refill):
            return kept
        after = [p for r in reversed(self.refill) for p in (0, r)]
        return padded(kept, after, inferer)

    def undo(self, output: torch.Tensor) -> torch.Tensor:
        """The pass's output where the scan lies (flips already undone)."""
        plain = plain_tensor(output)
        stops = [plain.shape[2 + k] - r for k, r in enumerate(self.refill)]
        kept = plain[:, :, : stops[0], : stops[1], : stops[2]]
        before = [p for b in reversed(self.by) for p in (b, 0)]
        return torch.nn.functional.pad(kept, before, mode="replicate")
