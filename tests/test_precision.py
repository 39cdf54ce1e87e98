"""Choosing the precision: bf16 on CPUs is native (AVX512-BF16, AMX) or emulated, and users are told."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import vggtransfer._runtime as runtime
from helpers import trainer

INTEL_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AMD_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n"


@pytest.mark.parametrize(
    ("cpuinfo", "native"), [(INTEL_AMX, True), (AMD_AVX2, False), (ARM, None), (None, None)]
)
def test_native_bf16_is_read_from_the_cpu_flags(
    tmp_path: Path, cpuinfo: str | None, native: bool | None
) -> None:
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert runtime.cpu_has_native_bf16(path) is native


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning) as caught:
        t = trainer(precision="bf16")
    assert str(caught[0].message) == (
        "Trainer: precision='bf16' on a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX in "
        "/proc/cpuinfo): torch emulates it, many times slower than fp32. HINT: use precision='fp32' "
        "(what 'auto' picks on CPUs)"
    )
    assert caught[0].filename.endswith("helpers.py")  # points at the line that built the Trainer
    assert t.precision.name == "bf16"  # a warning, not a refusal: the user may want it anyway


@pytest.mark.parametrize("native", [True, None])
def test_bf16_on_a_native_or_unknown_cpu_is_silent(
    monkeypatch: pytest.MonkeyPatch, native: bool | None
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer(precision="bf16").precision.name == "bf16"


def test_auto_keeps_fp32_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 for the frozen feature pass was measured 3x faster on a Xeon with native bf16 but 15-95x slower on an
    # AVX2 EPYC, and its accuracy on pretrained features is unverified: "auto" stays fp32 on CPUs.
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert trainer().precision.name == "fp32"
