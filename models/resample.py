"""MONAI's resampling (Spacingd, Invertd, SpatialResample) computed in slabs: the same numbers,
a fraction of the memory, every core.

MONAI resamples with `torch.nn.functional.affine_grid` over the whole output and one
`grid_sample` call. For a 512 x 512 x 300 output that grid is 0.9 GB (1.3 GB more for the base
grid torch builds it from), every page of it touched once, and `grid_sample` runs on one core
(torch parallelises it over the batch only). Measured on this 2-core machine, Invertd of a CT
of that size took 10-11 s and added 4 GB to the peak RSS.

`SlabbedAffineTransform` builds the grid a few output planes at a time and samples several slabs
per `grid_sample` call as a batch (the input expanded, not copied), so every thread works. Each
output voxel is computed by the same operations on the same values as in MONAI: the base grid
as torch builds it, its row times theta (`bmm`, row by row), then the same `grid_sample`.
`install` swaps it into MONAI's resampling only after a self-check shows it gives results equal
to MONAI's own, bit for bit, on this machine.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform
from monai.networks.utils import to_norm_affine
from monai.transforms import SpatialResample
from monai.transforms.spatial import functional as spatial_functional
from monai.utils import ensure_tuple

log = logging.getLogger(__name__)

# Output voxels per slab: grids of ~28 MB in float32 (4 coordinates in, 3 out; twice that in
# float64, MONAI's default for Spacing) instead of GBs, and a 512 x 512 plane fits four to a slab.
SLAB_VOXELS = 1 << 20
_DTYPES = (torch.float32, torch.float64)
_CHECK_SIZE = (7, 20, 30)
# Slabs sampled per grid_sample call, one per thread: torch parallelises grid_sample over the
# batch only. Four bound the grids in flight (~220 MB in float64) on machines with many cores.
_MAX_PARTS = 4
_INSTALL = threading.Lock()
_installed: list[bool] = []


class SlabbedAffineTransform(AffineTransform):
    """AffineTransform whose 3-D, single-image CPU resampling runs in slabs of output planes.

    Anything else (2-D, batches, CUDA, gradients, normalized thetas) goes to MONAI's own code.
    """

    slab_voxels = SLAB_VOXELS
    parts: int | None = None  # slabs per grid_sample call; None: one per torch thread, up to four
    float32_out = False  # write the result in float32 (see MonaiResampling)

    def forward(
        self, src: torch.Tensor, theta: torch.Tensor, spatial_size: Sequence[int] | int | None = None
    ) -> torch.Tensor:
        if not self._slabbable(src, theta):
            return super().forward(src, theta, spatial_size)
        size = self.spatial_size if spatial_size is None else ensure_tuple(spatial_size)
        dst_size = tuple(int(s) for s in (size if size is not None else src.shape[2:]))
        return slabbed_resample(
            src,
            self._normalized_theta(theta, tuple(src.shape[2:]), dst_size),
            dst_size,
            Sampling(self.mode, self.padding_mode, self.align_corners),
            Slabs(self.slab_voxels, self.parts, torch.float32 if self.float32_out else None),
        )

    def _slabbable(self, src: torch.Tensor, theta: torch.Tensor) -> bool:
        return (
            isinstance(src, torch.Tensor)
            and isinstance(theta, torch.Tensor)
            and src.dim() == 5
            and src.shape[0] == 1
            and src.device.type == "cpu"
            and src.dtype in _DTYPES
            and theta.dtype == src.dtype
            and tuple(theta.shape[-2:]) == (4, 4)
            and theta.dim() in (2, 3)
            and (theta.dim() == 2 or theta.shape[0] == 1)
            and not self.normalized
            and not (src.requires_grad or theta.requires_grad)
        )

    def _normalized_theta(
        self, theta: torch.Tensor, src_size: tuple[int, ...], dst_size: tuple[int, ...]
    ) -> torch.Tensor:
        """What AffineTransform.forward hands affine_grid, by the same steps (3-D, one image)."""
        theta = (theta[None] if theta.dim() == 2 else theta).clone()
        theta = to_norm_affine(
            affine=theta,
            src_size=src_size,
            dst_size=dst_size,
            align_corners=self.align_corners,
            zero_centered=self.zero_centered,
        )
        if self.reverse_indexing:
            reverse = torch.as_tensor(range(2, -1, -1), device=theta.device)
            theta[:, :3] = theta[:, reverse]
            theta[:, :, :3] = theta[:, :, reverse]
        return theta[:, :3]


class MonaiResampling(SlabbedAffineTransform):
    """The one installed in MONAI's spatial functions (spatial_resample, rotate), whose callers
    cast the result to float32 at once: written in float32 slab by slab, the float64 result of a
    512 x 512 x 300 Invertd (630 MB) never exists. `install` checks that MONAI's own code, run
    with it, gives MONAI's result, dtype included."""

    float32_out = True


def _linspace(count: int, dtype: torch.dtype, align_corners: bool) -> torch.Tensor:
    """torch's linspace_from_neg_one (AffineGridGenerator.cpp), step for step."""
    if count <= 1:
        return torch.zeros(1, dtype=dtype)
    values = torch.linspace(-1, 1, count, dtype=dtype)
    return values if align_corners else values * (count - 1) / count


@dataclass(frozen=True)
class Sampling:
    """grid_sample's options."""

    mode: str
    padding_mode: str
    align_corners: bool


@dataclass(frozen=True)
class Slabs:
    """How the output is cut and kept: voxels per slab, slabs per grid_sample call (None: one per
    torch thread, up to four), the output's dtype (None: the input's)."""

    voxels: int = SLAB_VOXELS
    parts: int | None = None
    dtype: torch.dtype | None = None


def slabbed_resample(
    src: torch.Tensor, theta: torch.Tensor, dst_size: tuple[int, ...], sampling: Sampling, slabs: Slabs = Slabs()
) -> torch.Tensor:
    """grid_sample(src, affine_grid(theta, dst_size)) for a (1, C, D, H, W) src and a (1, 3, 4)
    normalized theta, built and sampled a slab of D-planes at a time, several slabs per call."""
    depth, height, width = dst_size
    channels = src.shape[1]
    out = torch.empty((1, channels, depth, height, width), dtype=slabs.dtype or src.dtype)
    planes = max(1, slabs.voxels // max(1, height * width))
    batch = max(1, min(torch.get_num_threads(), _MAX_PARTS) if slabs.parts is None else slabs.parts)
    base = _BaseGrid(dst_size, theta.dtype, sampling.align_corners, planes * batch)
    transposed = theta.transpose(1, 2)
    contiguous = src.contiguous()
    for start in range(0, depth, planes * batch):
        stop = min(depth, start + planes * batch)
        in_call = batch if (stop - start) == planes * batch else 1
        grid = base.rows(start, stop).bmm(transposed).view(in_call, (stop - start) // in_call, height, width, 3)
        sampled = torch.nn.functional.grid_sample(
            contiguous.expand(in_call, -1, -1, -1, -1),
            grid,
            mode=sampling.mode,
            padding_mode=sampling.padding_mode,
            align_corners=sampling.align_corners,
        )
        # (parts, C, planes, H, W) -> (C, parts * planes, H, W): the slabs back in plane order (and
        # rounded to the output's dtype, as MONAI's own cast of the whole result would round them).
        out[0, :, start:stop] = sampled.transpose(0, 1).reshape(channels, stop - start, height, width)
    return out


class _BaseGrid:
    """torch's base grid (make_base_grid_5D: x, y, z in [-1, 1] and a 1 per output voxel), a slab
    of planes at a time in one reused buffer: only the plane's z changes from slab to slab."""

    def __init__(self, size: tuple[int, ...], dtype: torch.dtype, align_corners: bool, planes: int):
        depth, height, width = size
        self.along_d = _linspace(depth, dtype, align_corners)
        self.buffer = torch.empty((min(planes, depth), height, width, 4), dtype=dtype)
        self.buffer[..., 0] = _linspace(width, dtype, align_corners)
        self.buffer[..., 1] = _linspace(height, dtype, align_corners).unsqueeze(-1)
        self.buffer[..., 3] = 1

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """(1, voxels, 4): the base grid of output planes start..stop-1, row by row."""
        slab = self.buffer[: stop - start]
        slab[..., 2] = self.along_d[start:stop].view(-1, 1, 1)
        return slab.view(1, -1, 4)


def self_check() -> bool:
    """Whether the slabbed resampling equals MONAI's here, bit for bit, on a small awkward case:
    rotated and scaled, odd sizes, one slab and three slabs per call with a last call that is
    not full, both modes, two paddings, both corner conventions, float32 and float64.

    Slabs of thousands of rows, as in real use: torch multiplies tiny matrices (< 400 products)
    with a plain loop that rounds differently from the BLAS kernel that affine_grid's large
    product gets."""
    generator = torch.Generator().manual_seed(0)
    angle = 0.3
    theta = torch.tensor(
        [
            [math.cos(angle) * 1.3, -math.sin(angle), 0.0, 0.7],
            [math.sin(angle), math.cos(angle) * 0.8, 0.1, -1.2],
            [0.0, 0.05, 1.7, 0.4],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    for dtype in _DTYPES:
        src = torch.rand((1, 2, 7, 9, 11), generator=generator, dtype=dtype)
        for mode, padding, align in itertools.product(("bilinear", "nearest"), ("border", "zeros"), (False, True)):
            expected = AffineTransform(mode=mode, padding_mode=padding, align_corners=align)(
                src, theta.to(dtype), spatial_size=_CHECK_SIZE
            )
            slabbed = SlabbedAffineTransform(mode=mode, padding_mode=padding, align_corners=align)
            slabbed.slab_voxels = 2 * _CHECK_SIZE[1] * _CHECK_SIZE[2]
            for parts in (1, 3):
                slabbed.parts = parts
                if not torch.equal(expected, slabbed(src, theta.to(dtype), spatial_size=_CHECK_SIZE)):
                    return False
    return True


def monai_code_check() -> bool:
    """Whether MONAI's own spatial_resample, run with MonaiResampling in place of its
    AffineTransform (a copy of the function with its own globals: nothing is swapped while
    checking), gives what it gives with AffineTransform: Spacing forward and back, both modes."""
    original = spatial_functional.spatial_resample
    candidate = types.FunctionType(
        original.__code__, {**original.__globals__, "AffineTransform": MonaiResampling}, original.__name__
    )
    candidate.__defaults__ = original.__defaults__
    resampler = SpatialResample()
    generator = torch.Generator().manual_seed(1)
    image = MetaTensor(
        torch.rand((1, 9, 8, 7), generator=generator), affine=torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0]))
    )
    target = torch.diag(torch.tensor([1.25, 1.25, 1.25, 1.0], dtype=torch.float64))
    for mode, size in itertools.product(("bilinear", "nearest"), (None, (40, 30, 20))):
        arguments = (target, size, mode, "border", False, torch.float64, False, resampler.get_transform_info())
        expected, got = original(image, *arguments), candidate(image, *arguments)
        if expected.dtype != got.dtype or not torch.equal(torch.as_tensor(expected), torch.as_tensor(got)):
            return False
    return True


def install() -> bool:
    """Make MONAI's spatial resampling (Spacing, its inverse in Invertd, SpatialResample) slabbed,
    once per process, when the self-checks pass; returns whether it is in place."""
    with _INSTALL:
        if not _installed:
            ok = self_check() and monai_code_check()
            if ok:
                spatial_functional.AffineTransform = MonaiResampling  # type: ignore[misc]
            else:
                log.warning("slabbed resampling differs from MONAI's on this machine; MONAI's own is used")
            _installed.append(ok)
        return _installed[0]
