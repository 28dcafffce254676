"""Running the network over a scan: test-time flips, their spread as uncertainty, and progress.

Research runs the inferer on the scan and on its flips along each axis and averages the
network outputs (logits, before the bundle's own activation), so the bundle's post-processing
sees one output as usual. The spread of the activated outputs across the passes is the
voxel-wise uncertainty (variance, summed over channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import Activationsd
from monai.utils import ensure_tuple_rep

from models.pipeline import Pipeline

ProgressFn = Callable[[float], None]
# Dims of a (batch, channel, x, y, z) tensor: no flip, then one flip per spatial axis.
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))


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
) -> NetworkOutput:
    calls = expected_calls(pipeline.inferer, inputs.shape[2:])

    def report_pass(index: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda share: progress((index + share) / len(flips))

    total: torch.Tensor | None = None
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    for index, dims in enumerate(flips):
        counter = _Counter(network, report_pass(index), calls)
        out = pipeline.infer(torch.flip(inputs, dims) if dims else inputs, counter)
        out = (torch.flip(out, dims) if dims else out).float()
        total = out if total is None else total.add_(out)
        if len(flips) > 1:
            activated = activation(pipeline, out.shape[1])(out.as_tensor() if hasattr(out, "as_tensor") else out)
            moments = (
                (activated, activated**2) if moments is None else (moments[0] + activated, moments[1] + activated**2)
            )
    assert total is not None
    logits = total.div_(len(flips))
    if moments is None:
        return NetworkOutput(logits, None)
    mean, mean_sq = moments[0] / len(flips), moments[1] / len(flips)
    variance = (mean_sq - mean**2).clamp_(min=0.0).sum(dim=1, keepdim=True)
    return NetworkOutput(logits, variance)
