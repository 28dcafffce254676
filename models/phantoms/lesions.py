"""Focal lesions: outline generators and appearances.

Two outline generators on purpose: training lesions are ellipsoids whose radius is modulated by
smooth bumps on the sphere (round to lobulated to irregular); validation lesions are clusters of
overlapping spheres or thresholded smooth noise. A model that only memorised one way of drawing
a lesion fails on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Appearance of a lesion inside its organ (lung nodules have their own).
KINDS = ("hypodense", "hyperdense", "rim_enhancing", "necrotic", "solid_nodule", "part_solid_nodule")


@dataclass(frozen=True)
class Lesion:
    organ: str
    kind: str  # one of KINDS
    center_mm: tuple[float, float, float]  # RAS mm
    radii_mm: tuple[float, float, float]
    hu: float  # mean HU of the lesion as drawn

    @property
    def diameter_mm(self) -> float:
        return 2.0 * float(np.mean(self.radii_mm))

    @property
    def density(self) -> str:
        """hypodense / hyperdense / nodule: what the post-processing should call it."""
        if self.kind in ("solid_nodule", "part_solid_nodule"):
            return "lung nodule"
        return "hyperdense" if self.kind == "hyperdense" else "hypodense"


def radial_outline(
    local: tuple[np.ndarray, np.ndarray, np.ndarray], radii: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Training outline: rho <= 1 + sum of von Mises bumps on the direction (local mm coords)."""
    u, v, w = (c / r for c, r in zip(local, radii, strict=True))
    rho = np.sqrt(u * u + v * v + w * w) + 1e-6
    style = rng.random()
    n_bumps, kappa, amp = (0, 1.0, 0.0) if style < 0.35 else (4, 4.0, 0.3) if style < 0.75 else (10, 14.0, 0.35)
    bound = np.ones_like(rho)
    for _ in range(n_bumps):
        n = rng.normal(size=3)
        n /= np.linalg.norm(n)
        cos = (u * n[0] + v * n[1] + w * n[2]) / rho
        bound = bound + float(rng.uniform(-amp, amp)) * np.exp(kappa * (cos - 1.0))
    return rho <= np.clip(bound, 0.55, 1.6)


def cluster_outline(
    local: tuple[np.ndarray, np.ndarray, np.ndarray], radii: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Validation outline: a few overlapping spheres, or smooth noise thresholded inside a ball."""
    u, v, w = (c / r for c, r in zip(local, radii, strict=True))
    if rng.random() < 0.5:
        inside = np.zeros(np.broadcast_shapes(u.shape, v.shape, w.shape), dtype=bool)
        for k in range(int(rng.integers(2, 5))):
            offset = rng.normal(0.0, 0.3, size=3) if k else np.zeros(3)
            r = float(rng.uniform(0.5, 0.8)) if k else 0.75
            inside |= (u - offset[0]) ** 2 + (v - offset[1]) ** 2 + (w - offset[2]) ** 2 <= r * r
        return inside
    rho = np.sqrt(u * u + v * v + w * w)
    field = rng.normal(size=rho.shape).astype(np.float32)
    field = ndimage.gaussian_filter(field, sigma=max(1.0, min(rho.shape) / 5.0), mode="nearest")
    field /= max(float(np.abs(field).max()), 1e-6)
    return rho + 0.35 * field <= 0.9


def appearance(
    kind: str, organ_hu: float, inside: np.ndarray, rho: np.ndarray, rng: np.random.Generator, family: str
) -> np.ndarray:
    """HU values inside the lesion (same shape as rho; rho is the normalised radius)."""
    # Contrast to the organ: training spans wider than validation so validation is covered.
    lo, hi = (15.0, 100.0) if family == "train" else (25.0, 90.0)
    delta = float(rng.uniform(lo, hi))
    values = np.full(rho.shape, organ_hu - delta, dtype=np.float32)
    if kind == "hyperdense":
        values[:] = organ_hu + delta
    elif kind == "rim_enhancing":
        rim = rho > float(rng.uniform(0.6, 0.8))
        values[rim] = organ_hu + float(rng.uniform(20.0, 70.0))
    elif kind == "necrotic":
        core = rho < float(rng.uniform(0.4, 0.7))
        values[:] = organ_hu - float(rng.uniform(10.0, 35.0))
        values[core] = float(rng.uniform(0.0, 25.0))
    elif kind == "solid_nodule":
        values[:] = float(rng.uniform(-20.0, 70.0))
    elif kind == "part_solid_nodule":
        values[:] = float(rng.uniform(-650.0, -350.0))
        values[rho < float(rng.uniform(0.3, 0.6))] = float(rng.uniform(0.0, 60.0))
    # Some lesions are heterogeneous inside.
    if rng.random() < 0.4:
        values += rng.normal(0.0, float(rng.uniform(3.0, 12.0)), size=values.shape).astype(np.float32)
    return values


def choose_kind(organ: str, rng: np.random.Generator) -> str:
    if organ == "lung":
        return "solid_nodule" if rng.random() < 0.6 else "part_solid_nodule"
    return str(rng.choice(["hypodense", "hyperdense", "rim_enhancing", "necrotic"], p=[0.45, 0.25, 0.15, 0.15]))


# Where lesions go, and how often (organs absent from the field of view are skipped).
LESION_ORGANS = {"liver": 0.38, "spleen": 0.12, "kidney": 0.12, "pancreas": 0.08, "lung": 0.30}


def place_lesions(
    painter,  # anatomy.Painter (not imported: anatomy imports nothing from here either)
    organ_labels: dict[str, int],
    organ_hu: dict[str, float],
    count: int,
    diameter_mm: tuple[float, float],
    family: str,
) -> tuple[list[Lesion], np.ndarray]:
    """Draw `count` lesions (fewer if they do not fit); returns them and their instance map."""
    rng = painter.rng
    instances = np.zeros(painter.shape, dtype=np.uint8)
    if count <= 0:
        return [], instances
    candidates = {name: np.flatnonzero(painter.tissue == label) for name, label in organ_labels.items()}
    names = [n for n in LESION_ORGANS if candidates.get(n) is not None and len(candidates[n]) > 2000]
    if not names:
        return [], instances
    weights = np.array([LESION_ORGANS[n] for n in names])
    outline = radial_outline if family == "train" else cluster_outline
    placed: list[Lesion] = []
    for _ in range(count * 25):
        if len(placed) == count:
            break
        organ = str(rng.choice(names, p=weights / weights.sum()))
        d = float(np.exp(rng.uniform(np.log(diameter_mm[0]), np.log(diameter_mm[1]))))
        radii = d / 2.0 * rng.uniform(0.8, 1.2, size=3)
        index = np.unravel_index(int(rng.choice(candidates[organ])), painter.shape)
        center = np.array([painter.axes[a][index[a]] for a in range(3)])
        found = painter.box(center, radii * 1.4)
        if found is None:
            continue
        sl, (x, y, z) = found
        local = np.meshgrid(x, y, z, indexing="ij", sparse=True)
        inside = outline(tuple(local), radii, rng)
        voxels = int(inside.sum())
        # In the organ (an exophytic part is allowed), apart from other lesions, and visible.
        if voxels == 0 or np.any(instances[sl][inside]):
            continue
        if (painter.tissue[sl][inside] == organ_labels[organ]).mean() < 0.8:
            continue
        rho = np.sqrt(sum((c / r) ** 2 for c, r in zip(local, radii, strict=True)))
        kind = choose_kind(organ, rng)
        base = organ_hu.get(organ, 0.0)
        values = appearance(kind, base, inside, rho, rng, family)
        painter.paint(sl, inside, values, None)
        instances[sl][inside] = len(placed) + 1
        hu = float(values[inside].mean())
        placed.append(Lesion(organ, kind, tuple(center.tolist()), tuple(radii.tolist()), hu))
    return placed, instances
