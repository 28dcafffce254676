"""Running the network over a scan: test-time flips and shifts, their spread as uncertainty, and progress.

Research runs the inferer on the scan and on its flips along each axis and averages the
network outputs (logits, before the bundle's own activation), so the bundle's post-processing
sees one output as usual. A setup may also name shifts (`"shifts": [[4, 4, 4]]` in its
configs/profiles.json entry): passes over the scan moved by that many voxels of the model grid
(the inferer's padding value before it), each pass for every flip. A network that downsamples by
strides answers otherwise for each position of the scan against its stride grid (aliasing);
averaging positions smooths that out. The spread of the activated outputs across the passes is
the voxel-wise uncertainty (variance, summed over channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

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
    uncertainty: torch.Tensor | None  # (1, 1, ...) on the model grid, with flips only


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
    """The mean network output over every flip of every shift (the first pass is the scan as it
    is), with the window fitted to each pass's input where the setup fits its windows."""
    passes = [(dims, shift) for shift in shifts for dims in flips]

    def report_pass(index: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda share: progress((index + share) / len(passes))

    total: torch.Tensor | None = None
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    for index, (dims, shift) in enumerate(passes):
        moved = shifted(inputs, shift, float(getattr(pipeline.inferer, "cval", 0.0)))
        run = (
            pipeline
            if fit is None
            else replace(pipeline, inferer=fitted_inferer(pipeline.inferer, moved.shape[2:], fit))
        )
        counter = _Counter(network, report_pass(index), expected_calls(run.inferer, moved.shape[2:]))
        out = run.infer(torch.flip(moved, dims) if dims else moved, counter)
        out = unshifted((torch.flip(out, dims) if dims else out).float(), shift)
        total = out if total is None else total.add_(out)
        if len(passes) > 1:
            activated = activation(pipeline, out.shape[1])(out.as_tensor() if hasattr(out, "as_tensor") else out)
            moments = (
                (activated, activated**2) if moments is None else (moments[0] + activated, moments[1] + activated**2)
            )
    assert total is not None
    logits = total.div_(len(passes))
    if moments is None:
        return NetworkOutput(logits, None)
    mean, mean_sq = moments[0] / len(passes), moments[1] / len(passes)
    variance = (mean_sq - mean**2).clamp_(min=0.0).sum(dim=1, keepdim=True)
    return NetworkOutput(logits, variance)


def shifted(inputs: torch.Tensor, shift: Shift, value: float) -> torch.Tensor:
    """The input with `shift` voxels of `value` before each spatial axis (the inferer's padding)."""
    if not any(shift):
        return inputs
    plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
    return torch.nn.functional.pad(plain, [p for s in reversed(shift) for p in (int(s), 0)], value=value)


def unshifted(output: torch.Tensor, shift: Shift) -> torch.Tensor:
    if not any(shift):
        return output
    starts = [int(s) for s in shift]
    return output[..., starts[0] :, starts[1] :, starts[2] :]
