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
