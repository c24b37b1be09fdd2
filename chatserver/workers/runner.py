"""Model runners: one forward pass for a whole step of mixed prefill and decode work.

`LlamaRunner` is chatserver's own forward pass over the weights of a Hugging
Face Llama-family model (Llama, SmolLM, Mistral, Qwen2), read from its
safetensors by models/llama_weights.py or taken from a loaded transformers
model (both give the same tensors). For one sequence it
is no faster than the stock `model.forward` (fp32 on 2 CPU cores: 64.7 vs 60.8
ms a step, both bound by reading the weights); it exists because the stock
forward has no cache that lets sequences of different lengths decode in one
batch, and no int8 path. Ours:

* fuses q/k/v and gate/up into one matmul each;
* keeps a slot KV cache `[slots, kv_heads, capacity, head_dim]` per layer in
  which the live sequences always occupy slots 0..n-1, so batched decode
  attends over a view of the cache with no gather; which slot holds what, and
  which prefixes are reused, is workers/kv_cache.py's bookkeeping, applied
  here as slot copies and swaps (`apply`). The whole budget of slots, each of
  `max_context` positions, is reserved at start in memory that is committed
  only where written (`zeroed_cache`), so nothing ever grows or moves while
  the batch waits;
* flattens every token of the step (one per decoding sequence, a chunk per
  prefilling one) into one `[tokens, hidden]` matrix, so the weights are read
  once per step however many sequences run: decoding is memory-bound, so a
  step for 16 sequences costs little more than a step for one;
* computes logits only for the rows that need a next token;
* under int4, runs steps of a few rows through the C block kernels of
  native_kernels.py (`NativeLayer`), the norm, the gated MLP product and the
  residual adds folded into the projections' calls.

`HFRunner` is the fallback for any other architecture: the stock forward with
one `DynamicCache` per sequence, correct but unbatched.

Why not transformers' own continuous batching (`generate_batch` /
`ContinuousBatchingManager`)? Measured with `python -m
load_tests.compare_hf_batching` on the 2-core CPU machine, 16 sequences x 64
greedy tokens, same prompts and threads: ours 140 tok/s vs 60 in fp32, 163 vs
91 in bf16. Its paged cache and generic forward carry per-step Python cost
that dominates on a CPU, its manager runs its own thread rather than fitting
our worker loop, and it offers no int8 path (our CPU default).
"""

from __future__ import annotations

import inspect
import logging
import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chatserver.models.llama_weights import LlamaWeights
from chatserver.workers import cpu_features, native_kernels
from chatserver.workers.calibration import DownCalibration
from chatserver.workers.kernels import DownProjLinear, Int8Kernels, Int8Linear
from chatserver.workers.kv_cache import SlotClear, SlotCopy, SlotOp, SlotSwap
from chatserver.workers.native_kernels import BlockLinear, RopeCacheAttention

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepItem:
    """Tokens of one sequence to run this step, written to `slot` from `start`."""

    seq_id: int
    slot: int
    token_ids: list[int]
    start: int
    wants_logits: bool


@dataclass(frozen=True)
class NativeLayer:
    """One layer's projections as C block kernels (native_kernels.py), for steps of a
    few rows: q/k/v with the input norm folded in, o and down adding the residual,
    gate/up with the post-attention norm and the SiLU-gated product folded in."""

    qkv: BlockLinear
    o: BlockLinear
    gate_up: BlockLinear
    down: BlockLinear


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | Int8Linear | DownProjLinear,
    bias: torch.Tensor | None = None,
    weight_first: bool = True,
    padded_rows: int = 2,
) -> torch.Tensor:
    """x W^T (+ bias); float32 steps of a few rows on the CPU in the form `weight_first`
    says this machine's BLAS computes faster (see few_rows_weight_first), steps of
    fewer than `padded_rows` rows padded to that many (see few_rows_padding)."""
    if not isinstance(weight, torch.Tensor):
        out = weight(x)
        return out if bias is None else out + bias
    if (
        x.dim() == 2
        and x.shape[0] <= FEW_ROWS
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
    ):
        return _few_rows_linear(x, weight, bias, weight_first, padded_rows)
    return F.linear(x, weight, bias)


# float32 steps of up to this many rows get their own GEMM form: see below.
FEW_ROWS = 3


def _few_rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_first: bool,
    padded_rows: int = 2,
) -> torch.Tensor:
    """x W^T for a few float32 rows on the CPU: as (W x^T)^T where MKL is slow at it,
    fewer rows than `padded_rows` padded to that many with copies of the first,
    in both forms.

    On the AMD EPYCs F.linear handed MKL a GEMM of a few rows against the
    whole transposed weight, and with 2 or 3 rows that took several times as
    long as W x^T, which streams the weight once (the LM head, 49152 x 576, at
    2 rows: 25.8 ms against 3.9 ms); one row went to a GEMV that read the
    weight at half the memory's speed. On the Intel(R) Xeon(R) Processor (torch
    CPU capability AVX512, VNNI avx_vnni, 480 MiB L3; /tmp timing loop over 30
    distinct layers of each shape, 2 threads, 2026-12-04) it is the other way
    round: a whole float32 step's projections took 12.4 ms through F.linear
    at 1 or 2 rows and 29.5 ms as W x^T (the LM head 4.2-4.5 against 12.5
    ms). So each runner times both on its LM head at load
    (few_rows_weight_first) and keeps the faster.

    Padding (one row as two, or every step as three where this BLAS needs it:
    few_rows_padding) keeps a sequence decoding alone in the class of one
    decoding beside one or two others: the same row gives bit-identical outputs
    in a step of 1, 2 or 3 rows, in either form (tests/test_runner.py); steps of 4
    or more are F.linear's, bit-identical as far as MKL keeps one kernel (one
    class from 4 rows up on the AMD EPYCs; 4-15 and 16+ on the Intel(R) Xeon(R),
    README, Batch invariance). W x^T for every row count was faster still at
    4 rows on the AVX-512 EPYC (100.5 -> 47.9 ms a step) but split the 4+
    class in two (4-9 and 16+), so that a prompt's last chunk of 4-15 tokens,
    computed after a cached prefix, no longer gave the logits a whole prefill
    gives (test_api_responses' seeded logprobs differed in the 6th digit).

    The default model's float32 decode step at 150 cached positions (/tmp
    timing loop, min of 3 medians of 15 steps; 2-core AMD EPYC, torch
    capability AVX512, VNNI avx512_vnni, 2026-12-03): 1 row 54.2 -> 32.2 ms,
    2 rows 106.3 -> 28.7 as W x^T; held to AVX2 (MKL's AVX2 kernels), 59.0 ->
    32.1 and 90.8 -> 35.5. bf16 goes through oneDNN, where W x^T was slower
    (31.2 -> 43.5 ms at one row), so it keeps F.linear.
    """
    rows = x.shape[0]
    columns = x if rows >= padded_rows else torch.cat([x, x[:1].expand(padded_rows - rows, -1)])
    out = (weight @ columns.T).T if weight_first else F.linear(columns, weight)
    out = out[:rows].contiguous()
    return out if bias is None else out + bias


def few_rows_timings(weight: torch.Tensor, repeats: int = 3) -> dict[bool, float]:
    """Seconds, best of `repeats`, for 2 float32 rows of `weight` in each form:
    True (W x^T)^T, False F.linear; each form's first call is left out."""
    x = torch.randn(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    best = {True: math.inf, False: math.inf}
    with torch.inference_mode():
        for form in best:
            _few_rows_linear(x, weight, None, form)
        for _ in range(repeats):
            for form in best:
                started = time.perf_counter()
                _few_rows_linear(x, weight, None, form)
                best[form] = min(best[form], time.perf_counter() - started)
    return best


def few_rows_weight_first(weight: torch.Tensor) -> bool:
    """Whether (W x^T)^T beats F.linear on a few float32 rows of `weight`, timed here, now.

    The two differed by 2.4x or more in either direction on the CPUs measured
    (_few_rows_linear), beyond timing noise.
    """
    timings = few_rows_timings(weight)
    weight_first = timings[True] < timings[False]
    log.info(
        "float32 steps of up to %d rows as %s: (W x^T)^T %.2f ms, F.linear %.2f ms on %s",
        FEW_ROWS,
        "(W x^T)^T" if weight_first else "F.linear",
        timings[True] * 1e3,
        timings[False] * 1e3,
        tuple(weight.shape),
    )
    return weight_first


def few_rows_padding(weights: list[torch.Tensor], weight_first: bool) -> int:
    """Rows a float32 step of 1-3 rows is computed as, in the form `weight_first` names:
    2 (one row doubled) where every row of `weights`' products in a step of 2 or 3
    rows has the bits it has alone, else 3 (every such step padded to 3).

    Padding keeps a sequence's logits the same alone or beside one or two others
    (tests/test_runner.py). MKL picks its GEMM kernel by the number of rows: on
    the Intel(R) Xeon(R) Processor (torch CPU capability AVX512, VNNI avx_vnni)
    2 and 3 rows shared a kernel natively, but held to AVX2
    (MKL_ENABLE_INSTRUCTIONS=AVX2) each had its own, for every shape of the
    default model, in F.linear's form. Padding costs the third row's compute:
    a one-row step's projections (30 layers and the LM head, /tmp timing loop,
    2 threads, 2026-12-06) took 22.2 ms as 2 rows against 23.8 as 3 natively,
    41.3-42.3 against 42.0-44.3 held to AVX2, so it is paid only where needed.
    """
    with torch.inference_mode():
        for weight in weights:
            x = torch.randn(3, weight.shape[1], dtype=weight.dtype, device=weight.device)
            alone = torch.cat(
                [_few_rows_linear(x[r : r + 1], weight, None, weight_first, 2) for r in range(3)]
            )
            two = _few_rows_linear(x[:2], weight, None, weight_first, 2)
            three = _few_rows_linear(x, weight, None, weight_first, 2)
            if not (torch.equal(two, alone[:2]) and torch.equal(three, alone)):
                log.info(
                    "float32 steps of 1-3 rows padded to 3: %s gives a row other bits alone "
                    "than in 2 or 3 rows on %s",
                    "(W x^T)^T" if weight_first else "F.linear",
                    tuple(weight.shape),
                )
                return 3
    return 2


def supports_fast_runner(model: Any) -> bool:
    """True when LlamaRunner (batched, with int8 kernels) can run this model."""
    if isinstance(model, LlamaWeights):
        return True  # read only for architectures it runs (models/llama_weights.py)
    cfg = model.config
    return (
        getattr(cfg, "model_type", "") in ("llama", "mistral", "qwen2", "smollm3")
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(cfg, "sliding_window", None)
        and not getattr(cfg, "mlp_bias", False)
    )


def _pair_rows(heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Row order putting rotary pair (i, i + D/2) of each head side by side."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return (torch.arange(heads).unsqueeze(1) * head_dim + within).reshape(-1).to(device)


def zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor for the KV cache; on the CPU its memory is committed only where written.

    Anonymous mmap pages read as zero until first written, so the whole budget
    costs address space, not RAM or time, until sequences fill it; torch.zeros
    writes every byte up front (what made growing the cache stall, see
    reserve_slots). Zeros matter: masked positions still meet the attention
    weights, and garbage there could be NaN.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, nbytes)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


class LlamaRunner:
    name = "llama-slots"

    def __init__(
        self,
        model: Any,
        max_context: int,
        slots: int = 8,
        int8: Int8Kernels | None = None,
        compile: bool = False,
        calibration: DownCalibration | None = None,
    ) -> None:
        """`calibration`: down_proj's input ranges, for int8 kernels that smooth it
        (workers/calibration.py)."""
        weights = model if isinstance(model, LlamaWeights) else LlamaWeights.from_model(model)
        shape = weights.shape
        self.device = weights.device
        self.dtype = weights.dtype
        self.num_layers = shape.num_layers
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.groups = self.num_heads // self.num_kv_heads
        self.eps = shape.rms_norm_eps
        self.max_context = max_context
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.embed = weights.embed
        self.final_norm = weights.final_norm
        self.lm_head = weights.lm_head
        # Rotary tables as the model defines them (llama3 scaling, linear, ...).
        cos, sin = (t.to(self.device) for t in weights.rotary(max_context))
        self.cos = cos.to(self.dtype)
        self.sin = sin.to(self.dtype)
        # float32 activations (float32 and int8): rotary as one complex product
        # (see _rope), on q/k rows reordered so each rotated pair sits side by side.
        half = self.head_dim // 2
        self.freqs: torch.Tensor | None = None
        if (
            self.dtype == torch.float32
            and not compile  # inductor's complex support is partial
            and torch.equal(cos[..., :half], cos[..., half:])
            and torch.equal(sin[..., :half], sin[..., half:])
        ):
            self.freqs = torch.complex(cos[:, :half].float(), sin[:, :half].float())
        pair_rows = _pair_rows(self.num_heads + self.num_kv_heads, self.head_dim, self.device)
        self.layers = []
        for layer in weights.layers:
            qkv = torch.cat([layer.q, layer.k, layer.v]).contiguous()
            bias = None if layer.qkv_bias is None else torch.cat(layer.qkv_bias).contiguous()
            if self.freqs is not None:
                # q and k reordered alike: their dot products, hence attention, unchanged.
                qkv = torch.cat([qkv[pair_rows], qkv[len(pair_rows) :]]).contiguous()
                if bias is not None:
                    bias = torch.cat([bias[pair_rows], bias[len(pair_rows) :]]).contiguous()
            self.layers.append(
                (
                    layer.input_norm,
                    qkv,
                    bias,
                    layer.o,
                    layer.post_norm,
                    torch.cat([layer.gate, layer.up]).contiguous(),
                    layer.down,
                )
            )
        self.intermediate = self.layers[0][5].shape[0] // 2
        self.slots = 0
        self.capacity = max_context
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.int8 = int8
        # F.linear, one row doubled, until decided below: _quantize's calibration
        # prefill runs first, and the choice needs to know whether the LM head
        # stayed float32.
        self.weight_first = False
        self.padded_rows = 2
        self.native_layers: list[NativeLayer] = []
        self.native_head: BlockLinear | None = None
        self.native_attention: RopeCacheAttention | None = None
        self.native_max_rows = 0
        self.native_only = False
        if int8 is not None:
            if int8.smooths_down and calibration is None:
                raise ValueError(f"{int8.name} needs a calibration (workers/calibration.py)")
            self._quantize(int8, calibration)
        # float32 steps of a few rows: the GEMM form this machine computes faster,
        # padded as far as its BLAS needs to give a row the same bits in 1-3 rows.
        if (
            isinstance(self.lm_head, torch.Tensor)
            and self.lm_head.dtype == torch.float32
            and self.device.type == "cpu"
        ):
            self.weight_first = few_rows_weight_first(self.lm_head)
            _, qkv, _, o, _, gate_up, down = self.layers[0]
            self.padded_rows = few_rows_padding(
                [qkv, o, gate_up, down, self.lm_head], self.weight_first
            )
        if compile:
            # Attention and the cache writes stay eager (shapes change every step);
            # the norm / projection / rotary / MLP pieces around them are fused.
            self._project_qkv = torch.compile(self._project_qkv, dynamic=True)
            self._output_and_mlp = torch.compile(self._output_and_mlp, dynamic=True)
        self.reserve_slots(slots)
        if compile:
            # Compile now, so readiness includes it rather than the first request.
            # One graph per row class: 1 row (specialized), each few-rows form up to
            # FEW_ROWS (their padding is a guard), and FEW_ROWS + 1 on (dynamic).
            # Warming 3 and 1 rows alone left the first longer prompt to recompile
            # while every stream waited (TORCH_LOGS=recompiles showed it).
            for rows in range(1, FEW_ROWS + 2):
                self.forward([StepItem(-1, 0, list(range(rows)), 0, True)], 1)

    @torch.inference_mode()
    def down_input_maxima(self, token_ids: list[int]) -> list[torch.Tensor]:
        """Each layer's largest |input| per channel of down_proj over one prefill of `token_ids`."""
        if self.slots < 1:
            self.reserve_slots(1)  # the prefill writes the cache; reserved again after load
        recorders = [_InputMaxRecorder(layer[6]) for layer in self.layers]
        weights = self.layers
        self.layers = [layer[:6] + (rec,) for layer, rec in zip(weights, recorders, strict=True)]
        try:
            self._hidden([StepItem(-1, 0, token_ids[: self.max_context], 0, False)], 1)
        finally:
            self.layers = weights
        return [rec.input_max for rec in recorders]

    def _quantize(self, int8: Int8Kernels, calibration: DownCalibration | None) -> None:
        """Swap the float projections for int8 ones, a layer per thread.

        quantize_per_channel and fbgemm's prepack each run on one core and
        release the GIL. Building the default model's int8 runner on the 2-core
        AMD EPYC (torch capability AVX512, VNNI avx512_vnni; 4 alternated builds
        in one process, a one-thread pool against this one) took 1.87-2.07 s
        one layer after another and 1.04-1.23 s on two threads; the packed
        weights give identical outputs.

        down_proj goes last: a smoothed one (kernels.DownProjLinear) needs its
        input's range, measured with the other projections already int8, as
        they will be when serving.
        """
        wmax, rows = int8.weight_max, int8.scale_rows_above
        few = int8.attn_weight_only_max_rows
        library = None
        if int8.native_max_rows:
            if self.freqs is None or self.head_dim % 8:
                # The attention kernel takes the complex rotary on 8-float rows; without
                # it a C step would be half torch's, a second path not worth its keep.
                raise native_kernels.NativeUnavailable(
                    "the C attention needs the complex rotary and a head size in 8s"
                )
            library = native_kernels.load(cpu_features.detect())
        floats = self.layers

        def native_layer(weights: tuple) -> NativeLayer:
            ln1, qkv, _, o, ln2, gu, down = weights
            eps = self.eps
            return NativeLayer(
                BlockLinear.from_weight(library, qkv, 4, norm=ln1, eps=eps),
                BlockLinear.from_weight(library, o, 4),
                BlockLinear.from_weight(library, gu, 4, gated=True, norm=ln2, eps=eps),
                BlockLinear.from_weight(library, down, 4),
            )

        def layer(weights: tuple) -> tuple:
            ln1, qkv, b, o, ln2, gu, down = weights
            return (
                ln1,
                Int8Linear(qkv, wmax, rows, few),
                b,
                Int8Linear(o, wmax, rows, few),
                ln2,
                Int8Linear(gu, wmax, rows),
                down,
            )

        head_float = self.lm_head
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            if int8.native_only:
                # No step runs torch's kernels: keep only the q/k/v bias of each layer.
                self.layers = [(None, None, b, None, None, None, None) for _, _, b, *_ in floats]
                self.lm_head = None
            else:
                head = pool.submit(Int8Linear, self.lm_head, wmax, rows)
                self.layers = list(pool.map(layer, self.layers))
                self.lm_head = head.result()
                input_max: list[torch.Tensor | None] = [None] * self.num_layers
                if int8.smooths_down:
                    assert calibration is not None
                    input_max = list(calibration.input_maxima(self.down_input_maxima))
                downs = pool.map(
                    lambda weights, m: DownProjLinear(weights[6], int8, m), self.layers, input_max
                )
                self.layers = [
                    weights[:6] + (down,) for weights, down in zip(self.layers, downs, strict=True)
                ]
            if library is not None:
                # The LM head keeps 8 bits: it is tied to the embedding, which GGUF
                # files ship in Q8_0 where they ship the projections in Q4_1.
                self.native_head = BlockLinear.from_weight(
                    library, head_float, 8, norm=self.final_norm, eps=self.eps
                )
                self.native_layers = list(pool.map(native_layer, floats))
                self.native_max_rows = int8.native_max_rows
                self.native_only = int8.native_only
                assert self.freqs is not None
                # Its rotary is the complex form's, on the same pair-adjacent rows.
                self.native_attention = RopeCacheAttention(
                    library,
                    self.freqs.real.contiguous(),
                    self.freqs.imag.contiguous(),
                    self.num_heads,
                    self.num_kv_heads,
                    self.head_dim,
                    self.scale,
                )

    # --- cache management -------------------------------------------------
    def reserve_slots(self, slots: int) -> None:
        """Hold exactly `slots` slots of `max_context` positions (the KV cache budget).

        Called before any sequence holds a slot: the contents are dropped.
        Reserving the whole budget up front replaces growing the cache on
        demand (doubling the slots, zeroing and copying), which stalled every
        running sequence: `python -m load_tests.bench_batching --levels 1,16,32`
        on the 2-core AMD EPYC (torch capability AVX512, VNNI avx512_vnni,
        2026-12-02) gave TTFT p99 14.9 s and
        86 tok/s at 16 streams while the cache grew, 0.57 s and 234 tok/s
        reserved (load_tests/results/bench_batching_cpu_avx512_epyc*.json).
        """
        slots = max(1, slots)
        shape = (slots, self.num_kv_heads, self.max_context, self.head_dim)
        for caches in (self.k_cache, self.v_cache):
            caches[:] = [
                zeroed_cache(shape, self.dtype, self.device) for _ in range(self.num_layers)
            ]
        self.slots = slots

    def slot_bytes(self) -> int:
        """Bytes one slot of `max_context` positions takes, keys and values of every layer."""
        return self.bytes_per_position() * self.max_context

    def bytes_per_position(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def _check_fits(self, slots: int, length: int) -> None:
        if slots > self.slots:
            raise RuntimeError(f"the KV cache holds {self.slots} slots; slot {slots - 1} asked")
        if length > self.capacity:
            raise RuntimeError(f"the KV cache holds {self.capacity} positions; {length} asked")

    @torch.inference_mode()
    def apply(self, ops: list[SlotOp]) -> None:
        """Carry out the KV cache manager's slot copies, swaps and clears, in order."""
        for op in ops:
            if isinstance(op, SlotCopy):
                self._check_fits(max(op.src, op.dst) + 1, op.length)
                for cache in (*self.k_cache, *self.v_cache):
                    cache[op.dst, :, : op.length] = cache[op.src, :, : op.length]
            elif isinstance(op, SlotSwap):
                self._check_fits(max(op.a, op.b) + 1, op.length)
                pair = torch.tensor([op.a, op.b], device=self.device)
                for cache in (*self.k_cache, *self.v_cache):
                    cache[pair, :, : op.length] = cache[pair.flip(0), :, : op.length]
            elif isinstance(op, SlotClear) and op.slot < self.slots:
                for cache in (*self.k_cache, *self.v_cache):
                    cache[op.slot, :, : op.length] = 0

    def release(self, seq_id: int) -> None:
        """Slots are owned by the scheduler; nothing per sequence to free here."""

    # --- forward ------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one fused op
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None) -> torch.Tensor:
        """Rotary embedding of ``[T, heads, D]``; ``sin`` None: ``cos`` holds the
        complex rotations (self.freqs) and x's pairs are adjacent (_pair_rows).

        The complex form is 3 ops instead of 7 (a few microseconds each, which is
        what a one-token decode step is made of): 30 -> 12 us a layer for one
        token's q and k, torch timing loop on the 2-core AMD EPYC (torch
        capability AVX2, no VNNI).
        """
        if sin is None:
            T, heads, D = x.shape
            pairs = torch.view_as_complex(x.reshape(T, heads, D // 2, 2))
            return torch.view_as_real(pairs * cos).view(T, heads, D)
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def project(
        self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x W^T (+ bias) in this runner's few-row form (see linear)."""
        return linear(x, weight, bias, self.weight_first, self.padded_rows)

    @torch.inference_mode()
    def forward(self, items: list[StepItem], active_slots: int) -> torch.Tensor:
        """Run one step; return float32 logits for the items with wants_logits, in order."""
        x, offsets = self._hidden(items, active_slots)
        rows = [offsets[i + 1] - 1 for i, it in enumerate(items) if it.wants_logits]
        if not rows:
            return torch.empty(0, self.embed.shape[0])
        return self._logits(x[torch.tensor(rows, device=self.device)])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head of hidden rows, as float32 logits."""
        if self.native_head is not None and (
            self.native_only or x.shape[0] <= self.native_max_rows
        ):
            rows = self.native_max_rows
            head = self.native_head
            return torch.cat([head(x[i : i + rows]) for i in range(0, x.shape[0], rows)])
        return self.project(self._rms(x, self.final_norm), self.lm_head).float()

    @torch.inference_mode()
    def sequence_logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """float32 logits at every position of `token_ids`, computed in slot 0.

        `chunk` feeds the text through the KV cache that many tokens a step;
        `chunk=1` runs the kernels single-stream decoding actually runs.
        """
        chunk = chunk or len(token_ids)
        logits = []
        for start in range(0, len(token_ids), chunk):
            piece = token_ids[start : start + chunk]
            x, _ = self._hidden([StepItem(-1, 0, piece, start, False)], 1)
            logits.append(self._logits(x))
        return torch.cat(logits)

    def score(self, token_ids: list[int], chunk: int | None = None) -> float:
        """Mean negative log-likelihood of `token_ids` (for perplexity checks)."""
        logits = self.sequence_logits(token_ids[:-1], chunk)
        target = torch.tensor(token_ids[1:], device=self.device)
        return F.cross_entropy(logits, target).item()

    def _hidden(self, items: list[StepItem], active_slots: int) -> tuple[torch.Tensor, list[int]]:
        ends = [it.start + len(it.token_ids) for it in items]
        self._check_fits(active_slots, max(ends))
        dev = self.device
        H, KV, D, cap = self.num_heads, self.num_kv_heads, self.head_dim, self.capacity
        token_ids: list[int] = []
        positions: list[int] = []
        slot_of_token: list[int] = []
        offsets = [0]
        for it in items:
            token_ids.extend(it.token_ids)
            positions.extend(range(it.start, it.start + len(it.token_ids)))
            slot_of_token.extend([it.slot] * len(it.token_ids))
            offsets.append(len(token_ids))
        T = len(token_ids)
        ids_t = torch.tensor(token_ids, device=dev)
        pos_t = torch.tensor(positions, device=dev)
        slot_t = torch.tensor(slot_of_token, device=dev)
        if self.native_attention is not None and (self.native_only or T <= self.native_max_rows):
            return self._native_hidden(ids_t, slot_t, pos_t), offsets
        if self.freqs is not None:
            cos, sin = self.freqs[pos_t].unsqueeze(1), None
        else:
            cos = self.cos[pos_t].unsqueeze(1)
            sin = self.sin[pos_t].unsqueeze(1)
        # Row of each (token, kv head) in the cache seen as [slots * KV * capacity, D]:
        # index_copy_ writes a step's keys in one cheap call (advanced-index
        # assignment costs milliseconds here).
        cache_rows = (
            (slot_t.unsqueeze(1) * KV + torch.arange(KV, device=dev)) * cap + pos_t.unsqueeze(1)
        ).reshape(-1)

        decode = [i for i, it in enumerate(items) if len(it.token_ids) == 1 and it.start > 0]
        prefill = [i for i, it in enumerate(items) if not (len(it.token_ids) == 1 and it.start > 0)]
        n = active_slots
        # Fast path: every live slot decodes, in slot order (the common steady state).
        all_decode = not prefill and [items[i].slot for i in decode] == list(range(n))
        if decode:
            dec_rows = torch.tensor([offsets[i] for i in decode], device=dev)
            dec_slots = torch.tensor([items[i].slot for i in decode], device=dev)
            span = max(ends[i] for i in decode)
            dec_mask: torch.Tensor | None = None
            if len(decode) < n or any(ends[i] != span for i in decode):
                lengths = torch.ones(n, dtype=torch.long, device=dev)  # other slots: any row
                lengths[dec_slots] = torch.tensor([ends[i] for i in decode], device=dev)
                past_end = torch.arange(span, device=dev).unsqueeze(0) >= lengths.unsqueeze(1)
                # Additive, built once a step: a boolean mask is converted in every layer.
                dec_mask = torch.zeros(n, 1, 1, span, dtype=self.dtype, device=dev)
                dec_mask.masked_fill_(past_end[:, None, None, :], float("-inf"))
        # A chunk that continues a prompt attends to the cached prefix and causally
        # within itself; a first chunk is plain causal (mask None). Built once a step.
        prefill_masks: dict[int, torch.Tensor | None] = {}
        for i in prefill:
            start, end = items[i].start, ends[i]
            prefill_masks[i] = None
            if start > 0:
                rows = torch.arange(start, end, device=dev).unsqueeze(1)
                prefill_masks[i] = torch.arange(end, device=dev).unsqueeze(0) <= rows
        x = F.embedding(ids_t, self.embed)
        for layer_index, (ln1, w_qkv, b_qkv, w_o, ln2, w_gu, w_down) in enumerate(self.layers):
            k_cache = self.k_cache[layer_index]
            v_cache = self.v_cache[layer_index]
            q, k, v = self._project_qkv(x, ln1, w_qkv, b_qkv, cos, sin)
            k_cache.view(-1, D).index_copy_(0, cache_rows, k)
            v_cache.view(-1, D).index_copy_(0, cache_rows, v)
            if all_decode:  # q's rows are already the slots' rows
                attn = self._decode_attention(q, k_cache, v_cache, span, dec_mask).reshape(T, H * D)
            else:
                attn = torch.empty(T, H, D, dtype=x.dtype, device=dev)
                if decode:
                    q_all = torch.zeros(n, H, D, dtype=x.dtype, device=dev)
                    q_all.index_copy_(0, dec_slots, q.index_select(0, dec_rows))
                    out = self._decode_attention(q_all, k_cache, v_cache, span, dec_mask)
                    attn.index_copy_(0, dec_rows, out.index_select(0, dec_slots))
                for i in prefill:
                    slot, lo, hi, end = items[i].slot, offsets[i], offsets[i + 1], ends[i]
                    out = F.scaled_dot_product_attention(
                        q[lo:hi].transpose(0, 1).unsqueeze(0),
                        k_cache[slot : slot + 1, :, :end],
                        v_cache[slot : slot + 1, :, :end],
                        attn_mask=prefill_masks[i],
                        is_causal=prefill_masks[i] is None,
                        enable_gqa=True,
                    )
                    attn[lo:hi] = out[0].transpose(0, 1)
                attn = attn.view(T, H * D)
            x = self._output_and_mlp(x, attn, w_o, ln2, w_gu, w_down)
        return x, offsets

    def _native_hidden(
        self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """A step of a few rows in the C kernels alone, five calls a layer: q/k/v (norm
        folded in); rotary, cache write and attention; o; gate/up; down.

        More rows (native_only) go through in order, a few at a time: a chunk's keys
        are cached before the next chunk's rows attend to them.
        """
        attention = self.native_attention
        assert attention is not None
        rows = self.native_max_rows
        if ids.shape[0] > rows:
            return torch.cat(
                [
                    self._native_hidden(
                        ids[i : i + rows], slots[i : i + rows], positions[i : i + rows]
                    )
                    for i in range(0, ids.shape[0], rows)
                ]
            )
        x = F.embedding(ids, self.embed)
        for blocks, layer, k_cache, v_cache in zip(
            self.native_layers, self.layers, self.k_cache, self.v_cache, strict=True
        ):
            qkv = blocks.qkv(x) if layer[2] is None else blocks.qkv(x) + layer[2]
            attn = attention(qkv, slots, positions, k_cache, v_cache)
            x = blocks.o(attn, residual=x)
            x = blocks.down(blocks.gate_up(x), residual=x)
        return x

    def _decode_attention(
        self,
        q_slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        span: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One query per live slot (`[n, H, D]`) over the first `span` cache rows -> `[n, H, D]`."""
        n = q_slots.shape[0]
        return F.scaled_dot_product_attention(
            q_slots.unsqueeze(2),
            k_cache[:n, :, :span],
            v_cache[:n, :, :span],
            attn_mask=mask,
            enable_gqa=True,
        ).squeeze(2)

    def _project_qkv(
        self,
        x: torch.Tensor,
        ln1: torch.Tensor,
        w_qkv: Any,
        b_qkv: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, fused q/k/v projection and rotary: q `[T, H, D]`, k and v `[T * KV, D]`."""
        T, H, KV, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.project(self._rms(x, ln1), w_qkv, b_qkv)
        # q and k sit side by side in qkv: one rotary call for both.
        qk = self._rope(qkv[:, : (H + KV) * D].view(T, H + KV, D), cos, sin)
        k = qk[:, H:].reshape(T * KV, D)
        return qk[:, :H], k, qkv[:, (H + KV) * D :].reshape(T * KV, D)

    def _output_and_mlp(
        self,
        x: torch.Tensor,
        attn: torch.Tensor,
        w_o: Any,
        ln2: torch.Tensor,
        w_gu: Any,
        w_down: Any,
    ) -> torch.Tensor:
        """Attention output projection and the MLP, each with its residual."""
        x = x + self.project(attn, w_o)
        gu = self.project(self._rms(x, ln2), w_gu)
        act = F.silu(gu[:, : self.intermediate]) * gu[:, self.intermediate :]
        return x + self.project(act, w_down)


class _InputMaxRecorder:
    """Stands in for a float weight during calibration, keeping its input's |max| per channel."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.input_max = torch.zeros(weight.shape[1], device=weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input_max = torch.maximum(self.input_max, x.detach().abs().amax(dim=0).float())
        return F.linear(x, self.weight)


class HFRunner:
    """Any causal LM through its own forward: one DynamicCache per sequence, no batching."""

    name = "hf-sequential"

    def __init__(self, model: Any, max_context: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_context = max_context
        self.caches: dict[int, Any] = {}
        # transformers >= 5.2x names the argument `cache`; older ones `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def apply(self, ops: list[SlotOp]) -> None:
        """Caches are per sequence, not per slot (and prefixes are not reused): nothing to do."""

    @torch.inference_mode()
    def sequence_logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """float32 logits at every position, fed `chunk` tokens a step through one cache."""
        from transformers import DynamicCache

        chunk = chunk or len(token_ids)
        cache = DynamicCache()
        logits = []
        for start in range(0, len(token_ids), chunk):
            ids = torch.tensor([token_ids[start : start + chunk]], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache})
            logits.append(out.logits[0].float())
        return torch.cat(logits)

    def release(self, seq_id: int) -> None:
        self.caches.pop(seq_id, None)

    @torch.inference_mode()
    def forward(self, items: list[StepItem], active_slots: int) -> torch.Tensor:
        from transformers import DynamicCache

        logits = []
        for it in items:
            cache = self.caches.setdefault(it.seq_id, DynamicCache())
            ids = torch.tensor([it.token_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache})
            if it.wants_logits:
                logits.append(out.logits[0, -1].float())
        if not logits:
            return torch.empty(0, self.model.config.vocab_size)
        return torch.stack(logits)


def build_runner(
    model: Any,
    max_context: int,
    int8: Int8Kernels | None = None,
    compile: bool = False,
    calibration: DownCalibration | None = None,
) -> LlamaRunner | HFRunner:
    if supports_fast_runner(model):
        return LlamaRunner(model, max_context, int8=int8, compile=compile, calibration=calibration)
    return HFRunner(model, max_context)
