"""The engines' dtype rule: bf16 only where the hardware computes it, DPICL_DTYPE overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from dp_decoding.engines.dtype import cpu_flags, default_dtype


def test_bf16_only_on_a_gpu_or_a_cpu_with_bf16_instructions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DPICL_DTYPE", raising=False)
    assert default_dtype(flags=frozenset({"avx2", "fma"})) == "float32"
    assert default_dtype(flags=frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert default_dtype(flags=frozenset({"amx_bf16", "amx_tile"})) == "bfloat16"
    assert default_dtype(flags=frozenset()) == "float32"
    assert default_dtype(gpu=True, flags=frozenset()) == "bfloat16"


def test_the_environment_overrides_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPICL_DTYPE", "bfloat16")
    assert default_dtype(flags=frozenset({"avx2"})) == "bfloat16"
    monkeypatch.setenv("DPICL_DTYPE", "fp8")
    with pytest.raises(ValueError, match="DPICL_DTYPE must be one of"):
        default_dtype()


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\nbugs\t\t: spectre\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
