"""How much an input may be: bytes and members of a ZIP, voxels of a volume, reader threads.

The voxel limit is checked here and only here, for a NIfTI header, a NIfTI image and a DICOM
series alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from consumer.errors import InputError
from consumer.settings import Settings
from schemas.errors import ErrorCode


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 8 * 1024**3
    max_members: int = 50_000
    max_ratio: float = 200.0


@dataclass(frozen=True)
class ReadLimits:
    max_voxels: int = 1024**3 // 2
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)
    threads: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        return cls(
            max_voxels=settings.ml_max_voxels,
            archive=ArchiveLimits(
                max_total_bytes=settings.ml_max_archive_bytes,
                max_members=settings.ml_max_archive_members,
                max_ratio=settings.ml_max_archive_ratio,
            ),
            threads=settings.ml_reader_threads or os.cpu_count() or 1,
        )


def check_voxels(shape: tuple[int, ...], max_voxels: int, what: str = "image") -> int:
    """The voxel count of `shape`; `image_too_large` when it is over the limit."""
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > max_voxels:
        raise InputError(
            f"the {what} has {voxels} voxels ({'x'.join(map(str, shape))}), more than the limit of {max_voxels}",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    return voxels
