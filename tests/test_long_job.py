"""Long jobs: no rebalance past max_poll_interval_ms, and a stop that lets the running job finish."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.dev.localstack import LocalStack
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics
from models.phantom import generate_phantom, save_phantom
from tests.conftest import (
    committed_offset,
    event_log,
    isolated_settings,
    send_json,
    start_service,
    upload_input,
)


@pytest.fixture(scope="module")
def big_phantom_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("long") / "big.nii.gz"
    save_phantom(generate_phantom(99, (256, 256, 128), (0.8, 0.8, 2.5), lesion_count=(2, 2)), path)
    return path


async def test_long_job_completes_once_without_rebalance(
    stack: LocalStack, store: ObjectStore, producer, big_phantom_file: Path
) -> None:
    settings = isolated_settings(stack, "long", kafka_max_poll_interval_ms=1000)
    await ensure_topics(settings)
    async with event_log(settings, settings.kafka_job_events_topic) as events:
        service = await start_service(settings)
        try:
            assignments = service.worker.assignments
            job, key = await upload_input(store, big_phantom_file, "big.nii.gz", "application/gzip")
            message = {"job_uuid": job, "input_object": key, "profile": "research"}
            sent = await send_json(producer, settings.kafka_jobs_topic, message, key=job)
            final = await events.final(job, timeout=240)
            assert final["status"] == "completed"
            # The job ran well past the poll interval...
            assert final["duration_seconds"] * 1000 > 2 * settings.kafka_max_poll_interval_ms
            # ...and the member never lost its partitions, so the job ran exactly once.
            assert service.worker.assignments == assignments
            statuses = [e["status"] for e in events.by_job[job]]
            assert statuses.count("accepted") == 1 and statuses.count("completed") == 1
            committed = await committed_offset(settings, settings.kafka_jobs_topic, sent.partition, sent.offset + 1)
            assert committed == sent.offset + 1
        finally:
            await service.stop()


async def test_stop_lets_the_running_job_finish_and_commits(
    stack: LocalStack, store: ObjectStore, producer, big_phantom_file: Path
) -> None:
    settings = isolated_settings(stack, "drain")
    await ensure_topics(settings)
    async with event_log(settings, settings.kafka_job_events_topic) as events:
        service = await start_service(settings)
        try:
            job, key = await upload_input(store, big_phantom_file, "big.nii.gz", "application/gzip")
            message = {"job_uuid": job, "input_object": key, "profile": "production"}
            sent = await send_json(producer, settings.kafka_jobs_topic, message, key=job)
            await events.wait_for(lambda e: e.get("job_uuid") == job and e["status"] == "running")
        finally:
            # What SIGTERM does: stop intake, finish the running job within the grace period, commit, leave.
            await service.stop()
        final = await events.final(job, timeout=30)
        assert final["status"] == "completed"
        committed = await committed_offset(settings, settings.kafka_jobs_topic, sent.partition, sent.offset + 1)
        assert committed == sent.offset + 1
