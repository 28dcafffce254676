"""The patient's size a profile's setup for small patients is chosen by (models.patient_size)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from models.patient_size import effective_diameter_mm

AIR, SOFT, LUNG = -1000.0, 40.0, -850.0


def _trunk(  # type: ignore[no-untyped-def]
    semi_axes_mm: tuple[float, float],
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    table: tuple[float, float] = (10.0, 15.0),
):
    """An elliptic trunk in RAS (x: right, y: anterior, z: slices), with lungs as two holes, and
    a table below it (thickness, and air between it and the back, in mm): the CT a size is
    measured on, and its affine."""
    x, y = (((np.arange(n) - (n - 1) / 2) * s)[:, None] for n, s in zip(shape[:2], spacing[:2], strict=True))
    a, b = semi_axes_mm
    trunk = (x / a) ** 2 + (y.T / b) ** 2 <= 1
    lungs = ((np.abs(x) - a / 2) / (a / 4)) ** 2 + (y.T / (b / 2)) ** 2 <= 1
    thick, gap = table
    below = -(y.T + b + gap)  # mm under the back, less the gap
    table = (np.abs(x) <= 220) & (below >= -1.0) & (below <= thick)
    plane = np.where(trunk, np.where(lungs, LUNG, SOFT), np.where(table, 300.0, AIR))
    volume = np.repeat(plane[..., None], shape[2], axis=2).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return volume, affine


@pytest.mark.parametrize("semi_axes", [(160.0, 115.0), (90.0, 70.0)])
@pytest.mark.parametrize("table", [(10.0, 15.0), (6.0, 0.0)], ids=["table apart", "lying on a thin table"])
def test_the_effective_diameter_is_that_of_the_trunk_with_its_lungs_without_the_table(
    semi_axes: tuple[float, float], table: tuple[float, float]
) -> None:
    volume, affine = _trunk(semi_axes, (0.8, 0.8, 5.0), (512, 512, 30), table)
    expected = 2 * np.sqrt(semi_axes[0] * semi_axes[1])  # a circle of the ellipse's area
    assert effective_diameter_mm(volume, affine, -350.0) == pytest.approx(expected, rel=0.03)


def test_the_size_does_not_depend_on_how_the_array_is_stored() -> None:
    """Slices along the first axis, flipped axes: the axis running head to foot is the affine's."""
    volume, affine = _trunk((150.0, 110.0), (0.9, 0.9, 2.5), (400, 400, 24))
    stored = np.ascontiguousarray(np.flip(volume.transpose(2, 1, 0), axis=1))
    ornt = nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], [[2, 1], [1, -1], [0, 1]])
    stored_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    assert np.allclose(nib.orientations.apply_orientation(volume, ornt), stored)
    assert effective_diameter_mm(stored, stored_affine, -350.0) == pytest.approx(
        effective_diameter_mm(volume, affine, -350.0), rel=0.01
    )


def test_a_scan_with_no_body_measures_zero() -> None:
    assert effective_diameter_mm(np.full((64, 64, 8), AIR, np.float32), np.eye(4), -350.0) == 0.0
