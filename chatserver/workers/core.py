"""WorkerCore: the decoding loop's body, the same wherever it is hosted.

A host (a process, a thread, or the event loop itself for the demonstration
engines) feeds it requests and cancels and calls `step()` while it has work;
each step returns the `StepOutput` to send back to the server.
"""

from __future__ import annotations

import logging
import time

import torch

from chatserver.models.loading import ModelSource, load_model
from chatserver.models.sampling import Sampler
from chatserver.protocol.worker import (
    CancelRequest,
    GenerateRequest,
    ServerToWorker,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerReady,
)
from chatserver.workers.runner import HFRunner, LlamaRunner, build_runner
from chatserver.workers.scheduler import BatchScheduler, Sequence

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class WorkerCore:
    def __init__(
        self, worker_id: int, config: WorkerConfig, runner: LlamaRunner | HFRunner
    ) -> None:
        self.worker_id = worker_id
        self.config = config
        self.runner = runner
        self.scheduler = BatchScheduler(config.max_batch, config.prefill_chunk, config.max_context)
        self.sampler = Sampler(runner.device)
        self.pending_finished: list[tuple[int, str]] = []

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.pending_finished)

    def submit(self, request: GenerateRequest) -> None:
        if not request.prompt_ids or len(request.prompt_ids) >= self.config.max_context:
            self.pending_finished.append((request.seq_id, "length"))
            return
        self.scheduler.add(Sequence(request.seq_id, list(request.prompt_ids), request.params))

    def cancel(self, request: CancelRequest) -> None:
        seq = self.scheduler.find(request.seq_id)
        if seq is None:
            return  # already finished; its finish was or will be reported
        self.scheduler.remove(seq)
        self._forget(seq.seq_id)
        self.pending_finished.append((seq.seq_id, "cancelled"))

    def apply(self, msg: ServerToWorker) -> bool:
        """Take one message from the server; False means shut down."""
        if isinstance(msg, GenerateRequest):
            self.submit(msg)
        elif isinstance(msg, CancelRequest):
            self.cancel(msg)
        return not isinstance(msg, Shutdown)

    def _forget(self, seq_id: int) -> None:
        self.runner.release(seq_id)
        self.sampler.forget(seq_id)

    def step(self) -> StepOutput:
        out = StepOutput(self.worker_id, finished=self.pending_finished)
        self.pending_finished = []
        for move in self.scheduler.take_moves():
            self.runner.move_slot(move.src, move.dst, move.length)
        plan = self.scheduler.schedule()
        if plan.empty:
            return out
        try:
            logits = self.runner.forward(plan.items, plan.active_slots)
            wanting = [
                s for it, s in zip(plan.items, plan.sequences, strict=True) if it.wants_logits
            ]
            sampled = self.sampler.sample(
                logits, [s.seq_id for s in wanting], [s.params for s in wanting]
            )
        except Exception:
            log.exception(
                "worker %d: step failed; failing its %d sequences", self.worker_id, len(plan.items)
            )
            for seq in plan.sequences:
                if seq.slot >= 0 or seq in self.scheduler.waiting:
                    self.scheduler.remove(seq)
                self._forget(seq.seq_id)
                out.finished.append((seq.seq_id, "error"))
            return out
        produced, finished = self.scheduler.complete(plan, sampled)
        for seq_id, _ in finished:
            self._forget(seq_id)
        out.tokens = produced
        out.finished.extend(finished)
        return out


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_core(worker_id: int, config: WorkerConfig) -> tuple[WorkerCore, WorkerReady]:
    """Load the model as configured and wrap it in a WorkerCore (runs in the worker)."""
    started = time.monotonic()
    if config.threads > 0 and config.device == "cpu":
        torch.set_num_threads(config.threads)
    dtype = config.dtype
    if dtype == "int8" and config.device != "cpu":
        log.warning("int8 weights use CPU kernels; loading bfloat16 on %s instead", config.device)
        dtype = "bfloat16"
    int8 = dtype == "int8"
    load_dtype = torch.float32 if int8 else TORCH_DTYPES[dtype]
    source = ModelSource(config.model_id, config.model_path, True)
    model = load_model(source, load_dtype, config.device)
    compile = config.compile and not int8
    if config.compile and int8:
        # Compiled, the fbgemm int8 kernels gave other numerics (greedy answers
        # changed from the first token); int8 is CPU-only, where compile measured slower.
        log.warning("--compile is for float dtypes; int8 runs eager")
    runner = build_runner(model, config.max_context, int8=int8, compile=compile)
    if compile and not isinstance(runner, LlamaRunner):
        log.warning("--compile applies to the Llama-family runner only; running eager")
    if int8 and not isinstance(runner, LlamaRunner):
        dtype = "float32"  # the generic runner has no int8 path
    log.info(
        "worker %d: %s on %s (%s, runner %s) ready in %.1fs",
        worker_id,
        config.model_id,
        config.device,
        dtype,
        runner.name,
        time.monotonic() - started,
    )
    ready = WorkerReady(
        worker_id, config.model_id, config.device, dtype, config.max_context, runner.name
    )
    return WorkerCore(worker_id, config, runner), ready
