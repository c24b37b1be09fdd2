"""The server <-> worker protocol: every message that crosses a process boundary.

The server sends ``GenerateRequest``, ``CancelRequest`` and ``Shutdown``; a
worker answers ``WorkerReady`` once its model is loaded, then ``StepOutput``
after every decoding step that produced anything, and ``WorkerFailed`` if it
cannot go on. Messages carry token ids, never text: the server's threads do
all tokenizing and detokenizing, so a step costs one small pickle for the
whole batch rather than one per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# WorkerConfig.int8_kernels: "auto" picks from the CPU's features (workers/precision.py).
INT8_KERNEL_CHOICES = ("auto", "vnni", "avx2")
# WorkerConfig.cpu_isa: "avx2" holds torch, fbgemm, oneDNN and MKL to AVX2
# (workers/cpu_features.py), to run the AVX2 kernel paths on a newer CPU.
CPU_ISA_CHOICES = ("native", "avx2")

# Below this a temperature changes nothing a float32 softmax can show, and dividing
# logits by it overflows: such requests decode greedily.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on what a sequence may generate, compiled and applied in the worker.

    ``kind``: "json_schema" (``source`` is the schema as JSON text), "json_object"
    (any JSON object; ``source`` empty), "regex" or "lark" (``source`` is the
    pattern or grammar). workers/grammar.py compiles it and masks the logits.
    """

    kind: str
    source: str = ""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-sequence decoding settings; temperature below GREEDY_TEMPERATURE means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # OpenAI's penalties, on the counts of the tokens generated so far, and
    # logit_bias as (token id, bias) pairs; added to the logits before anything else.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Constrained decoding (workers/grammar.py); None: unconstrained.
    grammar: GrammarSpec | None = None
    # None: no logprobs; 0: the sampled token's; k (<= 20): and the k most likely.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class CancelRequest:
    seq_id: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The worker serves `dtype` computed by `kernels`, chosen on `cpu` by the quality gate.

    ``quality_gate`` holds one dict per candidate precision measured (see
    workers/quality_gate.py ``GateResult``), the failed ones first; empty when
    the gate was skipped or the reference float32 was chosen outright.
    """

    worker_id: int
    model_id: str
    device: str
    dtype: str
    max_context: int
    runner: str
    kernels: str = ""
    cpu: dict[str, object] = field(default_factory=dict)
    quality_gate: tuple[dict[str, object], ...] = ()


@dataclass(slots=True)
class StepOutput:
    """What one decoding step produced, for every sequence it touched.

    ``tokens`` holds (seq_id, token_id) pairs, in order; ``finished`` holds
    (seq_id, finish_reason) for sequences that left the batch this step:
    "stop" (a stop token), "length" (max_tokens or context), "cancelled",
    or "error".

    The rest is what the server's metrics need from the worker (chatserver/metrics.py),
    carried here so no worker writes metrics of its own:
    ``started``: (seq_id, prompt tokens found in the prefix cache) of the
    sequences scheduled for the first time this step (their queue time ends
    when it began); ``batch_size``: sequences in the step (0 when no forward
    pass ran, only finishes are reported); ``step_seconds``: the step's
    forward pass and sampling; ``kv_used`` / ``kv_allocated``: token positions
    of the worker's KV cache holding running sequences after the step, and
    the positions its memory budget holds (0: the runner's cache grows per
    sequence and has no budget to compare with); ``kv_retained``: positions
    holding the prefixes of finished sequences, kept for reuse;
    ``prefix_queries`` / ``prefix_hits``: prompt tokens looked up in the
    prefix cache and found there, since the worker started.
    ``logprobs``: (seq_id, token_id, logprob, ((token_id, logprob), ...)) for
    the tokens of sequences that asked for logprobs (models/sampling.py says
    from which distribution), empty otherwise; ``grammar_seconds``: the step's
    time computing grammar masks and advancing matchers (workers/grammar.py).
    """

    worker_id: int
    tokens: list[tuple[int, int]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)
    started: list[tuple[int, int]] = field(default_factory=list)
    batch_size: int = 0
    step_seconds: float = 0.0
    kv_used: int = 0
    kv_allocated: int = 0
    kv_retained: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    logprobs: list[tuple[int, int, float, tuple[tuple[int, float], ...]]] = field(
        default_factory=list
    )
    grammar_seconds: float = 0.0

    @property
    def empty(self) -> bool:
        """Nothing worth sending: no tokens, no finishes, no step ran."""
        return not (self.tokens or self.finished or self.batch_size)


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """A worker could not load. ``fatal``: retrying cannot help (a precision that
    failed the quality gate, a dtype the device lacks), so the server exits."""

    worker_id: int
    message: str
    fatal: bool = False


ServerToWorker = GenerateRequest | CancelRequest | Shutdown
WorkerToServer = WorkerReady | StepOutput | WorkerFailed


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker needs to load its model and run; sent once at spawn."""

    model_path: str
    model_id: str
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "auto", "float32", "bfloat16", "float16", "int8"
    max_context: int
    max_batch: int
    prefill_chunk: int
    threads: int
    nice: int = 0
    compile: bool = False  # torch.compile the runner's fusable pieces
    int8_kernels: str = "auto"  # "auto" (from CPU features), "vnni", "avx2"
    cpu_isa: str = "native"  # "native" or "avx2" (CPU_ISA_CHOICES)
    skip_quality_gate: bool = False
    quality_max_ppl_ratio: float = 1.05
    quality_min_top1: float = 0.85
    kv_cache_bytes: int = 0  # this worker's KV cache budget (0: --max-batch x 4 slots)
    prefix_cache: bool = True  # reuse cached prompt prefixes (workers/kv_cache.py)
    batch_invariant: bool = False  # every step in the int4 C kernels (precision.py)
