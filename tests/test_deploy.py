"""The deployment files, checked without a Docker engine: what they run, pin, wire and watch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from consumer.settings import Settings
from consumer.transport.clients import TOPIC_PARTITIONS

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_services_images_and_health_checks() -> None:
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"kafka", "topics", "minio", "minio-init", "ml-service"}
    for name, service in services.items():
        image = service.get("image", "")
        # Every image is pinned to a version: no floating tag.
        assert ":" in image and not image.endswith((":latest", ":stable")), (name, image)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert re.fullmatch(r"minio/minio:RELEASE\.\S+", services["minio"]["image"])
    assert re.fullmatch(r"minio/mc:RELEASE\.\S+", services["minio-init"]["image"])
    # Long-running services are health-checked; one-shot steps gate what follows by completing.
    for name in ("kafka", "minio", "ml-service"):
        assert services[name]["healthcheck"]["test"], name
    assert "/health" in " ".join(services["ml-service"]["healthcheck"]["test"])
    assert services["minio"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["ml-service"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_kafka_is_single_node_kraft_and_topics_match_the_service() -> None:
    services = load("docker-compose.yml")["services"]
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    script = services["topics"]["command"][0]
    created = dict(re.findall(r"([a-z.-]+):(\d+)", script.split("for t in", 1)[1].split(";", 1)[0]))
    settings = Settings()
    assert {name: int(n) for name, n in created.items()} == {
        topic: TOPIC_PARTITIONS[key]
        for key, topic in {
            "jobs": settings.kafka_jobs_topic,
            "minio_events": settings.kafka_minio_events_topic,
            "job_events": settings.kafka_job_events_topic,
            "dlq": settings.kafka_dlq_topic,
        }.items()
    }


def test_minio_publishes_uploads_to_kafka_with_a_queue_directory() -> None:
    services = load("docker-compose.yml")["services"]
    env = services["minio"]["environment"]
    assert env["MINIO_NOTIFY_KAFKA_ENABLE_PRIMARY"] == "on"
    assert env["MINIO_NOTIFY_KAFKA_BROKERS_PRIMARY"] == "kafka:9092"
    assert env["MINIO_NOTIFY_KAFKA_TOPIC_PRIMARY"] == Settings().kafka_minio_events_topic
    assert env["MINIO_NOTIFY_KAFKA_QUEUE_DIR_PRIMARY"].startswith("/data/")
    init = services["minio-init"]["command"][0]
    bucket = Settings().minio_bucket
    assert f"mc mb --ignore-existing local/{bucket}" in init
    assert re.search(rf"mc event add local/{bucket} arn:minio:sqs::PRIMARY:kafka --event put --prefix uploads/", init)


def test_ml_service_reads_every_variable_it_is_given() -> None:
    compose = load("docker-compose.yml")
    service = compose["services"]["ml-service"]
    env = service["environment"]
    known = {name.upper() for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092" and env["MINIO_ENDPOINT"] == "minio:9000"
    assert "ML_ALLOW_INSECURE" not in env and "?" in env["ML_SERVICE_TOKEN"]  # compose refuses to start without one
    # Replicas of one consumer group, no more than the partitions they share.
    assert 2 <= service["deploy"]["replicas"] <= TOPIC_PARTITIONS["jobs"]
    assert env["KAFKA_GROUP_ID"] == "ml-service"
    assert service["expose"] == ["8080"] and env["HTTP_PORT"] == "8080"


def test_gpu_override_reserves_a_gpu_and_builds_cuda_torch() -> None:
    gpu = load("docker-compose.gpu.yml")["services"]["ml-service"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"] and gpu["environment"]["ML_DEVICE"] == "cuda"


def test_dockerfile_is_multi_stage_non_root_with_model_and_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE)
    assert len(stages) >= 2 and {name for _, name in stages} >= {"build", "runtime"}
    runtime = text.split("AS runtime", 1)[1]
    user = re.search(r"^USER\s+(\S+)", runtime, flags=re.MULTILINE)
    assert user and user.group(1) not in ("root", "0")
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, flags=re.MULTILINE)
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_VERSION\s*[:?]?=\s*([\d.]+)", makefile, flags=re.MULTILINE)
    assert torch_pin and f"ARG TORCH_VERSION={torch_pin.group(1)}" in text  # the version CI tests
    assert "COPY models/medical_segmentation_v1 /app/models/medical_segmentation_v1" in runtime
    assert (ROOT / "models/medical_segmentation_v1/models/model.pt").exists()
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1.*/health", runtime, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["python", "-m", "consumer"]' in runtime and 'CMD ["serve"]' in runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_keda_example_scales_on_the_service_group_lag() -> None:
    scaled = load("deploy/keda-scaledobject.yaml")
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["maxReplicaCount"] <= TOPIC_PARTITIONS["jobs"]
    settings = Settings()
    topics = {t["metadata"]["topic"] for t in scaled["spec"]["triggers"]}
    assert topics == set(settings.consumed_topics)
    assert all(
        t["type"] == "kafka" and t["metadata"]["consumerGroup"] == settings.kafka_group_id
        for t in scaled["spec"]["triggers"]
    )
