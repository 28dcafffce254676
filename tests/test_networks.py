"""The default bundle's network: CT windows inside it, so the bundle takes one HU channel."""

from __future__ import annotations

import pytest
import torch

from models.networks import LesionUNet

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
