"""ZIP input: limits hold while members are inflated; names never become paths."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from consumer.errors import InputError
from consumer.imaging.archives import extract_members
from consumer.imaging.limits import ArchiveLimits, ReadLimits
from consumer.imaging.scans import read_scan
from schemas.errors import ErrorCode

CT = Path(get_testdata_file("CT_small.dcm")).read_bytes()


def zip_bomb(path: Path, mebibytes: int) -> Path:
    """One member of zeros: about 1000x smaller compressed than inflated."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("scan.dcm", "w") as member:
        block = b"\x00" * 2**20
        for _ in range(mebibytes):
            member.write(block)
    return path


def inflated_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_zip_bomb_stops_at_the_ratio_limit(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.zip", 256)
    assert bomb.stat().st_size < 2**20
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InputError) as info:
        extract_members(bomb, dest, ArchiveLimits(max_ratio=100.0))
    assert info.value.code is ErrorCode.ARCHIVE_RATIO_EXCEEDED
    # It stopped within a chunk of ratio x compressed size, not after inflating 256 MiB.
    assert inflated_bytes(dest) <= 100 * bomb.stat().st_size + 2**20 < 64 * 2**20


def test_total_inflated_size_is_limited_while_reading(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "big.zip", 24)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InputError) as info:
        extract_members(bomb, dest, ArchiveLimits(max_total_bytes=8 * 2**20, max_ratio=1e9))
    assert info.value.code is ErrorCode.ARCHIVE_TOO_LARGE
    assert inflated_bytes(dest) <= 9 * 2**20


def test_member_count_is_limited_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for n in range(50):
            zf.writestr(f"{n}.dcm", CT)
    with pytest.raises(InputError) as info:
        read_scan(path, tmp_path, ReadLimits(archive=ArchiveLimits(max_members=20)))
    assert info.value.code is ErrorCode.ARCHIVE_TOO_MANY_MEMBERS


def test_traversal_names_never_leave_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../../escaped.dcm", CT)
        zf.writestr("/tmp/absolute-escape.dcm", b"junk")
        zf.writestr("C:\\windows\\escape.dcm", b"junk")
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    scan = read_scan(path, work, ReadLimits())
    assert scan.data.shape == (128, 128, 1)
    assert not (tmp_path / "escaped.dcm").exists() and not (tmp_path / "a" / "escaped.dcm").exists()
    assert not Path("/tmp/absolute-escape.dcm").exists()
    assert any("never used as paths" in w for w in scan.warnings)


def test_nested_archives_are_not_followed(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("inner.dcm", CT)
    path = tmp_path / "nested.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("inner.zip", inner.getvalue())
    with pytest.raises(InputError) as info:
        read_scan(path, tmp_path, ReadLimits())
    assert info.value.code is ErrorCode.NO_IMAGE_SERIES


def test_corrupt_and_empty_archives(tmp_path: Path) -> None:
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", CT)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(InputError) as info:
        read_scan(truncated, tmp_path, ReadLimits())
    assert info.value.code is ErrorCode.INVALID_ARCHIVE

    corrupt = bytearray(good.getvalue())
    corrupt[60:80] = b"\xff" * 20  # inside the deflated member: the CRC or the stream breaks
    (tmp_path / "corrupt.zip").write_bytes(bytes(corrupt))
    with pytest.raises(InputError) as info:
        read_scan(tmp_path / "corrupt.zip", tmp_path, ReadLimits())
    assert info.value.code in (ErrorCode.INVALID_ARCHIVE, ErrorCode.NO_IMAGE_SERIES)

    text_only = tmp_path / "text.zip"
    with zipfile.ZipFile(text_only, "w") as zf:
        zf.writestr("notes.txt", b"hello")
    with pytest.raises(InputError) as info:
        read_scan(text_only, tmp_path, ReadLimits())
    assert info.value.code is ErrorCode.NO_IMAGE_SERIES


def test_png_renamed_dcm_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    with pytest.raises(InputError) as info:
        read_scan(path, tmp_path, ReadLimits())
    assert info.value.code is ErrorCode.UNSUPPORTED_FORMAT and "PNG" in info.value.message
