"""Sliding windows fitted to the scan (models.windows), for setups whose windows do not overlap."""

from __future__ import annotations

import math

import pytest
from monai.inferers import SlidingWindowInferer

from models.windows import WindowFit, can_fit, fitted_inferer, fitted_roi


def _computed(spatial: tuple[int, ...], sides: tuple[int, ...]) -> int:
    """Voxels a sliding window without overlap computes: whole windows along each axis."""
    return math.prod(math.ceil(size / side) * side for size, side in zip(spatial, sides, strict=True))


def _brute_force(spatial: tuple[int, ...], fit: WindowFit, least: tuple[int, ...]) -> int:
    """The fewest voxels any window of the allowed sides computes, trying every side there is."""
    axes = [
        [s for s in range(fit.multiple, fit.multiple * math.ceil(size / fit.multiple) + 1, fit.multiple) if s >= low]
        or [fit.multiple * math.ceil(size / fit.multiple)]
        for size, low in zip(spatial, least, strict=True)
    ]
    best = None
    for a in axes[0]:
        for b in axes[1]:
            for c in axes[2]:
                if a * b * c <= fit.max_voxels:
                    cost = _computed(spatial, (a, b, c))
                    best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize(
    ("spatial", "fit", "least"),
    [
        ((171, 123, 225), WindowFit(16, 3_000_000), (112, 112, 112)),  # an adult's trunk at 2.0 mm
        ((171, 123, 225), WindowFit(16, 3_000_000), (16, 16, 16)),
        ((97, 64, 150), WindowFit(16, 200_000), (48, 32, 48)),
        ((30, 200, 45), WindowFit(8, 50_000), (8, 8, 8)),
        ((5, 7, 300), WindowFit(16, 16**3 * 4), (16, 16, 16)),
        ((64, 70, 60), WindowFit(16, 3_000_000), (96, 96, 96)),  # smaller than the bundle's window
    ],
)
def test_the_fitted_window_computes_the_fewest_voxels_that_cover_the_scan(
    spatial: tuple[int, int, int], fit: WindowFit, least: tuple[int, int, int]
) -> None:
    sides = fitted_roi(spatial, fit, least)
    assert all(side % fit.multiple == 0 for side in sides)
    assert math.prod(sides) <= fit.max_voxels
    # Never thinner than the bundle's window where the scan is longer; else no longer than the scan.
    assert all(side >= min(low, size) for side, low, size in zip(sides, least, spatial, strict=True))
    assert _computed(spatial, sides) == _brute_force(spatial, fit, least)


def test_an_adult_trunk_takes_a_third_of_the_fixed_window_s_work() -> None:
    spatial = (171, 123, 225)
    fixed = _computed(spatial, (112, 112, 112))
    fitted = _computed(spatial, fitted_roi(spatial, WindowFit(16, 3_000_000), (112, 112, 112)))
    assert fixed == 12 * 112**3 and fitted == 2 * 176 * 128 * 128 < fixed / 2.9


def test_a_scan_smaller_than_a_window_takes_one_window_of_its_size() -> None:
    assert fitted_roi((40, 36, 24), WindowFit(16, 3_000_000)) == (48, 48, 32)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"multiple": 0, "max_voxels": 1000}, "multiple must be a positive integer"),
        ({"multiple": 16, "max_voxels": 2.5e6}, "max_voxels must be a positive integer"),
        ({"multiple": 16, "max_voxels": 1000}, "holds no window of 16"),
        ({"multiple": 16, "voxels": 1000}, "an object with 'multiple' and 'max_voxels'"),
        (True, "an object with"),
    ],
)
def test_a_bad_fit_is_refused_with_what_is_wrong(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowFit.parse(value)


def test_only_windows_without_overlap_are_fitted() -> None:
    plain = SlidingWindowInferer(roi_size=(112, 112, 112), overlap=0.0, mode="constant")
    fitted = fitted_inferer(plain, (171, 123, 225), WindowFit())
    assert fitted.roi_size == (176, 128, 128) and plain.roi_size == (112, 112, 112)
    overlapping = SlidingWindowInferer(roi_size=(96, 96, 96), overlap=0.25)
    assert can_fit(plain) and not can_fit(overlapping) and not can_fit(object())
    with pytest.raises(ValueError, match="without overlap"):
        fitted_inferer(overlapping, (171, 123, 225), WindowFit())
