"""python -m consumer serve | dev | token"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from aiokafka.errors import KafkaError
from pydantic import ValidationError

from consumer.auth import issue_token, weak_secret
from consumer.dev.localstack import LocalStack, S3Ports, StackError, port_taken, prepare_stack
from consumer.errors import validation_summary
from consumer.observability.logs import configure_logging
from consumer.service import Service
from consumer.settings import Settings
from models.bundle import BundleError

log = logging.getLogger("consumer")


def _settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SystemExit(
            f"error: invalid configuration: {validation_summary(error, 'configuration', upper=True)}"
        ) from None


def _check_security(settings: Settings) -> None:
    secret = settings.ml_service_token.get_secret_value()
    reason = weak_secret(secret)
    if reason is None:
        if len(secret.encode()) < 32:
            log.warning("ML_SERVICE_TOKEN is shorter than 32 bytes, below what RFC 7518 asks of an HS256 key")
        return
    if not settings.ml_allow_insecure:
        raise SystemExit(
            f"error: refusing to start: {reason}. Set a random secret shared with the backend "
            "(e.g. `openssl rand -hex 32`), or ML_ALLOW_INSECURE=1 for a local trial only."
        )
    log.warning(
        "INSECURE: %s and ML_ALLOW_INSECURE=1: %s",
        reason,
        "POST /infer needs no token" if not settings.auth_secrets else "the secret is a known placeholder",
    )


async def _serve(settings: Settings) -> None:
    service = Service(settings)
    try:
        await service.run_until_signal()
    except (KafkaError, OSError, BundleError) as error:
        # Unreachable broker or a taken port: one line that says which, not a traceback.
        raise SystemExit(f"error: could not start: {type(error).__name__}: {error}") from None


async def _dev(settings: Settings) -> None:
    await prepare_stack(settings)
    await _serve(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m consumer", description="The ML analysis service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run against the configured Kafka and MinIO (environment variables)")
    token = sub.add_parser("token", help="print a JWT for POST /infer, signed with ML_SERVICE_TOKEN")
    token.add_argument("--ttl", type=float, default=300.0, help="seconds until it expires (default 300)")
    token.add_argument("--subject", default="backend")
    dev = sub.add_parser("dev", help="run on an embedded local stack (Kafka-protocol broker + S3 server)")
    dev.add_argument("--kafka-port", type=int, default=9092)
    dev.add_argument("--s3-port", type=int, default=9000)
    dev.add_argument("--http-port", type=int, default=None, help="default: HTTP_PORT or 8080")
    dev.add_argument("--data-dir", type=Path, default=Path(".dev"), help="S3 data and the stack's logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command == "serve":
        return _serve_command()
    return _dev_command(args)


def _token(args: argparse.Namespace) -> int:
    secret = _settings().ml_service_token.get_secret_value()
    if not secret:
        print("error: ML_SERVICE_TOKEN is not set", file=sys.stderr)
        return 1
    print(issue_token(secret, ttl_s=args.ttl, subject=args.subject))
    return 0


def _serve_command() -> int:
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    _check_security(settings)
    asyncio.run(_serve(settings))
    return 0


def _dev_command(args: argparse.Namespace) -> int:
    settings = _dev_settings(args)
    # Text for people by default in dev; LOG_FORMAT=json still wins when set.
    configure_logging(settings.log_level, settings.log_format if "LOG_FORMAT" in os.environ else "text")
    _check_security(settings)
    if port_taken(settings.http_port):
        print(
            f"error: port {settings.http_port} (HTTP) is already in use: stop what holds it or pass --http-port",
            file=sys.stderr,
        )
        return 1
    # SeaweedFS' internal ports (master, volume, filer) are nobody's business: any free ones.
    s3_ports = S3Ports.free()
    s3_ports.s3 = args.s3_port
    stack = LocalStack(args.data_dir.resolve(), args.kafka_port, s3_ports)
    try:
        stack.start()
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        log.info(
            "embedded stack up: Kafka %s, S3 %s, logs in %s", stack.bootstrap, stack.s3_endpoint, args.data_dir / "logs"
        )
        asyncio.run(_dev(settings))
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        log.info("embedded stack stopped")
    return 0


def _dev_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {
        "kafka_bootstrap_servers": f"127.0.0.1:{args.kafka_port}",
        "minio_endpoint": f"127.0.0.1:{args.s3_port}",
        "minio_secure": False,
        # A local trial on loopback: no secret needed (said in the log at start).
        "ml_allow_insecure": True,
    }
    if args.http_port is not None:
        overrides["http_port"] = args.http_port
    return _settings(**overrides)
