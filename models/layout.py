"""Copies of a volume into C order (cast on the way): what the scan readers and the engine need.

A NIfTI file stores its first axis fastest (Fortran order), and so does the transposed view a
DICOM series is read into; MONAI's transforms and the network take C order. One torch copy of
the whole transpose runs from memory: copied slab by slab along the middle axis, each plane of
the transpose stays in cache (512x512x300 int16 -> float32 on 2 threads: 0.21 s against 0.47 s;
a C-ordered source costs the same either way).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

_SLAB_BYTES = 8 << 20  # source and copy of one slab together


def c_order_copy(volume: np.ndarray, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """`volume` as `dtype` in C order, on every torch thread (numpy's copy, on one, for a dtype or
    byte order torch does not take)."""
    out = np.empty(volume.shape, dtype=dtype)
    try:
        source, copy = torch.from_numpy(volume), torch.from_numpy(out)
        if volume.ndim != 3:
            copy.copy_(source)
            return out
        plane = volume.shape[0] * volume.shape[2] * (volume.itemsize + out.itemsize)
        step = max(1, _SLAB_BYTES // max(plane, 1))
        for start in range(0, volume.shape[1], step):
            copy[:, start : start + step].copy_(source[:, start : start + step])
    except (TypeError, ValueError, RuntimeError):
        np.copyto(out, volume, casting="unsafe")
    return out
