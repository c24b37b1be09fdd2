"""Block-quantized few-row kernels in C, compiled here with the machine's gcc, called by ctypes.

Why C: a one-stream decode step on a 2-core AVX2 CPU is bound by reading the
weights and by the number of torch calls a layer makes, and neither fbgemm
nor `_weight_int8pack_mm` reads fewer than 8 bits a weight or folds the ops
around a projection. native/gemv_avx2.c reads 4-bit blocks (GGUF's Q4_1: the
default model's projections are shipped in it, so its weights stay exact) or
8-bit ones (Q8_0: its embedding, hence the tied LM head), quantizes the
activations per block of 32 as it starts, and folds in the RMS norm before a
projection, the SiLU-gated product after gate/up and the residual add;
native/attention_avx2.c does a layer's rotary, KV cache write and attention
in one call. It also packs the weights (pack_blocks; pack_q4 and pack_q8 here
are the reference its bytes are tested against).

Weight layout, one row of W [N, K] after another, K / 32 blocks a row:
  4 bits: fp16 d, fp16 m, 16 bytes; byte j holds q_j | q_{j+16} << 4;  w = d q + m
  8 bits: fp16 d, 32 int8;                                              w = d q

The library is built once per source and compiler into the cache directory
(1.7 s on the 2-core AVX2 EPYC) and loaded only where the CPU has AVX2, FMA
and F16C; where gcc is missing or the build fails, `load()` says why and the
worker goes on to the next precision (int8).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from chatserver.workers.cpu_features import CpuFeatures
from chatserver.workers.measurement_cache import cache_dir

SOURCES = [
    Path(__file__).with_name("native") / name for name in ("gemv_avx2.c", "attention_avx2.c")
]
BLOCK = 32
MAX_ROWS = 8  # the C side's limit on rows a call
REQUIRED_FLAGS = ("avx2", "fma", "f16c")
_BLOCK_BYTES = {4: 20, 8: 34}
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


class NativeUnavailable(RuntimeError):
    """The C kernels cannot run here (CPU, compiler or build); the message says which."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def _compiler() -> str:
    name = os.environ.get("CC") or "gcc"
    cc = shutil.which(name)
    if not cc:
        raise NativeUnavailable(f"no C compiler: {name!r} is not on PATH (set CC to one)")
    return cc


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(version.encode() + " ".join(_CFLAGS).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    target = cache_dir() / "native" / f"kernels_avx2-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(
        [cc, *_CFLAGS, *map(str, SOURCES), "-o", str(partial), "-lm"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        names = " and ".join(source.name for source in SOURCES)
        raise NativeUnavailable(f"building {names} failed: {done.stderr.strip()[-500:]}")
    os.replace(partial, target)  # atomic: workers building at once each see a whole file
    return target


def load(cpu: CpuFeatures) -> ctypes.CDLL:
    """The compiled kernels, built on first use; NativeUnavailable where they cannot run.

    Loaded after torch, the library's libgomp.so.1 resolves to the one torch
    already holds, so its threads are torch's threads (two pools would
    oversubscribe the cores).
    """
    global _library
    missing = [f for f in REQUIRED_FLAGS if f not in cpu.flags]
    if missing:
        raise NativeUnavailable(f"the CPU lacks {', '.join(missing)}")
    with _lock:
        if _library is None:
            lib = ctypes.CDLL(str(_build(_compiler())))
            lib.block_gemv.restype = ctypes.c_int
            lib.block_gemv.argtypes = [
                ctypes.c_void_p,  # x
                ctypes.c_int,  # M
                ctypes.c_int,  # K
                ctypes.c_void_p,  # norm or NULL
                ctypes.c_float,  # eps
                ctypes.c_void_p,  # w
                ctypes.c_int,  # bits
                ctypes.c_int,  # N
                ctypes.c_int,  # gated
                ctypes.c_void_p,  # residual or NULL
                ctypes.c_void_p,  # out
            ]
            lib.pack_blocks.restype = None
            lib.pack_blocks.argtypes = [
                ctypes.c_void_p,  # w [N, K] float32
                ctypes.c_int,  # N
                ctypes.c_int,  # K
                ctypes.c_int,  # bits
                ctypes.c_void_p,  # out
            ]
            lib.rope_cache_attend.restype = ctypes.c_int
            lib.rope_cache_attend.argtypes = [
                ctypes.c_void_p,  # qkv, rotated in place
                ctypes.c_int,  # T
                ctypes.c_void_p,  # slots (int64)
                ctypes.c_void_p,  # positions (int64)
                ctypes.c_void_p,  # cos [positions, D/2]
                ctypes.c_void_p,  # sin
                ctypes.c_void_p,  # k cache
                ctypes.c_void_p,  # v cache
                ctypes.c_int,  # H
                ctypes.c_int,  # KV
                ctypes.c_int,  # D
                ctypes.c_int,  # capacity
                ctypes.c_float,  # scale
                ctypes.c_void_p,  # out
            ]
            _library = lib
        return _library


def pack(library: ctypes.CDLL, weight: torch.Tensor, bits: int) -> torch.Tensor:
    """W [N, K] packed by the C library: the bytes of pack_q4 / pack_q8, in milliseconds."""
    w = weight.detach().float().contiguous()
    n, k = w.shape
    out = torch.empty(n, k // BLOCK * _BLOCK_BYTES[bits], dtype=torch.uint8)
    library.pack_blocks(w.data_ptr(), n, k, bits, out.data_ptr())
    return out


def pack_q4(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] as 4-bit blocks: d = (max - min) / 15 and m = min of each block, in fp16.

    Weights dequantized from Q4_1 come back bit for bit: a block's min is its
    fp16 m and its max is m + 15 d (the elements that set them got q = 0, 15).
    """
    w = weight.detach().float()
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    scale = d.float().unsqueeze(-1)
    q = torch.where(scale > 0, (blocks - m.float().unsqueeze(-1)) / scale, torch.zeros_like(blocks))
    q = q.round().clamp(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    packed = torch.cat([_fp16_bytes(d), _fp16_bytes(m), nibbles], dim=-1)
    return packed.reshape(n, -1).contiguous()


def pack_q8(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] as 8-bit blocks: d = max|w| / 127 in fp16 (Q8_0's rule, so Q8_0 comes back exact)."""
    w = weight.detach().float()
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    d = (blocks.abs().amax(-1) / 127).half()
    scale = d.float().unsqueeze(-1)
    q = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks))
    q = q.round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=-1).reshape(n, -1).contiguous()


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.contiguous().view(torch.uint8).reshape(*values.shape, 2)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The float32 weights a packed tensor stands for (tests and quality checks)."""
    n = packed.shape[0]
    blocks = packed.reshape(n, k // BLOCK, _BLOCK_BYTES[bits])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if bits == 8:
        return (blocks[..., 2:].contiguous().view(torch.int8).float() * d).reshape(n, k)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    nibbles = blocks[..., 4:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float()
    return (q * d + m).reshape(n, k)


@dataclass(frozen=True)
class BlockLinear:
    """One projection's packed weights and the call that runs it on a few rows.

    `gated`: the weights are gate rows then up rows and the result is
    silu(gate) * up, half as wide. `norm`: RMS-normalize the input first.
    """

    library: ctypes.CDLL
    packed: torch.Tensor
    bits: int
    in_features: int
    out_features: int  # of the result: half the rows when gated
    gated: bool = False
    norm: torch.Tensor | None = None
    eps: float = 1e-5

    @classmethod
    def from_weight(
        cls,
        library: ctypes.CDLL,
        weight: torch.Tensor,
        bits: int,
        gated: bool = False,
        norm: torch.Tensor | None = None,
        eps: float = 1e-5,
    ) -> BlockLinear:
        n, k = weight.shape
        if k % BLOCK or (gated and n % 2):
            # The model cannot use these kernels: its worker goes on to the next precision.
            raise NativeUnavailable(f"a {n}x{k} weight does not split into blocks of {BLOCK}")
        packed = pack(library, weight, bits)
        norm_f32 = None if norm is None else norm.detach().float().contiguous()
        return cls(library, packed, bits, k, n // 2 if gated else n, gated, norm_f32, eps)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] float32 (M <= MAX_ROWS) -> [M, out_features] float32 (+ residual)."""
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        if residual is not None:
            residual = residual.contiguous()
        status = self.library.block_gemv(
            x.data_ptr(),
            rows,
            self.in_features,
            None if self.norm is None else self.norm.data_ptr(),
            self.eps,
            self.packed.data_ptr(),
            self.bits,
            self.out_features,
            int(self.gated),
            None if residual is None else residual.data_ptr(),
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError(f"block_gemv refused {rows}x{self.in_features} rows")
        return out


@dataclass(frozen=True)
class RopeCacheAttention:
    """Rotary, KV cache write and attention of a step of a few rows in one call
    (native/attention_avx2.c); q and k rows in the runner's pair-adjacent order."""

    library: ctypes.CDLL
    cos: torch.Tensor  # [positions, D/2] float32
    sin: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    scale: float

    def __call__(
        self,
        qkv: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """qkv [T, (H + 2 KV) D] (rotated in place) -> attention output [T, H D]; the
        caches [slots, KV, capacity, D] get each row's k and v at its slot and position."""
        rows = qkv.shape[0]
        out = torch.empty(rows, self.heads * self.head_dim, dtype=torch.float32)
        status = self.library.rope_cache_attend(
            qkv.data_ptr(),
            rows,
            slots.data_ptr(),
            positions.data_ptr(),
            self.cos.data_ptr(),
            self.sin.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            self.heads,
            self.kv_heads,
            self.head_dim,
            k_cache.shape[2],
            self.scale,
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError(f"rope_cache_attend refused {rows} rows")
        return out
