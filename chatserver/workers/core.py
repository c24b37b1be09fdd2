"""WorkerCore: the decoding loop's body, the same wherever it is hosted.

A host (a process, a thread, or the event loop itself for the demonstration
engines) feeds it requests and cancels and calls `step()` while it has work;
each step returns the `StepOutput` to send back to the server.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from chatserver.models.llama_weights import LlamaWeights, read_llama_weights
from chatserver.models.loading import ModelSource, load_model
from chatserver.models.sampling import Sampler
from chatserver.protocol.worker import (
    CancelRequest,
    GenerateRequest,
    ServerToWorker,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
)
from chatserver.workers import calibration, cpu_features, native_kernels, precision, quality_gate
from chatserver.workers.grammar import GrammarBook
from chatserver.workers.kv_cache import KVCacheManager
from chatserver.workers.runner import HFRunner, LlamaRunner, build_runner, supports_fast_runner
from chatserver.workers.scheduler import BatchScheduler, Sequence

log = logging.getLogger(__name__)


class WorkerCore:
    def __init__(
        self,
        worker_id: int,
        config: WorkerConfig,
        runner: LlamaRunner | HFRunner,
        grammars: GrammarBook | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.config = config
        self.runner = runner
        self.kv = kv_cache_for(config, runner)
        if isinstance(runner, LlamaRunner):
            runner.reserve_slots(self.kv.num_slots)
        self.scheduler = BatchScheduler(
            min(config.max_batch, self.kv.num_slots),
            config.prefill_chunk,
            config.max_context,
            self.kv,
        )
        # Constrained decoding's tokenizer loads in the background (build_core starts
        # it first and waits for it before the worker says ready).
        self.grammars = grammars or GrammarBook(config.model_path)
        self.grammars.warm()
        self.sampler = Sampler(runner.device, self.grammars)
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

    def serve(
        self,
        receive: Callable[[], ServerToWorker],
        has_message: Callable[[], bool],
        emit: Callable[[StepOutput], None],
    ) -> None:
        """The decoding loop every host runs, over its own transport (pipe, queue).

        Idle, it blocks in ``receive``; between steps it takes every message
        already there, so a cancel lands within one step. Returns on Shutdown.
        """
        while True:
            if not self.has_work and not self.apply(receive()):
                return
            while has_message():
                if not self.apply(receive()):
                    return
            out = self.step()
            if not out.empty:
                emit(out)

    def _forget(self, seq_id: int) -> None:
        self.runner.release(seq_id)
        self.sampler.forget(seq_id)

    def step(self) -> StepOutput:
        out = StepOutput(self.worker_id, finished=self.pending_finished)
        self.pending_finished = []
        plan = self.scheduler.schedule()
        # Copies and swaps from the last step's releases and this step's
        # admissions, in the order the manager decided them.
        self.runner.apply(self.scheduler.take_ops())
        if plan.empty:
            self._report_cache(out)
            return out
        out.started = [(seq.seq_id, seq.cached) for seq in plan.admitted]
        out.batch_size = len(plan.items)
        began = time.perf_counter()
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
                    self.scheduler.remove(seq, retain=False)
                self._forget(seq.seq_id)
                out.finished.append((seq.seq_id, "error"))
            out.step_seconds = time.perf_counter() - began
            self._report_cache(out)
            return out
        out.step_seconds = time.perf_counter() - began
        out.logprobs = self.sampler.logprobs
        out.grammar_seconds = self.grammars.take_seconds()
        produced, finished = self.scheduler.complete(plan, sampled, self.sampler.completed)
        for seq_id, _ in finished:
            self._forget(seq_id)
        out.tokens = produced
        out.finished.extend(finished)
        self._report_cache(out)
        return out

    def _report_cache(self, out: StepOutput) -> None:
        stats = self.kv.snapshot()
        out.kv_used = self.scheduler.cached_tokens
        # HFRunner's caches grow per sequence: no budget to compare with (0).
        budgeted = isinstance(self.runner, LlamaRunner)
        out.kv_allocated = self.kv.num_slots * self.config.max_context if budgeted else 0
        out.kv_retained = stats.tokens_retained
        out.prefix_queries = stats.queries
        out.prefix_hits = stats.hits


def kv_cache_for(config: WorkerConfig, runner: LlamaRunner | HFRunner) -> KVCacheManager:
    """The KV cache manager for this runner: as many slots as the memory budget holds.

    A slot holds `max_context` positions. ``config.kv_cache_bytes`` (0: no
    budget) bounds slots x slot bytes; at least one slot, and no more than
    four times --max-batch (running ones plus retained prefixes). HFRunner
    keeps its own cache per sequence: one slot per running sequence, no reuse.
    """
    if not isinstance(runner, LlamaRunner):
        return KVCacheManager(config.max_batch, config.max_context, prefix_cache=False)
    most = 4 * config.max_batch
    if config.kv_cache_bytes > 0:
        most = min(most, config.kv_cache_bytes // runner.slot_bytes())
    slots = max(1, most)
    log.info(
        "KV cache: %d slots of %d positions (%.0f MiB each, %.2f GiB in all), prefix cache %s",
        slots,
        config.max_context,
        runner.slot_bytes() / 2**20,
        slots * runner.slot_bytes() / 2**30,
        "on" if config.prefix_cache else "off",
    )
    return KVCacheManager(slots, config.max_context, prefix_cache=config.prefix_cache)


def build_core(worker_id: int, config: WorkerConfig) -> tuple[WorkerCore, WorkerReady]:
    """Load the model, pick the fastest precision that passes the quality gate, wrap it.

    Runs in the worker. Raises QualityGateFailed (with the measured figures)
    when no candidate passes, PrecisionUnavailable for a dtype the device lacks.
    """
    started = time.monotonic()
    if config.threads > 0 and config.device == "cpu":
        torch.set_num_threads(config.threads)
    # The grammar tokenizer loads beside the weights, the int8 packing and the gate.
    # Left to run after ready, it held the GIL in the first replies' steps: a first
    # 64-token reply took 4.65 s against 2.08 s with it done (WorkerCore.step timed
    # in a loop; 2-core AMD EPYC, torch capability AVX2, no VNNI, 2026-12-02).
    grammars = GrammarBook(config.model_path)
    grammars.warm()
    cpu = cpu_features.detect()
    chain = precision.candidates(
        config.dtype, config.device, cpu, config.int8_kernels, config.batch_invariant
    )
    # float32 is the reference itself: a chain of float32 alone has nothing to gate.
    gated = not config.skip_quality_gate and any(not c.is_reference for c in chain)
    source = ModelSource(config.model_id, config.model_path, True)
    # The gate's reference and the int8 kernels both start from float32 weights.
    load_dtype = torch.float32 if gated or len(chain) > 1 else chain[0].load_dtype
    # The runner's own architectures skip transformers' modeling code (seconds a start).
    model: Any = read_llama_weights(config.model_path, load_dtype, config.device)
    if model is None:
        model = load_model(source, load_dtype, config.device)
    reference = probe = None
    if gated:
        probe = quality_gate.probe_from_files(config.model_path)
        reference = quality_gate.cached_reference(model, config.model_path, probe)
    bounds = quality_gate.GateBounds(config.quality_max_ppl_ratio, config.quality_min_top1)
    results: list[quality_gate.GateResult] = []
    runner: LlamaRunner | HFRunner | None = None
    chosen: precision.Candidate | None = None
    for index, candidate in enumerate(chain):
        last = index == len(chain) - 1
        runner = _runner_for(model, candidate, config, keep_float32=not last)
        if runner is None:
            log.info("worker %d: %s cannot run this model here; next", worker_id, candidate.kernels)
            continue
        if not gated or candidate.is_reference:
            chosen = candidate
            break
        assert reference is not None and probe is not None
        result = quality_gate.check(
            runner, reference, probe, candidate.dtype, candidate.kernels, bounds
        )
        results.append(result)
        log.info(
            "worker %d: quality gate %s (%s): perplexity x%.3f, decode x%.3f, top-1 %.3f, %.1fs: %s",
            worker_id,
            candidate.dtype,
            candidate.kernels,
            result.ppl_ratio,
            result.decode_ppl_ratio,
            result.top1_agreement,
            result.seconds,
            "passed" if result.passed else "FAILED: " + result.reason,
        )
        if result.passed:
            chosen = candidate
            break
    if chosen is None or runner is None:
        tried = "; ".join(f"{r.dtype} ({r.kernels}): {r.reason}" for r in results)
        raise quality_gate.QualityGateFailed(
            f"--dtype {config.dtype} failed the quality gate on this CPU "
            f"({cpu.model}, {cpu.capability}): {tried or 'no candidate could run'}. "
            "Choose another --dtype (or --dtype auto), or pass --skip-quality-gate "
            "to serve it anyway"
        )
    del model  # the runner keeps what it needs
    grammars.wait()
    log.info(
        "worker %d: %s on %s (%s, kernels %s, runner %s, CPU %s) ready in %.1fs",
        worker_id,
        config.model_id,
        config.device,
        chosen.dtype,
        chosen.kernels,
        runner.name,
        cpu.capability,
        time.monotonic() - started,
    )
    ready = WorkerReady(
        worker_id,
        config.model_id,
        config.device,
        chosen.dtype,
        config.max_context,
        runner.name,
        kernels=chosen.kernels,
        cpu=cpu.describe(),
        quality_gate=tuple(r.as_dict() for r in results),
    )
    return WorkerCore(worker_id, config, runner, grammars), ready


def load_failure(worker_id: int, exc: Exception) -> WorkerFailed:
    """The message a worker that could not load sends; fatal when a retry cannot help."""
    fatal = isinstance(exc, quality_gate.QualityGateFailed | precision.PrecisionUnavailable)
    text = str(exc) if fatal else f"{type(exc).__name__}: {exc}"
    return WorkerFailed(worker_id, text, fatal=fatal)


def _runner_for(
    model: Any, candidate: precision.Candidate, config: WorkerConfig, keep_float32: bool
) -> LlamaRunner | HFRunner | None:
    """A runner computing in `candidate`'s precision, or None if this model has no such path.

    `model` holds float32 weights (or already the only candidate's dtype); a float
    candidate that may still fail gets a converted copy, so the next one starts
    from the original weights.
    """
    if candidate.int8 is not None:
        if not supports_fast_runner(model):
            return None
        if config.compile:
            # Compiled, the fbgemm int8 kernels gave other numerics (greedy answers
            # changed from the first token); int8 is CPU-only, where compile measured slower.
            log.warning("--compile is for float dtypes; int8 runs eager")
        try:
            return _int8_runner(model, candidate, config)
        except native_kernels.NativeUnavailable as exc:
            if candidate.int8.native_only:
                raise precision.PrecisionUnavailable(
                    f"--batch-invariant needs the int4 C kernels, which cannot run here: {exc}"
                ) from exc
            log.warning("%s cannot run here: %s; next", candidate.kernels, exc)
            return None
    dtype = candidate.load_dtype
    if isinstance(model, LlamaWeights):
        model = model.to(dtype)  # a copy when the dtype differs
    elif next(model.parameters()).dtype != dtype:
        model = (copy.deepcopy(model) if keep_float32 else model).to(dtype)
    runner = build_runner(model, config.max_context, compile=config.compile)
    if config.compile and not isinstance(runner, LlamaRunner):
        log.warning("--compile applies to the Llama-family runner only; running eager")
    return runner


def _int8_runner(model: Any, candidate: precision.Candidate, config: WorkerConfig) -> Any:
    assert candidate.int8 is not None
    return build_runner(
        model,
        config.max_context,
        int8=candidate.int8,
        calibration=(
            calibration.for_model(config.model_path, candidate.int8)
            if candidate.int8.smooths_down
            else None
        ),
    )
