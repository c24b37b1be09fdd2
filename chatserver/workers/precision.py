"""Which precisions a worker may serve, fastest first, for the device and CPU it runs on.

`--dtype auto` walks the whole chain until one passes the quality gate
(quality_gate.py); an explicit `--dtype` walks only its own kernels (one,
but int8-avx2 is followed by int8-avx2-float-down). The order on CPU
comes from `python -m load_tests.precision` and `load_tests.bench_batching` on
each kind of CPU (README, "Precision"): int4 first (the C kernels of
native_kernels.py for steps of a few rows, this CPU's int8 kernels for wider
ones; where the C kernels cannot be built, the chain goes on), then int8; then
bfloat16 only where the CPU has native bf16 (without it a bf16 GEMM measured
4-10x slower than float32 at 16+ rows on the AVX2 machine), then float32, the
reference, which always passes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chatserver.protocol.worker import INT8_KERNEL_CHOICES
from chatserver.workers import native_kernels
from chatserver.workers.cpu_features import CpuFeatures
from chatserver.workers.kernels import Int8Kernels

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Candidate:
    """One precision to try: the dtype clients see and the kernels that compute it."""

    dtype: str  # "int8", "bfloat16", "float16", "float32"
    kernels: str  # what /readyz reports, e.g. "int8-avx2", "bfloat16-native", "float32"
    int8: Int8Kernels | None = None

    @property
    def load_dtype(self) -> torch.dtype:
        """int8 is quantized from float32 weights."""
        return torch.float32 if self.int8 else TORCH_DTYPES[self.dtype]

    @property
    def is_reference(self) -> bool:
        return self.dtype == "float32"


class PrecisionUnavailable(ValueError):
    """The asked-for precision cannot run on this device at all."""


def int8_kernels(cpu: CpuFeatures, choice: str = "auto") -> Int8Kernels:
    """The int8 kernel variant for this CPU, or the one `--int8-kernels` forces.

    Forcing "vnni" on a CPU without VNNI is allowed on purpose: the quality
    gate then shows (and tests prove) that it answers with noise there.
    """
    if choice not in INT8_KERNEL_CHOICES:
        raise PrecisionUnavailable(f"--int8-kernels must be one of {INT8_KERNEL_CHOICES}")
    use_vnni = cpu.vnni if choice == "auto" else choice == "vnni"
    # down_proj's many-row GEMM: see kernels.DownProjLinear for why each.
    wide = torch.bfloat16 if cpu.native_bf16 else torch.float32
    if use_vnni:
        return Int8Kernels(
            "int8-vnni",
            weight_max=127,
            scale_rows_above=1,
            down_int8_max_rows=4,
            down_wide_dtype=wide,
        )
    return Int8Kernels(
        "int8-avx2",
        weight_max=63,
        scale_rows_above=1,
        down_int8_max_rows=8,
        down_wide_dtype=None,
        attn_weight_only_max_rows=4,
    )


def int4_kernels(cpu: CpuFeatures, choice: str = "auto", invariant: bool = False) -> Int8Kernels:
    """4-bit weights in C kernels for steps of a few rows (native_kernels.py); wider
    steps (prefill, many streams) run this CPU's int8 kernels, which win there.

    `invariant` (--batch-invariant): every step in the C kernels, a few rows a call,
    so a reply does not depend on the batch, the prefix cache or the CPU kind.
    """
    wide = int8_kernels(cpu, choice)
    # q/k/v and o in int8 weight-only form serve only steps the C kernels take.
    return dataclasses.replace(
        wide,
        name="int4-avx2-invariant" if invariant else "int4-avx2",
        # Invariant, as many rows a call as the C side takes: a 128-token prefill took
        # 3.4 ms a token in calls of 8 rows against 5.0 in calls of 4, the same bits
        # (the runner alone, a /tmp loop; Intel(R) Xeon(R) Processor, torch CPU
        # capability AVX512, VNNI avx_vnni).
        native_max_rows=native_kernels.MAX_ROWS if invariant else INT4_MAX_ROWS,
        attn_weight_only_max_rows=0,
        native_only=invariant,
    )


# Steps of up to this many rows run the 4-bit C kernels; see README, Precision.
INT4_MAX_ROWS = 4


def _int4(cpu: CpuFeatures, choice: str) -> list[Candidate]:
    kernels = int4_kernels(cpu, choice)
    return [Candidate("int4", kernels.name, kernels)]


def _int8(cpu: CpuFeatures, choice: str) -> list[Candidate]:
    kernels = int8_kernels(cpu, choice)
    chain = [Candidate("int8", kernels.name, kernels)]
    if kernels.smooths_down:
        # Smoothing is calibrated on one text (workers/calibration.py); for a model
        # whose gate it fails, int8 with a float32 down_proj may still pass, and
        # is faster than float32.
        exact = dataclasses.replace(
            kernels, name=kernels.name + "-float-down", down_wide_dtype=torch.float32
        )
        chain.append(Candidate("int8", exact.name, exact))
    return chain


def _float(dtype: str, device: str, cpu: CpuFeatures) -> Candidate:
    if device.startswith("cuda"):
        return Candidate(dtype, f"cuda-{dtype}")
    if dtype == "bfloat16":
        return Candidate(dtype, "bfloat16-native" if cpu.native_bf16 else "bfloat16-emulated")
    return Candidate(dtype, dtype)


def candidates(
    dtype: str,
    device: str,
    cpu: CpuFeatures,
    int8_choice: str = "auto",
    batch_invariant: bool = False,
) -> list[Candidate]:
    """The chain to try, fastest first; the last is the fallback of last resort."""
    cuda = device.startswith("cuda")
    if batch_invariant:
        # One path only: falling back to kernels that are not invariant would break
        # the promise silently.
        if cuda or dtype not in ("auto", "int4"):
            raise PrecisionUnavailable(
                "--batch-invariant runs the int4 C kernels of CPU workers; "
                f"--dtype {dtype} on {device} has no batch-invariant path"
            )
        kernels = int4_kernels(cpu, int8_choice, invariant=True)
        return [Candidate("int4", kernels.name, kernels)]
    if dtype == "auto":
        if cuda:
            return [_float("bfloat16", device, cpu), _float("float32", device, cpu)]
        # int4 first on VNNI CPUs too: `load_tests.bench_batching --server-args "--dtype
        # int4" --baseline-args "--dtype int8"` on the AVX-512 EPYC (torch capability
        # AVX512, VNNI avx512_vnni) gave 155 tok/s at one stream against int8-vnni's 66
        # (README, Benchmarks, "Continuous batching on an AVX-512 EPYC").
        chain = _int4(cpu, int8_choice) + _int8(cpu, int8_choice)
        if cpu.native_bf16:
            chain.append(_float("bfloat16", device, cpu))
        chain.append(_float("float32", device, cpu))
        return chain
    if dtype in ("int8", "int4"):
        if cuda:
            # The int8 and int4 kernels are CPU ones; bf16 is the fast GPU path.
            return [_float("bfloat16", device, cpu)]
        return _int8(cpu, int8_choice) if dtype == "int8" else _int4(cpu, int8_choice)
    if dtype not in TORCH_DTYPES:
        raise PrecisionUnavailable(f"unknown dtype {dtype!r}")
    return [_float(dtype, device, cpu)]
