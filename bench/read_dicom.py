"""Benchmark: reading a CT series from a ZIP (extract, headers, decode, stack), per thread count.

    python -m bench.read_dicom [--shape 512 512 300] [--threads 1 2 4] [--syntax explicit rle jpeg2000]

Each measurement runs in a fresh process, so its peak memory is the read's own (imports included:
torch and pydicom alone take about 280 MiB).
The ZIP is a synthetic phantom written as a scanner would export it (shuffled members,
deflated); it is built once per shape and transfer syntax and cached under the temp directory.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}


def build_zip(shape: tuple[int, int, int], syntax: str) -> Path:
    from models.dicom_export import SeriesOptions, series_datasets, zip_series
    from models.phantom import generate_phantom

    target = Path(tempfile.gettempdir()) / f"bench-ct-{'x'.join(map(str, shape))}-{syntax}.zip"
    if not target.exists():
        phantom = generate_phantom(1, shape, (0.7, 0.7, 1.0))
        datasets = series_datasets(phantom.image, phantom.affine, SeriesOptions(transfer_syntax=SYNTAXES[syntax]))
        partial = target.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        zip_series(datasets, partial, folder="DICOM/")
        partial.rename(target)
    return target


def measure(archive: Path, threads: int) -> tuple[float, float]:
    """In this (child) process: seconds to read, and peak RSS in MiB."""
    from consumer.imaging.limits import ReadLimits
    from consumer.imaging.scans import read_scan

    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        scan = read_scan(archive, Path(work), ReadLimits(threads=threads))
        elapsed = time.perf_counter() - started
    assert scan.data.ndim == 3
    return elapsed, peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's high-water RSS. Not ru_maxrss: Linux carries that over fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--syntax", nargs="+", choices=sorted(SYNTAXES), default=("explicit",))
    parser.add_argument("--child", nargs=2, metavar=("ZIP", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        elapsed, peak = measure(Path(args.child[0]), int(args.child[1]))
        print(f"{elapsed:.3f} {peak:.1f}")
        return
    shape = tuple(args.shape)
    print("| transfer syntax | ZIP MB | threads | read s | peak RSS MiB |\n| --- | --- | --- | --- | --- |")
    for syntax in args.syntax:
        archive = build_zip(shape, syntax)  # type: ignore[arg-type]
        size = archive.stat().st_size / 1e6
        for threads in args.threads:
            out = subprocess.run(
                [sys.executable, "-m", "bench.read_dicom", "--child", str(archive), str(threads)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            print(f"| {syntax} | {size:.0f} | {threads} | {float(out[0]):.2f} | {float(out[1]):.0f} |", flush=True)


if __name__ == "__main__":
    main()
