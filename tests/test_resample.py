"""The slabbed resampling gives MONAI's numbers bit for bit, for the transforms the bundles use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Orientationd, Spacingd
from monai.transforms.spatial import functional as spatial_functional

from models import resample
from models.resample import MonaiResampling, SlabbedAffineTransform


def _theta(dtype: torch.dtype) -> torch.Tensor:
    """A Spacing-like pull: scaled per axis and shifted by part of a voxel (what Spacingd computes)."""
    return torch.tensor(
        [[1.6, 0.0, 0.0, 0.3], [0.0, 0.64, 0.0, -0.18], [0.0, 0.0, 2.5, 0.75], [0.0, 0.0, 0.0, 1.0]], dtype=dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("mode", "padding"), [("bilinear", "border"), ("nearest", "border"), ("bilinear", "zeros")])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_slabs_equal_monai_bit_for_bit(dtype: torch.dtype, mode: str, padding: str, parts: int) -> None:
    src = torch.rand((1, 2, 30, 41, 17), generator=torch.Generator().manual_seed(1), dtype=dtype)
    size = (37, 52, 11)
    expected = AffineTransform(mode=mode, padding_mode=padding, align_corners=False)(src, _theta(dtype), size)
    slabbed = SlabbedAffineTransform(mode=mode, padding_mode=padding, align_corners=False)
    slabbed.slab_voxels = 3 * size[1] * size[2]  # 13 slabs, the last call not full
    slabbed.parts = parts
    assert torch.equal(slabbed(src, _theta(dtype), size), expected)


def test_what_it_does_not_slab_goes_to_monai() -> None:
    batch = torch.rand((2, 1, 8, 9, 10))
    theta = _theta(torch.float32)
    expected = AffineTransform(align_corners=False)(batch, theta, (5, 6, 7))
    assert torch.equal(SlabbedAffineTransform(align_corners=False)(batch, theta, (5, 6, 7)), expected)


def _spacing_round_trip() -> tuple[torch.Tensor, torch.Tensor]:
    """Orientationd + Spacingd (MONAI's float64 resampling) forward, and Invertd back to the input grid."""
    volume = np.random.default_rng(3).normal(size=(48, 40, 20)).astype(np.float32)
    affine = torch.tensor(np.diag([-0.8, -0.8, 2.5, 1.0]))
    pre = Compose(
        [
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=(1.25, 1.25, 1.25), mode="bilinear"),
        ]
    )
    data = pre({"image": MetaTensor(torch.from_numpy(volume), affine=affine)})
    data["pred"] = torch.sigmoid(data["image"])
    inverted = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    return data["image"].as_tensor(), inverted["pred"].as_tensor()


def test_spacingd_and_invertd_give_the_same_numbers_with_and_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spatial_functional, "AffineTransform", AffineTransform)
    monai_forward, monai_back = _spacing_round_trip()
    monkeypatch.setattr(spatial_functional, "AffineTransform", MonaiResampling)
    monkeypatch.setattr(MonaiResampling, "slab_voxels", 2000)  # many slabs on this small volume
    forward, back = _spacing_round_trip()
    assert forward.dtype == monai_forward.dtype and torch.equal(forward, monai_forward)
    assert back.dtype == monai_back.dtype and torch.equal(back, monai_back)
    assert back.shape[1:] == (48, 40, 20)


def test_in_monai_it_writes_float32_as_monai_casts_its_result() -> None:
    src = torch.rand((1, 1, 20, 30, 10), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = AffineTransform(align_corners=False)(src, _theta(torch.float64), (25, 19, 9)).to(torch.float32)
    got = MonaiResampling(align_corners=False)(src, _theta(torch.float64), (25, 19, 9))
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_install_checks_itself_against_monais_code_and_is_idempotent() -> None:
    assert resample.self_check() and resample.monai_code_check()
    assert resample.install() is True
    assert resample.install() is True
    assert spatial_functional.AffineTransform is MonaiResampling
