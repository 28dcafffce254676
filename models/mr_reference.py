"""A real T1 MR with a known brain: the MNI152 template that nilearn's wheel ships.

The reference brain is `template / template.max() > 0.2`, nilearn's own definition of the MNI152
brain mask (`load_mni152_brain_mask`, threshold 0.2). The wheel holds one T1 image,
`mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz` (ICBM 2009a nonlinear symmetric, 1 mm, 197x233x189,
RAS); the other two `mni_icbm152_*` files are grey- and white-matter probability maps, on which that
threshold gives one tissue and not a brain. The T1 is already masked (zero outside the brain), so
it checks the whole path and where the model puts the brain's edge, not the removal of a skull.

nilearn is never imported or installed: its wheel is fetched with `pip download --no-deps` into the
weights cache (see models.fetch_weights) and the template is read out of the zip. Any cached nilearn
wheel that holds the template is used, so pip is run only when none is there.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from models.fetch_weights import Downloader, FetchError, default_cache_dir, pip_download

TEMPLATE_MEMBER = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
BRAIN_THRESHOLD = 0.2  # of the template's maximum, as nilearn's MNI152 brain mask

# Which world axis, and which way, each orientation code points (nibabel's RAS+ world).
_WORLD_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def nilearn_wheel(cache_dir: Path | None = None, download: Downloader = pip_download) -> Path:
    """A nilearn wheel holding the template: one from the cache, else the latest from PyPI."""
    cache_dir = cache_dir or default_cache_dir()
    for attempt in range(2):
        for wheel in sorted(cache_dir.glob("nilearn-*.whl"), reverse=True):
            with zipfile.ZipFile(wheel) as archive:
                if TEMPLATE_MEMBER in archive.namelist():
                    return wheel
        if attempt == 0:
            download("nilearn", cache_dir)
    raise FetchError(f"no nilearn wheel in {cache_dir} holds {TEMPLATE_MEMBER}")


def template_file(cache_dir: Path | None = None, download: Downloader = pip_download) -> Path:
    """The template as a NIfTI file in the cache, extracted from the nilearn wheel on first use."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / Path(TEMPLATE_MEMBER).name
    if not target.is_file():
        with zipfile.ZipFile(nilearn_wheel(cache_dir, download)) as archive:
            data = archive.read(TEMPLATE_MEMBER)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return target


def load_template(cache_dir: Path | None = None, download: Downloader = pip_download) -> nib.Nifti1Image:
    """The MNI152 T1 template (uint8 on disk, 1 mm, RAS)."""
    return nib.Nifti1Image.from_filename(template_file(cache_dir, download))


def reference_brain(image: nib.Nifti1Image) -> np.ndarray:
    """The brain of a template-like image: voxels above 0.2 of its maximum, on the image's own grid."""
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    return data / data.max() > BRAIN_THRESHOLD


def voxel_volume_ml(image: nib.Nifti1Image) -> float:
    return float(np.prod(image.header.get_zooms()[:3])) / 1000.0


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    p, r = prediction.astype(bool), reference.astype(bool)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def resampled_copy(
    image: nib.Nifti1Image, axcodes: str = "PIL", spacing_mm: float = 1.5, tilt_deg: float = 0.0
) -> nib.Nifti1Image:
    """The image on another grid covering the same field of view, trilinear, as float32.

    `axcodes` gives the direction of each voxel axis (e.g. "PIL": a sagittal-like acquisition with
    every axis permuted or flipped against RAS), `tilt_deg` an oblique rotation about the
    left-right world axis, as a tilted acquisition would have.
    """
    rotation = np.zeros((3, 3))
    for voxel_axis, code in enumerate(axcodes):
        world_axis, sign = _WORLD_AXIS[code]
        rotation[world_axis, voxel_axis] = sign
    angle = np.deg2rad(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    linear = tilt @ rotation * spacing_mm
    # The new grid spans the world box of the old one's corners, seen along the new axes.
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (np.array(image.shape[:3]) - 1)
    world = nib.affines.apply_affine(image.affine, corners)
    along = world @ np.linalg.inv(linear).T  # corner coordinates in units of the new axes
    start, stop = along.min(axis=0), along.max(axis=0)
    shape = tuple(int(np.ceil(n)) + 1 for n in stop - start)
    affine = nib.affines.from_matvec(linear, linear @ start)
    resampled = resample_from_to(image, (shape, affine), order=1, cval=0.0)
    copy = nib.Nifti1Image(np.asarray(resampled.dataobj, dtype=np.float32), affine)
    copy.set_qform(affine, code=1)
    copy.set_sform(affine, code=1)
    return copy
