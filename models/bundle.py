"""A MONAI bundle on disk: `configs/metadata.json`, `configs/inference.json`, `models/model.pt`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from schemas.jobs import Profile


class BundleError(RuntimeError):
    """The bundle is missing a file or its files do not fit together."""


@dataclass(frozen=True)
class ProfileConfig:
    """How one processing profile runs this model."""

    spacing_mm: tuple[float, float, float]
    overlap: float
    blend: str  # "constant" | "gaussian"
    sw_batch_size: int
    min_lesion_volume_mm3: float


@dataclass(frozen=True)
class Bundle:
    path: Path
    metadata: dict[str, Any]
    parser: ConfigParser

    @classmethod
    def load(cls, path: Path) -> Bundle:
        metadata_file = path / "configs" / "metadata.json"
        config_file = path / "configs" / "inference.json"
        for required in (metadata_file, config_file, path / "models" / "model.pt"):
            if not required.is_file():
                raise BundleError(f"model bundle {path} lacks {required.relative_to(path)}")
        parser = ConfigParser()
        parser.read_meta(str(metadata_file))
        parser.read_config(str(config_file))
        return cls(path, json.loads(metadata_file.read_text()), parser)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def intensity_window(self) -> tuple[float, float]:
        window = self.parser["intensity"]
        return float(window["a_min"]), float(window["a_max"])

    @property
    def roi_size(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.parser["roi_size"])  # type: ignore[return-value]

    def profile(self, profile: Profile) -> ProfileConfig:
        raw = self.parser["profiles"][profile.value]
        return ProfileConfig(
            spacing_mm=tuple(float(v) for v in raw["spacing_mm"]),  # type: ignore[arg-type]
            overlap=float(raw["overlap"]),
            blend=str(raw["blend"]),
            sw_batch_size=int(raw["sw_batch_size"]),
            min_lesion_volume_mm3=float(raw["min_lesion_volume_mm3"]),
        )

    def build_network(self) -> torch.nn.Module:
        network = self.parser.get_parsed_content("network_def", instantiate=True)
        state = torch.load(self.path / "models" / "model.pt", map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise BundleError(f"weights of {self.path} do not fit its network_def: {first}") from error
        return network
