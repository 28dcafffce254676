"""From what a bundle's post-processing leaves in `pred` to a label map and a probability map.

Bundles end in different shapes, and all of them are honoured:
- one float channel in [0, 1] (a sigmoid map, as the service's own bundles did): the job's
  threshold makes it a mask, label 1;
- one integer-valued channel (after AsDiscreted(argmax)): the label map itself;
- several float channels (softmax probabilities): the most probable channel is the label;
- several 0/1 channels (one-hot, or overlapping sigmoid labels): the highest channel set wins;
- float values after the bundle's own AsDiscreted (a label map that Invertd interpolated, as
  prostate_mri_anatomy's does): the nearest label, never a probability to threshold.

The probability map holds, for a labelled voxel, the probability of its label, and for a
background voxel, the probability that it is foreground after all; it comes from the last float
`pred` on the input grid that the post-processing passed through (e.g. after Invertd, before
AsDiscreted). Bundles that never have one give no probability map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_UINT8_LABEL = 255


@dataclass(frozen=True)
class LabelMaps:
    labels: np.ndarray  # uint8 or uint16, the input grid
    probability: np.ndarray | None  # float32, the input grid


# Probability maps show a fractional value within a few thousand voxels spread over the volume;
# only a map that passes that sample is scanned whole, in chunks (no volume-sized copy).
_SAMPLE = 4096
_CHUNK = 1 << 22


def is_discrete(tensor: torch.Tensor) -> bool:
    """Whether every value is a whole number (a label map), exactly."""
    if not torch.is_floating_point(tensor):
        return True
    flat = (tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor).reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)]
    if not torch.equal(sample, torch.round(sample)):
        return False
    return all(
        torch.equal(chunk, torch.round(chunk))
        for chunk in (flat[i : i + _CHUNK] for i in range(0, flat.numel(), _CHUNK))
    )


def label_dtype(max_label: int) -> type[np.unsignedinteger]:
    return np.uint8 if max_label <= MAX_UINT8_LABEL else np.uint16


def to_label_maps(
    pred: torch.Tensor,
    captured: torch.Tensor | None,
    threshold: float,
    discrete: bool | None = None,
    labelled: bool = False,
) -> LabelMaps:
    """`pred` and `captured` are channel-first (C, X, Y, Z) tensors on the input grid; `discrete`:
    whether `pred` is a label map, when the caller has checked already; `labelled`: the bundle's
    post-processing made `pred` labels (AsDiscreted), so a float `pred` is an interpolated label map."""
    pred = pred.detach().cpu()
    channels = pred.shape[0]
    discrete = is_discrete(pred) if discrete is None else discrete
    if labelled and not discrete:
        return _interpolated_labels(pred, captured)
    if channels == 1 and not discrete:
        probability = pred[0].float()
        return LabelMaps(_numpy(probability >= threshold, np.uint8), _numpy(probability, np.float32))
    if channels == 1:
        labels = pred[0]
    elif not discrete:
        probabilities = pred.float()
        labels = probabilities.max(0).indices  # argmax over channels is slow on the CPU
        captured = probabilities
    else:
        weights = torch.arange(channels, dtype=torch.int32).view(-1, *([1] * (pred.ndim - 1)))
        labels = (pred.to(torch.int32) * weights).max(0).values
    max_label = int(labels.max()) if labels.numel() else 0
    label_array = _numpy(labels, label_dtype(max_label))
    return LabelMaps(label_array, _probability(captured, labels))


def _interpolated_labels(pred: torch.Tensor, captured: torch.Tensor | None) -> LabelMaps:
    """A label map resampled with interpolation: each voxel's nearest label (one channel), or its
    largest one-hot channel; never thresholded as a probability, nor taken as one."""
    if pred.shape[0] == 1:
        labels = torch.round(pred[0].float()).clamp_(min=0).to(torch.int64)
    else:
        labels = pred.float().max(0).indices
    max_label = int(labels.max()) if labels.numel() else 0
    return LabelMaps(_numpy(labels, label_dtype(max_label)), _probability(captured, labels))


def _probability(captured: torch.Tensor | None, labels: torch.Tensor) -> np.ndarray | None:
    if captured is None or tuple(captured.shape[1:]) != tuple(labels.shape) or is_discrete(captured):
        return None
    captured = captured.detach().cpu().float()
    if captured.shape[0] == 1:
        return _numpy(captured[0], np.float32)
    index = labels.to(torch.int64).clamp_(0, captured.shape[0] - 1)
    of_label = captured.gather(0, index[None])[0]
    # The foreground channels summed, not 1 - p(background): the same for softmax, but sigmoid
    # channels need not sum to 1 (and regions an inverted crop padded back hold 0 in every channel).
    foreground = captured[1:].sum(0).clamp_(0.0, 1.0)
    return _numpy(torch.where(labels > 0, of_label, foreground), np.float32)


def _numpy(tensor: torch.Tensor, dtype: type[np.generic]) -> np.ndarray:
    plain = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor  # a MetaTensor's bare data
    return plain.numpy().astype(dtype, copy=False)
