"""Sliding windows fitted to the scan (models.windows), for setups whose windows do not overlap."""

from __future__ import annotations

import math

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from models.passes import Move, run_passes
from models.pipeline import Pipeline
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
        ({"multiple": 16}, "an object with 'multiple' and 'max_voxels'"),
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
    spanning = SlidingWindowInferer(roi_size=(-1, 96, 96), overlap=0.0)
    assert can_fit(plain) and not can_fit(overlapping) and not can_fit(spanning) and not can_fit(object())
    with pytest.raises(ValueError, match="without overlap"):
        fitted_inferer(overlapping, (171, 123, 225), WindowFit())


def _stride_two(x: torch.Tensor) -> torch.Tensor:
    """Answers per 2-voxel block of its window: a scan moved by an odd number of voxels against
    the window reads otherwise, by an even number the same."""
    return torch.nn.functional.interpolate(torch.nn.functional.avg_pool3d(x, 2), scale_factor=2.0, mode="nearest")


def _pipeline(inferer: SlidingWindowInferer) -> Pipeline:
    return Pipeline(image_key="image", loader=None, preprocessing=None, inferer=inferer, postprocessing=[])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("inferer", "fit"),
    [
        (SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.25, mode="constant", cval=-5.0), None),
        (SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.0, mode="constant", cval=-5.0), WindowFit(8, 16**3)),
    ],
)
def test_a_shift_moves_the_scan_against_the_windows(inferer: SlidingWindowInferer, fit: WindowFit | None) -> None:
    # One axis shorter than a window (MONAI centres it), two covered by several (MONAI pins the last).
    scan = torch.rand(1, 1, 20, 30, 10, generator=torch.Generator().manual_seed(0))
    pipeline = _pipeline(inferer)

    def mean_of(shifts: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        return run_passes(pipeline, _stride_two, scan, ((),), None, shifts, fit).logits

    once = mean_of(((0, 0, 0),))
    assert once.shape == scan.shape == mean_of(((0, 0, 0), (3, 5, 7))).shape
    # Even moves: the same blocks, away from the planes a move leaves out (and a block next to them
    # that loses its partner there); odd ones: other blocks.
    assert torch.allclose(mean_of(((0, 0, 0), (2, 4, 2)))[..., 3:, 5:, 3:], once[..., 3:, 5:, 3:], atol=1e-6)
    assert not torch.allclose(mean_of(((0, 0, 0), (1, 1, 1)))[..., 1:, 1:, 1:], once[..., 1:, 1:, 1:], atol=1e-3)
    assert not torch.allclose(mean_of(((0, 0, 0), (0, 0, 1)))[..., 1:], once[..., 1:], atol=1e-3)  # spanned axis


def test_a_move_leaves_out_the_first_voxels_pads_no_more_than_the_scan_and_puts_the_output_back() -> None:
    scan = torch.rand(1, 1, 22, 32, 12, generator=torch.Generator().manual_seed(1))
    inferer = SlidingWindowInferer(roi_size=(16, 16, -1), overlap=0.0, mode="constant", cval=-5.0)
    move = Move.of((22, 32, 12), (1, 2, 3), inferer)
    # Axes several windows cover lose their first voxels; the one a window spans keeps its length.
    assert move.by == (1, 2, 3) and move.refill == (0, 0, 3)
    moved = move.apply(scan, inferer)
    assert moved.shape == (1, 1, 21, 30, 12)
    assert torch.equal(moved[..., :9], scan[..., 1:, 2:, 3:]) and bool((moved[..., 9:] == -5.0).all())
    back = move.undo(moved)
    assert back.shape == scan.shape and torch.equal(back[..., 1:, 2:, 3:], scan[..., 1:, 2:, 3:])
    assert torch.equal(back[..., :1, 2:, 3:], scan[..., 1:2, 2:, 3:])  # a plane left out repeats its neighbour
    assert Move.of((5, 40, 40), (8, 0, 0), inferer).by == (4, 0, 0)  # a voxel of the scan stays
    # Longer than a window as it runs, shorter once moved: MONAI would centre it and move it by less.
    assert Move.of((18, 40, 12), (4, 4, 4), inferer).refill == (4, 0, 4)


def test_a_move_refills_a_spanned_axis_as_the_inferer_pads() -> None:
    """Where the inferer repeats the edge planes (the default bundle: a window of constant air
    made its network read false findings), so does the refill; a whole-volume inferer gets the
    scan's lowest value (its background)."""
    scan = torch.rand(1, 1, 22, 32, 12, generator=torch.Generator().manual_seed(2))
    inferer = SlidingWindowInferer(roi_size=(16, 16, -1), overlap=0.0, padding_mode="replicate")
    moved = Move.of((22, 32, 12), (1, 2, 3), inferer).apply(scan, inferer)
    assert moved.shape == (1, 1, 21, 30, 12)
    assert torch.equal(moved[..., 9:], scan[..., 1:, 2:, 11:].expand(-1, -1, -1, -1, 3))
    whole = Move.of((22, 32, 12), (1, 2, 3), None).apply(scan, None)
    assert whole.shape == scan.shape and bool((whole[..., 21:, :, :] == scan[..., 1:, 2:, 3:].min()).all())
