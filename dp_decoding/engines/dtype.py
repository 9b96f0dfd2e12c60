"""The floating-point type the engines compute in, chosen for the hardware.

The converted weights are stored in bfloat16, so bfloat16 and float32 both hold them exactly;
the two differ only in the arithmetic. bfloat16 is used where the hardware computes it: a CUDA
GPU, or a CPU with AVX512-BF16 or AMX-BF16 instructions. Elsewhere torch emulates bfloat16
matrix products, and float32 is both faster and more exact: on a 2-core AMD EPYC with AVX2
only, one torch thread prefilled 32 rows of 80 tokens in 68 s in bfloat16 and 11 s in float32.

``DPICL_DTYPE`` (``bfloat16``, ``float32`` or ``float16``) overrides the choice. The embedded
and vLLM engines follow the same rule, so on one machine they compute in the same type.
"""

from __future__ import annotations

import os
from pathlib import Path

DTYPES = ("bfloat16", "float32", "float16")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def default_dtype(*, gpu: bool = False, flags: frozenset[str] | None = None) -> str:
    """``DPICL_DTYPE`` if set, else ``bfloat16`` on a GPU or a CPU with bf16 instructions,
    else ``float32``."""
    env = os.environ.get("DPICL_DTYPE", "").strip()
    if env:
        if env not in DTYPES:
            raise ValueError(f"DPICL_DTYPE must be one of {', '.join(DTYPES)}; got {env!r}")
        return env
    if gpu:
        return "bfloat16"
    return "bfloat16" if BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "float32"
