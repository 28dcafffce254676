"""The default bundle's network: CT windows inside it, so the bundle takes one HU channel."""

from __future__ import annotations

import pytest
import torch

from models.networks import LesionUNet, warm_start

WINDOWS = [[-100.0, 200.0], [-1000.0, 600.0]]


def test_windows_in_the_network_equal_windowed_channels_fed_to_its_body() -> None:
    torch.manual_seed(0)
    windowed = LesionUNet(in_channels=1, windows=WINDOWS).eval()
    plain = LesionUNet(in_channels=2).eval()
    plain.load_state_dict(windowed.state_dict())  # same parameters: the windows have none
    hu = torch.empty(1, 1, 32, 32, 32).uniform_(-1100.0, 1200.0)
    channels = torch.cat([((hu - lo) / (hi - lo)).clamp(0, 1) for lo, hi in WINDOWS], dim=1)
    with torch.no_grad():
        assert torch.allclose(windowed(hu), plain(channels))


def test_windows_need_one_input_channel() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        LesionUNet(in_channels=2, windows=WINDOWS)


def test_a_full_resolution_branch_starts_as_the_network_it_grew_from() -> None:
    torch.manual_seed(0)
    old = LesionUNet(windows=WINDOWS[:1]).eval()
    grown = LesionUNet(windows=WINDOWS[:1], detail=4).eval()
    fresh = warm_start(grown, old.state_dict())
    assert fresh and all(name.startswith("detail.") for name in fresh)
    assert grown.head.weight.shape[1] == old.head.weight.shape[1] + 4
    hu = torch.empty(1, 1, 32, 32, 32).uniform_(-1100.0, 1200.0)
    with torch.no_grad():
        assert torch.equal(grown(hu), old(hu))
        grown.head.weight[:, -1] = 1.0  # once the head reads the branch, the answer is its own
        assert not torch.equal(grown(hu), old(hu))


def test_the_branch_keeps_the_full_resolution_and_the_plain_network_is_unchanged() -> None:
    assert LesionUNet(windows=WINDOWS, detail=4)(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)
    assert not any(name.startswith("detail.") for name in LesionUNet(windows=WINDOWS).state_dict())


def test_a_new_ct_window_starts_unread_and_other_networks_weights_are_refused() -> None:
    torch.manual_seed(0)
    old = LesionUNet(windows=WINDOWS[:1]).eval()
    grown = LesionUNet(windows=WINDOWS, detail=4).eval()
    fresh = warm_start(grown, old.state_dict())
    assert all(name.startswith("detail.") for name in fresh)  # the first convolutions grew, not replaced
    hu = torch.empty(1, 1, 32, 32, 32).uniform_(-1100.0, 1200.0)
    with torch.no_grad():
        assert torch.equal(grown(hu), old(hu))
    with pytest.raises(ValueError, match="another network"):
        warm_start(LesionUNet(windows=WINDOWS[:1], channels=(8, 16, 32, 64)), old.state_dict())


def test_a_transposed_convolution_that_grew_is_not_passed_off_as_the_old_one() -> None:
    # Its dim 1 is output maps: padding it would drop the old maps' bias and change the answer.
    old = LesionUNet(windows=WINDOWS[:1], features=8).eval()
    grown = LesionUNet(windows=WINDOWS[:1], features=12).eval()
    fresh = warm_start(grown, old.state_dict())
    transposed = [n for n, m in grown.named_modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert any(name.startswith(tuple(transposed)) and name.endswith("weight") for name in fresh)
