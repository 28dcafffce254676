"""How a scanner sees the phantom: acquisition grids, stored axis order, blur, streaks and noise.

The anatomy is drawn in a canonical RAS array (index grows towards patient right, anterior,
superior); the acquisition decides how that array is stored (a DICOM converter's LPS-like
layout, or permuted and flipped axes) and what the scanner adds to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]

# CT numbers a scanner can store (12-bit range with the usual -1024 offset).
HU_MIN, HU_MAX = -1024.0, 3071.0
# Below this the body wall alone (fat and muscle, up to 46 mm a side) leaves no cavity.
MIN_FOV_MM = 120.0

_LPS_LIKE = np.array([[0, -1], [1, -1], [2, 1]], dtype=float)  # stored axes: x and y flipped


@dataclass(frozen=True)
class Acquisition:
    shape: Shape  # canonical (RAS-ordered) array shape
    spacing: Spacing  # canonical spacing in mm; z is the slice direction
    layout: np.ndarray  # nibabel orientation of the stored axes relative to RAS

    def store(self, canonical: np.ndarray) -> np.ndarray:
        """The canonical array in the stored axis order."""
        ornt = nib.orientations.ornt_transform(_ras(), self.layout)
        return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, ornt))

    def affine(self) -> np.ndarray:
        """Voxel index of the stored array -> RAS mm, centred on the volume."""
        canonical = np.diag([*self.spacing, 1.0])
        canonical[:3, 3] = -(np.asarray(self.shape, dtype=float) - 1.0) / 2.0 * np.asarray(self.spacing)
        ornt = nib.orientations.ornt_transform(_ras(), self.layout)
        return canonical @ nib.orientations.inv_ornt_aff(ornt, self.shape)

    @property
    def stored_spacing(self) -> Spacing:
        return tuple(float(self.spacing[int(axis)]) for axis, _ in self.layout)  # type: ignore[return-value]


def _ras() -> np.ndarray:
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def lps_like(shape: Shape, spacing: Spacing) -> Acquisition:
    """The layout a DICOM converter writes for an axial series: x and y flipped."""
    return Acquisition(shape, spacing, _LPS_LIKE.copy())


def check_field_of_view(shape: Shape, spacing: Spacing) -> None:
    fov = [n * s for n, s in zip(shape[:2], spacing[:2], strict=True)]
    if min(fov) < MIN_FOV_MM:
        raise ValueError(
            f"an in-plane field of view of {fov[0]:.0f} x {fov[1]:.0f} mm cannot hold an abdomen; "
            f"at least {MIN_FOV_MM:.0f} mm is needed (more voxels or a larger spacing)"
        )


def random_acquisition(rng: np.random.Generator, family: str = "train") -> Acquisition:
    """A plausible CT grid. The two families use different grids on purpose.

    train: in-plane 0.9-1.6 mm on 224-320 matrices (kept small so generation is cheap: the model
    sees 1.25 mm or coarser anyway), slices 1-5 mm, 100-240 mm along z, stored LPS-like.
    validation: 384-512 matrices at 0.65-0.95 mm, slices 0.625-3 mm, 120-240 mm along z, stored in a
    random axis order with random flips (as converters and resliced exports do).
    """
    if family == "train":
        in_plane = float(rng.uniform(0.9, 1.6))
        n_xy = int(np.clip(round(rng.uniform(330.0, 480.0) / in_plane / 16) * 16, 224, 320))
        slice_mm = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]))
        n_z = int(np.clip(round(rng.uniform(100.0, 240.0) / slice_mm), 24, 150))
        return lps_like((n_xy, n_xy, n_z), (in_plane, in_plane, slice_mm))
    in_plane = float(rng.uniform(0.65, 0.95))
    slice_mm = float(rng.choice([0.625, 1.0, 1.5, 2.0, 3.0]))
    n_z = int(np.clip(round(rng.uniform(120.0, 240.0) / slice_mm), 40, 256))
    n_xy = int(rng.choice([384, 448, 512]))
    perm = rng.permutation(3) if rng.random() < 0.4 else np.arange(3)
    flips = rng.choice([-1.0, 1.0], size=3)
    layout = np.stack([perm.astype(float), flips], axis=1)
    return Acquisition((n_xy, n_xy, n_z), (in_plane, in_plane, slice_mm), layout)


# -- the scanner ---------------------------------------------------------------------------------
def blur(image: np.ndarray, spacing: Spacing, rng: np.random.Generator, family: str) -> np.ndarray:
    """Partial volume: the in-plane PSF of the reconstruction kernel and the slice profile."""
    fwhm_in_plane = float(rng.uniform(0.7, 1.3) if family == "train" else rng.uniform(0.9, 1.5))
    fwhm = np.array([fwhm_in_plane, fwhm_in_plane, spacing[2]])
    sigma_vox = np.maximum(fwhm / 2.355, 0.35 * np.asarray(spacing)) / np.asarray(spacing)
    return ndimage.gaussian_filter(image, sigma=sigma_vox, mode="nearest")


def streaks(
    image: np.ndarray,
    spacing: Spacing,
    sources: list[tuple[np.ndarray, float, tuple[int, int]]],
    rng: np.random.Generator,
) -> None:
    """Beam-hardening and metal streaks, in place.

    Each source is (centre in voxels (x, y), strength in HU, z range in slices). Dense objects
    give dark bands between them (beam hardening) and, for metal, alternating bright and dark
    rays fanning out; both fade with distance.
    """
    if not sources:
        return
    nx, ny, _ = image.shape
    x = (np.arange(nx) * spacing[0])[:, None]
    y = (np.arange(ny) * spacing[1])[None, :]
    for centre, strength, (z0, z1) in sources:
        cx, cy = centre[0] * spacing[0], centre[1] * spacing[1]
        angle = np.arctan2(y - cy, x - cx)
        radius = np.hypot(x - cx, y - cy)
        n_rays = int(rng.integers(6, 18))
        rays = np.zeros_like(angle)
        for theta, sign in zip(rng.uniform(-np.pi, np.pi, n_rays), rng.choice([-1.0, 1.0], n_rays), strict=True):
            width = float(rng.uniform(0.01, 0.04))
            gap = np.angle(np.exp(1j * (angle - theta)))
            rays += sign * np.exp(-0.5 * (gap / width) ** 2)
        pattern = (strength * rays * np.exp(-radius / float(rng.uniform(60.0, 160.0)))).astype(np.float32)
        image[:, :, z0:z1] += pattern[:, :, None]


def noise(
    shape: Shape, spacing: Spacing, level_hu: float, rng: np.random.Generator, family: str, body: np.ndarray
) -> np.ndarray:
    """Quantum noise.

    train: the texture of a reconstruction kernel drawn from smooth to sharp (see `_kernel_noise`),
    at one level everywhere or growing towards the body's centre (an elliptical profile).
    validation: high-pass (difference of Gaussians, a sharp kernel) with a level that grows
    towards the centre of the body by its distance from the outline.
    """
    white = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    if family == "train":
        field = _kernel_noise(white, spacing, rng)
    else:
        fine = ndimage.gaussian_filter(white, sigma=[0.6, 0.6, 0.4], mode="wrap")
        coarse = ndimage.gaussian_filter(white, sigma=[1.8, 1.8, 0.8], mode="wrap")
        field = fine - 0.8 * coarse
    field *= level_hu / max(float(field.std()), 1e-6)
    if family != "train":
        # Distance from the body outline, in-plane, scales the level from 0.7x to 1.4x.
        depth = ndimage.distance_transform_edt(body, sampling=spacing[:2])
        gain = 0.7 + 0.7 * np.clip(depth / max(float(depth.max()), 1.0), 0.0, 1.0)
        field *= gain[:, :, None].astype(np.float32)
    elif rng.random() < 0.5:
        field *= _central_gain(body, float(rng.uniform(0.3, 0.8)))[:, :, None]
    return field


def _kernel_noise(white: np.ndarray, spacing: Spacing, rng: np.random.Generator) -> np.ndarray:
    """In-plane noise of filtered back-projection: a ramp rolled off by the kernel's apodisation,
    noise power ~ f * exp(-(f / fc)^2) over spatial frequency f (cycles/mm). A cut-off of
    0.25 cycles/mm is a soft-tissue kernel (coarse grain), 0.8 a sharp one (fine grain that
    averages out when resampled to a coarser grid); slices are mildly correlated along z.
    Real scans come with any of them, so training must see them all."""
    nx, ny, _ = white.shape
    fx = np.fft.fftfreq(nx, d=spacing[0])[:, None]
    fy = np.fft.rfftfreq(ny, d=spacing[1])[None, :]
    f = np.hypot(fx, fy)
    cutoff = float(np.exp(rng.uniform(np.log(0.25), np.log(0.8))))
    amplitude = np.sqrt(f * np.exp(-((f / cutoff) ** 2))).astype(np.float32)
    spectrum = np.fft.rfft2(white, axes=(0, 1))
    spectrum *= amplitude[:, :, None]
    field = np.fft.irfft2(spectrum, s=(nx, ny), axes=(0, 1)).astype(np.float32)
    return ndimage.gaussian_filter1d(field, sigma=float(rng.uniform(0.3, 0.9)), axis=2, mode="wrap")


def _central_gain(body: np.ndarray, strength: float) -> np.ndarray:
    """(X, Y) gain from 1 - strength/2 at the body's edge to 1 + strength/2 at its centre: the
    ellipse of the body outline's second moments (more tissue, fewer photons, more noise)."""
    points = np.argwhere(body).astype(np.float64)
    if len(points) < 10:
        return np.ones(body.shape, dtype=np.float32)
    centre = points.mean(axis=0)
    covariance = np.cov((points - centre).T) * 4.0  # a uniform ellipse's radius^2 is 4 x its variance
    x, y = np.meshgrid(np.arange(body.shape[0]), np.arange(body.shape[1]), indexing="ij")
    offset = np.stack([x - centre[0], y - centre[1]], axis=-1)
    radius = np.sqrt(np.einsum("...i,ij,...j->...", offset, np.linalg.pinv(covariance), offset))
    return (1.0 + strength * (0.5 - np.clip(radius, 0.0, 1.0))).astype(np.float32)
