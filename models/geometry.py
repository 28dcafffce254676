"""Voxel-grid geometry shared by training and inference, so both see the same input.

A volume is brought to a canonical RAS axis order (flips and transposes only, never
interpolation), resampled to the model's spacing, and every step has an exact inverse so the
probability map comes back in the input's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Spacing of each array axis in mm: the length of each affine column."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def nonzero_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every non-zero voxel of a 3-D array (None: there is none), from its
    projections: what findings occupy is usually a small part of a scan."""
    z = np.flatnonzero(array.any(axis=(0, 1)))
    if len(z) == 0:
        return None
    plane = np.asarray(array[:, :, z[0] : z[-1] + 1]).any(axis=2)
    x, y = np.flatnonzero(np.any(plane, axis=1)), np.flatnonzero(np.any(plane, axis=0))
    return (slice(int(x[0]), int(x[-1]) + 1), slice(int(y[0]), int(y[-1]) + 1), slice(int(z[0]), int(z[-1]) + 1))


_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class Canonical:
    """How an array was reoriented to RAS, and how to undo it."""

    source: np.ndarray  # nibabel orientation of the input array's axes

    def apply(self, array: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(self.source, _RAS))

    def invert(self, array: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(array, nib.orientations.ornt_transform(_RAS, self.source))

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Per-axis values of the input (spacing, or axis lengths) listed in RAS axis order."""
        out = [0.0, 0.0, 0.0]
        for axis, (target, _) in enumerate(self.source):
            out[int(target)] = spacing[axis]
        return tuple(out)  # type: ignore[return-value]


def canonical(affine: np.ndarray) -> Canonical:
    """The orientation that puts an array with this affine into RAS axis order."""
    return Canonical(nib.orientations.io_orientation(np.asarray(affine)))


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, float, float], target_mm: tuple[float, float, float]
) -> tuple[int, int, int]:
    """Grid size that keeps the physical extent at (about) the target spacing."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_mm, strict=True))  # type: ignore[return-value]


def resample(volume: torch.Tensor, size: tuple[int, int, int], mode: str = "trilinear") -> torch.Tensor:
    """Resample a (B, C, X, Y, Z) tensor to `size` over the same physical extent.

    align_corners=False keeps voxel centres at half-voxel offsets, so resampling to a size and
    back to the original size is an exact geometric round trip.
    """
    if tuple(volume.shape[2:]) == tuple(size):
        return volume
    if mode == "nearest":
        return F.interpolate(volume, size=size, mode="nearest-exact")
    return F.interpolate(volume, size=size, mode=mode, align_corners=False)


def normalise_intensity(volume: np.ndarray | torch.Tensor, a_min: float, a_max: float):  # type: ignore[no-untyped-def]
    """Map a CT window to [0, 1] and clip; the same for training and inference."""
    scaled = (volume - a_min) / (a_max - a_min)
    if isinstance(scaled, torch.Tensor):
        return scaled.clamp_(0.0, 1.0)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


@dataclass(frozen=True)
class ModelGrid:
    """The way from an input array to the model's grid and back; training and inference share it."""

    orient: Canonical
    ras_shape: tuple[int, int, int]  # the input array in RAS axis order
    size: tuple[int, int, int]  # the model grid

    @classmethod
    def for_input(cls, shape: tuple[int, ...], affine: np.ndarray, spacing_mm: tuple[float, float, float]) -> ModelGrid:
        orient = canonical(affine)
        # Axis lengths permute like spacings.
        lengths = orient.spacing((float(shape[0]), float(shape[1]), float(shape[2])))
        ras_shape = (int(lengths[0]), int(lengths[1]), int(lengths[2]))
        spacing = orient.spacing(voxel_spacing(affine))
        return cls(orient, ras_shape, resampled_shape(ras_shape, spacing, spacing_mm))

    def to_model(self, array: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """(1, 1, *size) float32 tensor of the array, reoriented and resampled (trilinear)."""
        ras = np.ascontiguousarray(self.orient.apply(array), dtype=np.float32)
        return resample(torch.from_numpy(ras)[None, None].to(device), self.size)

    def from_model(self, volume: torch.Tensor) -> np.ndarray:
        """A (1, 1, *size) tensor back on the input array's own grid and axis order."""
        back = resample(volume, self.ras_shape)
        return self.orient.invert(back[0, 0].cpu().numpy())
