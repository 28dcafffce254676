"""The two commands a newcomer runs, as subprocesses: `python -m consumer dev` and `submit --wait`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import psutil
import pytest

from consumer.dev.localstack import free_port

pytestmark = pytest.mark.slow


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "dev exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if orjson.loads(response.read())["status"] == "healthy":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("the dev service never became healthy")


def lingers(process: psutil.Process) -> bool:
    """Still running; a zombie has ended (nothing in a container may reap it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dev_and_submit_wait(tmp_path: Path, phantom_file: Path) -> None:
    kafka, s3, http = free_port(), free_port(), free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}", "MINIO_ENDPOINT": f"127.0.0.1:{s3}"}
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115 - the child writes to it until the end
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumer",
            "dev",
            "--kafka-port",
            str(kafka),
            "--s3-port",
            str(s3),
            "--http-port",
            str(http),
            "--data-dir",
            str(tmp_path / "dev"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(http, dev)
        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) >= 2  # the broker and the S3 server

        submit = subprocess.run(
            [sys.executable, "-m", "producer_tools", "submit", str(phantom_file), "--wait", "--timeout", "120"],
            env=env,
            capture_output=True,
            timeout=180,
        )
        assert submit.returncode == 0, submit.stderr.decode()
        event = orjson.loads(submit.stdout)
        assert event["status"] == "completed" and event["output_object"].startswith("results/analysis_")

        # A missing file is one clear line, not a traceback.
        missing = subprocess.run(
            [sys.executable, "-m", "producer_tools", "submit", str(tmp_path / "nope.nii.gz")],
            env=env,
            capture_output=True,
        )
        assert missing.returncode != 0 and b"Traceback" not in missing.stderr

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not [c for c in alive if lingers(c)], "children left behind"
    finally:
        if dev.poll() is None:
            dev.kill()
        log.close()
    assert "embedded stack stopped" in (tmp_path / "dev.log").read_text()


def test_dev_with_a_taken_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "consumer",
                "dev",
                "--kafka-port",
                str(taken),
                "--s3-port",
                str(free_port()),
                "--http-port",
                str(free_port()),
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert f"port {taken}".encode() in result.stderr and b"already in use" in result.stderr
