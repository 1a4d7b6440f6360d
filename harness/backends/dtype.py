"""The float type a backend computes in: ``--backend-arg dtype=auto|float32|bfloat16|float16``.

``auto`` is bfloat16 on CUDA and on CPUs that run bf16 natively (AVX512-BF16 or AMX-BF16; on
this project's CPU bf16 decoding is ~1.5x faster than fp32), float32 on other CPUs, where bf16 is
emulated and slower. AutoDeco's heads and the nucleus stay in float32 whatever the base's dtype
(heads.model, heads.vllm_plugin).
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.backends.base import BackendError

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's feature flags (Linux), or None where /proc/cpuinfo is unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (its flags; torch's own probe where there are none)."""
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        return any(flag in flags for flag in BF16_FLAGS)
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private: absent in some versions
    return bool(probe and probe())


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """``auto`` -> "bfloat16" on CUDA and on CPUs with native bf16, else "float32"; other names are
    checked (BackendError for an unknown one) and returned."""
    if name not in DTYPES:
        raise BackendError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if name != "auto":
        return name
    if str(device).startswith("cuda") or native_bf16():
        return "bfloat16"
    return "float32"


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``resolve_dtype`` as a torch dtype."""
    return getattr(torch, resolve_dtype(name, device))
