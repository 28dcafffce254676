"""Synthetic CT phantoms of the trunk with exact lesion ground truth.

    from models.phantoms import generate_phantom, save_phantom
    phantom = generate_phantom(seed)                        # training family, random grid
    phantom = generate_phantom(seed, family="validation")   # the held-out family
    phantom = generate_phantom(seed, lesion_count=(0, 0))   # normal anatomy only

Roles: `anatomy` draws the trunk in millimetres (RAS), `lesions` draws focal lesions with two
different outline generators, `acquisition` decides the grid, the stored axis order and what the
scanner adds (blur, beam-hardening and metal streaks, noise). The same seed gives the same
phantom; everything is placed in mm, so anatomy does not depend on the voxel size.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np

from models.phantoms import acquisition as acq
from models.phantoms.anatomy import ORGAN_LABELS, Painter, TrunkBuilder
from models.phantoms.lesions import Lesion, place_lesions

MIN_FOV_MM = acq.MIN_FOV_MM
FAMILIES = ("train", "validation")

__all__ = [
    "FAMILIES",
    "MIN_FOV_MM",
    "Lesion",
    "Phantom",
    "add_writer_arguments",
    "generate_phantom",
    "save_phantom",
    "summary",
]


@dataclass
class Phantom:
    image: np.ndarray  # float32 HU, in the stored axis order
    lesion_mask: np.ndarray  # uint8, 1 inside a lesion
    affine: np.ndarray  # voxel index -> RAS mm
    spacing: tuple[float, float, float]  # of the stored axes
    lesions: list[Lesion] = field(default_factory=list)
    lesion_instances: np.ndarray | None = None  # uint8, lesion index + 1 (order of `lesions`)
    tissue: np.ndarray | None = None  # uint8 tissue labels (models.phantoms.anatomy)

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)


def generate_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    *,
    family: str = "train",
    lesion_count: tuple[int, int] = (1, 5),
    lesion_diameter_mm: tuple[float, float] = (3.0, 40.0),
    noise_hu: tuple[float, float] | None = None,
) -> Phantom:
    """One phantom, fully determined by its arguments.

    An explicit shape and spacing are stored LPS-like (as a DICOM converter writes them) and the
    body is scaled to fit that field of view; without them the family picks a random grid.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown phantom family {family!r}; one of {FAMILIES}")
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    if shape is None or spacing is None:
        grid = acq.random_acquisition(rng, family)
        if shape is not None or spacing is not None:
            grid = acq.lps_like(shape or grid.shape, spacing or grid.spacing)
    else:
        grid = acq.lps_like(shape, spacing)
    acq.check_field_of_view(grid.shape, grid.spacing)

    painter = Painter(grid.shape, grid.spacing, rng)
    extent = grid.shape[2] * grid.spacing[2]
    # Which part of the trunk is in view: anything from the pelvis to the upper chest.
    lo, hi = -330.0 + extent / 2.0, 260.0 - extent / 2.0
    z_offset = float(rng.uniform(lo, hi)) if hi > lo else -35.0
    body_scale = float(rng.uniform(0.85, 1.1)) if family == "train" else float(rng.uniform(0.8, 1.15))
    trunk = TrunkBuilder(painter, body_scale, z_offset, family)
    trunk.table_and_blankets()
    trunk.body()
    trunk.organs()
    trunk.vessels()
    trunk.bowel()
    trunk.skeleton()
    trunk.chest()
    trunk.metal()
    n = int(rng.integers(lesion_count[0], lesion_count[1] + 1))
    lesions, instances = place_lesions(painter, ORGAN_LABELS, trunk.trunk.organ_hu, n, lesion_diameter_mm, family)

    image = acq.blur(painter.image, grid.spacing, rng, family)
    acq.streaks(image, grid.spacing, trunk.trunk.streak_sources, rng)
    levels = noise_hu or ((6.0, 20.0) if family == "train" else (8.0, 16.0))
    body = trunk.trunk.body2d if trunk.trunk.body2d is not None else np.ones(grid.shape[:2], dtype=bool)
    image += acq.noise(grid.shape, grid.spacing, float(rng.uniform(*levels)), rng, family, body)
    np.clip(image, acq.HU_MIN, acq.HU_MAX, out=image)
    return Phantom(
        image=grid.store(image.astype(np.float32)),
        lesion_mask=grid.store((instances > 0).astype(np.uint8)),
        affine=grid.affine(),
        spacing=grid.stored_spacing,
        lesions=lesions,
        lesion_instances=grid.store(instances),
        tissue=grid.store(painter.tissue),
    )


class Savable(Protocol):
    """What writing a phantom needs: both phantom worlds (this one and models.phantom) have it."""

    image: np.ndarray
    lesion_mask: np.ndarray
    affine: np.ndarray


def save_phantom(phantom: Savable, image_path: Path, mask_path: Path | None = None) -> None:
    """Write the image (int16 HU, like a scanner's export) and optionally its lesion mask."""
    image = nib.Nifti1Image(np.round(phantom.image).astype(np.int16), phantom.affine)
    image.set_qform(phantom.affine, code=1)
    image.set_sform(phantom.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, image_path)
    if mask_path is not None:
        mask = nib.Nifti1Image(phantom.lesion_mask, phantom.affine)
        mask.set_qform(phantom.affine, code=1)
        mask.set_sform(phantom.affine, code=1)
        nib.save(mask, mask_path)


class Described(Savable, Protocol):
    """What a phantom's one-line summary needs (both phantom worlds have it)."""

    @property
    def spacing(self) -> tuple[float, float, float]: ...

    @property
    def lesions(self) -> Sequence[Any]: ...

    @property
    def lesion_count(self) -> int: ...


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments both phantom command lines share: where to write, the seed and the grid."""
    parser.add_argument("out", type=Path, help="image path, e.g. phantom.nii.gz")
    parser.add_argument("--mask", type=Path, help="also write the ground-truth lesion mask here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"))


def summary(phantom: Described, out: Path) -> str:
    lesions = ", ".join(f"{les.kind} {les.diameter_mm:.1f} mm in {les.organ}" for les in phantom.lesions)
    spacing = tuple(round(s, 3) for s in phantom.spacing)
    return f"{out}: shape {phantom.image.shape}, spacing {spacing} mm, {phantom.lesion_count} lesion(s): {lesions}"
