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

    With `detail` > 0 a full-resolution branch (two 3x3x3 convolutions of `detail` maps on the
    windowed input) joins the UNet's maps at the head: MONAI's UNet reads its input only through
    stride-2 convolutions and answers from a transposed convolution at half resolution, and
    lesions under 12 mm got a probability of 0.00 (measured; see the README).

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
        detail: int = 0,
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
        conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
        channels_in = len(self.windows) if self.windows else in_channels
        self.detail = (
            torch.nn.Sequential(
                conv(channels_in, detail, 3, padding=1),
                torch.nn.PReLU(),
                conv(detail, detail, 3, padding=1),
                torch.nn.PReLU(),
            )
            if detail > 0
            else None
        )
        self.head = conv(features + detail, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.windows is not None:
            x = torch.cat([((x - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in self.windows], dim=1)
        maps = self.body(x)
        if self.detail is not None:
            maps = torch.cat([maps, self.detail(x)], dim=1)
        return self.head(maps)


def warm_start(network: torch.nn.Module, state: dict[str, torch.Tensor], min_share: float = 0.5) -> list[str]:
    """Load `state` into a network that may have grown (new input maps of the head, new layers).

    Parameters of the same shape are copied. A parameter that grew along its input channels (the
    head after `detail` was added, the first convolutions after a CT window was added) takes the
    old values in its first channels and zeros in the new ones, so the grown network answers
    exactly as the old one did until training moves it (a new CT window must come after the old
    ones: the old weights read the first channels). Returns the names left at their initial
    values. Weights of another network (under `min_share` of the state's elements taken from
    `state`) raise ValueError: a run that silently started from scratch would look like a
    continued one.
    """
    own = network.state_dict()
    fresh = []
    for name, value in own.items():
        old = state.get(name)
        if old is not None and old.shape == value.shape:
            own[name] = old
        elif (
            old is not None
            and _reads_inputs_along_dim_1(network, name)
            and old.dim() == value.dim() >= 2
            and old.shape[1] < value.shape[1]
            and (old.shape[0], old.shape[2:]) == (value.shape[0], value.shape[2:])
        ):
            grown = torch.zeros_like(value)
            grown[:, : old.shape[1]] = old
            own[name] = grown
        else:
            fresh.append(name)
    total = sum(value.numel() for value in own.values())
    kept = total - sum(own[name].numel() for name in fresh)
    if kept < min_share * total:
        raise ValueError(
            f"these weights fit {kept / max(total, 1):.0%} of the network's parameters: another network's "
            "(or a checkpoint wrapping its state dict)?"
        )
    network.load_state_dict(own)
    return fresh


def _reads_inputs_along_dim_1(network: torch.nn.Module, name: str) -> bool:
    """A convolution's or linear layer's weight: dim 1 is its input channels. A transposed
    convolution's dim 1 is its outputs (and its bias grows with them): never grown."""
    owner, _, kind = name.rpartition(".")
    module = network.get_submodule(owner)
    convolution = isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed
    return kind == "weight" and (convolution or isinstance(module, torch.nn.Linear))
