"""Where jobs keep their files: a directory per process under ML_WORKDIR, one per job inside it.

- A process holds a lock (flock) on its directory for as long as it lives, so the lock of a
  killed process is free: at start, the directories of processes that are gone are removed, with
  whatever their jobs left. Replicas that share a work directory never touch each other's.
- Before a job fetches its input it reserves disk space for it (the object's size times
  ML_DISK_SPACE_FACTOR). While the disk has less free than that (less what running jobs have
  reserved), the job waits, and its lane shows as stalled on disk space (/health degraded),
  instead of filling the disk or failing; its deadline still counts. A job that could never fit
  (it needs more than the whole disk) fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from consumer import activity
from consumer.errors import InputTooLarge

log = logging.getLogger(__name__)

PROCESS_PREFIX = "ml-service-"
LOCK_NAME = ".lock"
DISK_POLL_S = 2.0


def _try_lock(path: Path) -> int | None:
    """An exclusive flock on `path`, or None when a live process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep(root: Path) -> list[Path]:
    """Remove the directories of processes that are gone; returns them."""
    removed = []
    for folder in sorted(root.glob(f"{PROCESS_PREFIX}*")):
        fd = _try_lock(folder / LOCK_NAME) if folder.is_dir() else None
        if fd is None:
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


class Workspace:
    def __init__(self, root: Path | None, space_factor: float, poll_s: float = DISK_POLL_S):
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir())
        self.space_factor = space_factor
        self.poll_s = poll_s
        self.reserved = 0
        self.waiting = 0
        self._dir: Path | None = None
        self._lock_fd: int | None = None

    @property
    def dir(self) -> Path:
        """This process's directory (made on first use)."""
        if self._dir is None:
            self.open()
        assert self._dir is not None
        return self._dir

    def open(self) -> list[Path]:
        """Remove what killed processes left, then make and lock this process's directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        removed = sweep(self.root)
        if removed:
            log.info("removed %d work directories of processes that are gone: %s", len(removed), removed)
        folder = Path(tempfile.mkdtemp(prefix=PROCESS_PREFIX, dir=self.root))
        fd = _try_lock(folder / LOCK_NAME)
        assert fd is not None, "a fresh directory's lock is free"
        self._dir, self._lock_fd = folder, fd
        return removed

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._dir, self._lock_fd = None, None

    @contextlib.contextmanager
    def job_dir(self, job_uuid: str) -> Iterator[Path]:
        """A private directory for one job, removed on every path out."""
        with tempfile.TemporaryDirectory(prefix=f"job-{job_uuid}-", dir=self.dir, ignore_cleanup_errors=True) as work:
            yield Path(work)

    def job_dirs(self) -> list[Path]:
        return sorted(self.dir.glob("job-*"))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.dir).free

    def total_bytes(self) -> int:
        return shutil.disk_usage(self.dir).total

    @contextlib.asynccontextmanager
    async def room(self, size: int) -> AsyncIterator[int]:
        """Reserve the space a job with an input of `size` bytes needs, waiting until there is."""
        need = int(size * self.space_factor)
        if need > self.total_bytes():
            raise InputTooLarge(
                f"the input needs about {need} bytes of work space; the disk holds {self.total_bytes()}"
            )
        if not self._fits(need):
            await self._wait_for(need)
        self.reserved += need
        try:
            yield need
        finally:
            self.reserved -= need

    def _fits(self, need: int) -> bool:
        return self.free_bytes() - self.reserved >= need

    async def _wait_for(self, need: int) -> None:
        log.warning("waiting for %d bytes of free disk space in %s", need, self.dir)
        self.waiting += 1
        try:
            with activity.stalled("disk space"):
                # Free space announces nothing: it is looked at again every poll_s.
                while True:
                    await asyncio.sleep(self.poll_s)
                    if self._fits(need):
                        break
        finally:
            self.waiting -= 1
        log.info("disk space is back: %d bytes free in %s", self.free_bytes(), self.dir)
