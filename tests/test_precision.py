"""chatserver.workers.cpu_features and precision: the kernels and fallback chain each CPU gets.

The chain is pure logic over a CPU's feature flags, so every kind of CPU is
checked here on any machine; the real model runs through each path in
test_quality_gate.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatserver.workers import cpu_features, native_kernels
from chatserver.workers.cpu_features import CpuFeatures
from chatserver.workers.precision import PrecisionUnavailable, candidates, int8_kernels
from tests.serverproc import ServerProcess

AVX2 = CpuFeatures("AMD EPYC (AVX2)", 2, "AVX2", frozenset({"avx2", "fma"}))
AVX512_VNNI_BF16 = CpuFeatures(
    "AMD EPYC (Zen 4)",
    2,
    "AVX512",
    frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}),
)
AVX512_VNNI = CpuFeatures(
    "Intel Xeon (Cascade Lake)", 2, "AVX512", frozenset({"avx2", "avx512f", "avx512_vnni"})
)
AVX2_VNNI = CpuFeatures("Intel Core (Alder Lake)", 8, "AVX2", frozenset({"avx2", "avx_vnni"}))


def test_detect_reads_this_machine() -> None:
    cpu = cpu_features.detect()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.cores >= 1
    flags = Path("/proc/cpuinfo").read_text()
    held = bool(cpu_features.isa_limit())  # the suite itself run as an AVX2 CPU
    assert cpu.vnni == (not held and any(f" {f}" in flags for f in cpu_features.VNNI_FLAGS))
    assert cpu.native_bf16 == (not held and any(f" {f}" in flags for f in cpu_features.BF16_FLAGS))
    assert set(cpu.describe()) >= {"cpu_model", "cores", "cpu_capability", "cpu_kind"}


def test_any_library_held_to_avx2_limits_the_kernels() -> None:
    """One switch is enough: fbgemm at AVX2 saturates full-range int8 even if torch's
    own kernels use AVX-512, so the chosen kernels must not count on VNNI."""
    assert cpu_features.isa_limit({}) == ""
    assert cpu_features.isa_limit({"ATEN_CPU_CAPABILITY": "avx512"}) == ""
    assert cpu_features.isa_limit({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"}) == ""
    for name, value in cpu_features.AVX2_ENV.items():
        if name != "MKL_ENABLE_INSTRUCTIONS":  # MKL's float GEMMs choose no kernel of ours
            assert cpu_features.isa_limit({name: value}) == "avx2", name
    assert cpu_features.isa_limit({"ATEN_CPU_CAPABILITY": "default"}) == "avx2"
    assert cpu_features.isa_env("native") == {}
    with pytest.raises(ValueError, match="native"):
        cpu_features.isa_env("avx1024")


def test_cpu_isa_avx2_makes_any_cpu_an_avx2_one() -> None:
    """What a worker spawned under --cpu-isa avx2 detects: torch's AVX2 kernels, no
    VNNI, no native bf16, so the AVX2 chain; outside the block nothing is left set."""
    probe = (
        "import json, torch; from chatserver.workers import cpu_features, precision; "
        "cpu = cpu_features.detect(); "
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), cpu.describe(), "
        "[c.kernels for c in precision.candidates('auto', 'cpu', cpu)]]))"
    )
    before = dict(os.environ)
    with cpu_features.isa_environment("avx2"):
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
        ).stdout
    assert dict(os.environ) == before
    capability, described, chain = json.loads(out.splitlines()[-1])
    assert capability == "AVX2" == described["cpu_capability"]
    assert described["isa_limit"] == "avx2" and described["cpu_kind"] == "AVX2"
    assert not described["vnni"] and not described["native_bf16"]
    assert chain == ["int4-avx2", "int8-avx2", "int8-avx2-float-down", "float32"]


@pytest.mark.parametrize(
    ("cpu", "kind"),
    [
        (AVX2, "AVX2"),
        (AVX2_VNNI, "AVX2+VNNI"),
        (AVX512_VNNI, "AVX-512+VNNI"),
        (AVX512_VNNI_BF16, "AVX-512+VNNI+BF16"),
    ],
)
def test_cpu_kind(cpu: CpuFeatures, kind: str) -> None:
    assert cpu.kind == kind


def test_int8_kernels_follow_vnni() -> None:
    """Full-range int8 weights only where int32 accumulation (VNNI) makes them exact."""
    assert int8_kernels(AVX512_VNNI_BF16).name == "int8-vnni"
    assert int8_kernels(AVX512_VNNI_BF16).weight_max == 127
    assert int8_kernels(AVX2_VNNI).name == "int8-vnni"
    avx2 = int8_kernels(AVX2)
    assert avx2.name == "int8-avx2"
    # 7-bit weights: u8 x s8 pair sums stay within int16 (vpmaddubsw saturates).
    assert 2 * 255 * avx2.weight_max <= 32767
    # down_proj's many rows: smoothed int8 on AVX2; bf16 GEMMs only where the
    # CPU has native bf16, float32 otherwise.
    assert avx2.down_wide_dtype is None
    assert int8_kernels(AVX512_VNNI).down_wide_dtype == torch.float32
    assert int8_kernels(AVX512_VNNI_BF16).down_wide_dtype == torch.bfloat16


def test_forcing_kernels() -> None:
    assert int8_kernels(AVX2, "vnni").name == "int8-vnni"  # allowed: the gate judges it
    assert int8_kernels(AVX512_VNNI_BF16, "avx2").name == "int8-avx2"
    with pytest.raises(PrecisionUnavailable):
        int8_kernels(AVX2, "avx1024")


def test_auto_chains_fastest_first_and_end_at_float32() -> None:
    chain = [c.kernels for c in candidates("auto", "cpu", AVX2)]
    # int4's C kernels first on every CPU (README, Precision); emulated bf16
    # is slower than float32 batched; int8 with an unsmoothed down_proj is the
    # fallback for a model whose smoothing fails the gate.
    assert chain == ["int4-avx2", "int8-avx2", "int8-avx2-float-down", "float32"]
    int4 = candidates("auto", "cpu", AVX2)[0]
    assert int4.dtype == "int4" and int4.int8 is not None
    # Its wide steps (prefill, many streams) run int8-avx2's kernels.
    wide = dataclasses.replace(int4.int8, name="int8-avx2", native_max_rows=0)
    assert dataclasses.replace(wide, attn_weight_only_max_rows=4) == int8_kernels(AVX2)
    assert 1 <= int4.int8.native_max_rows <= native_kernels.MAX_ROWS
    exact_down = candidates("auto", "cpu", AVX2)[2].int8
    assert exact_down is not None and exact_down.down_wide_dtype == torch.float32
    chain = [c.kernels for c in candidates("auto", "cpu", AVX512_VNNI_BF16)]
    assert chain == ["int4-avx2", "int8-vnni", "bfloat16-native", "float32"]
    vnni_int4 = candidates("auto", "cpu", AVX512_VNNI_BF16)[0].int8
    assert vnni_int4 is not None and vnni_int4.weight_max == 127  # wide steps: int8-vnni's
    chain = [c.kernels for c in candidates("auto", "cuda:0", AVX2)]
    assert chain == ["cuda-bfloat16", "cuda-float32"]
    assert candidates("auto", "cpu", AVX2)[-1].is_reference


def test_explicit_dtype_chains_only_its_own_kernels() -> None:
    assert [c.kernels for c in candidates("int8", "cpu", AVX2)] == [
        "int8-avx2",
        "int8-avx2-float-down",
    ]
    assert [c.kernels for c in candidates("int8", "cpu", AVX512_VNNI_BF16)] == ["int8-vnni"]
    assert [c.kernels for c in candidates("bfloat16", "cpu", AVX2)] == ["bfloat16-emulated"]
    assert [c.kernels for c in candidates("float32", "cpu", AVX2)] == ["float32"]
    # int8 kernels are fbgemm's (CPU); on a GPU int8 means its fast path, bf16.
    assert [c.dtype for c in candidates("int8", "cuda", AVX2)] == ["bfloat16"]
    assert [c.kernels for c in candidates("int4", "cpu", AVX2)] == ["int4-avx2"]
    # Asked for, int4 runs where int8 has VNNI too (its wide steps then int8-vnni's).
    vnni_int4 = candidates("int4", "cpu", AVX512_VNNI_BF16)[0].int8
    assert vnni_int4 is not None and vnni_int4.weight_max == 127
    assert [c.dtype for c in candidates("int4", "cuda", AVX2)] == ["bfloat16"]
    with pytest.raises(PrecisionUnavailable):
        candidates("int2", "cpu", AVX2)


def test_batch_invariant_is_the_int4_c_kernels_alone() -> None:
    """--batch-invariant has one path, every step in the C kernels; what has none is
    refused, not served with kernels that would break the promise."""
    for cpu in (AVX2, AVX512_VNNI_BF16):
        for dtype in ("auto", "int4"):
            chain = candidates(dtype, "cpu", cpu, batch_invariant=True)
            assert [c.kernels for c in chain] == ["int4-avx2-invariant"]
            kernels = chain[0].int8
            assert kernels is not None and kernels.native_only and not kernels.smooths_down
            assert kernels.native_max_rows == native_kernels.MAX_ROWS
    for dtype, device in (("float32", "cpu"), ("int8", "cpu"), ("auto", "cuda:0")):
        with pytest.raises(PrecisionUnavailable, match="batch-invariant"):
            candidates(dtype, device, AVX2, batch_invariant=True)


def test_a_server_asked_for_batch_invariance_it_cannot_give_does_not_start() -> None:
    proc = ServerProcess("--batch-invariant", "--dtype", "float32", "--log-level", "warning")
    try:
        code = proc.proc.wait(timeout=120)
    finally:
        proc.stop()
    assert code != 0
    assert "--batch-invariant runs the int4 C kernels" in proc.log() and "float32" in proc.log()
