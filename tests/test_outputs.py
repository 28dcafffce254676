"""Output keys and encoders (pure logic)."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from consumer.jobs.outputs import OutputKeys, encode_mask
from schemas.jobs import JobRequest


@pytest.mark.parametrize(
    ("output_object", "expected"),
    [
        (None, ("results/analysis_j1.nii.gz", "results/analysis_j1.json", "results/analysis_j1.xlsx")),
        ("out/m.nii.gz", ("out/m.nii.gz", "out/m.json", "out/m.xlsx")),
        ("out/m.nii", ("out/m.nii", "out/m.json", "out/m.xlsx")),
        ("out/m", ("out/m.nii.gz", "out/m.json", "out/m.xlsx")),
    ],
)
def test_keys_derive_from_the_job(output_object: str | None, expected: tuple[str, str, str]) -> None:
    keys = OutputKeys.for_job(JobRequest(job_uuid="j1", input_object="uploads/a", output_object=output_object))
    assert (keys.mask, keys.results, keys.report) == expected


def test_mask_keeps_the_input_geometry() -> None:
    affine = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 90], [0, 0, 2.5, -50], [0, 0, 0, 1]])
    source = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine)
    source.set_sform(affine, code=2)
    source.set_qform(affine, code=1)
    mask = np.zeros((5, 6, 7), np.uint8, order="F")
    mask[1:3, 2:4, 3:5] = 1
    image = nib.Nifti1Image.from_bytes(gzip.decompress(encode_mask(mask, affine, source.header)))
    assert image.shape == mask.shape
    np.testing.assert_allclose(image.affine, affine)
    assert int(image.header["sform_code"]) == 2 and int(image.header["qform_code"]) == 1
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), mask)
