"""deepbet's two-stage brain extraction (Fisch et al., 2024) as one network of a MONAI bundle.

The bundle's preprocessing has already put the volume in RAS orientation and clipped it to [0, 1]
between its 0.5 % and 99.5 % intensity quantiles. What stays here is the part of the published method
that depends on each network's own input: a bounding-box network on the whole volume at 128^3, then the
main network on the box at 256^3, each input standardised on its own statistics.

Only torch and MONAI are imported: the bundle's `scripts` package must not depend on the hosting
service.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.transforms.utils import get_largest_connected_component_mask
from torch import nn


class DeepBetCascade(nn.Module):
    """Both TorchScript networks of deepbet 1.0.2 behind one `forward`.

    Input: a (1, 1, X, Y, Z) float volume in RAS orientation, clipped to [0, 1] by the preprocessing.
    Output: (1, 2, X, Y, Z) probabilities on the same grid (channel 0 background, 1 brain; they sum to
    1), zero brain probability outside the box found by the first stage. Computed on the device the
    networks are on and returned on the input's device.
    """

    def __init__(
        self,
        model_path: str,
        bbox_model_path: str,
        coarse_shape: tuple[int, int, int] = (128, 128, 128),
        fine_shape: tuple[int, int, int] = (256, 256, 256),
        bbox_margin: float = 0.1,
    ) -> None:
        super().__init__()
        self.bbox_model = _load_torchscript(bbox_model_path)
        self.model = _load_torchscript(model_path)
        self.coarse_shape = tuple(coarse_shape)
        self.fine_shape = tuple(fine_shape)
        self.bbox_margin = bbox_margin

    # The cascade crops at a threshold, so it has no gradient worth keeping, whoever calls it.
    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 5 or image.shape[:2] != (1, 1):
            raise ValueError(f"expected one single-channel 3-D volume (1, 1, X, Y, Z), got {tuple(image.shape)}")
        device = next(self.model.parameters()).device
        # A MetaTensor's meta means nothing to TorchScript; the grid does not change here.
        volume = image.as_subclass(torch.Tensor)[0, 0].to(device=device, dtype=torch.float32)
        coarse = self.bbox_model(_standardise(_resize(volume, self.coarse_shape)))[0, 1]
        box = _bounding_box(coarse > 0.5, volume.shape, self.bbox_margin)
        fine = self.model(_standardise(_resize(volume[box], self.fine_shape)))[0, 1]
        brain = torch.zeros_like(volume)
        brain[box] = _resize(fine, brain[box].shape)
        return torch.stack((1.0 - brain, brain))[None].to(image.device)


def _load_torchscript(path: str) -> torch.jit.ScriptModule:
    """A TorchScript file on the CPU, whatever device it was saved from (the bundle's `network` moves it)."""
    with warnings.catch_warnings():
        # torch deprecates TorchScript, but these networks are published in no other form: nothing to act on.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
        return torch.jit.load(path, map_location="cpu").eval()


def _resize(volume: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Nearest-exact resampling of a 3-D tensor, as deepbet resizes both ways."""
    return F.interpolate(volume[None, None], size=tuple(shape), mode="nearest-exact")[0, 0]


def _standardise(volume: torch.Tensor) -> torch.Tensor:
    """deepbet's network input: zero mean, unit deviation, then ImageNet's grey mean and deviation."""
    return (0.226 * (volume - volume.mean()) / volume.std() + 0.449)[None, None]


def _bounding_box(coarse_mask: torch.Tensor, shape: torch.Size, margin: float) -> tuple[slice, slice, slice]:
    """The box around the coarse brain, scaled to the full grid and widened by `margin` on each side.

    As deepbet does: the largest connected component only, and along each axis the slices of which
    more than 2 % is brain, so that a few stray voxels do not stretch the box.
    """
    brain = get_largest_connected_component_mask(coarse_mask).float()
    box = []
    for axis, (coarse_size, size) in enumerate(zip(coarse_mask.shape, shape, strict=True)):
        others = tuple(d for d in range(3) if d != axis)
        occupied = torch.nonzero(brain.mean(dim=others) > 0.02).flatten()
        if occupied.numel() == 0:
            raise ValueError("no brain found: the bounding-box network marked too few voxels")
        first, end = int(occupied.min()), int(occupied.max()) + 1
        scale = size / coarse_size
        # Rounded half to even and truncated towards zero, as deepbet's tensors do.
        centre, extent = round(scale * (first + end) / 2), round((1 + 2 * margin) * scale * (end - first))
        box.append(slice(max(0, int(centre - extent / 2)), min(size, int(centre + extent / 2))))
    return box[0], box[1], box[2]
