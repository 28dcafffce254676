"""What an operator sees: health probes, metrics after real jobs, JSON logs with job context,
lag / tail / topics from the command line, and the API documents."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from consumer.dev.localstack import LocalStack
from consumer.observability.logs import ContextFilter, JsonFormatter, log_context
from consumer.service import Service
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics, make_consumer
from schemas.api_docs import TOPICS
from schemas.export import document_path
from tests.conftest import (
    SECRET,
    EventLog,
    committed_offset,
    isolated_settings,
    job_id,
    samples,
    send_json,
    upload_input,
    value,
)


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "MINIO_ENDPOINT": settings.minio_endpoint,
        "KAFKA_JOBS_TOPIC": settings.kafka_jobs_topic,
        "KAFKA_MINIO_EVENTS_TOPIC": settings.kafka_minio_events_topic,
        "KAFKA_JOB_EVENTS_TOPIC": settings.kafka_job_events_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
    }


async def run_cli(settings: Settings, *args: str, timeout: float = 60) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "producer_tools",
        *args,
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, out.decode()


# --- health ------------------------------------------------------------------------------------


async def test_health_has_a_check_per_dependency_and_probes(service: Service, http) -> None:
    body = await (await http.get("/health")).json()
    assert body["status"] == "healthy"
    assert set(body["checks"]) == {"kafka", "storage", "model", "device", "disk"}
    assert all(check["status"] == "ok" for check in body["checks"].values()), body["checks"]
    assert "partition" in body["checks"]["kafka"]["detail"]
    live = await http.get("/health/live")
    assert live.status == 200 and (await live.json())["status"] == "alive"
    ready = await http.get("/health/ready")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_not_ready_until_model_loaded_and_group_joined(stack: LocalStack) -> None:
    # A service that has not started: nothing loaded, no group joined.
    settings = isolated_settings(stack, "unready")
    service = Service(settings)
    probe = service.health.readiness()
    assert probe.status == "not_ready"
    assert any("model" in r for r in probe.reasons) and any("group" in r for r in probe.reasons)
    report = await service.health.report()
    assert report.status == "unhealthy" and report.checks["model"].status == "failing"
    assert report.checks["kafka"].status == "degraded"


# --- metrics -----------------------------------------------------------------------------------


async def test_metrics_after_real_jobs(
    service: Service, store: ObjectStore, producer, job_events: EventLog, http, phantom_file: Path
) -> None:
    before = samples(await (await http.get("/metrics")).text())
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    assert (await http.post("/infer", json={"job_uuid": job, "input_object": key})).status == 200
    settings = service.settings
    broken = await send_json(producer, settings.kafka_jobs_topic, b"{not json", key="broken")
    failed = job_id()
    failing = await send_json(
        producer,
        settings.kafka_jobs_topic,
        {"job_uuid": failed, "input_object": f"uploads/{failed}/nothing.nii.gz"},
        key=failed,
    )
    await job_events.final(failed)
    # Lag is read from committed offsets: once both records are committed, a refresh shows none.
    for sent in (broken, failing):  # possibly on one partition: then the later commit covers both
        committed = await committed_offset(settings, sent.topic, sent.partition, sent.offset + 1)
        assert committed is not None and committed > sent.offset, (sent, committed)
    await service.lag_monitor.refresh()
    after = samples(await (await http.get("/metrics")).text())

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("ml_jobs_total", status="completed", source="http", profile="fast_debug") == 1
    assert grew("ml_jobs_total", status="failed", source="kafka", profile="fast_debug") == 1
    assert grew("ml_job_errors_total", code="input_not_found") == 1
    assert grew("ml_dead_letters_total", topic=service.settings.kafka_jobs_topic, code="invalid_json") == 1
    for step in ("fetch", "read", "infer", "analyse", "write", "publish"):
        assert grew("ml_job_step_seconds_count", step=step) >= 1, step
    assert value(after, "ml_jobs_in_flight") == 0
    assert value(after, "ml_model_loaded") == 1
    assert value(after, "process_resident_memory_bytes") > 50 * 2**20
    lags = {labels: v for (name, labels), v in after.items() if name == "ml_consumer_lag"}
    assert lags and all(v == 0 for v in lags.values()), lags  # everything sent was consumed
    assert ("ml_callbacks_failed_total", frozenset()) in after


# --- logs --------------------------------------------------------------------------------------


def test_json_logs_carry_job_context_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("test.json-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(job_uuid="j-1", topic="ml.jobs", partition=2, offset=41, model_version="1.0.0"):
            with log_context(step="infer"):
                logger.info("inferring", extra={"duration": 1.5})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message")} == {
        "level": "INFO",
        "logger": "test.json-logs",
        "message": "inferring",
    }
    assert first["job_uuid"] == "j-1" and first["partition"] == 2 and first["offset"] == 41
    assert first["step"] == "infer" and first["duration"] == 1.5 and first["model_version"] == "1.0.0"
    assert "time" in first
    assert "step" not in second and "ValueError: boom" in second["traceback"]
    assert "job_uuid" not in third


async def test_service_logs_name_the_job_and_step(
    service: Service, store: ObjectStore, http, phantom_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(ContextFilter())
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    with caplog.at_level(logging.INFO):
        assert (await http.post("/infer", json={"job_uuid": job, "input_object": key})).status == 200
    records = [r for r in caplog.records if getattr(r, "job_uuid", None) == job]
    assert records, "no log line carried the job id"
    done = next(r for r in records if "completed" in r.getMessage())
    assert (
        done.duration > 0
        and done.model_version == service.models.card(service.models.default).version
        and done.source == "http"
    )  # type: ignore[attr-defined]


# --- the operator's command line ----------------------------------------------------------------


async def test_lag_counts_what_was_produced_and_consumed(stack: LocalStack, producer) -> None:
    settings = isolated_settings(stack, f"lag-{job_id()[:8]}")
    await ensure_topics(settings)
    topic = settings.kafka_jobs_topic
    for n in range(7):
        await producer.send_and_wait(topic, b"{}", partition=0, key=f"k{n}".encode())
    for n in range(3):
        await producer.send_and_wait(topic, b"{}", partition=1, key=f"m{n}".encode())
    # A group that has consumed and committed 4 of partition 0 and nothing of partition 1.
    group = "lag-check"
    consumer = make_consumer(settings, group)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): 4})
    finally:
        await consumer.stop()

    code, out = await run_cli(settings, "lag", "--group", group, "--json")
    assert code == 0, out
    report = orjson.loads(out.strip().splitlines()[-1])
    by_partition = {(p["topic"], p["partition"]): p for p in report["partitions"]}
    assert by_partition[(topic, 0)] == {"topic": topic, "partition": 0, "committed": 4, "end": 7, "lag": 3}
    assert by_partition[(topic, 1)]["committed"] is None and by_partition[(topic, 1)]["lag"] == 3
    assert report["total_lag"] == 6
    assert report["members"] in (None, [])  # nobody consumes now; the embedded broker may not describe groups

    code, out = await run_cli(settings, "lag", "--group", group, "--max-lag", "5")
    assert code == 1 and "total" in out and f"{topic}" in out
    code, _ = await run_cli(settings, "lag", "--group", group, "--max-lag", "6")
    assert code == 0

    # --watch prints again and again until stopped, following new messages.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "producer_tools",
        "lag",
        "--group",
        group,
        "--json",
        "--watch",
        "0.5",
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 60))
        await producer.send_and_wait(topic, b"{}", partition=1, key=b"late")
        totals = [first["total_lag"]]
        while totals[-1] != 7:
            totals.append(orjson.loads(await asyncio.wait_for(process.stdout.readline(), 60))["total_lag"])
        assert totals[0] == 6
    finally:
        process.terminate()
        await process.wait()


async def test_topics_twice_changes_nothing(stack: LocalStack) -> None:
    settings = isolated_settings(stack, f"topics-{job_id()[:8]}")
    code, first = await run_cli(settings, "topics")
    assert code == 0 and "created" in first and settings.kafka_dlq_topic in first
    code, second = await run_cli(settings, "topics")
    assert code == 0 and "all topics exist" in second


async def test_tail_prints_one_line_per_event(
    service: Service, store: ObjectStore, producer, job_events: EventLog
) -> None:
    job = job_id()
    await send_json(
        producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": f"uploads/{job}/x.nii"}, key=job
    )
    await job_events.final(job)
    settings = service.settings
    for flags, check in (
        ((), lambda line: "failed" in line and job in line and "input_not_found" in line),
        (("--json",), lambda line: orjson.loads(line)["error"]["code"] == "input_not_found"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "producer_tools",
            "tail",
            "--from-beginning",
            "--job",
            job,
            *flags,
            env=cli_env(settings),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            lines: list[str] = []
            assert process.stdout is not None
            while not lines or "failed" not in lines[-1]:
                lines.append((await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip())
            assert len(lines) == 2  # accepted, failed
            assert check(lines[-1]), lines
        finally:
            process.terminate()
            await process.wait()


# --- API documents ------------------------------------------------------------------------------


async def test_openapi_is_served_and_matches_the_export(http) -> None:
    response = await http.get("/openapi.json")
    assert response.status == 200
    served = await response.json()
    assert served == json.loads(document_path("openapi").read_text())
    assert set(served["paths"]) >= {"/infer", "/health", "/health/live", "/health/ready", "/metrics"}
    assert served["paths"]["/infer"]["post"]["security"] == [{"bearerJWT": []}]


async def test_schemathesis_finds_no_server_error_or_schema_violation(service: Service, tmp_path: Path) -> None:
    from consumer.auth import issue_token

    url = f"http://127.0.0.1:{service.settings.http_port}/openapi.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url,
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
        "negative_data_rejection",
        "--header",
        f"Authorization: Bearer {issue_token(SECRET, ttl_s=3600)}",
        "--max-examples",
        "25",
        "--workers",
        "1",
        "--seed",
        "7",
        "--phases",
        "examples,coverage,fuzzing",
        "--report-dir",
        str(tmp_path),
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # its example database and reports stay out of the work tree
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 240)
    text = out.decode()
    assert process.returncode == 0, text[-6000:]


def test_asyncapi_describes_the_four_topics_with_their_schemas() -> None:
    document: dict[str, Any] = json.loads(document_path("asyncapi").read_text())
    assert document["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in document["channels"].values()}
    settings = Settings()
    assert addresses == {
        settings.kafka_jobs_topic,
        settings.kafka_minio_events_topic,
        settings.kafka_job_events_topic,
        settings.kafka_dlq_topic,
    }
    for _, topic, model, action, _ in TOPICS:
        channel = next(c for c in document["channels"].values() if c["address"] == topic)
        (message_ref,) = channel["messages"].values()
        name = message_ref["$ref"].rsplit("/", 1)[-1]
        payload = document["components"]["messages"][name]["payload"]["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][payload]
        assert set(schema["properties"]) == set(model.model_json_schema(by_alias=True)["properties"])
        assert any(
            op["action"] == action
            and op["channel"]["$ref"].endswith(next(k for k, c in document["channels"].items() if c is channel))
            for op in document["operations"].values()
        )
