"""Where and in which precision inference runs: decided once, at start, from what the machine has."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# The CPU features that decide precision and runtime speed here, as /proc/cpuinfo names them.
DECIDING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags", ...); {} if unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo"), wanted: tuple[str, ...] = DECIDING_FLAGS) -> list[str]:
    """Which of `wanted` the CPU has (none where /proc/cpuinfo cannot be read)."""
    have = set(cpu_fields(cpuinfo).get("flags", "").split())
    return [flag for flag in wanted if flag in have]


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("unknown CPU" where the kernel does not give one, as on some ARM)."""
    return cpu_fields(cpuinfo).get("model name") or "unknown CPU"


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware instead of being emulated (slower than fp32)."""
    return bool(cpu_flags(cpuinfo, ("avx512_bf16", "amx_bf16")))


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """Mixed precision for the network only; pre- and post-processing stay in fp32."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
