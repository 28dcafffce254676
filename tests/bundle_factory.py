"""Model Zoo-layout bundles written by the tests, with networks whose right answer is known exactly.

The intensity bundle is a 1x1x1 convolution with fixed weights: three logits that are linear in
the intensity x (0, x - 100, 2x - 400), so the softmax argmax is label 0 below 100, label 1 from
100 to 300 and label 2 above 300, voxel by voxel. Its network and a transform live in the
bundle's own `scripts` package, as in real Model Zoo bundles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOW, HIGH = 100.0, 300.0
LABELS = {"0": "background", "1": "soft", "2": "dense"}

_NETWORK_CODE = '''
import torch


class IntensityNet(torch.nn.Module):
    """Three logits linear in the intensity: the argmax thresholds it at two values."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, kernel_size=1)

    def forward(self, x):
        return self.conv(x)
'''

_TRANSFORM_CODE = '''
from monai.transforms import MapTransform


class FailOnThin(MapTransform):
    """Refuses volumes with fewer than `min_slices` slices: a transform failing on one scan."""

    def __init__(self, keys, min_slices: int = 4):
        super().__init__(keys)
        self.min_slices = min_slices

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[-1] < self.min_slices:
                raise ValueError(f"{key} has {d[key].shape[-1]} slices, fewer than {self.min_slices}")
        return d
'''


def intensity_weights() -> dict[str, torch.Tensor]:
    # Logits 0, x - LOW, 2x - (LOW + HIGH): label 1 wins from LOW, label 2 from HIGH.
    return {
        "conv.weight": torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1, 1),
        "conv.bias": torch.tensor([0.0, -LOW, -(LOW + HIGH)]),
    }


def inference_config(spacing: float = 2.0, roi: int = 32) -> dict[str, Any]:
    return {
        "imports": ["$import scripts"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "scripts.network.IntensityNet"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "scripts.transforms.FailOnThin", "keys": "image", "min_slices": 4},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [spacing] * 3, "mode": "bilinear"},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [roi] * 3, "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg"},
            ],
        },
    }


def labels_first_postprocessing(nearest_interp: bool) -> dict[str, Any]:
    """Argmax on the model grid, then Invertd (as prostate_mri_anatomy does): with `nearest_interp`
    false, the label map comes back to the input grid interpolated, as floats between labels."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": nearest_interp,
                "to_tensor": True,
            },
        ],
    }


def metadata(
    name: str, version: str = "0.1.0", modality: str = "CT", spatial_shape: list[int | str] | None = None
) -> dict[str, Any]:
    image: dict[str, Any] = {"type": "image", "modality": modality, "num_channels": 1}
    if spatial_shape is not None:
        image["spatial_shape"] = spatial_shape
    return {
        "name": name,
        "version": version,
        "task": "label voxels by intensity (test bundle)",
        "network_data_format": {
            "inputs": {"image": image},
            "outputs": {"pred": {"type": "image", "num_channels": 3, "channel_def": LABELS}},
        },
    }


def write_intensity_bundle(
    root: Path,
    name: str = "intensity_labels",
    *,
    modality: str = "CT",
    version: str = "0.1.0",
    config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    spatial_shape: list[int | str] | None = None,
) -> Path:
    """A complete bundle under root/name; `config`/`weights` replace the defaults (for broken bundles);
    `spatial_shape`: the input the metadata says the network takes."""
    path = root / name
    (path / "configs").mkdir(parents=True, exist_ok=True)
    (path / "models").mkdir(exist_ok=True)
    (path / "scripts").mkdir(exist_ok=True)
    (path / "configs" / "metadata.json").write_text(
        json.dumps(metadata(name, version, modality, spatial_shape), indent=2)
    )
    (path / "configs" / "inference.json").write_text(json.dumps(config or inference_config(), indent=2))
    (path / "scripts" / "__init__.py").write_text("from . import network, transforms  # noqa: F401\n")
    (path / "scripts" / "network.py").write_text(_NETWORK_CODE)
    (path / "scripts" / "transforms.py").write_text(_TRANSFORM_CODE)
    torch.save(weights if weights is not None else intensity_weights(), path / "models" / "model.pt")
    return path


def break_forward(path: Path, statement: str) -> None:
    """The bundle's network runs `statement` (e.g. a `raise`) instead of its forward pass."""
    code = path / "scripts" / "network.py"
    code.write_text(code.read_text().replace("return self.conv(x)", statement))


def intensity_volume(shape: tuple[int, int, int] = (40, 36, 24), seed: int = 0) -> np.ndarray:
    """Blocks of three intensities (below LOW, between, above HIGH) with no value near a threshold."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, 20.0, dtype=np.float32)
    for _ in range(6):
        corner = [int(rng.integers(0, n - 6)) for n in shape]
        size = [int(rng.integers(4, 12)) for _ in shape]
        value = float(rng.choice([200.0, 450.0]))
        volume[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = value
    return volume


def expected_labels(volume: np.ndarray) -> np.ndarray:
    return ((volume >= LOW).astype(np.uint8) + (volume >= HIGH).astype(np.uint8)).astype(np.uint8)


def flipped_affine(spacing: float = 2.0) -> np.ndarray:
    """An LPS-like affine with a flipped third axis: the bundle's Orientationd must really invert."""
    affine = np.diag([-spacing, -spacing, -spacing, 1.0])
    affine[:3, 3] = [40.0, 30.0, 20.0]
    return affine
