"""The service's configuration: one object, read from the environment once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.jobs import Profile

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def parse_routes(text: str) -> dict[str, str]:
    """`MR:mr_brain_extraction,CT:medical_segmentation_v1` -> {"MR": ..., "CT": ...}."""
    routes: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        modality, sep, name = item.partition(":")
        if not sep or not modality.strip() or not name.strip():
            raise ValueError(f"a model route is MODALITY:model_name, not {item!r}")
        routes[modality.strip().upper()] = name.strip()
    return routes


class Settings(BaseSettings):
    """Names follow the seed specification; each field reads the upper-case variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # Object storage (MinIO or any S3 server).
    minio_endpoint: str = "127.0.0.1:9000"
    minio_access_key: str = "minioadmin"
    minio_secret_key: SecretStr = SecretStr("minioadmin")
    minio_bucket: str = "californiagold"
    minio_secure: bool = False
    minio_region: str | None = None

    # Backend callback.
    backend_url: str = ""
    # The HS256 secret of the JWTs on /infer and on callbacks; the previous one is still
    # accepted on /infer while a rotation is under way.
    ml_service_token: SecretStr = SecretStr("")
    ml_service_token_previous: SecretStr = SecretStr("")
    # Run without a secret (and /infer without authentication). `dev` sets it.
    ml_allow_insecure: bool = False
    callback_timeout_s: float = 10.0
    callback_max_attempts: int = 5

    # Analysis defaults.
    ml_default_profile: Profile = Profile.FAST_DEBUG
    ml_decision_threshold: float = Field(default=0.55, gt=0.0, lt=1.0)
    ml_max_input_bytes: int = 2 * 1024**3
    ml_max_voxels: int = 1024**3 // 2
    # ZIP input: limits checked while members are read (ZIP bombs stop early).
    ml_max_archive_bytes: int = 8 * 1024**3
    ml_max_archive_members: int = 50_000
    ml_max_archive_ratio: float = 200.0
    ml_reader_threads: int | None = Field(default=None, ge=1, description="Default: the CPU count")
    # The whole job, every retry inside it included (consumer.retry).
    ml_job_timeout_s: float = Field(default=1800.0, gt=0)
    # Two: while one job is in inference (the engine runs one prediction at a time), the next is
    # fetched and read and the previous one written, so the engine does not wait for I/O.
    ml_max_concurrent_jobs: int = Field(default=2, ge=1)
    ml_device: Literal["auto", "cpu", "cuda"] = "auto"
    ml_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    ml_torch_threads: int | None = None
    ml_workdir: Path | None = None
    # Before a fetch, free space in ML_WORKDIR for the object's size times this (inflating,
    # reading, outputs); a job waits while there is less.
    ml_disk_space_factor: float = Field(default=4.0, gt=0)
    ml_shutdown_grace_s: float = Field(default=60.0, ge=0)
    # After a job, when none is running, hand the heap's free pages back to the system
    # (glibc malloc_trim), so that idle memory between jobs stays near its level at start.
    ml_malloc_trim: bool = True
    # POST /infer: how long one retry loop (storage, events) waits through an outage before the
    # caller gets 503 with Retry-After. Kafka jobs wait up to their deadline.
    ml_infer_retry_wait_s: float = Field(default=30.0, ge=0)
    # A partition that makes no progress this long (waiting on storage, disk space, or retrying a
    # record) shows in /health as degraded.
    ml_stall_limit_s: float = Field(default=60.0, gt=0)

    # Outputs: every key a job writes lies under this prefix. The result cache reuses a finished
    # identical job's outputs (server-side copies) instead of running the model again.
    ml_output_prefix: str = "results/"
    ml_result_cache: bool = True

    # The model bundles: MODEL_PATH/<name> for every name of MODEL_NAME (comma-separated; the
    # first is the default), a job's model by modality when it names none, at most
    # ML_MAX_LOADED_MODELS loaded at once (default: all), the CPU runtime and its export cache.
    model_path: Path = DEFAULT_MODELS_DIR
    model_name: str = "medical_segmentation_v1,mr_brain_extraction"
    ml_model_routes: str = Field(default="MR:mr_brain_extraction", description="MODALITY:model,...")
    ml_max_loaded_models: int | None = Field(default=None, ge=1)
    ml_runtime: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    ml_export_cache: Path = Path.home() / ".cache" / "ml-service" / "exports"

    # Kafka.
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_group_id: str = "ml-service"
    kafka_client_id: str = "ml-service"
    kafka_jobs_topic: str = "ml.jobs"
    kafka_minio_events_topic: str = "minio.events"
    kafka_job_events_topic: str = "ml.job-events"
    kafka_dlq_topic: str = "ml.jobs.dlq"
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 3_000
    kafka_max_poll_interval_ms: int = 300_000
    kafka_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # How often ml_consumer_lag is refreshed.
    ml_lag_refresh_s: float = Field(default=15.0, gt=0)
    # Passed through to aiokafka as they are.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None

    # HTTP.
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    http_max_body_bytes: int = 64 * 1024
    # Idle keep-alive, and the time a client has to send a request's headers (aiohttp closes a
    # connection without a complete request after it); the body must arrive within the second.
    http_keepalive_s: float = Field(default=15.0, gt=0)
    http_body_timeout_s: float = Field(default=15.0, gt=0)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "json"

    @property
    def auth_secrets(self) -> list[str]:
        return [
            s
            for s in (self.ml_service_token.get_secret_value(), self.ml_service_token_previous.get_secret_value())
            if s
        ]

    @property
    def model_names(self) -> list[str]:
        return [name.strip() for name in self.model_name.split(",") if name.strip()]

    @property
    def model_routes(self) -> dict[str, str]:
        return parse_routes(self.ml_model_routes)

    @field_validator("ml_output_prefix")
    @classmethod
    def _prefix_is_a_folder(cls, value: str) -> str:
        if not value or value.startswith("/") or ".." in value.split("/"):
            raise ValueError("a key prefix such as results/ (not empty, no leading /, no ..)")
        return value if value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _models_fit_together(self) -> Settings:
        if not self.model_names:
            raise ValueError("MODEL_NAME names no model")
        # Routes may name only hosted models; an operator who narrows MODEL_NAME drops them too.
        unknown = sorted(set(self.model_routes.values()) - set(self.model_names))
        if unknown and "ml_model_routes" in self.model_fields_set:
            raise ValueError(f"ML_MODEL_ROUTES names models MODEL_NAME does not host: {', '.join(unknown)}")
        return self

    @property
    def hosted_routes(self) -> dict[str, str]:
        """The routes to models that MODEL_NAME hosts (the default route drops out when its model is not)."""
        return {modality: name for modality, name in self.model_routes.items() if name in self.model_names}

    @property
    def consumed_topics(self) -> tuple[str, str]:
        return (self.kafka_jobs_topic, self.kafka_minio_events_topic)
