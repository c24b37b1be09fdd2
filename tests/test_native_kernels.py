"""The C block kernels (workers/native_kernels.py) against float32 torch on the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from chatserver.workers import cpu_features, native_kernels
from chatserver.workers.native_kernels import BlockLinear, NativeUnavailable

CPU = cpu_features.detect()
MISSING = [f for f in native_kernels.REQUIRED_FLAGS if f not in CPU.flags]
needs_kernels = pytest.mark.skipif(
    bool(MISSING), reason=f"the C kernels need {', '.join(MISSING)}; this CPU lacks them"
)


@pytest.fixture(scope="module")
def library():
    return native_kernels.load(CPU)


def q4_1_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF file dequantizes them: w = d q + m, fp16 d and m, q in 0..15,
    each block holding a 0 and a 15 (the elements its min and max came from)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 31] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    m = (-8 * d - torch.rand(n, k // 32, 1, generator=g) * 0.01).half().float()
    return (q * d + m).reshape(n, k)


def q8_0_weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g)
    q[..., 5] = 127
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.001 + 1e-5).half().float()
    return (q * d).reshape(n, k)


def test_packing_gives_back_q4_1_and_q8_0_weights_bit_for_bit():
    """The default model ships as Q4_1 projections and a Q8_0 embedding: packed again,
    its weights are the file's, not an approximation of them."""
    w4 = q4_1_weights(64, 576, seed=0)
    assert torch.equal(native_kernels.unpack(native_kernels.pack_q4(w4), 4, 576), w4)
    w8 = q8_0_weights(64, 576, seed=1)
    assert torch.equal(native_kernels.unpack(native_kernels.pack_q8(w8), 8, 576), w8)


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_the_c_packing_gives_the_reference_packings_bytes(library, bits: int):
    """BlockLinear packs in C (a start's worth of weights in milliseconds); its bytes
    are those of the torch reference, pack_q4 / pack_q8."""
    reference = native_kernels.pack_q4 if bits == 4 else native_kernels.pack_q8
    weights = [
        q4_1_weights(96, 576, seed=7) if bits == 4 else q8_0_weights(96, 576, seed=7),
        torch.randn(96, 1536) * 0.02,
        torch.zeros(8, 64),  # blocks whose scale is 0
    ]
    for weight in weights:
        assert torch.equal(native_kernels.pack(library, weight, bits), reference(weight))


def test_packing_other_weights_is_near():
    w = torch.randn(96, 1536) * 0.02
    for bits, bound in ((4, 0.12), (8, 0.008)):
        back = native_kernels.unpack(
            native_kernels.pack_q4(w) if bits == 4 else native_kernels.pack_q8(w), bits, 1536
        )
        error = ((back - w).norm() / w.norm()).item()
        assert error < bound, f"{bits} bits: relative error {error:.4f}"


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got - exact).norm() / exact.norm()).item()


@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_block_gemv_matches_float32_on_its_own_weights(library, bits: int, rows: int):
    """Against x W^T in float32 with W the packed weights: only the activations' int8
    blocks differ (measured 0.005 relative)."""
    weight = q4_1_weights(320, 576, seed=rows) if bits == 4 else q8_0_weights(320, 576, rows)
    linear = BlockLinear.from_weight(library, weight, bits)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(100 + rows))
    out = linear(x)
    assert out.shape == (rows, 320) and out.dtype == torch.float32
    assert relative_error(out, x @ weight.T) < 0.01


@needs_kernels
def test_folded_norm_gate_and_residual_match_their_torch_forms(library):
    torch.manual_seed(0)
    gate_up = q4_1_weights(2 * 384, 576, seed=3)
    norm = torch.rand(576) + 0.5
    x = torch.randn(3, 576) * 4
    residual = torch.randn(3, 384)
    linear = BlockLinear.from_weight(library, gate_up, 4, gated=True, norm=norm, eps=1e-5)
    gu = F.rms_norm(x, (576,), norm, 1e-5) @ gate_up.T
    exact = residual + F.silu(gu[:, :384]) * gu[:, 384:]
    assert relative_error(linear(x, residual=residual), exact) < 0.01


@needs_kernels
def test_a_row_gets_the_same_bits_in_steps_of_one_to_eight_rows(library):
    """Each row is quantized and summed on its own, so a sequence decoding alone and
    beside others computes bit-identical logits (README, Batch invariance)."""
    linear = BlockLinear.from_weight(library, q4_1_weights(960, 576, seed=4), 4)
    x = torch.randn(native_kernels.MAX_ROWS, 576, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([linear(x[i : i + 1]) for i in range(len(x))])
    for rows in range(2, native_kernels.MAX_ROWS + 1):
        assert torch.equal(linear(x[:rows]), alone[:rows]), rows


@needs_kernels
def test_shapes_it_cannot_take_are_refused(library):
    with pytest.raises(NativeUnavailable, match="blocks of 32"):
        BlockLinear.from_weight(library, torch.randn(8, 100), 4)
    linear = BlockLinear.from_weight(library, q4_1_weights(8, 64, seed=6), 4)
    with pytest.raises(ValueError, match="refused"):
        linear(torch.randn(native_kernels.MAX_ROWS + 1, 64))


def test_a_cpu_without_avx2_gets_a_reason_not_a_crash():
    old = dataclasses.replace(CPU, flags=frozenset({"sse2", "sse4_2"}))
    with pytest.raises(NativeUnavailable, match="lacks avx2, fma, f16c"):
        native_kernels.load(old)


@needs_kernels
def test_a_failed_build_says_why(tmp_path, monkeypatch):
    """A machine without a working compiler: load() names the failure (the worker then
    skips int4, see test_precision.py) rather than serving without kernels."""
    monkeypatch.setattr(native_kernels, "_library", None)
    monkeypatch.setenv("CHATSERVER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.raises(NativeUnavailable, match="building gemv_avx2.c and attention_avx2.c failed"):
        native_kernels.load(CPU)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        native_kernels.load(CPU)


def reference_attention(qkv, slots, positions, cos, sin, k_cache, v_cache, heads, kv_heads):
    """The same step in torch: complex rotary on adjacent pairs, cache writes, then SDPA
    per row over its slot's positions 0..position."""
    d = k_cache.shape[-1]
    rows = qkv.shape[0]
    qk = qkv[:, : (heads + kv_heads) * d].reshape(rows, heads + kv_heads, d // 2, 2)
    rotation = torch.complex(cos[positions], sin[positions]).unsqueeze(1)
    qk = torch.view_as_real(torch.view_as_complex(qk.contiguous()) * rotation).reshape(rows, -1, d)
    q, k = qk[:, :heads], qk[:, heads:]
    v = qkv[:, (heads + kv_heads) * d :].reshape(rows, kv_heads, d)
    for r in range(rows):
        k_cache[slots[r], :, positions[r]] = k[r]
        v_cache[slots[r], :, positions[r]] = v[r]
    out = []
    for r in range(rows):
        n = int(positions[r]) + 1
        out.append(
            F.scaled_dot_product_attention(
                q[r].unsqueeze(1).unsqueeze(0),
                k_cache[slots[r] : slots[r] + 1, :, :n],
                v_cache[slots[r] : slots[r] + 1, :, :n],
                enable_gqa=True,
            )[0, :, 0].reshape(-1)
        )
    return torch.stack(out)


@needs_kernels
def test_rope_cache_attention_matches_torch(library):
    """Rows of three slots, two of them one sequence's chunk (the later sees the
    earlier), against complex rotary, index writes and SDPA in float32."""
    torch.manual_seed(0)
    heads, kv_heads, d, capacity = 9, 3, 64, 96
    positions_all = torch.arange(capacity, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = positions_all[:, None] * inv[None, :]
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    caches = [torch.randn(4, kv_heads, capacity, d) for _ in range(2)]
    slots = torch.tensor([0, 2, 2, 3])
    positions = torch.tensor([70, 40, 41, 0])
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d)
    attention = native_kernels.RopeCacheAttention(
        library, cos, sin, heads, kv_heads, d, 1.0 / d**0.5
    )
    expected_caches = [c.clone() for c in caches]
    expected = reference_attention(
        qkv.clone(), slots, positions, cos, sin, *expected_caches, heads, kv_heads
    )
    got = attention(qkv, slots, positions, *caches)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for cache, reference in zip(caches, expected_caches, strict=True):
        torch.testing.assert_close(cache, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="refused"):
        attention(qkv, slots, torch.tensor([capacity, 0, 1, 2]), *caches)
