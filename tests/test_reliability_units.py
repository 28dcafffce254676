"""Pure logic of the reliability parts: the retry policy and deadlines, what a lane is doing,
dead letters, where outputs may lie, the result cache's key, the work directory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord

from consumer import activity
from consumer.activity import Activity, Finals, Phase
from consumer.errors import InputTooLarge, InvalidMessage, OutputNotAllowed
from consumer.jobs.cache import cache_key, model_identity
from consumer.jobs.context import JobContext
from consumer.jobs.outputs import OutputKeys, check_allowed
from consumer.jobs.result import model_info
from consumer.jobs.workspace import LOCK_NAME, PROCESS_PREFIX, Workspace, sweep
from consumer.observability import memory
from consumer.retry import Deadline, RetryPolicy, budget, retry
from consumer.storage import ObjectInfo
from consumer.transport.publisher import LETTER_HEAD, dead_letter_of
from models.engine import Ran
from models.registry import ModelCard
from schemas.events import DeadLetter
from schemas.jobs import JobRequest, Profile, Source
from schemas.results import ModelInfo
from tests.conftest import eventually

FAST = RetryPolicy("test", base=0.001, cap=0.002, wait_s=5.0)


class Flaky:
    """Fails `failures` times with `error`, then returns "ok"."""

    def __init__(self, failures: int, error: Exception | None = None):
        self.failures = failures
        self.error = error or ConnectionError("down")
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def transient(error: Exception) -> bool:
    return isinstance(error, ConnectionError)


# --- retry -------------------------------------------------------------------------------------


async def test_retry_rides_out_transient_failures_and_counts_them() -> None:
    counted: list[int] = []
    policy = RetryPolicy("test", base=0.001, cap=0.002, wait_s=5.0, on_retry=lambda: counted.append(1))
    call = Flaky(3)
    assert await retry(call, policy, transient) == "ok"
    assert call.calls == 4 and len(counted) == 3


async def test_retry_raises_what_is_not_transient_at_once() -> None:
    call = Flaky(5, ValueError("refused"))
    with pytest.raises(ValueError, match="refused"):
        await retry(call, FAST, transient)
    assert call.calls == 1


async def test_retry_gives_up_before_its_deadline_with_the_last_error() -> None:
    call = Flaky(10**6)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await retry(
            call, RetryPolicy("test", base=0.01, cap=0.02, wait_s=None), transient, deadline=Deadline.after(0.3)
        )
    elapsed = time.monotonic() - started
    assert call.calls > 3 and elapsed < 0.3 + 0.05  # the next wait would have ended past the deadline


async def test_a_budget_in_scope_decides_the_limit_and_attempts_bound_it_too() -> None:
    # A job's budget: retries go on past the policy's own (short) wait, up to the job's deadline.
    short = RetryPolicy("test", base=0.001, cap=0.002, wait_s=0.0)
    with budget(Deadline.after(5.0)):
        assert await retry(Flaky(20), short, transient) == "ok"
    # Without one, the policy's own wait is the limit.
    with pytest.raises(ConnectionError):
        await retry(Flaky(20), short, transient)
    # An /infer caller's budget: one loop waits at most max_wait_s.
    with budget(Deadline.after(60.0), max_wait_s=0.0), pytest.raises(ConnectionError):
        await retry(Flaky(20), FAST, transient)
    # A count instead of a time.
    counted = RetryPolicy("test", base=0.001, cap=0.002, wait_s=None, attempts=3)
    call = Flaky(20)
    with pytest.raises(ConnectionError):
        await retry(call, counted, transient)
    assert call.calls == 3


async def test_a_retry_marks_its_lane_stalled_while_it_waits() -> None:
    lane = Activity()
    seen: list[str | None] = []

    async def call() -> str:
        seen.append(lane.stall_reason)
        if len(seen) < 3:
            raise ConnectionError("down")
        return "ok"

    with activity.bound(lane):
        await retry(call, FAST, transient)
    assert seen == [None, "test", "test"] and lane.stalled_since is None


def test_deadlines_compare() -> None:
    never, soon, later = Deadline(None), Deadline.after(1.0), Deadline.after(10.0)
    assert never.remaining() == float("inf") and not never.expired
    assert soon.earliest(later) is soon and later.earliest(soon) is soon
    assert never.earliest(soon) is soon and soon.earliest(never) is soon
    assert Deadline.after(-1.0).expired


async def test_a_final_write_is_not_cut_by_a_cancel() -> None:
    finals = Finals()
    written: list[str] = []
    gate = asyncio.Event()

    async def write() -> None:
        await gate.wait()
        written.append("event")

    caller = asyncio.create_task(finals.run(write))
    await eventually(lambda: bool(finals.tasks), what="the write under way")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    gate.set()
    await finals.wait(5.0)
    assert written == ["event"] and not finals.tasks


def test_phases_nest_and_restore() -> None:
    lane = Activity()
    with activity.bound(lane):
        with activity.phase(Phase.WAITING):
            assert lane.phase is Phase.WAITING
            with activity.phase(Phase.RUNNING):
                assert activity.current() is lane and lane.phase is Phase.RUNNING
        assert lane.phase is Phase.IDLE
    # Unbound: marks go nowhere.
    with activity.phase(Phase.RUNNING):
        assert activity.current().phase is Phase.IDLE


# --- dead letters ------------------------------------------------------------------------------


def record(value: bytes | None, key: bytes | None = b"k", headers: tuple = ()) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("ml.jobs", 2, 41, 1700000000000, 0, key, value, None, 0, len(value or b""), headers)


def test_a_dead_letter_keeps_the_message_exactly() -> None:
    value = b"\xff\xfe not UTF-8 \x00\x80"
    key = b"\x01\x02key"
    letter = dead_letter_of(record(value, key, (("trace", b"\xff"), ("empty", None))), InvalidMessage("bad"))
    DeadLetter.model_validate(letter.model_dump(mode="json"))
    assert base64.b64decode(letter.payload_base64) == value and not letter.payload_truncated
    assert letter.payload_size == len(value) and letter.payload_sha256 == hashlib.sha256(value).hexdigest()
    assert base64.b64decode(letter.origin.key_base64 or "") == key
    assert [(h.key, base64.b64decode(h.value_base64)) for h in letter.origin.headers] == [
        ("trace", b"\xff"),
        ("empty", b""),
    ]
    assert (letter.origin.topic, letter.origin.partition, letter.origin.offset) == ("ml.jobs", 2, 41)


def test_a_message_too_large_for_a_letter_leaves_its_head_size_and_hash() -> None:
    value = os.urandom(900 * 1024)
    details = [
        {"loc": [f"extra{i}"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"} for i in range(500)
    ]
    letter = dead_letter_of(record(value), InvalidMessage("x" * 10_000, details=details))
    encoded = letter.model_dump_json().encode()
    assert len(encoded) < 200 * 1024  # far below the producer's 1 MiB
    assert letter.payload_truncated and base64.b64decode(letter.payload_base64) == value[:LETTER_HEAD]
    assert letter.payload_size == len(value) and letter.payload_sha256 == hashlib.sha256(value).hexdigest()
    assert len(letter.details) == 20 and len(letter.error.message) < 2100
    empty = dead_letter_of(record(None, key=None), InvalidMessage("no value"))
    assert empty.payload_size == 0 and empty.payload_base64 == "" and empty.origin.key_base64 is None


# --- where outputs may lie ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_object", "extra", "allowed"),
    [
        (None, {}, True),
        ("results/a/b.nii.gz", {}, True),
        ("custom/b.nii.gz", {}, False),
        ("uploads/j/scan.nii.gz", {}, False),
        ("results/j/scan.nii.gz", {"input_object": "results/j/scan.nii.gz"}, False),
        ("results/j/scan", {"input_object": "results/j/scan.json"}, False),  # its result JSON would be the input
        ("results/j/m.nii.gz", {"reference_object": "results/j/m.preview.png"}, False),
        ("results/.cache/m.nii.gz", {}, False),
        ("resultsX/m.nii.gz", {}, False),
    ],
)
def test_outputs_lie_under_the_prefix_and_never_over_the_input(output_object, extra, allowed) -> None:
    request = JobRequest.model_validate(
        {"job_uuid": "j", "input_object": "uploads/j/scan.nii.gz", "output_object": output_object, **extra}
    )
    keys = OutputKeys.for_job(request, "results/")
    if allowed:
        check_allowed(keys, request, "results/")
    else:
        with pytest.raises(OutputNotAllowed) as refused:
            check_allowed(keys, request, "results/")
        assert refused.value.code.value == "output_not_allowed" and refused.value.http_status == 422


# --- the result cache's key --------------------------------------------------------------------


def context(**request: object) -> JobContext:
    job = JobRequest.model_validate({"job_uuid": "j", "input_object": "uploads/j/a.nii.gz", **request})
    return JobContext(
        job,
        Source.KAFKA,
        job.profile or Profile.FAST_DEBUG,
        job.threshold or 0.55,
        OutputKeys.for_job(job),
        ModelInfo(name="m", version="1", device="cpu", precision="fp32"),
    )


def test_the_cache_key_covers_what_the_outputs_depend_on() -> None:
    source = ObjectInfo("uploads/j/a.nii.gz", 100, '"etag-1"', None)
    base = cache_key(context(), source, None, "model@1#sha")
    assert base is not None and len(base) == 64
    # The same bytes under another key and another job id: the same result.
    moved = ObjectInfo("uploads/other/b.nii.gz", 100, "etag-1", None)
    assert cache_key(context(job_uuid="k", input_object="uploads/other/b.nii.gz"), moved, None, "model@1#sha") == base
    different = [
        cache_key(context(), ObjectInfo("uploads/j/a.nii.gz", 100, "etag-2", None), None, "model@1#sha"),
        cache_key(context(profile="production"), source, None, "model@1#sha"),
        cache_key(context(threshold=0.4), source, None, "model@1#sha"),
        cache_key(context(series_uid="1.2.3"), source, None, "model@1#sha"),
        cache_key(context(), source, ObjectInfo("ref", 5, "r", None), "model@1#sha"),
        cache_key(context(), source, None, "model@2#sha"),
        cache_key(context(output_object="results/x.nii"), source, None, "model@1#sha"),  # another mask format
    ]
    assert base not in different and len(set(different)) == len(different)
    assert cache_key(context(), ObjectInfo("uploads/j/a.nii.gz", 100, None, None), None, "m") is None


class OneModel:
    """The registry's face that the cache's model identity reads: one hosted model."""

    def __init__(self, fast_sha: str):
        ran = Ran("openvino", "fp32", fast_sha)
        self.card_ = ModelCard("m", "1", "", "CT", {}, "sha", True, "cpu", "fp32", "openvino", {"fast_debug": ran})

    def resolve(self, requested: str | None, modality: str | None = None) -> str:
        return "m"

    def card(self, name: str) -> ModelCard:
        return self.card_


def test_a_job_names_its_profiles_own_network_from_its_first_event() -> None:
    card = OneModel("fast-1").card_
    fast, production = model_info(card, Profile.FAST_DEBUG), model_info(card, Profile.PRODUCTION)
    assert (fast.weights_sha256, fast.runtime) == ("fast-1", "openvino")
    assert production.weights_sha256 == "sha"


def test_new_weights_of_a_profile_network_are_a_new_model_to_that_profile_alone() -> None:
    def identity(sha: str, profile: Profile) -> str:
        return model_identity(OneModel(sha), "m", profile)  # type: ignore[arg-type]

    first, again, retrained = (identity(sha, Profile.FAST_DEBUG) for sha in ("fast-1", "fast-1", "fast-2"))
    assert first == again != retrained and "fast_debug#fast-1" in first
    # Production runs the bundle's network: fast_debug's new weights leave its entries valid.
    assert identity("fast-1", Profile.PRODUCTION) == identity("fast-2", Profile.PRODUCTION)


# --- the work directory ------------------------------------------------------------------------


def test_directories_of_killed_processes_are_removed_at_start(tmp_path: Path) -> None:
    # A real process opens its work directory, leaves a job's files in it, and is killed.
    script = (
        "import sys, time; from pathlib import Path; from consumer.jobs.workspace import Workspace\n"
        "w = Workspace(Path(sys.argv[1]), 4.0); w.open(); (w.dir / 'job-x-1').mkdir()\n"
        "(w.dir / 'job-x-1' / 'input').write_bytes(b'0' * 1000); print(w.dir, flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE)
    assert child.stdout is not None
    left = Path(child.stdout.readline().decode().strip())
    # While it lives, a starting replica beside it leaves its directory alone.
    beside = Workspace(tmp_path, 4.0)
    assert beside.open() == [] and left.exists()
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    again = Workspace(tmp_path, 4.0)
    assert again.open() == [left] and not left.exists()
    # The one beside (alive) is still there; so is the new one.
    assert sorted(tmp_path.iterdir()) == sorted([beside.dir, again.dir])
    for workspace in (beside, again):
        workspace.close()
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_an_unlocked_directory_only(tmp_path: Path) -> None:
    dead = tmp_path / f"{PROCESS_PREFIX}dead"
    (dead / "job-a").mkdir(parents=True)
    other = tmp_path / "something-else"
    other.mkdir()
    assert sweep(tmp_path) == [dead] and other.exists()
    assert not (tmp_path / f"{PROCESS_PREFIX}dead" / LOCK_NAME).exists()


async def test_a_job_waits_for_disk_space_instead_of_failing(tmp_path: Path, monkeypatch) -> None:
    workspace = Workspace(tmp_path, 4.0, poll_s=0.01)
    free = {"bytes": 100}
    monkeypatch.setattr(workspace, "free_bytes", lambda: free["bytes"])
    lane = Activity()

    async def job() -> int:
        with activity.bound(lane):
            async with workspace.room(1000) as need:
                return need

    waiting = asyncio.create_task(job())
    await eventually(lambda: workspace.waiting == 1, what="the job waiting for space")
    assert lane.stall_reason == "disk space" and not waiting.done()
    free["bytes"] = 10**9
    assert await waiting == 4000
    assert workspace.waiting == 0 and workspace.reserved == 0 and lane.stalled_since is None
    # One that could never fit fails at once.
    with pytest.raises(InputTooLarge):
        async with workspace.room(workspace.total_bytes()):
            pass
    workspace.close()


def test_malloc_trim_is_there_on_glibc() -> None:
    assert memory.trim() in (True, False)
    assert memory._libc() is not None  # this machine's C library is glibc


def test_parallel_waits_keep_a_lane_stalled_until_the_last_ends() -> None:
    lane = Activity()
    with activity.bound(lane), activity.stalled("storage"):
        with activity.stalled("storage"):
            since = lane.stalled_since
        assert lane.stalled_since == since and lane.stall_reason == "storage"  # one upload still retries
    assert lane.stalled_since is None and lane.stalls == 0
    lane.stall("record 7 failed")
    lane.stall("record 7 failed")
    lane.clear()  # a commit: progress
    assert lane.stalled_since is None and lane.stalls == 0
