"""Safe extraction of a ZIP of DICOM files into a private directory.

Every limit is checked on the bytes actually inflated, while they are inflated, so a ZIP bomb
stops at the limit instead of filling the disk; the header's claims are only a first, cheap
refusal. Member names are never used as paths: members are written as numbered files, so
`../` or absolute names cannot escape the directory. Nested archives are not followed.
"""

from __future__ import annotations

import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from consumer.errors import InputError
from consumer.imaging.limits import ArchiveLimits
from schemas.errors import ErrorCode

_CHUNK = 1024 * 1024
# Below this, a member's compression ratio says nothing (a 200-byte header compresses well).
_RATIO_FLOOR_BYTES = 1024 * 1024
_ARCHIVE_MAGICS = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh")


@dataclass(frozen=True)
class Extracted:
    files: list[Path]  # in archive order
    warnings: list[str]  # what was skipped, and why


class _Budget:
    """The inflated bytes of all members together, shared by the extraction threads."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            self.used += n
            if self.used > self.limit:
                raise InputError(
                    f"the archive inflates to more than {self.limit} bytes", code=ErrorCode.ARCHIVE_TOO_LARGE
                )


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def extract_members(archive: Path, dest: Path, limits: ArchiveLimits, workers: int = 1) -> Extracted:
    """Blocking: inflate the archive's file members into `dest` as 000000, 000001, ..."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InputError(f"not a readable ZIP archive: {error}", code=ErrorCode.INVALID_ARCHIVE) from error
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise InputError(
                f"the archive has {len(infos)} members, more than the limit of {limits.max_members}",
                code=ErrorCode.ARCHIVE_TOO_MANY_MEMBERS,
            )
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_total_bytes:
            raise InputError(
                f"the archive declares {declared} bytes uncompressed, more than the limit of {limits.max_total_bytes}",
                code=ErrorCode.ARCHIVE_TOO_LARGE,
            )
    wanted: list[tuple[int, zipfile.ZipInfo]] = []
    encrypted = unsafe_names = 0
    for info in infos:
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            encrypted += 1
            continue
        if _unsafe(info.filename):
            unsafe_names += 1
        wanted.append((len(wanted), info))

    budget = _Budget(limits.max_total_bytes)
    # Each thread opens the archive itself: a ZipFile is not safe to share between threads.
    chunks = [wanted[i :: max(1, workers)] for i in range(max(1, workers))]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(lambda part: _extract_part(archive, dest, part, limits, budget), chunks))
    kept = sorted(entry for files, _ in outcomes for entry in files)
    nested = sum(n for _, n in outcomes)
    warnings = []
    if nested:
        warnings.append(f"{nested} nested archive(s) in the ZIP were not opened")
    if encrypted:
        warnings.append(f"{encrypted} encrypted member(s) in the ZIP were skipped")
    if unsafe_names:
        warnings.append(
            f"{unsafe_names} member name(s) were absolute or held '..'; they were read, never used as paths"
        )
    return Extracted([path for _, path in kept], warnings)


def _extract_part(
    archive: Path, dest: Path, part: list[tuple[int, zipfile.ZipInfo]], limits: ArchiveLimits, budget: _Budget
) -> tuple[list[tuple[int, Path]], int]:
    files: list[tuple[int, Path]] = []
    nested = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for index, info in part:
                target = dest / f"{index:06d}"
                if _inflate(zf, info, target, limits, budget):
                    files.append((index, target))
                else:
                    nested += 1
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise InputError(
            f"the ZIP archive is corrupt or unsupported: {error}", code=ErrorCode.INVALID_ARCHIVE
        ) from error
    return files, nested


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: ArchiveLimits, budget: _Budget) -> bool:
    """Write one member; False (and nothing written) when it is itself an archive."""
    written = 0
    ratio_cap = limits.max_ratio * max(info.compress_size, 1)
    with zf.open(info) as src:
        chunk = src.read(_CHUNK)
        if chunk.startswith(_ARCHIVE_MAGICS):
            return False
        with open(target, "wb") as dst:
            while chunk:
                written += len(chunk)
                budget.take(len(chunk))
                if written > _RATIO_FLOOR_BYTES and written > ratio_cap:
                    raise InputError(
                        f"a ZIP member inflates more than {limits.max_ratio:.0f} times its compressed size "
                        f"({info.compress_size} bytes)",
                        code=ErrorCode.ARCHIVE_RATIO_EXCEEDED,
                    )
                dst.write(chunk)
                chunk = src.read(_CHUNK)
    return True
