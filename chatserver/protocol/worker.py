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


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-sequence decoding settings; temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


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
    worker_id: int
    model_id: str
    device: str
    dtype: str
    max_context: int
    runner: str


@dataclass(slots=True)
class StepOutput:
    """What one decoding step produced, for every sequence it touched.

    ``tokens`` holds (seq_id, token_id) pairs, in order; ``finished`` holds
    (seq_id, finish_reason) for sequences that left the batch this step:
    "stop" (a stop token), "length" (max_tokens or context), "cancelled",
    or "error".
    """

    worker_id: int
    tokens: list[tuple[int, int]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    worker_id: int
    message: str


ServerToWorker = GenerateRequest | CancelRequest | Shutdown
WorkerToServer = WorkerReady | StepOutput | WorkerFailed


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker needs to load its model and run; sent once at spawn."""

    model_path: str
    model_id: str
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "float32", "bfloat16", "float16", "int8"
    max_context: int
    max_batch: int
    prefill_chunk: int
    threads: int
    nice: int = 0
    compile: bool = False  # torch.compile the runner's fusable pieces
