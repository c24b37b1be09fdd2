"""What the CPU we run on can do, read once at worker start.

Kernels are chosen from this, never from the machine the code was written on:
fbgemm's int8 GEMM is exact with VNNI (`vpdpbusd` accumulates u8 x s8 products
in int32) but on AVX2 alone it uses `vpmaddubsw`, whose int16 pair sums
saturate once |a1*w1 + a2*w2| > 32767 (255 * 127 * 2 = 64770 does); bfloat16
GEMMs are fast only with native bf16 instructions (AVX512_BF16 or AMX) and
several times slower than float32 without them.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    cores: int
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    flags: frozenset[str]

    @property
    def vnni(self) -> bool:
        """int8 dot products accumulate in int32: full-range int8 weights are exact."""
        return any(f in self.flags for f in VNNI_FLAGS)

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def kind(self) -> str:
        """The CPU kind README's tables are split by."""
        if self.avx512 and self.vnni:
            return "AVX-512+VNNI" + ("+BF16" if self.native_bf16 else "")
        if self.avx512:
            return "AVX-512"
        if self.vnni:
            return "AVX2+VNNI"
        if "avx2" in self.flags or self.capability == "AVX2":
            return "AVX2"
        return self.capability or platform.machine()

    def describe(self) -> dict[str, object]:
        return {
            "cpu_model": self.model,
            "cores": self.cores,
            "cpu_capability": self.capability,
            "cpu_kind": self.kind,
            "vnni": self.vnni,
            "native_bf16": self.native_bf16,
        }


def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model or platform.machine(), flags


@functools.cache
def detect() -> CpuFeatures:
    import torch

    model, flags = _cpuinfo()
    return CpuFeatures(
        model=model,
        cores=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1,
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=flags,
    )
