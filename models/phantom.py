"""Synthetic abdominal CT phantoms with exact lesion ground truth.

Used to train and validate the default model and to feed tests and benchmarks. Everything is
placed in millimetres, so the same seed gives the same anatomy at any voxel spacing. The image
is in Hounsfield units; the lesion mask marks voxels whose centre lies inside a lesion.

Realism that matters for the model: a body outline with a fat layer, muscle, organs with slow
texture, lungs, a spine and ribs, hypo- and hyper-dense focal lesions of 3-30 mm inside the
organs, partial-volume blur that follows the slice thickness, and correlated noise.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from models.phantoms import add_writer_arguments, save_phantom, summary

__all__ = ["Phantom", "generate_phantom", "job_phantom", "save_phantom"]

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
VISCERA_HU = 0.0
LUNG_HU = -850.0
CANCELLOUS_BONE_HU = 250.0
CORTICAL_BONE_HU = 900.0

# Organ: (nominal HU, semi-axes as fractions of the body semi-axes (x, y) and mm along z).
ORGANS: dict[str, tuple[float, tuple[float, float, float]]] = {
    "liver": (60.0, (0.42, 0.48, 85.0)),
    "spleen": (48.0, (0.18, 0.22, 55.0)),
    "kidney_left": (35.0, (0.12, 0.16, 55.0)),
    "kidney_right": (35.0, (0.12, 0.16, 55.0)),
}
# Where lesions go, and how often.
LESION_ORGANS = {"liver": 0.6, "spleen": 0.2, "kidney_left": 0.1, "kidney_right": 0.1}


@dataclass(frozen=True)
class Lesion:
    organ: str
    kind: str  # "hypodense" | "hyperdense"
    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float

    @property
    def diameter_mm(self) -> float:
        return 2.0 * float(np.mean(self.radii_mm))


@dataclass
class Phantom:
    image: np.ndarray  # float32 HU, axes (x, y, z)
    lesion_mask: np.ndarray  # uint8, 1 inside a lesion
    affine: np.ndarray  # voxel index -> RAS mm
    spacing: tuple[float, float, float]
    lesions: list[Lesion] = field(default_factory=list)

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)


# Below this the body wall alone (fat and muscle, up to 46 mm a side) leaves no cavity.
MIN_FOV_MM = 120.0


def random_acquisition(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A plausible CT grid: in-plane 0.6-1.0 mm, slices 0.8-5 mm, 160-320 mm of body along z."""
    in_plane = float(rng.uniform(0.6, 1.0))
    slice_mm = float(rng.choice([0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
    n_xy = int(rng.choice([256, 320, 384, 448, 512]))
    n_z = int(np.clip(round(rng.uniform(160, 320) / slice_mm), 24, 400))
    return (n_xy, n_xy, n_z), (in_plane, in_plane, slice_mm)


def small_body_acquisition(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A grid whose 150-250 mm field of view this world fills with a trunk: a child's, where a
    coarse grid leaves a lesion few voxels (random_acquisition draws one in about 20 %)."""
    n_xy = int(rng.choice([192, 256]))
    in_plane = float(rng.uniform(150.0, 250.0)) / n_xy
    slice_mm = float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 5.0]))
    n_z = int(np.clip(round(rng.uniform(120, 240) / slice_mm), 24, 400))
    return (n_xy, n_xy, n_z), (in_plane, in_plane, slice_mm)


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """LPS-scanner-like affine as a DICOM converter writes it: x and y flipped, centred at 0."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def job_phantom() -> Phantom:
    """The phantom the service's job tests run on: a small scan with two lesions of 16-30 mm (what
    the coarse fast_debug grid finds reliably), so tests stay quick."""
    return generate_phantom(7, (192, 192, 64), (0.9, 0.9, 2.5), lesion_count=(2, 2), lesion_diameter_mm=(16.0, 30.0))


def generate_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    *,
    lesion_count: tuple[int, int] = (1, 5),
    lesion_diameter_mm: tuple[float, float] = (3.0, 30.0),
    noise_hu: tuple[float, float] = (6.0, 18.0),
) -> Phantom:
    """One phantom, fully determined by its arguments."""
    rng = np.random.default_rng(seed)
    if shape is None or spacing is None:
        shape_r, spacing_r = random_acquisition(rng)
        shape = shape or shape_r
        spacing = spacing or spacing_r
    fov = [n * s for n, s in zip(shape[:2], spacing[:2], strict=True)]
    if min(fov) < MIN_FOV_MM:
        raise ValueError(
            f"an in-plane field of view of {fov[0]:.0f} x {fov[1]:.0f} mm cannot hold an abdomen; "
            f"at least {MIN_FOV_MM:.0f} mm is needed (more voxels or a larger spacing)"
        )
    builder = _Builder(shape, spacing, rng)
    builder.body()
    organs = builder.organs()
    builder.lungs_and_bone()
    lesions = builder.lesions(organs, lesion_count, lesion_diameter_mm)
    image = builder.finish(noise_hu)
    return Phantom(
        image=image,
        lesion_mask=builder.lesion_mask,
        affine=phantom_affine(shape, spacing),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        lesions=lesions,
    )


@dataclass
class _Organ:
    name: str
    hu: float
    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray


class _Builder:
    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator):
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=float)
        self.rng = rng
        # Voxel centres in mm, phantom frame centred on the volume.
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
        self.image = np.full(shape, AIR_HU, dtype=np.float32)
        self.lesion_mask = np.zeros(shape, dtype=np.uint8)
        fov = np.asarray(shape) * self.spacing
        self.body_r = np.array([0.44 * fov[0] * rng.uniform(0.85, 1.0), 0.34 * fov[1] * rng.uniform(0.85, 1.0)])
        # The volume shows some part of a longer trunk: shift the anatomy along z.
        self.z_shift = float(rng.uniform(-0.25, 0.25) * fov[2])

    # -- shapes -------------------------------------------------------------------------------
    def _ellipsoid(
        self, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        """Boolean mask of a rotated ellipsoid, inside its bounding box only (cheap for small ones)."""
        extent = np.abs(rotation) @ radii  # half-size of the axis-aligned bounding box
        slices = []
        local_axes = []
        for axis in range(3):
            coords = self.axes[axis]
            lo = np.searchsorted(coords, center[axis] - extent[axis], side="left")
            hi = np.searchsorted(coords, center[axis] + extent[axis], side="right")
            slices.append(slice(lo, hi))
            local_axes.append(coords[lo:hi] - center[axis])
        if any(s.stop <= s.start for s in slices):
            return tuple(slices), np.zeros([0, 0, 0], dtype=bool)
        x, y, z = np.meshgrid(*local_axes, indexing="ij", sparse=True)
        # Coordinates in the ellipsoid's own frame: d = R^T p.
        total = np.zeros([len(a) for a in local_axes], dtype=np.float32)
        for k in range(3):
            d = rotation[0, k] * x + rotation[1, k] * y + rotation[2, k] * z
            total += (d / radii[k]) ** 2
        return tuple(slices), total <= 1.0

    def _rotation(self, max_angle_deg: float) -> np.ndarray:
        angles = np.deg2rad(self.rng.uniform(-max_angle_deg, max_angle_deg, size=3))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        return rz @ ry @ rx

    def _smooth_texture(self, amplitude_hu: float) -> np.ndarray:
        """Slowly varying tissue inhomogeneity (a few HU over centimetres)."""
        coarse_shape = [max(2, int(n * s / 24.0)) for n, s in zip(self.shape, self.spacing, strict=True)]
        coarse = self.rng.normal(0.0, amplitude_hu, size=coarse_shape).astype(np.float32)
        zoom = [n / c for n, c in zip(self.shape, coarse_shape, strict=True)]
        return ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest")[
            : self.shape[0], : self.shape[1], : self.shape[2]
        ]

    # -- anatomy ------------------------------------------------------------------------------
    def body(self) -> None:
        x, y = np.meshgrid(self.axes[0], self.axes[1], indexing="ij")
        rx, ry = self.body_r
        outer = (x / rx) ** 2 + (y / ry) ** 2 <= 1.0
        fat_mm = self.rng.uniform(8.0, 30.0)
        inner = (x / (rx - fat_mm)) ** 2 + (y / (ry - fat_mm)) ** 2 <= 1.0
        wall_mm = self.rng.uniform(8.0, 16.0)
        cavity = (x / (rx - fat_mm - wall_mm)) ** 2 + (y / (ry - fat_mm - wall_mm)) ** 2 <= 1.0
        self.image[outer] = FAT_HU
        self.image[inner] = MUSCLE_HU
        # The abdominal cavity: bowel and visceral fat blended at a scale of centimetres.
        cavity3d = np.broadcast_to(cavity[:, :, None], self.shape)
        self.image[cavity3d] = (VISCERA_HU + self._smooth_texture(30.0))[cavity3d]
        self.inner_r = np.array([rx - fat_mm, ry - fat_mm])

    def organs(self) -> list[_Organ]:
        rx, ry = self.inner_r
        placements = {
            "liver": np.array([-0.35 * rx, 0.05 * ry, 40.0]),
            "spleen": np.array([0.55 * rx, -0.15 * ry, 60.0]),
            "kidney_left": np.array([0.4 * rx, -0.45 * ry, -20.0]),
            "kidney_right": np.array([-0.4 * rx, -0.45 * ry, -30.0]),
        }
        organs = []
        texture = self._smooth_texture(4.0)
        for name, (hu, (fx, fy, rz)) in ORGANS.items():
            center = placements[name] + self.rng.normal(0.0, [0.03 * rx, 0.03 * ry, 10.0])
            center[2] += self.z_shift
            radii = np.array([fx * rx, fy * ry, rz]) * self.rng.uniform(0.85, 1.15, size=3)
            organ = _Organ(name, hu + float(self.rng.normal(0.0, 4.0)), center, radii, self._rotation(15.0))
            sl, inside = self._ellipsoid(organ.center, organ.radii, organ.rotation)
            if inside.size:
                region = self.image[sl]
                region[inside] = organ.hu + texture[sl][inside]
            organs.append(organ)
        return organs

    def lungs_and_bone(self) -> None:
        rx, ry = self.inner_r
        z = self.axes[2]
        # Lung bases above the diaphragm dome (upper part of the trunk).
        top = self.axes[2][-1]
        for side in (-1.0, 1.0):
            center = np.array([side * 0.5 * rx, 0.0, 150.0 + self.z_shift])
            radii = np.array([0.38 * rx, 0.6 * ry, 90.0])
            if center[2] - radii[2] < top:
                sl, inside = self._ellipsoid(center, radii, np.eye(3))
                if inside.size:
                    self.image[sl][inside] = LUNG_HU
        # Spine: a cortical ring around cancellous bone, posterior midline, all along z.
        x, y = np.meshgrid(self.axes[0], self.axes[1], indexing="ij")
        vy = -0.72 * ry
        r = np.hypot(x / 1.0, (y - vy) / 0.85)
        self.image[r <= 20.0] = CORTICAL_BONE_HU
        self.image[r <= 16.0] = CANCELLOUS_BONE_HU
        # Ribs: short arcs of the inner body wall repeated every ~28 mm along z.
        wall = (x / (rx - 4.0)) ** 2 + (y / (ry - 4.0)) ** 2
        arc = (wall >= 0.86) & (wall <= 1.0) & (y > -0.6 * ry)
        rib_phase = self.rng.uniform(0, 28.0)
        rib_slices = ((z - rib_phase) % 28.0) < 9.0
        for k in np.nonzero(rib_slices)[0]:
            self.image[:, :, k][arc] = CORTICAL_BONE_HU * 0.8

    def lesions(self, organs: list[_Organ], count: tuple[int, int], diameter_mm: tuple[float, float]) -> list[Lesion]:
        n = int(self.rng.integers(count[0], count[1] + 1))
        by_name = {o.name: o for o in organs}
        names = list(LESION_ORGANS)
        weights = np.array([LESION_ORGANS[k] for k in names])
        placed: list[Lesion] = []
        attempts = 0
        while len(placed) < n and attempts < 200:
            attempts += 1
            organ = by_name[str(self.rng.choice(names, p=weights / weights.sum()))]
            # Log-uniform sizes: small lesions are as common as large ones.
            d = float(np.exp(self.rng.uniform(np.log(diameter_mm[0]), np.log(diameter_mm[1]))))
            radii = d / 2.0 * self.rng.uniform(0.8, 1.2, size=3)
            margin = 1.0 - (radii.max() + 3.0) / organ.radii.min()
            if margin <= 0.1:
                continue
            direction = self.rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            local = direction * organ.radii * margin * self.rng.uniform(0.0, 1.0) ** (1 / 3)
            center = organ.center + organ.rotation @ local
            if not self._inside_volume(center, radii):
                continue
            if any(
                np.linalg.norm(center - np.array(o.center_mm)) < radii.max() + max(o.radii_mm) + 3.0 for o in placed
            ):
                continue
            kind = "hypodense" if self.rng.random() < 0.6 else "hyperdense"
            delta = self.rng.uniform(30.0, 70.0)
            hu = organ.hu - delta if kind == "hypodense" else organ.hu + delta
            lesion = Lesion(organ.name, kind, tuple(center.tolist()), tuple(radii.tolist()), float(hu))
            sl, inside = self._ellipsoid(center, radii, self._rotation(30.0))
            if inside.sum() == 0:
                continue
            self.image[sl][inside] = hu
            self.lesion_mask[sl][inside] = 1
            placed.append(lesion)
        return placed

    def _inside_volume(self, center: np.ndarray, radii: np.ndarray) -> bool:
        for axis in range(3):
            lo, hi = self.axes[axis][0], self.axes[axis][-1]
            if center[axis] - radii.max() < lo or center[axis] + radii.max() > hi:
                return False
        return True

    def finish(self, noise_hu: tuple[float, float]) -> np.ndarray:
        # Partial volume: the scanner's in-plane PSF (~1 mm FWHM) and the slice profile.
        fwhm_mm = np.array([1.0, 1.0, 0.0])
        fwhm_mm[2] = self.spacing[2]
        sigma_vox = np.maximum(fwhm_mm / 2.355, 0.35 * self.spacing) / self.spacing
        image = ndimage.gaussian_filter(self.image, sigma=sigma_vox, mode="nearest")
        # Correlated noise: white noise through a small kernel, rescaled to the chosen level.
        noise = self.rng.normal(0.0, 1.0, size=self.shape).astype(np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=[0.7, 0.7, 0.3], mode="wrap")
        noise *= float(self.rng.uniform(*noise_hu)) / max(float(noise.std()), 1e-6)
        image += noise
        return image.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic CT phantom (and its lesion mask) as NIfTI.")
    add_writer_arguments(parser)
    args = parser.parse_args()
    phantom = generate_phantom(
        args.seed, tuple(args.shape) if args.shape else None, tuple(args.spacing) if args.spacing else None
    )
    save_phantom(phantom, args.out, args.mask)
    print(summary(phantom, args.out))


if __name__ == "__main__":
    main()
