"""Fresh lesions drawn into training patches, so that lesions cannot be learnt by heart.

A run sees a few hundred phantoms at most on 2 cores (the producer draws one in ~3 s of a core
the trainer is using). With so few, the network memorised them: in the lesion-balanced run (not
kept) at step 1500,
small lesions of phantoms in its pool got 1.00 (6.0, 6.6 and 8.2 mm ones) while every lesion
under 8 mm of unseen phantoms of the same family got 0.00 (measured, README). A lesion drawn
into a patch at a fresh place with a fresh outline, size and contrast at every step costs
milliseconds, so the anatomy may be seen again while no lesion ever is.

The lesions are the training family's (`models.phantoms.lesions`: radial outlines, its
contrast range and kinds), drawn into liver, spleen, kidney, pancreas or lung where the phantom
drew that organ, blurred to the model grid's partial volume and added to the noisy scan as a
difference, so the phantom's own noise texture runs through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from models.phantoms.lesions import LESION_ORGANS, appearance, choose_kind, radial_outline

Spacing = tuple[float, float, float]
LUNG_SITE, ORGAN_SITE = 1, 0  # the fourth column of Sample.sites
PARTIAL_VOLUME_SIGMA = 0.6  # voxels: the model grid's resampling blur of a lesion edge (about)
MAX_TRIES = 4  # per lesion: a site whose box holds a lesion already is skipped
MAX_NUMBER = 255  # lesion numbers are uint8


def no_sites() -> np.ndarray:
    """The sites of a phantom without organs (the simple world): no lesion is drawn into it."""
    return np.zeros((0, 4), dtype=np.int64)


@dataclass(frozen=True)
class Insertion:
    """How many fresh lesions a patch gets, and their sizes."""

    share: float = 0.0  # of patches that get lesions drawn in; 0 turns insertion off
    count: tuple[int, int] = (1, 3)  # lesions a chosen patch gets, inclusive
    diameter_mm: tuple[float, float] = (3.0, 16.0)  # log-uniform: small ones are the ones missed


def sites_in_patch(sites: np.ndarray, start: np.ndarray, patch: int) -> np.ndarray:
    """The sites (x, y, z, lung) inside the patch at `start`, in patch coordinates."""
    if not len(sites):
        return sites
    local = sites[:, :3] - start
    inside = ((local >= 0) & (local < patch)).all(axis=1)
    return np.concatenate([local[inside], sites[inside, 3:]], axis=1)


def insert_lesions(
    image: torch.Tensor,
    numbers: torch.Tensor,
    sites: np.ndarray,
    spacing: Spacing,
    rng: np.random.Generator,
    insertion: Insertion,
) -> list[tuple[int, int]]:
    """Draw lesions into `image` (HU) and `numbers` in place; returns (number, voxels) of each new one.

    Each new lesion gets a number above every number in the patch, so numbers stay unique in it.
    """
    counts: list[tuple[int, int]] = []
    if not len(sites):
        return counts
    wanted = int(rng.integers(insertion.count[0], insertion.count[1] + 1))
    lung = sites[:, 3] == LUNG_SITE
    groups = [group for group in (sites[lung], sites[~lung]) if len(group)]
    for _ in range(wanted * MAX_TRIES):
        if len(counts) == wanted:
            break
        # Lung is most of the organ volume: by voxels nearly every lesion would be a nodule.
        group = groups[0] if len(groups) == 1 or rng.random() < LESION_ORGANS["lung"] else groups[1]
        site = group[int(rng.integers(len(group)))]
        drawn = _draw_one(image, numbers, site, spacing, rng, insertion)
        if drawn is not None:
            counts.append(drawn)
    return counts


def _draw_one(
    image: torch.Tensor,
    numbers: torch.Tensor,
    site: np.ndarray,
    spacing: Spacing,
    rng: np.random.Generator,
    insertion: Insertion,
) -> tuple[int, int] | None:
    low, high = np.log(insertion.diameter_mm[0]), np.log(insertion.diameter_mm[1])
    radii_mm = float(np.exp(rng.uniform(low, high))) / 2.0 * rng.uniform(0.8, 1.2, size=3)
    mm = np.asarray(spacing, dtype=float)
    half = np.ceil(1.5 * radii_mm / mm).astype(int) + 2  # room for bumps and the blur
    center = site[:3].astype(int)
    lo = np.maximum(center - half, 0)
    hi = np.minimum(center + half + 1, np.array(image.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    number = int(numbers.max()) + 1
    if bool((numbers[box] > 0).any()) or number > MAX_NUMBER:
        return None  # lesions do not touch: each keeps its own number
    axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, center, mm, strict=True)]
    local = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = radial_outline(tuple(local), radii_mm, rng)
    soft = ndimage.gaussian_filter(inside.astype(np.float32), PARTIAL_VOLUME_SIGMA)
    label = soft >= 0.5
    if not label.any():
        return None  # smaller than a voxel at this grid
    patch = image[box].numpy()
    background = float(np.median(patch[label]))
    lung = int(site[3]) == LUNG_SITE
    kind = choose_kind("lung" if lung else "organ", rng)
    rho = np.sqrt(sum((c / r) ** 2 for c, r in zip(local, radii_mm, strict=True)))
    values = appearance(kind, background, inside, rho, rng, "train")
    # A difference, not a replacement: the scan's noise and blur stay in the lesion.
    image[box] += torch.from_numpy(soft * (values - background))
    numbers[box][torch.from_numpy(label)] = number
    return number, int(label.sum())
