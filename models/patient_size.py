"""How large the patient in a scan is: the effective diameter of the body's axial cross-section.

A profile may run another setup for small patients (configs/profiles.json, `small_patients`): a
network trained on a coarse grid for adults loses a child's organs and lesions, where a finer
grid costs little because the scan is small. The measure is the effective diameter of AAPM
report 204 (the diameter of a circle with the body's cross-sectional area), the median over the
axial slices that hold body: the table and blankets are left out as smaller components (an
opening in the axial plane first parts a thin table the body lies on), and lungs and bowel gas
count as body (holes are filled slice by slice).
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from scipy import ndimage

from models.geometry import voxel_spacing
from models.transforms import fill_holes_per_slice, largest_component

# The body is found on a grid of about this many mm: fine enough for a child's trunk, and a
# 512x512x300 scan becomes ~1e6 voxels (tens of milliseconds).
_STEP_MM = 4.0


def effective_diameter_mm(volume: np.ndarray, affine: np.ndarray, body_above: float) -> float:
    """The patient's effective diameter in mm (0.0 when nothing in the scan is above body_above)."""
    spacing = voxel_spacing(affine)
    steps = tuple(max(1, int(_STEP_MM // s)) for s in spacing)
    coarse = np.asarray(volume[tuple(slice(None, None, k) for k in steps)]) > body_above
    axial = _axial_axis(affine)
    body = largest_component(ndimage.binary_opening(coarse, structure=_in_plane_cross(axial)))
    if body is None:
        return 0.0
    body = np.moveaxis(fill_holes_per_slice(np.moveaxis(body, axial, 2)), 2, axial)
    pixel_mm2 = math.prod(spacing[a] * steps[a] for a in range(3) if a != axial)
    areas = body.sum(axis=tuple(a for a in range(3) if a != axial)) * pixel_mm2
    area = float(np.median(areas[areas > 0]))
    return 2.0 * math.sqrt(area / math.pi)


def _in_plane_cross(axial: int) -> np.ndarray:
    """A 3x3 cross in the axial plane: an opening with it removes what is one coarse voxel thin."""
    cross = ndimage.generate_binary_structure(2, 1)
    return np.expand_dims(cross, axis=axial)


def _axial_axis(affine: np.ndarray) -> int:
    """The array axis that runs most nearly head to foot."""
    codes = nib.orientations.aff2axcodes(affine)
    return next(axis for axis, code in enumerate(codes) if code in ("S", "I"))
