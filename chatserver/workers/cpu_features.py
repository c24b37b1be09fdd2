"""What the CPU we run on can do, read once at worker start.

Kernels are chosen from this, never from the machine the code was written on:
fbgemm's int8 GEMM is exact with VNNI (`vpdpbusd` accumulates u8 x s8 products
in int32) but on AVX2 alone it uses `vpmaddubsw`, whose int16 pair sums
saturate once |a1*w1 + a2*w2| > 32767 (255 * 127 * 2 = 64770 does); bfloat16
GEMMs are fast only with native bf16 instructions (AVX512_BF16 or AMX) and
several times slower than float32 without them.

`--cpu-isa avx2` makes a newer CPU compute as an AVX2-only one does, through
each library's own switch (below): the same kernels, the same int16
saturation in fbgemm (full-range int8 weights then score noise, as on a real
AVX2 CPU), only the timings are this CPU's. Tests and benchmarks use it to run
the AVX2 paths on any machine; `detect()` honours those switches however they
were set, so no kernel is chosen for an instruction its library may not use.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chatserver.protocol.worker import CPU_ISA_CHOICES

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# Each library reads its switch once, when it first runs, so these must be in a
# worker's environment before it imports torch: torch's vectorized kernels
# (SDPA, norms, _weight_int8pack_mm), fbgemm's int8 GEMMs, oneDNN's bf16 GEMMs
# and MKL's float ones.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
# Flags an AVX2 limit hides: with any one library held to AVX2, no kernel may
# count on VNNI or native bf16 (a mixed setting falls to the safe choice).
_BEYOND_AVX2 = ("avx512", "avx_vnni", "amx", "avx_ne_convert", "avx_ifma")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    cores: int
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    flags: frozenset[str]
    isa_limit: str = ""  # "avx2" when the libraries are held to AVX2 (see above)

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
            "isa_limit": self.isa_limit or None,
        }


def isa_env(isa: str) -> dict[str, str]:
    """The environment a worker needs to compute with at most `isa`'s instructions.

    Also a cache directory of its own for torch.compile: inductor's on-disk cache
    does not key kernels by these switches, and a kernel compiled natively then
    reused held to AVX2 gave NaN logits (test_compiled_runner_matches_eager with
    the variables set, on the AVX-512 EPYC; it passed with a fresh cache).
    """
    if isa not in CPU_ISA_CHOICES:
        raise ValueError(f"cpu isa must be one of {CPU_ISA_CHOICES}, not {isa!r}")
    if isa == "native":
        return {}
    cache = _inductor_cache_dir()
    suffix = "_" + isa
    return {
        **AVX2_ENV,
        "TORCHINDUCTOR_CACHE_DIR": cache if cache.endswith(suffix) else cache + suffix,
    }


def _inductor_cache_dir() -> str:
    """Where inductor caches by default: torch._inductor.runtime.cache_dir_utils's rule,
    restated because importing that module imports torch, which the server does not."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"].rstrip("/")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return os.path.join(
        tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)
    )


@contextmanager
def isa_environment(isa: str) -> Iterator[None]:
    """`isa_env` set in os.environ for the block (a child spawned in it inherits it)."""
    env = isa_env(isa)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def isa_limit(env: Mapping[str, str] = os.environ) -> str:
    """The limit the environment sets: "avx2" when any library's switch holds it to
    AVX2 or less (a mixed setting counts as held), "" when none does."""
    if env.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
        return "avx2"
    for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if env.get(name, "").upper() in ("AVX2", "AVX", "SSE41", "SSE4_1", "DEFAULT"):
            return "avx2"
    return ""


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
    limit = isa_limit()
    if limit:
        flags = frozenset(f for f in flags if not f.startswith(_BEYOND_AVX2))
    return CpuFeatures(
        model=model,
        cores=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1,
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=flags,
        isa_limit=limit,
    )
