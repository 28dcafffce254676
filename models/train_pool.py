"""A pool of training phantoms that a second process keeps replacing while training runs.

A fixed set of a few dozen phantoms is learnt by heart (measured: a fine-tuning on 24 found the
lesions of its own phantoms and none of unseen ones). A phantom takes one to a few seconds to
draw and resample, so a child process draws fresh ones all along and the trainer swaps them in:
hundreds of different phantoms over a run, for the memory of a few dozen.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("models.train")

Job = Callable[[int], Any]  # seed -> a Sample (a dataclass of tensors and arrays)
_QUEUE_DEPTH = 4
_NICENESS = 15
_POLL_S = 5.0
_FIRST_SAMPLE_S = 600.0  # the largest phantoms take tens of seconds while the trainer waits


def _produce(make: Job, first_seed: int, out: Any) -> None:
    # The trainer has the cores: at equal priority this process slowed its steps 2-3x (measured);
    # niced, it draws in the trainer's idle moments and the pool refreshes as fast as they allow.
    torch.set_num_threads(1)
    os.nice(_NICENESS)
    parent = mp.parent_process()
    seed = first_seed
    while True:
        sample = make(seed)
        # Tensors cross as numpy arrays (pickled whole), not as torch's shared-memory handles.
        fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)}
        payload = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        tensors = [k for k, v in fields.items() if isinstance(v, torch.Tensor)]
        while True:  # a trainer that died (kill -9) must not leave this blocked on a full queue
            if parent is not None and not parent.is_alive():
                return
            try:
                out.put((payload, tensors), timeout=_POLL_S)
                break
            except queue.Full:
                continue
        seed += 1


class SamplePool:
    """`size` samples, the oldest replaced by a fresh one whenever the producer has one ready."""

    def __init__(self, make: Job, size: int, first_seed: int, sample_type: type) -> None:
        context = mp.get_context("spawn")  # no forked copy of the trainer's torch threads
        self._queue = context.Queue(maxsize=_QUEUE_DEPTH)
        self._process = context.Process(target=_produce, args=(make, first_seed, self._queue), daemon=True)
        self._sample_type = sample_type
        self._process.start()
        self.samples: list[Any] = []
        self.replaced = 0
        while len(self.samples) < size:
            self.samples.append(self._wait())
        log.info("pool of %d phantoms ready", size)

    def _wait(self) -> Any:
        deadline = time.monotonic() + _FIRST_SAMPLE_S
        while time.monotonic() < deadline:
            try:
                return self._unpack(self._queue.get(timeout=_POLL_S))
            except queue.Empty:
                self._check_producer()
        raise RuntimeError(f"no phantom from the producer in {_FIRST_SAMPLE_S:.0f} s")

    def _unpack(self, item: tuple[dict[str, Any], list[str]]) -> Any:
        payload, tensors = item
        return self._sample_type(**{k: torch.from_numpy(v) if k in tensors else v for k, v in payload.items()})

    def _check_producer(self) -> None:
        # Training on with a pool that no longer changes is what the pool exists to prevent.
        if not self._process.is_alive():
            raise RuntimeError(f"the phantom producer exited (code {self._process.exitcode}); see its traceback above")

    def refresh(self) -> None:
        """Swap in one fresh sample if one is ready; never waits for the producer."""
        try:
            sample = self._unpack(self._queue.get_nowait())
        except queue.Empty:
            self._check_producer()
            return
        self.samples[self.replaced % len(self.samples)] = sample
        self.replaced += 1

    def close(self) -> None:
        self._process.terminate()
        self._process.join(timeout=10)
