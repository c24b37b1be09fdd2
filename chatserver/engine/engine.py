"""InferenceEngine: the async front of inference.

It turns chat messages into token ids (in a thread pool), hands sequences to
the worker pool (workers/pool.py: placement by cached prefix, supervision,
restarts), turns the token ids that come back into text (in a lane of its own,
one job per worker step for all its sequences, so prompt work never delays a
token), applies stop strings, and feeds each client's `GenerationStream`.
Workers only ever see token ids.

Public API used by the API layer:

    engine = InferenceEngine(settings, metrics)
    await engine.start()            # loads tokenizer, spawns workers; returns at once
    engine.ready -> bool            # True once every worker has loaded the model
    engine.failure -> str | None    # why a worker could not load the model, if one could not
    stream = await engine.submit(messages, request_params, truncate=True)
        # = ticket = engine.admit()  (ServerBusy before any work when full)
        #   prompt = await engine.chat_prompt(messages, max_tokens, truncate)
        #   engine.generate(prompt, request_params, ticket)
    streams = await engine.submit_many(messages, [params, ...], truncate=False)
        # several generations of one prompt, admitted all or none, on one worker
    async with stream:              # leaving the block early cancels the sequence
        async for delta in stream:  # str text deltas
            ...
    stream.finish_reason            # "stop" | "length" | "cancelled" | "interrupted"
                                    # | "error" | "worker_failed" | "timeout"
    stream.check()                  # GenerationFailed / RequestTimedOut for the last two
    await engine.stop()

Errors are domain errors (``engine/errors.py``, ``limits/admission.ServerBusy``);
the API layer maps them to HTTP and WebSocket answers.

Metrics (chatserver/metrics.py) are observed where the engine already acts:
prompt tokens in generate(), queue time and worker step figures as each
StepOutput arrives, time to first token, inter-token latency and generated
tokens once per delivery, latency and finish reason in _finish.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from chatserver.config import DEFAULT_MODEL_NAME, Settings
from chatserver.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from chatserver.engine.errors import (
    GenerationFailed,
    InvalidGrammar,
    NotReady,
    RequestTimedOut,
    WorkerLost,
    WorkerUnavailable,
)
from chatserver.engine.logprobs import TokenLogprob, TokenTexts
from chatserver.engine.types import Prompt
from chatserver.limits.admission import AdmissionQueue, Ticket
from chatserver.metrics import Metrics
from chatserver.models.loading import ModelSource, load_tokenizer, model_config, resolve_model
from chatserver.models.prompt import build_prompt, warm_up
from chatserver.models.tools import Tool
from chatserver.protocol.sampling import RequestParams
from chatserver.protocol.worker import (
    CancelRequest,
    GenerateRequest,
    GrammarSpec,
    SamplingParams,
    StepOutput,
    WorkerConfig,
    WorkerReady,
    WorkerToServer,
)
from chatserver.workers.pool import WorkerPool, hosts_for

log = logging.getLogger(__name__)
T = TypeVar("T")

_END = object()

# Steps of at most this many tokens are detokenized on the event loop: tens of
# microseconds, less than the two thread hand-offs of the detokenize lane,
# each of which wakes a thread on cores the workers' GEMMs are using (at one
# stream, a token's whole server-side path). Larger batches go to the lane.
INLINE_DECODE_TOKENS = 16


def _device_memory(device: str) -> int:
    """Bytes of memory on `device` that KV caches share: RAM for the CPU, else the GPU's."""
    if device.startswith("cuda"):
        import torch

        try:
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
        except (AssertionError, RuntimeError):  # no such device: the worker will say so
            return 0  # no budget (kv_cache_for's slot cap alone)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


CancelCallback = Callable[["GenerationStream", bool, str], None]


class GenerationStream:
    """One sequence's text as it is generated; iterate for deltas.

    It knows nothing of the engine: how to stop its sequence comes in as a
    callback, so the API layer can hold streams (and tests can make them)
    without an engine behind them.
    """

    def __init__(
        self,
        seq_id: int,
        prompt: Prompt,
        stops: tuple[str, ...],
        ticket: Ticket,
        *,
        tokenizer: Any,
        cancel: CancelCallback,
        request_timeout: float = 0.0,
    ):
        """``cancel(stream, client_gone, reason)`` stops its sequence wherever it runs."""
        self.id = uuid.uuid4().hex
        self.seq_id = seq_id
        self.worker_id = -1
        self.prompt_tokens = len(prompt.ids)
        self.cached_tokens = 0  # of the prompt's, found in the worker's prefix cache
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self.created = time.time()
        self.started_at = time.monotonic()  # generate(): where latencies start
        self.scheduled = False  # a worker step has taken it into its batch
        self.last_token_at = 0.0  # when its latest tokens were delivered; 0: none yet
        self._cancel_sequence = cancel
        self.request_timeout = request_timeout
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stops)
        self.ticket = ticket
        self.prompt_ids = prompt.ids
        self.output_ids: list[int] = []  # as the worker sampled them (for prefix affinity)
        self.prompt_hashes: list[int] = []  # the prompt's block hashes, when placement used them
        self.deadline: asyncio.TimerHandle | None = None
        self.request: GenerateRequest | None = None  # as sent to its worker
        # One entry per generated token (end tokens left out), when the request
        # asked for logprobs; filled as its text is, so a reader that has seen a
        # delta has its tokens' entries (engine/logprobs.py).
        self.logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _push(self, text: str) -> None:
        if text:
            self.text += text
            self._queue.put_nowait(text)

    def _finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._queue.put_nowait(_END)

    def cancel(self, client_gone: bool = False) -> None:
        """Stop generating; the stream ends with finish_reason 'cancelled'.

        ``client_gone``: the client disconnected (not an explicit cancel), which
        requests_dropped_total counts.
        """
        self._cancel_sequence(self, client_gone, "cancelled")

    def interrupt(self) -> None:
        """Stop generating because the server stops: finish_reason 'interrupted'.

        Not 'stop' nor 'cancelled': the reply was cut short by the server, not
        finished by the model or dropped by its client.
        """
        self._cancel_sequence(self, False, "interrupted")

    def check(self) -> None:
        """Raise the domain error of a reply that did not end as a reply should.

        The one place that decides which finish reasons are failures: 'stop',
        'length', 'cancelled' and 'interrupted' are replies (the last two
        partial); 'error', 'worker_failed' and 'timeout' are not.
        """
        if self.finish_reason == "error":
            raise GenerationFailed()
        if self.finish_reason == "worker_failed":
            raise WorkerLost()
        if self.finish_reason == "timeout":
            raise RequestTimedOut(self.request_timeout)

    async def with_keepalive(self, interval: float) -> AsyncIterator[str | None]:
        """The deltas, with None after each ``interval`` seconds without one (0: never).

        Streaming transports turn a None into a keep-alive (an SSE comment) so
        that proxies do not cut a request that is waiting for a running slot.
        """
        while True:
            try:
                if interval > 0:
                    async with asyncio.timeout(interval):
                        delta = await self.__anext__()
                else:
                    delta = await self.__anext__()
            except TimeoutError:
                yield None
                continue
            except StopAsyncIteration:
                return
            yield delta

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later iterations end at once too
            raise StopAsyncIteration
        # A consumer that fell behind (slow socket, busy loop) takes all the text
        # queued so far as one delta: fewer frames to send, the same text.
        while not self._queue.empty():
            more = self._queue.get_nowait()
            if more is _END:
                self._queue.put_nowait(_END)
                break
            item += more
        return item

    async def collect(self) -> str:
        async for _ in self:
            pass
        return self.text

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if not self.finished:
            # Left by a cancelled handler (aiohttp cancels it when its client
            # disconnects) or a broken connection: the client went away.
            gone = exc_type is not None and issubclass(
                exc_type, asyncio.CancelledError | ConnectionError
            )
            self.cancel(client_gone=gone)


class InferenceEngine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.tokenizer: Any = None
        self._token_texts: TokenTexts | None = None  # for logprobs, made on first use
        self._grammar_compiler: Any = None  # workers/grammar.py's, made on first check
        self.max_token_chars = 0
        self.model_id = ""
        self.max_context = settings.max_context
        self.engine_kind = ""
        self.device = ""
        self.dtype = ""
        self.precision: dict[str, Any] = {}
        self.stop_token_ids: tuple[int, ...] = ()
        self.default_temperature = 0.0
        self.default_top_p = 1.0
        self.default_top_k = 0
        self._executor = ThreadPoolExecutor(
            settings.tokenizer_threads, thread_name_prefix="tokenizer"
        )
        # Detokenizing is on every stream's critical path: its own lane, so prompt
        # work (a 1 MiB message, a 150-turn history) never queues in front of it.
        self._detokenize = ThreadPoolExecutor(1, thread_name_prefix="detokenize")
        self.max_running = settings.max_running or settings.max_batch
        self.pool = WorkerPool(
            max_running=self.max_running,
            prefix_cache=settings.prefix_cache,
            restart_delay=settings.worker_restart_delay,
            metrics=self.metrics,
        )
        self._streams: dict[int, GenerationStream] = {}
        self._outputs: dict[int, asyncio.Queue[StepOutput]] = {}
        self._pumps: list[asyncio.Task] = []
        self._seq_ids = itertools.count(1)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._source: ModelSource | None = None
        self._model_config: dict[str, Any] = {}  # the model's config.json
        self._admission = AdmissionQueue(max(0, settings.max_queue))
        self._scheduled = 0  # live streams some worker step has taken into its batch
        self.metrics.read_gauges(
            running=lambda: self._scheduled,
            waiting=lambda: len(self._streams) - self._scheduled,
            kv_cache_usage=self.pool.kv_cache_usage,
        )

    # --- lifecycle ---------------------------------------------------------
    @property
    def ready(self) -> bool:
        """At least one worker serves: requests go to the ready ones while others reload."""
        return self.pool.ready and not self._stopping

    @property
    def failure(self) -> str | None:
        """Why a worker could not load the model, while none serves again."""
        return self.pool.failure

    @property
    def fatal(self) -> asyncio.Event:
        """Set when a worker cannot load and retrying cannot help: the server exits."""
        return self.pool.fatal

    def worker_states(self) -> list[dict[str, Any]]:
        """Each worker's state for /readyz: ready, loading, or restarting (and when)."""
        return self.pool.states()

    @property
    def running_slots(self) -> int:
        """Sequences the ready workers decode at once; admitted requests beyond wait."""
        return len(self.pool.ready_ids) * self.max_running

    def load(self) -> dict[str, int]:
        """Admitted requests, the running slots and the queue bound, for /readyz and metrics."""
        slots = self.running_slots
        return {
            "admitted": self._admission.admitted,
            "waiting": self._admission.waiting(slots),
            "running_slots": slots,
            "max_queue": self._admission.max_queue,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "engine": self.engine_kind,
            "device": self.device,
            "dtype": self.dtype,
            "precision": self.precision,
            "workers": len(self.pool.hosts),
            "workers_ready": len(self.pool.ready_ids),
            "max_context": self.max_context,
            "failure": self.failure,
        }

    def kv_cache_usage(self) -> float:
        return self.pool.kv_cache_usage()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        s = self.settings
        self._source = resolve_model(s.model, s.models_dir, DEFAULT_MODEL_NAME)
        self.model_id = self._source.model_id
        # Workers spawn before the tokenizer loads, whose transformers import then
        # runs beside the workers' torch import and weights: `python -m
        # load_tests.startup --runs 5` against the commit before, 2-core AMD EPYC
        # (torch capability AVX512, VNNI avx512_vnni), float32 4.83 -> 3.62 s to
        # ready (README, "Server start"; int8's parallel packing in the same run).
        configs = await self._loop.run_in_executor(self._executor, self._worker_configs)
        if s.max_queue < 0:
            self._admission.max_queue = 2 * len(configs) * self.max_running
        hosts = hosts_for(self.engine_kind, configs)
        for wid in hosts:
            self._outputs[wid] = asyncio.Queue()
            self._pumps.append(asyncio.create_task(self._pump(wid)))
        self.pool.start(
            self._loop, hosts, self._on_message, self._reroute_or_fail, s.worker_stall_timeout
        )
        await self._loop.run_in_executor(self._executor, self._load_tokenizer)
        log.info(
            "engine %s: %d worker(s), model %s on %s (%s), context %d",
            self.engine_kind,
            len(hosts),
            self.model_id,
            self.device,
            self.dtype,
            self.max_context,
        )

    def _load_tokenizer(self) -> None:
        from transformers import GenerationConfig

        assert self._source is not None
        self.tokenizer = load_tokenizer(self._source)
        # A token decodes to at most this many characters: the cheap bound
        # build_prompt checks before tokenizing anything.
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=0)
        try:
            warm_up(self.tokenizer)
        except Exception as exc:  # a request will meet it again, and be told
            log.warning("building a first prompt at start failed: %s", exc)
        config = self._model_config  # read by _worker_configs, which ran first
        try:
            gen = GenerationConfig.from_pretrained(self._source.path)
        except OSError:
            gen = GenerationConfig()
        eos = gen.eos_token_id if gen.eos_token_id is not None else config.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.stop_token_ids = tuple(sorted(eos_ids))
        if gen.do_sample:
            self.default_temperature = gen.temperature if gen.temperature is not None else 1.0
            self.default_top_p = gen.top_p if gen.top_p is not None else 1.0
            self.default_top_k = gen.top_k or 0

    def _worker_configs(self) -> list[WorkerConfig]:
        from chatserver.workers.devices import resolve_device

        s = self.settings
        assert self._source is not None
        self._model_config = model_config(self._source)
        model_ctx = self._model_config.get("max_position_embeddings") or s.max_context
        self.max_context = min(s.max_context, model_ctx)
        device = resolve_device(s.device)
        kind = s.engine
        if kind == "auto":
            kind = "gpu" if device.startswith("cuda") else "pool"
        if kind == "pool":
            device = "cpu" if s.device == "auto" else device
        cpus = os.cpu_count() or 1
        devices = [device]
        if kind == "gpu" and device == "cuda":
            import torch

            # One worker process owns each visible GPU (--device cuda:N picks one).
            devices = [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]
        if kind == "pool":
            devices = [device] * (s.workers or max(1, cpus // 2))
        count = len(devices)
        threads = s.threads_per_worker or max(1, cpus // count)
        if kind == "ray":
            from chatserver.workers import ray_worker

            ray = ray_worker.configure(
                s.ray_address,
                s.ray_workers,
                s.ray_cpus_per_worker,
                s.ray_gpus_per_worker,
                s.ray_share,
            )
            device, devices, threads = ray.device, [ray.device] * ray.workers, ray.threads
        # "auto" until a worker reports what its quality gate chose.
        self.engine_kind, self.device, self.dtype = kind, device, s.dtype
        return [
            WorkerConfig(
                model_path=self._source.path,
                model_id=self.model_id,
                device=worker_device,
                dtype=s.dtype,
                max_context=self.max_context,
                max_batch=self.max_running,
                prefill_chunk=s.prefill_chunk,
                threads=threads,
                nice=5 if device == "cpu" and kind in ("gpu", "pool") else 0,
                compile=s.compile,
                int8_kernels=s.int8_kernels,
                cpu_isa=s.cpu_isa,
                skip_quality_gate=s.skip_quality_gate,
                quality_max_ppl_ratio=s.quality_max_ppl_ratio,
                quality_min_top1=s.quality_min_top1,
                kv_cache_bytes=s.kv_cache_budget(
                    _device_memory(worker_device),
                    devices.count(worker_device),
                    gpu=worker_device.startswith("cuda"),
                ),
                prefix_cache=s.prefix_cache,
                batch_invariant=s.batch_invariant,
            )
            for worker_device in devices
        ]

    async def stop(self) -> None:
        self._stopping = True
        for stream in list(self._streams.values()):
            self._finish(stream, "cancelled")
        await self.pool.stop()
        for task in self._pumps:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._detokenize.shutdown(wait=False, cancel_futures=True)

    # --- requests ------------------------------------------------------------
    def admit(self) -> Ticket:
        """A place in the engine for one request, or ServerBusy; taken before any work."""
        return self.admit_many(1)[0]

    def admit_many(self, count: int) -> list[Ticket]:
        """Places for ``count`` generations of one request, all or none (ServerBusy)."""
        if not self.pool.ready_ids or self._stopping:
            raise self._unavailable()
        return self._admission.admit_many(self.running_slots, count)

    @property
    def capacity(self) -> int:
        """The most generations admitted at once with every worker serving (0: not started)."""
        if not self.pool.hosts:
            return 0
        return len(self.pool.hosts) * self.max_running + self._admission.max_queue

    def _unavailable(self) -> Exception:
        """Why no worker takes a request: still loading (NotReady), or restarting."""
        wait = self.pool.restart_wait()
        if wait is not None and not self._stopping:
            # A restarted worker loads the model again before it serves.
            return WorkerUnavailable(retry_after=wait + 5.0)
        return NotReady(self.failure or "the model workers are not ready yet")

    async def submit(
        self,
        messages: list[dict[str, Any]],
        req: RequestParams,
        truncate: bool,
        tools: Sequence[Tool] = (),
    ) -> GenerationStream:
        """Admit, build the prompt and start generating: the one way requests enter.

        Raises ServerBusy before the prompt is rendered or tokenized, NotReady,
        or the prompt's own errors (context too long, bad messages).
        """
        (stream,) = await self.submit_many(messages, [req], truncate, tools)
        return stream

    async def submit_many(
        self,
        messages: list[dict[str, Any]],
        reqs: Sequence[RequestParams],
        truncate: bool,
        tools: Sequence[Tool] = (),
    ) -> list[GenerationStream]:
        """submit() for several generations of one prompt (an OpenAI request's ``n``
        choices): admitted all or none, the prompt built once, see generate_many.
        ``max_tokens`` is the first request's (the prompt's room for a reply)."""
        tickets = self.admit_many(len(reqs))
        try:
            prompt = await self.chat_prompt(messages, reqs[0].max_tokens, truncate, tools)
            return self.generate_many(prompt, reqs, tickets)
        except BaseException:
            for ticket in tickets:
                ticket.release()
            raise

    async def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int | None,
        truncate: bool = True,
        tools: Sequence[Tool] = (),
    ) -> Prompt:
        if self.tokenizer is None:
            raise NotReady("the model is still loading")
        wanted = max_tokens or self.settings.default_max_tokens
        return await self.run_in_tokenizer_pool(
            build_prompt,
            self.tokenizer,
            messages,
            wanted,
            self.max_context,
            truncate,
            self.max_token_chars,
            tools,
        )

    async def check_grammar(self, spec: GrammarSpec) -> None:
        """Raise InvalidGrammar unless ``spec`` compiles against this model's vocabulary.

        In the tokenizer pool (a first call builds the grammar tokenizer, ~0.5 s);
        the API calls it before submitting, so a bad schema is a 400, not a failed
        generation.
        """
        if self.tokenizer is None:
            raise NotReady("the model is still loading")
        await self.run_in_tokenizer_pool(self._check_grammar, spec)

    def _check_grammar(self, spec: GrammarSpec) -> None:
        from chatserver.workers.grammar import GrammarCompiler, GrammarError

        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(self.tokenizer)
        try:
            self._grammar_compiler.check(spec)
        except GrammarError as exc:
            raise InvalidGrammar(str(exc)) from None

    async def run_in_tokenizer_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run prompt work (templating, tokenizing) in the tokenizer threads, off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def sampling_params(self, prompt: Prompt, req: RequestParams) -> SamplingParams:
        wanted = req.max_tokens or self.settings.default_max_tokens
        return SamplingParams(
            max_tokens=max(1, min(wanted, prompt.max_new_tokens)),
            temperature=self.default_temperature if req.temperature is None else req.temperature,
            top_p=self.default_top_p if req.top_p is None else req.top_p,
            top_k=self.default_top_k if req.top_k is None else req.top_k,
            seed=req.seed,
            stop_token_ids=() if req.ignore_eos else self.stop_token_ids,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias,
            grammar=req.grammar,
            logprobs=req.logprobs,
        )

    def generate(
        self, prompt: Prompt, req: RequestParams, ticket: Ticket | None = None
    ) -> GenerationStream:
        """Hand a prompt to a ready worker, see pool.place (``ticket``: from admit())."""
        if not self.pool.serving():
            raise self._unavailable()
        return self.generate_many(prompt, [req], [ticket or self.admit()])[0]

    def generate_many(
        self, prompt: Prompt, reqs: Sequence[RequestParams], tickets: Sequence[Ticket]
    ) -> list[GenerationStream]:
        """One sequence per request (and ticket, from admit_many()), all on the same
        worker: sent together, its scheduler prefills their shared prompt once
        (scheduler._prefix_in_flight) where several workers would each compute it."""
        serving = self.pool.serving()
        if not serving:
            raise self._unavailable()
        worker_id, hashes = self.pool.place(prompt.ids, serving)
        return [
            self._start(prompt, req, ticket, worker_id, hashes)
            for req, ticket in zip(reqs, tickets, strict=True)
        ]

    def _start(
        self, prompt: Prompt, req: RequestParams, ticket: Ticket, worker_id: int, hashes: list[int]
    ) -> GenerationStream:
        seq_id = next(self._seq_ids)
        stream = GenerationStream(
            seq_id,
            prompt,
            req.stop,
            ticket,
            tokenizer=self.tokenizer,
            cancel=self._cancel,
            request_timeout=self.settings.request_timeout,
        )
        timeout = self.settings.request_timeout
        if timeout > 0 and self._loop is not None:
            # Time in the queue counts: the deadline runs from admission.
            when = self._loop.time() + timeout - (time.monotonic() - ticket.admitted_at)
            stream.deadline = self._loop.call_at(when, self._expire, stream)
        stream.worker_id, stream.prompt_hashes = worker_id, hashes
        self._streams[seq_id] = stream
        self.metrics.prompt_tokens.inc(stream.prompt_tokens)
        if req.logprobs is not None:
            stream.logprobs = []
        stream.request = GenerateRequest(seq_id, prompt.ids, self.sampling_params(prompt, req))
        self.pool.assign(worker_id, stream.request)
        return stream

    def _cancel(
        self, stream: GenerationStream, client_gone: bool = False, reason: str = "cancelled"
    ) -> None:
        if stream.finished:
            return
        if client_gone:
            self.metrics.requests_dropped.inc()
        self.pool.send(stream.worker_id, CancelRequest(stream.seq_id))
        self._finish(stream, reason)

    def _expire(self, stream: GenerationStream) -> None:
        """--request-timeout passed: take the sequence out of its worker's queue or batch."""
        if stream.finished:
            return
        log.warning("request %s timed out after %gs", stream.id, self.settings.request_timeout)
        self.pool.send(stream.worker_id, CancelRequest(stream.seq_id))
        self._finish(stream, "timeout")

    def _finish(self, stream: GenerationStream, reason: str) -> None:
        if self._streams.pop(stream.seq_id, None) is not None:
            self.pool.release(stream.worker_id)
            if stream.scheduled:
                self._scheduled -= 1
            self.metrics.e2e_request_latency.observe(time.monotonic() - stream.started_at)
            self.metrics.request_success.labels(reason).inc()
            if reason in ("stop", "length", "cancelled") and stream.scheduled:
                self.pool.remember_blocks(
                    stream.worker_id, stream.prompt_hashes, stream.prompt_ids + stream.output_ids
                )
        if stream.deadline is not None:
            stream.deadline.cancel()
        stream.ticket.release(completed=reason in ("stop", "length"))
        stream._finish(reason)

    # --- worker output -----------------------------------------------------------
    def _on_message(self, msg: WorkerToServer) -> None:
        if isinstance(msg, StepOutput):
            self._observe_step(msg)
            self._outputs[msg.worker_id].put_nowait(msg)
        elif isinstance(msg, WorkerReady):
            log.info(
                "worker %d ready: %s on %s (%s, kernels %s, %s)",
                msg.worker_id,
                msg.model_id,
                msg.device,
                msg.dtype,
                msg.kernels,
                msg.runner,
            )
            self.dtype = msg.dtype
            self.precision = {
                "dtype": msg.dtype,
                "kernels": msg.kernels,
                "device": msg.device,
                "runner": msg.runner,
                **msg.cpu,
                "quality_gate": list(msg.quality_gate),
            }

    def _observe_step(self, out: StepOutput) -> None:
        """A worker step's own figures, and the end of the queue time of what it scheduled."""
        metrics = self.metrics
        if not out.batch_size:
            return
        metrics.worker_step.observe(out.step_seconds)
        if out.grammar_seconds:
            metrics.grammar_seconds.inc(out.grammar_seconds)
        metrics.batch_size.observe(out.batch_size)
        # The step began step_seconds before its output arrived (less the pipe's delay).
        step_began = time.monotonic() - out.step_seconds
        for seq_id, cached in out.started:
            stream = self._streams.get(seq_id)
            if stream is not None and not stream.scheduled:
                stream.cached_tokens = cached
                stream.scheduled = True
                self._scheduled += 1
                metrics.request_queue_time.observe(max(0.0, step_began - stream.started_at))

    def _reroute_or_fail(self, dead: int) -> None:
        """The dead worker's sequences: those it never scheduled go to a live worker
        (nothing was generated for them, so nothing is lost or repeated); the rest
        end with 'worker_failed'."""
        others = self.pool.serving(excluding=dead)
        for stream in [s for s in self._streams.values() if s.worker_id == dead]:
            if others and not stream.scheduled and stream.request is not None:
                target = min(others, key=lambda w: self.pool.load[w])
                self.pool.release(dead)
                stream.worker_id = target
                self.pool.assign(target, stream.request)
            else:
                self._finish(stream, "worker_failed")

    async def _pump(self, worker_id: int) -> None:
        """Detokenize one worker's steps in order and deliver them: a few tokens on
        the loop, more in the detokenize lane (see INLINE_DECODE_TOKENS)."""
        queue = self._outputs[worker_id]
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if sum(len(out.tokens) for out in batch) <= INLINE_DECODE_TOKENS:
                events = self._decode_steps(batch)
            else:
                try:
                    events = await loop.run_in_executor(self._detokenize, self._decode_steps, batch)
                except RuntimeError:  # executor shut down
                    return
            self._deliver(events)

    def _decode_steps(self, batch: list[StepOutput]) -> list[tuple]:
        """Thread-pool side: token ids -> text for every sequence in these steps."""
        events: list[tuple] = []
        for out in batch:
            per_seq: dict[int, list[int]] = {}
            for seq_id, token in out.tokens:
                per_seq.setdefault(seq_id, []).append(token)
            entries = self._logprob_entries(out) if out.logprobs else {}
            for seq_id, tokens in per_seq.items():
                stream = self._streams.get(seq_id)
                if stream is None or stream.finished:
                    continue
                stream.output_ids.extend(tokens)
                text, stopped = stream.matcher.feed(stream.detokenizer.add(tokens))
                events.append(
                    ("tokens", stream, text, len(tokens), stopped, entries.get(seq_id, ()))
                )
            for seq_id, reason in out.finished:
                stream = self._streams.get(seq_id)
                if stream is not None:
                    events.append(("finish", stream, stream.matcher.flush(), reason))
        return events

    def _logprob_entries(self, out: StepOutput) -> dict[int, list[TokenLogprob]]:
        """A step's logprobs by sequence, with their tokens' text; end tokens left out
        (their text is never part of the reply)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        entries: dict[int, list[TokenLogprob]] = {}
        for seq_id, token, logprob, top in out.logprobs:
            stream = self._streams.get(seq_id)
            if stream is None or stream.request is None:
                continue
            if token in stream.request.params.stop_token_ids:
                continue
            entry = self._token_texts.entry(token, logprob, top)
            entries.setdefault(seq_id, []).append(entry)
        return entries

    def _deliver(self, events: list[tuple]) -> None:
        metrics = self.metrics
        now = time.monotonic()
        generated = 0
        for event in events:
            stream = event[1]
            if stream.finished:
                continue
            if event[0] == "tokens":
                _, _, text, count, stopped, entries = event
                if entries and stream.logprobs is not None:
                    stream.logprobs.extend(entries)
                stream.completion_tokens += count
                generated += count
                if stream.last_token_at:
                    metrics.inter_token_latency.observe((now - stream.last_token_at) / count)
                else:
                    metrics.time_to_first_token.observe(now - stream.started_at)
                stream.last_token_at = now
                stream._push(text)
                if stopped:
                    self.pool.send(stream.worker_id, CancelRequest(stream.seq_id))
                    self._finish(stream, "stop")
            else:
                _, _, text, reason = event
                stream._push(text)
                self._finish(stream, reason)
        if generated:
            metrics.generation_tokens.inc(generated)
