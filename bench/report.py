"""The benchmark's records and their tables (Markdown, so the README takes them as printed)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

MB = 2**20
# The job's steps as the result JSON names them; "write" (outputs, result JSON, final event) is
# the rest of the wall time: the JSON is written by that step and cannot hold its own time.
SERVICE_STEPS = ("fetch", "read", "infer", "analyse")
ENGINE_STAGES = ("preprocess", "network", "postprocess")
PLAIN_STAGES = ("read", "preprocess", "network", "postprocess", "write")


@dataclass
class ServiceJob:
    replica: str
    size: str
    profile: str
    wall: float
    steps: dict[str, float]
    engine: dict[str, float]
    peak_rss: int
    rss_after: int
    lesions: int
    dice: float
    agreement: float | None = None  # share of voxels where the mask equals the plain script's
    peak_by_phase: dict[str, int] = field(default_factory=dict)  # read / infer / write -> peak RSS

    @property
    def write(self) -> float:
        return max(0.0, self.wall - sum(self.steps.get(step, 0.0) for step in SERVICE_STEPS))


@dataclass
class PlainRun:
    size: str
    profile: str
    times: dict[str, float]

    @property
    def total(self) -> float:
        return self.times.get("total", sum(self.times.get(stage, 0.0) for stage in PLAIN_STAGES))


@dataclass
class ColdStart:
    replica: str
    export_cache: str  # "warm" | "cold"
    ready_s: float
    idle_rss: int
    first_job: float
    second_job: float
    first_split: dict[str, float] = field(default_factory=dict)  # steps and engine stages of the first job
    second_split: dict[str, float] = field(default_factory=dict)


@dataclass
class Burst:
    replica: str
    profile: str
    jobs: int
    partitions: int
    slots: int
    elapsed: float
    infer_alone: float  # median infer step of the same job run alone on the same replica
    infer_in_burst: list[float] = field(default_factory=list)  # the step, waiting for the engine included
    engine_in_burst: list[float] = field(default_factory=list)  # the engine's own time per job

    @property
    def engine_busy(self) -> float:
        """Share of the burst's wall time the engine was predicting."""
        return sum(self.engine_in_burst) / self.elapsed

    @property
    def per_minute(self) -> float:
        return 60.0 * self.jobs / self.elapsed

    @property
    def ratio(self) -> float:
        """Jobs per minute against 1 / (inference time per job): 1.0 = the engine never waits."""
        return self.per_minute / (60.0 / self.infer_alone)


@dataclass
class RuntimeRow:
    replica: str
    bundle: str
    runtime: str
    precision: str
    agreement: float | None
    speedup: float | None
    reason: str


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _jobs(jobs: Sequence[ServiceJob], replica: str, size: str, profile: str) -> list[ServiceJob]:
    return [j for j in jobs if j.replica == replica and j.size == size and j.profile == profile]


def _plain(plains: Sequence[PlainRun], size: str, profile: str) -> list[PlainRun]:
    return [p for p in plains if p.size == size and p.profile == profile]


def comparison_table(jobs: Sequence[ServiceJob], plains: Sequence[PlainRun], replicas: Sequence[str]) -> str:
    """Per size and profile: the plain script, each replica's whole job and its ratio to the plain."""
    headers = ["size", "profile", "plain MONAI s"]
    for replica in replicas:
        headers += [f"service {replica} s", f"ratio {replica}"]
    headers += ["dice", "mask = plain"]
    rows = []
    for size, profile in _cases(jobs):
        plain = median([p.total for p in _plain(plains, size, profile)])
        row: list[object] = [size, profile, plain or None]
        for replica in replicas:
            wall = median([j.wall for j in _jobs(jobs, replica, size, profile)])
            row += [wall or None, (wall / plain) if wall and plain else None]
        measured = _jobs(jobs, replicas[0], size, profile)
        row.append(measured[-1].dice if measured else None)
        agreement = measured[-1].agreement if measured else None
        row.append(f"{100 * agreement:.3f} %" if agreement is not None else None)
        rows.append(row)
    return markdown(headers, rows)


def split_table(jobs: Sequence[ServiceJob], plains: Sequence[PlainRun], replicas: Sequence[str]) -> str:
    """Seconds per stage: the service's steps with the engine's split of `infer`, and the plain script's."""
    headers = ["size", "profile", "who", "fetch", "read", "preprocess", "network", "postprocess", "analyse", "write"]
    headers.append("total")
    rows: list[list[object]] = []
    for size, profile in _cases(jobs):
        for plain in _plain(plains, size, profile)[-1:]:
            t = plain.times
            rows.append([size, profile, "plain MONAI", None, *(t.get(s) for s in PLAIN_STAGES[:4]), None])
            rows[-1] += [t.get("write"), plain.total]
        for replica in replicas:
            for job in _jobs(jobs, replica, size, profile)[-1:]:
                steps, engine = job.steps, job.engine
                rows.append([size, profile, f"service {replica}", steps.get("fetch"), steps.get("read")])
                rows[-1] += [engine.get(s) for s in ENGINE_STAGES]
                rows[-1] += [steps.get("analyse"), job.write, job.wall]
    return markdown(headers, rows)


def profile_table(jobs: Sequence[ServiceJob], replicas: Sequence[str]) -> str:
    """fast_debug against production on the same scan and replica: the speed-up and the Dice of each."""
    headers = ["replica", "size", "production s", "fast_debug s", "speed-up", "production dice", "fast_debug dice"]
    rows: list[list[object]] = []
    for replica in replicas:
        for size in dict.fromkeys(j.size for j in jobs):
            fine = _jobs(jobs, replica, size, "production")
            coarse = _jobs(jobs, replica, size, "fast_debug")
            if not fine or not coarse:
                continue
            slow, fast = median([j.wall for j in fine]), median([j.wall for j in coarse])
            dice = [median([j.dice for j in fine]), median([j.dice for j in coarse])]
            rows.append([replica, size, slow, fast, slow / fast if fast else None, *dice])
    return markdown(headers, rows)


def memory_table(jobs: Sequence[ServiceJob], idle: dict[str, int]) -> str:
    """Peak RSS per job and in each phase (fetch + read, inference, analysis + writing), and after it."""
    headers = ["replica", "size", "profile", "idle RSS MB", "peak RSS MB", "read", "infer", "write", "after job MB"]
    rows = [
        [j.replica, j.size, j.profile, idle.get(j.replica, 0) // MB, j.peak_rss // MB]
        + [j.peak_by_phase[p] // MB if p in j.peak_by_phase else None for p in ("read", "infer", "write")]
        + [j.rss_after // MB]
        for j in jobs
    ]
    return markdown(headers, rows)


def cold_start_table(starts: Sequence[ColdStart]) -> str:
    headers = ["replica", "export cache", "start to ready s", "idle RSS MB", "first job s", "second job s"]
    headers.append("first / second")
    rows = [
        [s.replica, s.export_cache, s.ready_s, s.idle_rss // MB, s.first_job, s.second_job, s.first_job / s.second_job]
        for s in starts
    ]
    return markdown(headers, rows)


def burst_table(bursts: Sequence[Burst]) -> str:
    headers = ["replica", "profile", "jobs", "partitions", "slots", "elapsed s", "jobs/min", "infer alone s"]
    headers += ["60 / infer"]
    headers += ["ratio", "engine per job s", "engine busy"]
    rows = [_burst_row(b) for b in bursts]
    return markdown(headers, rows)


def _burst_row(b: Burst) -> list[object]:
    alone_rate = 60.0 / b.infer_alone
    return [b.replica, b.profile, b.jobs, b.partitions, b.slots, b.elapsed, b.per_minute, b.infer_alone, alone_rate, b.ratio,
            median(b.engine_in_burst), f"{100 * b.engine_busy:.0f} %"]  # fmt: skip


def runtime_table(rows: Sequence[RuntimeRow]) -> str:
    headers = ["replica", "bundle", "runtime", "precision", "agreement", "speedup vs torch", "why not exported"]
    return markdown(
        headers,
        [
            [
                r.replica,
                r.bundle,
                r.runtime,
                r.precision,
                f"{100 * r.agreement:.3f} %" if r.agreement is not None else None,
                f"{r.speedup:.2f}x" if r.speedup is not None else None,
                r.reason or None,
            ]
            for r in rows
        ],
    )


def _cases(jobs: Sequence[ServiceJob]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((j.size, j.profile) for j in jobs))
