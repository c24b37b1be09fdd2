"""int8 linear kernels for the CPU runner, in the variants each kind of CPU needs.

On CPU a decode step is bound by reading weights from memory; int8 weights are
a quarter of float32's bytes, and fbgemm's dynamic int8 GEMM is the fastest
kernel we measured at most batch sizes on both kinds of CPU (the exception:
steps of a few rows on AVX2, see WeightOnlyInt8). It quantizes activations
to u8 per tensor and multiplies them with s8 weights:

* with VNNI the products accumulate in int32, so weights use the full s8 range;
* without VNNI (AVX2) fbgemm multiplies pairs with `vpmaddubsw` into saturating
  int16, so weights are limited to 7 bits (|w| <= 63: 255 * 63 * 2 = 32130 fits).
  Full-range weights there gave perplexity 2819 instead of 16 (noise), and
  `reduce_range` (7-bit activations instead) 19.7: activations matter more.

Activations are quantized per tensor, so in a step of many rows each row
loses the bits its neighbours' wider range takes. Each row is scaled to
|x| <= 1 first and scaled back after the GEMM (a linear map commutes with
it): perplexity of the 335-token quality_text.txt in one prefill (LlamaRunner.score)
17.07 -> 16.50 (fp32 15.96), AMD EPYC, torch capability AVX2, no VNNI, measured
while building issue 8 by swapping this kernel in; two cheap elementwise ops, yet not free: on the AVX-512+VNNI EPYC they cost
16-stream decoding 14% (`python -m load_tests.precision`, 317 tok/s with them
against 349 without, same session) for no gain in one prompt's quality there
(prefill perplexity 16.62 with, 16.54 without), so int8-vnni once scaled only
steps of more than 64 rows. That left a short prompt's prefill unscaled, with
the first position's outlier activations in the same tensor as the rest.
`python -m load_tests.batch_effect` (16 prompts of 35-47 tokens, last
position's logits; 2-core AMD EPYC, torch capability AVX512, VNNI
avx512_vnni, 2026-12-02), with `--scale-rows-above 64` against today's 1:
prompts prefilled alone had float32's top token for 8 of 16 against 13 of
16 scaled, the worst prompt's logits 0.39 (relative) from float32's against
0.12, and alone vs batched differed by up to 0.73 against 0.12. Its cost to
decoding was not measured apart (README's AVX-512 EPYC table has it together
with the KV cache reservation). So both variants scale
every step of more than one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Int8Kernels:
    """Which int8 kernels a runner uses; one value per kind of CPU (see precision.py)."""

    name: str  # reported in /readyz: "int8-vnni", "int8-avx2"
    weight_max: int  # 127 (VNNI) or 63 (AVX2: no int16 saturation)
    # Scale each activation row to |x| <= 1 around the GEMM (see the module doc) in
    # steps of more rows than this.
    scale_rows_above: int
    # down_proj: weight-only int8 (float activations) up to this many rows; above,
    # a float GEMM in `down_wide_dtype`, or with None fbgemm on smoothed
    # activations (see DownProjLinear).
    down_int8_max_rows: int
    down_wide_dtype: torch.dtype | None
    # q/k/v and o projections: weight-only int8 (full-range weights, bf16
    # activations, see DownProjLinear) up to this many rows; 0: never.
    attn_weight_only_max_rows: int = 0
    # Every projection and the LM head in the C kernels of native_kernels.py
    # (4-bit blocks, the LM head 8-bit) in steps of up to this many rows; 0: never.
    native_max_rows: int = 0
    # Every step in those C kernels, native_max_rows rows a call (--batch-invariant):
    # they quantize each row's activations by itself, so a row's bits do not depend
    # on its neighbours, on how its prompt was split, or on the x86 CPU.
    native_only: bool = False

    @property
    def smooths_down(self) -> bool:
        """down_proj's many rows go through fbgemm smoothed, which needs a calibration."""
        return self.down_wide_dtype is None and not self.native_only


class Int8Linear:
    """A linear weight quantized per output channel, activations quantized per call (fbgemm)."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_max: int = 127,
        scale_rows_above: int = 1,
        weight_only_max_rows: int = 0,
    ) -> None:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / weight_max).clamp(min=1e-8).double()
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.shape = weight.shape
        self.scale_rows_above = scale_rows_above
        self.weight_only = (
            WeightOnlyInt8(weight, weight_only_max_rows) if weight_only_max_rows else None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only is not None and x.shape[0] <= self.weight_only.max_rows:
            return self.weight_only(x)
        # One row: per-tensor is already per-row.
        if x.shape[0] <= max(1, self.scale_rows_above):
            return torch.ops.quantized.linear_dynamic(x, self.packed, False)
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)
        return torch.ops.quantized.linear_dynamic(x / scale, self.packed, False) * scale


class WeightOnlyInt8:
    """int8 weights (full range, per output channel) against bf16 activations.

    For a few rows a step reads weights and little else: `_weight_int8pack_mm`
    does that with no activation quantization, so it is also the more exact of
    the two int8 kernels (activations keep bf16's per-element exponent). On the
    AVX2 EPYC (torch capability AVX2, no VNNI; min of 60 calls, 2 threads, other
    jobs running) one row of q/k/v took 59 us this way against 60 us through
    fbgemm, o_proj 42 against 53, and 4 rows 110 / 69 against 120 / 104; at 8
    rows fbgemm wins. It also kept the quality gate's one-token-a-step
    perplexity at x0.99-1.01 of float32 where fbgemm's q/k/v/o scored x1.01
    or x1.075 depending on rounding elsewhere (the rotary's form). So int8-avx2
    uses it for q/k/v and o in steps of up to 4 rows; not measured on VNNI.

    Held to AVX2 on the AVX-512 EPYC (`--cpu-isa avx2`; torch capability
    AVX512, VNNI avx512_vnni, 2026-12-03) fbgemm was the faster at one row
    (/tmp timing loop over 30 distinct layers: q/k/v 53 against 75 us, o 35
    against 52, down_proj smoothed 58 against 92). Every projection through
    fbgemm at every row count made a one-sequence step 7-17% faster in the
    runner alone, yet `python -m load_tests.bench_batching --levels 1,4,16
    --server-args "--cpu-isa avx2"` gave 50.6 and 45.6 tok/s for one stream
    against 45.3 and 44.5 (this VM's noise), and the gate's decode perplexity
    went from x0.989 to x1.012, top-1 from 0.880 to 0.870. Not adopted, as the
    AVX2 CPU itself timed the two kernels alike at one row.
    """

    def __init__(self, weight: torch.Tensor, max_rows: int) -> None:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.qweight = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales)
        return out.to(x.dtype)


class DownProjLinear:
    """down_proj beside int8 ones, with its activations' outlier channels kept out of int8.

    down_proj's inputs carry outlier channels that per-tensor int8 activations
    cannot represent (perplexity 15.96 -> 23.6 on the AVX2 machine when
    quantized like the others, before rows were scaled). For a few rows the
    step is bound by reading weights, and `_weight_int8pack_mm` reads int8
    weights against bf16 activations, the most exact of the int8 kernels.
    For more rows, one of:

    * a float GEMM in `down_wide_dtype` (bf16 where the CPU has it natively);
    * fbgemm on smoothed activations (`down_wide_dtype` None; SmoothQuant, Xiao
      et al. 2023): x W^T = (x / s)(W s)^T with s_j = sqrt(max|x_j| / max|W_:,j|)
      per input channel evens the ranges of activations and weights; max|x_j|
      comes from the calibration text (workers/calibration.py).

    On the 2-core AMD EPYC (torch capability AVX512, VNNI avx512_vnni; /tmp
    timing loop over 30 distinct 576x1536 layers, 2 threads, 2026-12-03), 16
    rows took: held to AVX2 (`--cpu-isa avx2`) 385 us a layer as a float32 GEMM,
    360 weight-only and 134 smoothed through fbgemm; natively 202 as bf16 and
    168 smoothed. So int8-avx2 smooths: its quality gate scored perplexity
    x0.986, top-1 0.880 (x1.029, 0.901 with the float32 GEMM), and 1,535 tokens
    of other text x1.040-1.047 of float32 (x1.038). int8-vnni keeps
    bf16: smoothed, its gate's perplexity went from x1.025 to x1.045 and the
    server's greedy answer to "What is the capital of France?" stopped being Paris.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        kernels: Int8Kernels,
        input_max: torch.Tensor | None = None,
    ) -> None:
        self.few = WeightOnlyInt8(weight, kernels.down_int8_max_rows)
        self.int8_max_rows = kernels.down_int8_max_rows
        self.wide: torch.Tensor | None = None
        self.smoothed: Int8Linear | None = None
        if kernels.down_wide_dtype is not None:
            self.wide = weight.detach().to(kernels.down_wide_dtype).contiguous()
            return
        if input_max is None:
            raise ValueError(f"{kernels.name} smooths down_proj: it needs the input's range")
        w = weight.detach().float()
        smooth = (input_max.float().clamp(min=1e-5) / w.abs().amax(dim=0).clamp(min=1e-5)).sqrt()
        self.inverse_smooth = (1.0 / smooth).to(weight.dtype)
        self.smoothed = Int8Linear(w * smooth, kernels.weight_max, kernels.scale_rows_above)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.int8_max_rows:
            return self.few(x)
        if self.wide is not None:
            return F.linear(x.to(self.wide.dtype), self.wide).to(x.dtype)
        assert self.smoothed is not None
        return self.smoothed(x * self.inverse_smooth)
