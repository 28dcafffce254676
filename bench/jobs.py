"""Benchmark: whole jobs through the real service on the embedded stack.

    python -m bench.jobs [--shape 256 256 128] [--spacing 0.8 0.8 2.5] [--repeat 2] [--input dicom-zip]

Starts a broker and an S3 server on free ports, the service on them, uploads a phantom and
publishes job messages; the wall time is from publishing the message to receiving the
`completed` event. Per-step times come from the result JSON. The first run of each profile is
a warm-up and is not reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import tempfile
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from consumer.dev.localstack import LocalStack, S3Ports, free_port, prepare_stack
from consumer.observability.logs import configure_logging
from consumer.service import Service
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import make_producer
from models.dicom_export import SeriesOptions, series_datasets, zip_series
from models.evaluate import dice
from models.phantom import Phantom, generate_phantom, save_phantom
from producer_tools.commands import EventFollower
from schemas.jobs import Profile

# "write" is not in the result JSON: the JSON is written by that step. Wall time includes it.
STEPS = ("fetch", "read", "infer", "analyse")


def _models(service: Service) -> str:
    return "; ".join(f"{c.name} on {c.device} ({c.runtime}, {c.precision})" for c in service.models.cards())


async def bench(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    repeat: int,
    precision: str,
    workdir: Path,
    input_format: str = "nifti",
) -> None:
    phantom = generate_phantom(2024, shape, spacing)
    scan = _scan_file(phantom, input_format, workdir)
    stack = LocalStack(workdir / "stack", free_port(), S3Ports.free())
    stack.start()
    try:
        settings = Settings(
            kafka_bootstrap_servers=stack.bootstrap,
            minio_endpoint=stack.s3_endpoint,
            http_port=free_port(),
            http_host="127.0.0.1",
            log_level="WARNING",
            ml_precision=precision,
        )
        store = await prepare_stack(settings)
        key = f"uploads/bench/{scan.name}"
        await store.put_file(key, scan, "application/octet-stream")
        service = Service(settings)
        await service.start()
        await asyncio.wait_for(service.worker.joined.wait(), 60)
        producer = make_producer(settings)
        await producer.start()
        print(
            f"phantom {shape} at {spacing} mm as {input_format}, {phantom.lesion_count} lesions; {_models(service)}, torch threads {__import__('torch').get_num_threads()}"
        )
        header = f"{'profile':<11} {'wall s':>7} " + " ".join(f"{s:>8}" for s in STEPS) + f" {'lesions':>8} {'dice':>6}"
        print(header)
        print("-" * len(header))
        try:
            for profile in (Profile.FAST_DEBUG, Profile.PRODUCTION, Profile.RESEARCH):
                for run in range(repeat + 1):
                    line = await _one_job(settings, store, producer, key, profile, phantom)
                    if run > 0:  # the first is a warm-up
                        print(line)
        finally:
            await producer.stop()
            await service.stop()
    finally:
        stack.stop()


def _scan_file(phantom: Phantom, input_format: str, workdir: Path) -> Path:
    if input_format == "dicom-zip":
        return zip_series(series_datasets(phantom.image, phantom.affine, SeriesOptions()), workdir / "phantom.zip")
    path = workdir / "phantom.nii.gz"
    save_phantom(phantom, path)
    return path


async def _one_job(
    settings: Settings, store: ObjectStore, producer: AIOKafkaProducer, key: str, profile: Profile, phantom: Phantom
) -> str:
    """Publish one job and wait for its final event; the table row of its times and score."""
    job = f"bench-{profile.value}-{uuid.uuid4().hex[:8]}"
    async with EventFollower(settings) as follower:
        started = time.perf_counter()
        message = {"job_uuid": job, "input_object": key, "profile": profile.value, "no_cache": True}
        await producer.send_and_wait(settings.kafka_jobs_topic, orjson.dumps(message), key=job.encode())
        final = await follower.wait_final(job, 900)
        wall = time.perf_counter() - started
    if final is None or final["status"] != "completed":
        raise SystemExit(f"job {job} did not complete: {final}")
    result = orjson.loads(await store.get_bytes(final["results_object"]))
    mask = np.asanyarray(
        nib.Nifti1Image.from_bytes(gzip.decompress(await store.get_bytes(final["output_object"]))).dataobj
    )
    score = dice(mask > 0, phantom.lesion_mask)
    steps = " ".join(f"{result['timings'].get(s, 0.0):>8.3f}" for s in STEPS)
    return f"{profile.value:<11} {wall:>7.2f} {steps} {result['summary']['lesions_count']:>8} {score:>6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument(
        "--input", default="nifti", choices=["nifti", "dicom-zip"], help="upload a .nii.gz or a ZIP of DICOM slices"
    )
    args = parser.parse_args()
    configure_logging("WARNING", "text")
    with tempfile.TemporaryDirectory(prefix="ml-bench-") as tmp:
        asyncio.run(bench(tuple(args.shape), tuple(args.spacing), args.repeat, args.precision, Path(tmp), args.input))


if __name__ == "__main__":
    main()
