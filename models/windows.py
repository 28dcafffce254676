"""Sliding windows fitted to the scan, for a setup whose windows do not overlap (fast_debug).

A fixed window tiles a scan badly when the windows do not overlap: MONAI pads the scan up to a
whole window and moves the last window of each axis back to end at the scan's edge, so on the
2.0 mm grid of an adult's cropped trunk (171 x 123 x 225 voxels) twelve 112^3 windows compute
16.9 M voxels for 4.7 M. A fully convolutional network answers the same for any input whose
sides its strides divide, so such a setup may take, per scan, the window that covers it with the
fewest voxels computed: here two of 176 x 128 x 128, 5.8 M voxels. A window is never smaller
than the bundle's own along an axis the scan fills (thin slabs would see less around each voxel
than the network was validated with), only larger, or as small as the scan. A bundle says its
network allows this in configs/profiles.json, per setup: `"fit_windows": {"multiple": 16,
"max_voxels": 3000000}` (sides a multiple of `multiple`; at most `max_voxels` a window, which
bounds the runtime's working memory: OpenVINO holds the buffers of the largest window it ran
until the job ends).
Windows that overlap are left as they are: their blending weights and the findings' agreement
across windows are part of what such a profile was validated with.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monai.inferers import SlidingWindowInferer
from monai.utils import ensure_tuple_rep

FIT_WINDOWS = "fit_windows"  # the key of a setup's entry in configs/profiles.json


@dataclass(frozen=True)
class WindowFit:
    multiple: int = 16  # the product of the network's strides, or a multiple of it
    max_voxels: int = 3_000_000

    @classmethod
    def parse(cls, value: Any) -> WindowFit:
        """From a profiles.json entry: an object with positive integers `multiple`, `max_voxels`."""
        if not isinstance(value, dict) or set(value) != {"multiple", "max_voxels"}:
            raise ValueError(f"{FIT_WINDOWS} must be an object with 'multiple' and 'max_voxels', not {value!r}")
        fit = cls(**value)
        for name in ("multiple", "max_voxels"):
            number = getattr(fit, name)
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ValueError(f"{FIT_WINDOWS}: {name} must be a positive integer, not {number!r}")
        if fit.max_voxels < fit.multiple**3:
            raise ValueError(f"{FIT_WINDOWS}: max_voxels {fit.max_voxels} holds no window of {fit.multiple}^3")
        return fit

    def least_voxels(self, roi: Sequence[int]) -> int:
        """The voxels of the bundle's own window with its sides rounded up to `multiple`: what
        `max_voxels` must hold, as fitted windows are never thinner than it."""
        return math.prod(self.multiple * math.ceil(int(r) / self.multiple) for r in roi)


def fitted_roi(spatial: Sequence[int], fit: WindowFit, least: Sequence[int] | None = None) -> tuple[int, ...]:
    """The window that covers a scan of `spatial` voxels with the fewest voxels computed (ties:
    the fewer windows, then the more cubic), each side a multiple of `fit.multiple`, at most
    `fit.max_voxels` in all, and no shorter than `least` (the bundle's window) where the scan is
    longer."""
    floors = least if least is not None else (fit.multiple,) * len(spatial)
    options = [_sides(int(size), fit.multiple, int(floor)) for size, floor in zip(spatial, floors, strict=True)]
    best: tuple[tuple[int, int, int], tuple[int, ...]] | None = None
    for choice in itertools.product(*options):
        sides = tuple(side for _, side in choice)
        if math.prod(sides) > fit.max_voxels:
            continue
        windows = math.prod(count for count, _ in choice)
        rank = (windows * math.prod(sides), windows, max(sides) - min(sides))
        if best is None or rank < best[0]:
            best = (rank, sides)
    if best is None:  # max_voxels holds at least one window of multiple^3 (WindowFit.parse)
        raise ValueError(f"no window of {fit.multiple}-voxel steps fits {fit.max_voxels} voxels")
    return best[1]


def _sides(size: int, multiple: int, least: int) -> list[tuple[int, int]]:
    """(windows, side) along one axis: for each count of windows the smallest side that covers the
    axis with them and is no shorter than `least` or the axis; a side shared by several counts is
    kept with its fewest windows."""
    whole = multiple * math.ceil(size / multiple)
    floor = min(multiple * math.ceil(least / multiple), whole)
    seen: dict[int, int] = {}
    for count in range(1, max(1, math.ceil(size / multiple)) + 1):
        side = max(floor, multiple * math.ceil(math.ceil(size / count) / multiple))
        seen.setdefault(side, math.ceil(size / side))
    return [(count, side) for side, count in seen.items()]


def fitted_inferer(inferer: Any, spatial: Sequence[int], fit: WindowFit) -> SlidingWindowInferer:
    """A copy of the setup's sliding-window inferer with the window fitted to this scan."""
    if not can_fit(inferer):
        raise ValueError(f"{FIT_WINDOWS} needs a sliding window without overlap, not {inferer!r}")
    fitted = copy.copy(inferer)
    fitted.roi_size = fitted_roi(spatial, fit, ensure_tuple_rep(inferer.roi_size, len(spatial)))
    fitted.roi_weight_map = None  # a cached blending map of the bundle's window would not fit this one
    return fitted


def can_fit(inferer: Any) -> bool:
    """A sliding window of a fixed window whose windows do not overlap: where fitting changes only
    the tiling (a side of 0 or less spans its axis: there is no window to fit)."""
    if not isinstance(inferer, SlidingWindowInferer):
        return False
    sides = ensure_tuple_rep(inferer.roi_size, 3)
    return all(float(o) == 0.0 for o in ensure_tuple_rep(inferer.overlap, 3)) and all(int(r) > 0 for r in sides)
