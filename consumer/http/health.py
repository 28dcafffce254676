"""What /health, /health/live and /health/ready report: one check per dependency.

The checks get what they look at (the bucket, the group membership and the partitions' stalls,
the models, the job slots, the work directory), never the whole service. Degraded means work
waits rather than fails: storage that jobs are retrying, a partition that has made no progress
for ML_STALL_LIMIT_S, jobs waiting for disk space.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import psutil
from aiokafka import TopicPartition

from consumer.jobs.slots import JobSlots
from consumer.jobs.workspace import Workspace
from consumer.storage import ObjectStore
from consumer.transport.worker import Stall
from models.registry import ModelCard, ModelRegistry
from schemas.api_docs import VERSION
from schemas.http import CheckStatus, HealthCheck, HealthResponse, ModelStatus, ProbeResponse, ProfileNetwork

# A health probe every few seconds must not become a storage load test.
_STORAGE_CACHE_S = 5.0
_STORAGE_TIMEOUT_S = 3.0


class GroupMembership(Protocol):
    """The partitions this replica holds (an AIOKafkaConsumer is one)."""

    def assignment(self) -> set[TopicPartition]: ...


def _own_runs(card: ModelCard) -> str:
    """What runs the profiles with a network of their own, e.g. " (fast_debug: openvino bf16)"."""
    own = ", ".join(f"{name}: {ran.runtime} {ran.precision}" for name, ran in card.profile_networks.items())
    return f" ({own})" if own else ""


def memory_usage() -> dict[str, float]:
    process = psutil.Process()
    info = process.memory_info()
    return {
        "rss_mb": round(info.rss / 2**20, 1),
        "vms_mb": round(info.vms / 2**20, 1),
        "percent": round(process.memory_percent(), 2),
        "system_available_mb": round(psutil.virtual_memory().available / 2**20, 1),
    }


class HealthChecks:
    def __init__(
        self,
        *,
        store: ObjectStore,
        group: GroupMembership,
        group_id: str,
        models: ModelRegistry,
        jobs: JobSlots,
        workspace: Workspace,
        stalls: Callable[[], list[Stall]] = list,
        stall_limit_s: float = 60.0,
    ):
        self.store = store
        self.group = group
        self.group_id = group_id
        self.models = models
        self.jobs = jobs
        self.workspace = workspace
        self.stalls = stalls
        self.stall_limit_s = stall_limit_s
        self.started_monotonic = time.monotonic()
        self._storage: tuple[float, HealthCheck] | None = None

    @property
    def joined(self) -> bool:
        return bool(self.group.assignment())

    async def storage(self) -> HealthCheck:
        waiting = [stall for stall in self.stalls() if stall.reason == "storage"]
        probe = await self._storage_probe()
        if waiting and probe.status is CheckStatus.OK:
            longest = max(stall.seconds for stall in waiting)
            return HealthCheck(
                status=CheckStatus.DEGRADED,
                detail=f"{len(waiting)} partition(s) retrying storage calls (for up to {longest:.0f} s)",
            )
        return probe

    async def _storage_probe(self) -> HealthCheck:
        now = time.monotonic()
        if self._storage is not None and now - self._storage[0] < _STORAGE_CACHE_S:
            return self._storage[1]
        bucket = self.store.bucket
        try:
            ok = await asyncio.wait_for(self.store.reachable(), _STORAGE_TIMEOUT_S)
        except TimeoutError:
            ok = False
        check = (
            HealthCheck(status=CheckStatus.OK, detail=f"bucket {bucket} reachable")
            if ok
            else HealthCheck(status=CheckStatus.FAILING, detail=f"bucket {bucket} not reachable")
        )
        self._storage = (now, check)
        return check

    def kafka(self) -> HealthCheck:
        assigned = self.group.assignment()
        stuck = [stall for stall in self.stalls() if stall.seconds >= self.stall_limit_s]
        if stuck:
            worst = max(stuck, key=lambda stall: stall.seconds)
            return HealthCheck(
                status=CheckStatus.DEGRADED,
                detail=f"{len(stuck)} partition(s) without progress; {worst.topic}[{worst.partition}] for "
                f"{worst.seconds:.0f} s: {worst.reason}",
            )
        if assigned:
            return HealthCheck(
                status=CheckStatus.OK, detail=f"group {self.group_id}: {len(assigned)} partition(s) assigned"
            )
        return HealthCheck(
            status=CheckStatus.DEGRADED,
            detail=f"group {self.group_id}: no partitions assigned (joining, or more replicas than partitions)",
        )

    def disk(self) -> HealthCheck:
        try:
            free_mb = self.workspace.free_bytes() / 2**20
        except OSError as error:
            return HealthCheck(status=CheckStatus.FAILING, detail=f"work directory unusable: {error}")
        if self.workspace.waiting:
            return HealthCheck(
                status=CheckStatus.DEGRADED,
                detail=f"{self.workspace.waiting} job(s) waiting for disk space; {free_mb:.0f} MB free",
            )
        return HealthCheck(status=CheckStatus.OK, detail=f"{free_mb:.0f} MB free in {self.workspace.root}")

    def model(self) -> HealthCheck:
        cards = self.models.cards()
        if not self.models.ready:
            return HealthCheck(status=CheckStatus.FAILING, detail="models not loaded yet")
        loaded = ", ".join(f"{c.name} {c.version}" + ("" if c.loaded else " (unloaded, reloads on use)") for c in cards)
        return HealthCheck(status=CheckStatus.OK, detail=loaded)

    def device(self) -> HealthCheck:
        cards = self.models.cards()
        if not cards:
            return HealthCheck(status=CheckStatus.OK, detail="no model loaded yet")
        runs = ", ".join(f"{c.name}: {c.device} {c.runtime} {c.precision}{_own_runs(c)}" for c in cards)
        return HealthCheck(status=CheckStatus.OK, detail=runs)

    def model_statuses(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                name=card.name,
                version=card.version,
                task=card.task,
                labels={str(k): v for k, v in card.labels.items()},
                weights_sha256=card.weights_sha256,
                loaded=card.loaded,
                default=card.name == self.models.default,
                runtime=card.runtime,
                precision=card.precision,
                profile_networks={
                    name: ProfileNetwork(
                        weights_sha256=ran.weights_sha256, runtime=ran.runtime, precision=ran.precision
                    )
                    for name, ran in card.profile_networks.items()
                },
            )
            for card in self.models.cards()
        ]

    async def report(self) -> HealthResponse:
        checks = {
            "kafka": self.kafka(),
            "storage": await self.storage(),
            "model": self.model(),
            "device": self.device(),
            "disk": self.disk(),
        }
        if checks["model"].status is not CheckStatus.OK or self.jobs.closed:
            status = "unhealthy"
        elif any(check.status is not CheckStatus.OK for check in checks.values()):
            status = "degraded"
        else:
            status = "healthy"
        models = self.model_statuses()
        default = next((m for m in models if m.default), None)
        cards = self.models.cards()
        return HealthResponse(
            status=status,  # type: ignore[arg-type]
            checks=checks,
            model_loaded=self.models.ready,
            version=VERSION,
            uptime=round(time.monotonic() - self.started_monotonic, 3),
            memory_usage=memory_usage(),
            model_name=self.models.default,
            model_version=default.version if default else None,
            device=cards[0].device if cards else None,
            jobs_in_flight=self.jobs.in_flight,
            models=models,
        )

    def readiness(self) -> ProbeResponse:
        """Ready to take work: the model is loaded and the consumer has joined its group."""
        reasons = []
        if not self.models.ready:
            reasons.append("model not loaded")
        if not self.joined:
            reasons.append("consumer has not joined its group (no partitions assigned)")
        if self.jobs.closed:
            reasons.append("shutting down")
        return ProbeResponse(status="not_ready" if reasons else "ready", reasons=reasons)
