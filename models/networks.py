"""Network definitions referenced by the bundles' configs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet


class LesionUNet(torch.nn.Module):
    """MONAI's UNet with a 1x1x1 convolution head, optionally reading CT windows of an HU input.

    The stock UNet ends with an instance-normalised layer of out_channels maps: with a single
    output map its logits are normalised per volume and it cannot learn the strong background
    bias a rare-lesion task needs (measured: it trained ~10x slower). The UNet here ends in
    `features` maps and a plain linear head produces the lesion logit.

    With `windows` ([[lo, hi], ...] in HU) the input is one channel of HU and the network itself
    maps each window to [0, 1] as one channel of the UNet. The windows live in the network, not
    in the preprocessing, so the bundle takes one channel (as a service that gives one scan a
    job expects) and an exported network (ONNX, OpenVINO) carries them along.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        norm: str | None = None,
        features: int = 8,
        windows: Sequence[Sequence[float]] | None = None,
    ):
        super().__init__()
        self.windows = [(float(lo), float(hi)) for lo, hi in windows] if windows else None
        if self.windows is not None and in_channels != 1:
            raise ValueError("windows read one HU channel: in_channels must be 1")
        self.body = UNet(
            spatial_dims,
            len(self.windows) if self.windows else in_channels,
            features,
            channels,
            strides,
            num_res_units=num_res_units,
            norm=norm,  # type: ignore[arg-type]
        )
        self.head = (
            torch.nn.Conv3d(features, out_channels, kernel_size=1)
            if spatial_dims == 3
            else torch.nn.Conv2d(features, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.windows is not None:
            x = torch.cat([((x - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in self.windows], dim=1)
        return self.head(self.body(x))
