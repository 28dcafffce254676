"""`make bench`: the service against the plain MONAI script, bursts, memory and cold start, in one go.

One embedded stack (broker + S3 server), two service replicas as their own processes, both up
for the whole run on their own jobs topics: `fp32` (ML_PRECISION=fp32, the ratio's side) and
`auto` (the runtime and precision the machine picks, as deployed). For every size and profile
the fp32 replica's job, the plain script (a fresh process) and the auto replica's job run one
after the other, so each ratio comes from the same minutes of the same (shared) machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import orjson
import torch
from aiokafka import AIOKafkaProducer

from bench.replica import Replica, ReplicaConfig, replica
from bench.report import Burst, ColdStart, PlainRun, RuntimeRow, ServiceJob, median
from consumer.dev.localstack import LocalStack, S3Ports, free_port, prepare_stack
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import make_producer
from models.device import cpu_flags
from models.evaluate import DEFAULT_BUNDLE, dice
from models.phantom import generate_phantom, save_phantom
from producer_tools.commands import FINAL_STATUSES, EventFollower
from schemas.jobs import Profile

SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    # Shape and spacing (mm): an abdominal CT at the slice thickness each is often read at.
    "256x256x128": ((256, 256, 128), (0.8, 0.8, 2.5)),
    "512x512x300": ((512, 512, 300), (0.8, 0.8, 1.5)),
}
JOB_TIMEOUT_S = 1800.0
Phases = dict[str, tuple[float, float]]  # phase -> (start, end) on the monotonic clock
# The ratio's side (fp32 like the plain script; the runtime still the machine's pick) and the
# service as deployed (runtime and precision chosen from the CPU).
FP32 = ReplicaConfig("fp32", precision="fp32")
AUTO = ReplicaConfig("auto")


@dataclass(frozen=True)
class Plan:
    sizes: tuple[str, ...]
    profiles: tuple[Profile, ...]
    repeat: int = 1
    burst_jobs: int = 20
    burst_size: str = "256x256x128"
    # The service's default profile first; production's longer inference leaves the rest of a
    # job less to slow down, so the two rows bracket what a burst gets.
    burst_profiles: tuple[Profile, ...] = (Profile.FAST_DEBUG, Profile.PRODUCTION)
    threshold: float = 0.55


@dataclass
class Results:
    plan: dict[str, Any]
    machine: dict[str, Any]
    jobs: list[ServiceJob] = field(default_factory=list)
    plains: list[PlainRun] = field(default_factory=list)
    cold_starts: list[ColdStart] = field(default_factory=list)
    bursts: list[Burst] = field(default_factory=list)
    runtimes: list[RuntimeRow] = field(default_factory=list)
    idle_rss: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            key: value if not isinstance(value, list) else [asdict(v) for v in value]
            for key, value in vars(self).items()
        }


@dataclass
class Scan:
    size: str
    path: Path
    key: str
    lesions: np.ndarray  # the phantom's lesion mask, for the Dice of each job


@dataclass
class Client:
    """What the benchmark needs to talk to one replica: its settings, a producer, the bucket."""

    replica: Replica
    settings: Settings
    producer: AIOKafkaProducer
    store: ObjectStore


def machine_facts() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "load_average_start": os.getloadavg(),
    }


def make_scans(plan: Plan, workdir: Path) -> dict[str, Scan]:
    scans = {}
    for size in dict.fromkeys((*plan.sizes, plan.burst_size)):
        shape, spacing = SIZES[size]
        phantom = generate_phantom(2024, shape, spacing)
        path = workdir / f"phantom-{size}.nii.gz"
        save_phantom(phantom, path)
        scans[size] = Scan(size, path, f"uploads/bench/{path.name}", phantom.lesion_mask.astype(bool))
    return scans


def export_cache_state(settings: Settings) -> str:
    """'warm' when the export cache holds an export of each of the default bundle's networks (its
    own and those of profiles with weights of their own)."""
    from models.bundle import BundleSpec

    spec = BundleSpec.load(DEFAULT_BUNDLE)
    keys = [spec.network_key(own)[:16] for own in (None, *spec.profile_weights)]
    return "warm" if all(any(settings.ml_export_cache.glob(f"{key}-*")) for key in keys) else "cold"


@contextlib.asynccontextmanager
async def client(config: ReplicaConfig, stack: LocalStack, workdir: Path, starts: list[ColdStart]):  # type: ignore[no-untyped-def]
    settings = config.settings(stack)
    store = await prepare_stack(settings)
    cache = export_cache_state(settings)
    with replica(config, stack, workdir) as running:
        starts.append(ColdStart(config.name, cache, running.ready_s, running.idle_rss, 0.0, 0.0))
        producer = make_producer(settings)
        await producer.start()
        try:
            yield Client(running, settings, producer, store)
        finally:
            await producer.stop()


async def upload(store: ObjectStore, scans: dict[str, Scan]) -> None:
    for scan in scans.values():
        await store.put_file(scan.key, scan.path, "application/gzip")


async def publish(c: Client, key: str, profile: Profile, threshold: float) -> tuple[str, int]:
    """Publish one job; its id and the partition it went to."""
    job = f"bench-{c.replica.config.name}-{profile.value}-{uuid.uuid4().hex[:8]}"
    # Every job runs: the result cache would answer a scan already analysed from its outputs.
    message = {"job_uuid": job, "input_object": key, "profile": profile.value, "threshold": threshold, "no_cache": True}
    sent = await c.producer.send_and_wait(c.settings.kafka_jobs_topic, orjson.dumps(message), key=job.encode())
    return job, int(sent.partition)


async def run_job(c: Client, scan: Scan, profile: Profile, threshold: float) -> tuple[ServiceJob, np.ndarray]:
    """One job, message to final event, with the replica's RSS over it; the job and its mask."""
    rss = c.replica.rss
    assert rss is not None
    async with EventFollower(c.settings) as follower:
        started = time.perf_counter()
        job, _ = await publish(c, scan.key, profile, threshold)
        final, phases = await _follow(follower, job, time.monotonic())
        wall = time.perf_counter() - started
    if final is None or final["status"] != "completed":
        raise SystemExit(f"job {job} did not complete: {final}")
    peaks = {name: rss.peak(start, end) for name, (start, end) in phases.items()}
    result = orjson.loads(await c.store.get_bytes(final["results_object"]))
    mask = await _mask(c.store, final["output_object"])
    await asyncio.sleep(1.0)  # what the process holds once the job's memory is given back
    record = ServiceJob(
        replica=c.replica.config.name,
        size=scan.size,
        profile=profile.value,
        wall=round(wall, 3),
        steps=result["timings"],
        engine=c.replica.engine_timings(job),
        peak_rss=max(peaks.values()),
        rss_after=rss.now(),
        lesions=int(result["summary"]["lesions_count"]),
        dice=round(dice(mask > 0, scan.lesions), 4),
        peak_by_phase=peaks,
    )
    return record, mask


async def _follow(follower: EventFollower, job: str, published: float) -> tuple[dict[str, Any] | None, Phases]:
    """The job's final event, and when its phases ran by its events: fetch and read until the
    `running` event of the infer step, inference until the `progress` event of analyse, then
    analysis and writing until the final event."""
    seen = {"read": published}
    async for event in follower.events(time.monotonic() + JOB_TIMEOUT_S):
        if event.get("job_uuid") != job:
            continue
        step = event.get("step")
        if step in ("infer", "analyse") and step not in seen:
            seen["infer" if step == "infer" else "write"] = time.monotonic()
        if event.get("status") in FINAL_STATUSES:
            return event, _phases(seen, time.monotonic())
    return None, {}


def _phases(seen: dict[str, float], end: float) -> Phases:
    names = [name for name in ("read", "infer", "write") if name in seen]
    ends = [seen[n] for n in names[1:]] + [end]
    return {name: (seen[name], stop) for name, stop in zip(names, ends, strict=True)}


async def _mask(store: ObjectStore, key: str) -> np.ndarray:
    image = nib.Nifti1Image.from_bytes(gzip.decompress(await store.get_bytes(key)))
    return np.asanyarray(image.dataobj)


def run_plain(scan: Scan, profile: Profile, threshold: float, workdir: Path) -> tuple[PlainRun, np.ndarray]:
    """The plain MONAI script in a fresh process (no state shared with the service); its mask."""
    out = workdir / f"plain-{scan.size}-{profile.value}"
    times = out / "times.json"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.plain_monai", str(scan.path), str(out), "--profile", profile.value]
    command += ["--threshold", str(threshold), "--json", str(times)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"plain MONAI script failed:\n{done.stderr[-3000:]}")
    written = next(out.glob("*_seg.nii*"))
    mask = np.asanyarray(nib.load(written).dataobj).reshape(scan.lesions.shape)  # type: ignore[attr-defined]
    written.unlink()
    return PlainRun(scan.size, profile.value, json.loads(times.read_text())), mask


async def first_and_second(c: Client, scan: Scan, plan: Plan, start: ColdStart) -> None:
    """The first two jobs after start, the same production job twice (kept out of the comparison,
    whose jobs run next to their plain script)."""
    first, _ = await run_job(c, scan, Profile.PRODUCTION, plan.threshold)
    second, _ = await run_job(c, scan, Profile.PRODUCTION, plan.threshold)
    start.first_job, start.second_job = first.wall, second.wall
    start.first_split, start.second_split = {**first.steps, **first.engine}, {**second.steps, **second.engine}


def runtime_rows(c: Client) -> list[RuntimeRow]:
    rows = []
    for line in c.replica.log_path.read_bytes().splitlines():
        if b"model_loaded" not in line:
            continue
        with contextlib.suppress(orjson.JSONDecodeError, KeyError):
            loaded = orjson.loads(line)["model_loaded"]
            rows.append(
                RuntimeRow(
                    c.replica.config.name,
                    loaded["model"],
                    loaded["runtime"],
                    loaded["precision"],
                    loaded["agreement"],
                    loaded["speedup"],
                    loaded["reason"],
                )
            )
    return rows


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a > 0) == (b > 0)))


@contextlib.contextmanager
def progress(text: str) -> Iterator[None]:
    started = time.perf_counter()
    print(f"  {text} ...", end="", flush=True)
    yield
    print(f" {time.perf_counter() - started:.1f} s", flush=True)


async def burst(c: Client, scan: Scan, profile: Profile, jobs: int, threshold: float, infer_alone: float) -> Burst:
    """`jobs` jobs published at once, spread over the partitions by their keys; until the last ends."""
    async with EventFollower(c.settings) as follower:
        started = time.perf_counter()
        sent = [await publish(c, scan.key, profile, threshold) for _ in range(jobs)]
        pending = {job for job, _ in sent}
        finals: list[dict[str, Any]] = []
        async for event in follower.events(time.monotonic() + JOB_TIMEOUT_S):
            if event.get("job_uuid") in pending and event.get("status") in FINAL_STATUSES:
                pending.discard(event["job_uuid"])
                finals.append(event)
                if not pending:
                    break
        elapsed = time.perf_counter() - started
    failed = [f for f in finals if f["status"] != "completed"]
    if pending or failed:
        raise SystemExit(f"burst: {len(pending)} jobs without a final event, {len(failed)} failed: {failed[:1]}")
    infers = [orjson.loads(await c.store.get_bytes(f["results_object"]))["timings"]["infer"] for f in finals]
    engine = [sum(c.replica.engine_timings(f["job_uuid"]).values()) for f in finals]
    slots = c.replica.config.max_concurrent_jobs or Settings().ml_max_concurrent_jobs
    partitions = len({p for _, p in sent})
    return Burst(c.replica.config.name, profile.value, jobs, partitions, slots, elapsed, infer_alone, infers, engine)


async def compare(a: Client, b: Client, scans: dict[str, Scan], plan: Plan, results: Results, workdir: Path) -> None:
    """Per size and profile: the fp32 replica's job, the plain script, the auto replica's job."""
    for size in plan.sizes:
        for profile in plan.profiles:
            for _ in range(plan.repeat):
                with progress(f"{size} {profile.value}: service fp32"):
                    job, mask = await run_job(a, scans[size], profile, plan.threshold)
                with progress(f"{size} {profile.value}: plain MONAI"):
                    plain, plain_mask = await asyncio.to_thread(
                        run_plain, scans[size], profile, plan.threshold, workdir
                    )
                job.agreement = agreement(mask, plain_mask)
                del mask, plain_mask
                with progress(f"{size} {profile.value}: service auto"):
                    auto_job, _ = await run_job(b, scans[size], profile, plan.threshold)
                results.jobs += [job, auto_job]
                results.plains.append(plain)


async def bursts(b: Client, scans: dict[str, Scan], plan: Plan, results: Results) -> None:
    scan = scans[plan.burst_size]
    for profile in plan.burst_profiles:
        alone = [
            j.steps["infer"]
            for j in results.jobs
            if j.replica == b.replica.config.name and j.size == scan.size and j.profile == profile.value
        ]
        while len(alone) < 2:
            with progress(f"{scan.size} {profile.value}: service auto, alone"):
                job, _ = await run_job(b, scan, profile, plan.threshold)
            alone.append(job.steps["infer"])
        with progress(f"burst of {plan.burst_jobs} jobs, {scan.size} {profile.value}: service auto"):
            results.bursts.append(await burst(b, scan, profile, plan.burst_jobs, plan.threshold, median(alone)))


async def run(plan: Plan, workdir: Path) -> Results:
    results = Results(plan={**asdict(plan), "profiles": [p.value for p in plan.profiles]}, machine=machine_facts())
    with progress("phantoms"):
        scans = make_scans(plan, workdir)
    stack = LocalStack(workdir / "stack", free_port(), S3Ports.free())
    stack.start()
    try:
        await _replicas(plan, scans, stack, workdir, results)
    finally:
        stack.stop()
    results.machine["load_average_end"] = os.getloadavg()
    return results


async def _replicas(plan: Plan, scans: dict[str, Scan], stack: LocalStack, workdir: Path, results: Results) -> None:
    first = scans[plan.burst_size]
    async with contextlib.AsyncExitStack() as replicas:
        with progress("replica fp32: start, first and second job"):
            a = await replicas.enter_async_context(client(FP32, stack, workdir, results.cold_starts))
            await upload(a.store, scans)
            await first_and_second(a, first, plan, results.cold_starts[-1])
        with progress("replica auto: start, first and second job"):
            b = await replicas.enter_async_context(client(AUTO, stack, workdir, results.cold_starts))
            await first_and_second(b, first, plan, results.cold_starts[-1])
        await compare(a, b, scans, plan, results, workdir)
        await bursts(b, scans, plan, results)
        results.runtimes += runtime_rows(a) + runtime_rows(b)
        results.idle_rss.update({FP32.name: a.replica.idle_rss, AUTO.name: b.replica.idle_rss})
