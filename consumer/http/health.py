"""What /health, /health/live and /health/ready report: one check per dependency."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import psutil

from schemas.api_docs import VERSION
from schemas.http import CheckStatus, HealthCheck, HealthResponse, ProbeResponse

if TYPE_CHECKING:
    from consumer.service import Service

# A health probe every few seconds must not become a storage load test.
_STORAGE_CACHE_S = 5.0
_STORAGE_TIMEOUT_S = 3.0


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
    def __init__(self, service: Service):
        self.service = service
        self._storage: tuple[float, HealthCheck] | None = None

    async def storage(self) -> HealthCheck:
        now = time.monotonic()
        if self._storage is not None and now - self._storage[0] < _STORAGE_CACHE_S:
            return self._storage[1]
        bucket = self.service.settings.minio_bucket
        try:
            ok = await asyncio.wait_for(self.service.store.reachable(), _STORAGE_TIMEOUT_S)
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
        service = self.service
        assigned = service.consumer.assignment()
        if service.consumer_joined:
            return HealthCheck(
                status=CheckStatus.OK,
                detail=f"group {service.settings.kafka_group_id}: {len(assigned)} partition(s) assigned",
            )
        return HealthCheck(
            status=CheckStatus.DEGRADED,
            detail=f"group {service.settings.kafka_group_id}: no partitions assigned (joining, or more replicas "
            "than partitions)",
        )

    def model(self) -> HealthCheck:
        engine = self.service.engine
        if engine.loaded and engine.bundle is not None:
            return HealthCheck(status=CheckStatus.OK, detail=f"{engine.bundle.name} {engine.bundle.version} loaded")
        return HealthCheck(status=CheckStatus.FAILING, detail="model not loaded")

    def device(self) -> HealthCheck:
        engine = self.service.engine
        return HealthCheck(status=CheckStatus.OK, detail=f"{engine.device} ({engine.precision})")

    async def report(self) -> HealthResponse:
        service = self.service
        checks = {
            "kafka": self.kafka(),
            "storage": await self.storage(),
            "model": self.model(),
            "device": self.device(),
        }
        if checks["model"].status is not CheckStatus.OK or service.stopping:
            status = "unhealthy"
        elif any(check.status is not CheckStatus.OK for check in checks.values()):
            status = "degraded"
        else:
            status = "healthy"
        engine = service.engine
        return HealthResponse(
            status=status,  # type: ignore[arg-type]
            checks=checks,
            model_loaded=engine.loaded,
            version=VERSION,
            uptime=round(time.monotonic() - service.started_monotonic, 3),
            memory_usage=memory_usage(),
            model_name=engine.bundle.name if engine.bundle else service.settings.model_name,
            model_version=engine.bundle.version if engine.bundle else None,
            device=str(engine.device),
            jobs_in_flight=service.runner.in_flight,
        )

    def readiness(self) -> ProbeResponse:
        """Ready to take work: the model is loaded and the consumer has joined its group."""
        reasons = []
        if not self.service.engine.loaded:
            reasons.append("model not loaded")
        if not self.service.consumer_joined:
            reasons.append("consumer has not joined its group (no partitions assigned)")
        if self.service.stopping:
            reasons.append("shutting down")
        return ProbeResponse(status="not_ready" if reasons else "ready", reasons=reasons)
