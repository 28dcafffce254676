"""python -m producer_tools submit | upload | tail | lag | topics

Defaults come from the same environment variables as the service, and match `python -m
consumer dev`, so no flags are needed against the embedded stack.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from consumer.settings import Settings
from consumer.transport.clients import ensure_topics
from consumer.transport.lag import GroupMember, PartitionLag
from producer_tools.commands import EventFollower, consumer_lag, emit_minio_event, submit, upload

EXIT_FAILED = 1
EXIT_TIMEOUT = 2


def _print_json(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _event_line(event: dict) -> str:
    parts = [event.get("timestamp", "")[:23], f"{event.get('status', '?'):<9}", event.get("job_uuid", "?")]
    if event.get("duration_seconds") is not None:
        parts.append(f"{event['duration_seconds']:.2f}s")
    if event.get("summary"):
        parts.append(f"lesions={event['summary'].get('lesions_count')}")
    if event.get("error"):
        parts.append(f"error={event['error'].get('code')}: {event['error'].get('message')}")
    if event.get("output_object"):
        parts.append(event["output_object"])
    return "  ".join(str(p) for p in parts)


async def _cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    message, final = await submit(
        settings,
        args.file,
        prefix=args.prefix,
        profile=args.profile,
        threshold=args.threshold,
        wait=args.wait,
        timeout=args.timeout,
        job_uuid=args.job_uuid,
        series_uid=args.series_uid,
        model=args.model,
    )
    if not args.wait:
        _print_json(message)
        return 0
    if final is None:
        print(f"error: no final event for job {message['job_uuid']} within {args.timeout:.0f} s", file=sys.stderr)
        return EXIT_TIMEOUT
    _print_json(final)
    return 0 if final["status"] == "completed" else EXIT_FAILED


async def _cmd_upload(settings: Settings, args: argparse.Namespace) -> int:
    key = args.key or f"uploads/{args.file.name}"
    uploaded = await upload(settings, args.file, key)
    result: dict[str, object] = {
        "bucket": settings.minio_bucket,
        "key": uploaded.key,
        "size": uploaded.size,
        "etag": uploaded.etag,
    }
    if args.emit_minio_event:
        result["event"] = await emit_minio_event(settings, uploaded, args.file)
    _print_json(result)
    return 0


async def _cmd_tail(settings: Settings, args: argparse.Namespace) -> int:
    async with EventFollower(settings, from_beginning=args.from_beginning) as follower:
        async for event in follower.events():
            if args.job and event.get("job_uuid") != args.job:
                continue
            print(orjson.dumps(event).decode() if args.json else _event_line(event), flush=True)
    return 0


def _lag_report(group: str, rows: list[PartitionLag], members: list[GroupMember] | None) -> dict[str, Any]:
    return {
        "group": group,
        "partitions": [
            {"topic": r.topic, "partition": r.partition, "committed": r.committed, "end": r.end, "lag": r.lag}
            for r in rows
        ],
        "total_lag": sum(r.lag for r in rows),
        "members": None
        if members is None
        else [
            {"member_id": m.member_id, "client_id": m.client_id, "host": m.host, "partitions": m.partitions}
            for m in members
        ],
    }


def _print_lag_table(report: dict[str, Any]) -> None:
    print(f"group {report['group']}")
    print(f"{'topic':<16} {'partition':>9} {'committed':>10} {'end':>8} {'lag':>6}")
    for r in report["partitions"]:
        committed = "-" if r["committed"] is None else str(r["committed"])
        print(f"{r['topic']:<16} {r['partition']:>9} {committed:>10} {r['end']:>8} {r['lag']:>6}")
    print(f"{'total':<16} {'':>9} {'':>10} {'':>8} {report['total_lag']:>6}")
    members = report["members"]
    if members is None:
        print("members: the broker does not describe groups")
    elif not members:
        print("members: none (no replica is consuming)")
    else:
        print("members:")
        for m in members:
            print(f"  {m['client_id']} {m['host']} {m['member_id'][:24]}: {', '.join(m['partitions']) or '-'}")


async def _cmd_lag(settings: Settings, args: argparse.Namespace) -> int:
    group = args.group or settings.kafka_group_id
    while True:
        rows, members = await consumer_lag(settings, group, list(settings.consumed_topics))
        report = _lag_report(group, rows, members)
        if args.json:
            print(orjson.dumps(report).decode(), flush=True)
        else:
            if args.watch:
                print(time.strftime("%H:%M:%S"))
            _print_lag_table(report)
        over = args.max_lag is not None and report["total_lag"] > args.max_lag
        if not args.watch:
            return EXIT_FAILED if over else 0
        if not args.json:
            print(flush=True)
        await asyncio.sleep(args.watch)


async def _cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    created = await ensure_topics(settings)
    print("created: " + ", ".join(created) if created else "all topics exist")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer_tools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="upload a scan and publish a job message")
    p.add_argument("file", type=Path)
    p.add_argument("--profile", choices=["fast_debug", "production", "research"])
    p.add_argument("--threshold", type=float)
    p.add_argument("--wait", action="store_true", help="print the final job event; exit 0 on completed")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait")
    p.add_argument("--prefix", default="uploads", help="key prefix of the upload (default uploads)")
    p.add_argument("--job-uuid", help="default: a new UUID")
    p.add_argument("--series-uid", help="DICOM input: the SeriesInstanceUID to analyse (default: the selection rule)")
    p.add_argument("--model", help="the model (bundle) to run; default: by the scan's modality, else the first hosted")
    p.set_defaults(run=_cmd_submit)

    p = sub.add_parser("upload", help="upload a file; optionally publish MinIO's upload event")
    p.add_argument("file", type=Path)
    p.add_argument("--key", help="default uploads/<file name>")
    p.add_argument("--emit-minio-event", action="store_true", help="publish the notification MinIO would send")
    p.set_defaults(run=_cmd_upload)

    p = sub.add_parser("tail", help="follow job events")
    p.add_argument("--job", help="only this job")
    p.add_argument("--json", action="store_true")
    p.add_argument("--from-beginning", action="store_true")
    p.set_defaults(run=_cmd_tail)

    p = sub.add_parser("lag", help="consumer-group lag per partition")
    p.add_argument("--group")
    p.add_argument("--json", action="store_true")
    p.add_argument("--max-lag", type=int, help="exit 1 when the total lag is above this")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until Ctrl-C")
    p.set_defaults(run=_cmd_lag)

    p = sub.add_parser("topics", help="create the service's topics (idempotent)")
    p.set_defaults(run=_cmd_topics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "file", None) is not None and not args.file.is_file():
        print(f"error: {args.file} is not a file", file=sys.stderr)
        return EXIT_FAILED
    settings = Settings()
    try:
        return int(asyncio.run(args.run(settings, args)))
    except KeyboardInterrupt:
        return 130
