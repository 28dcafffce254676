"""A job's memory goes back to the system: the malloc settings apply where glibc is the allocator."""

from __future__ import annotations

import platform

import pytest

from models import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_trim")
def test_malloc_thresholds_are_fixed_and_trim_runs() -> None:
    assert memory.keep_large_blocks_mapped() is True
    memory.release()


def test_without_glibc_both_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_libc", [None])
    assert memory.keep_large_blocks_mapped() is False
    memory.release()


def test_the_trim_between_jobs_frees_what_a_job_left_in_reference_cycles() -> None:
    """A job's frames caught in a cycle (an exception's traceback, a callback holding its owner)
    keep scan-sized arrays alive until the collector's oldest generation runs."""
    import gc
    import weakref

    import numpy as np

    from consumer.observability import memory as between_jobs

    class Frame:
        pass

    gc.disable()  # the collector of this process must not get there first
    try:
        frame = Frame()
        frame.self, frame.scan = frame, np.ones((64, 64, 64), np.float32)  # type: ignore[attr-defined]
        alive = weakref.ref(frame)
        del frame
        assert alive() is not None  # the cycle keeps it
        between_jobs.trim()
        assert alive() is None
    finally:
        gc.enable()


def test_settling_after_the_load_keeps_start_up_objects_out_of_every_collection() -> None:
    import gc

    from consumer.observability import memory as between_jobs

    try:
        between_jobs.settle()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
