"""RayWorker: a WorkerCore inside a Ray actor, so workers can run across a cluster.

`--engine ray` gives the engine the same `WorkerHost` it gets from
`process.ProcessWorker`; only where the decoding loop runs changes. The actor
(`WorkerActor`) runs the loop of `process.worker_main` in a thread of its own;
two concurrency groups serve the host beside it, so neither waits behind a
decoding step:

* ``control``: `send(batch)` puts requests and cancels on the loop's inbox;
  the loop drains it between steps, so a `CancelRequest` lands within one step;
* ``output``: `outputs()`, one call for the actor's life, streams back every
  message the loop queued (below).

How step outputs come back, measured with load_tests/ray_transport.py (a fake
step loop sleeping --step-ms, StepOutputs of 1 or 16 tokens, local Ray of 2
CPUs; busy shared 2-core AMD EPYC AVX512, two runs):

=========================  ================  ===============  ==============
per step                    (a) generator     (b) polled       chosen: queue
                            yields each step  queue            + generator
=========================  ================  ===============  ==============
steps/s, 5 ms steps (200)   165-176           191-196          193-194
steps/s, 20 ms steps (50)   46-48             49-50            49
latency p50 / p99           0.7-1.2 / 2-7 ms  0.8-1.6 / 2-9 ms 0.9-1.3 / 4-6 ms
actor CPU per 20 ms step    1.3-1.6 ms        1.7-2.3 ms       1.4 ms
most steps/s (0 ms steps)   2,300-3,400       50,000+ batched  490,000+ batched
=========================  ================  ===============  ==============

(a) an actor method returning a Ray streaming generator (``num_returns=
"streaming"``) that yields from the decoding loop itself reports each output
from inside the yield: ~1 ms of every step is Ray's, on the loop's thread,
before the next step may start (5-6 % of a 20 ms step). (b) an actor-side
queue drained by a polling call frees the loop (one ``queue.put``, ~10 µs)
but pays a request and a reply per batch, and a call a second when idle.
Chosen: both halves' good parts. The loop puts outputs on a queue; `outputs()`
is a streaming generator, in its own thread, that yields whatever the queue
holds as one list: the loop keeps its pace, one report per batch (never per
token), steps that piled up while one report was in flight travel together,
and an idle worker costs nothing (the generator blocks on the queue).

Supervision is the engine's (workers/pool.py), exactly as for a process: the
actor is created with ``max_restarts=0``; when it dies (`ray.kill`, its
process killed, its node lost) its `outputs()` stream raises `RayActorError`,
the host calls ``on_exit`` like a dead process's reader, its sequences fail with
``worker_failed``, and the pool builds a new `RayWorker` (a new actor, placed
by Ray on a node that is alive) after its usual delay while the others serve.
Ray restarting the actor itself would load a second copy of the model behind
the pool's back and hide the death from its backoff and /readyz.

Placement: an actor asks for ``--ray-cpus-per-worker`` CPUs and
``--ray-gpus-per-worker`` GPUs. When a worker needs more than one unit (a GPU
and CPUs, or several CPUs), the engine's workers share one placement group
with a bundle per worker and the SPREAD strategy, so each worker's resources
are reserved together on one node and workers go to different nodes where
they can; a one-CPU worker is an actor scheduled with "SPREAD". A SPREAD
placement group is placed whole: a cluster that cannot hold every worker's
bundle starts none (a warning says so after PLACEMENT_WARN_S).

What Ray costs here (busy shared 2-core AMD EPYC AVX512): a local instance
starts in 9-11 s (`ray.init`, before the model loads; the server serves
/healthz meanwhile and /readyz says loading), and idles at ~3 % of one core
(GCS, raylet and agents) where a process worker idles at 0.2 %.

Sharing (``--ray-share NAME``, with ``--ray-address``): instances that pass
the same NAME use the same workers. Worker i is the named, detached actor
``chatserver-share-NAME-worker-i``, created by whichever instance comes first
(``get_if_exists``: Ray settles a race between two creators) and attached by
the others; no placement group (an instance's group would take the actor with
it when that instance ends), the actor asks for its resources with "SPREAD".
Each instance `attach`es as a client: its own `outputs(client)` stream (one
thread of the ``output`` group each, so at most MAX_CLIENTS instances a
worker), its own `send(client, batch)`. Sequence ids cannot collide because
the actor numbers sequences itself: `send` maps each client's (client,
seq_id) to the actor's next id, the decoding loop only ever sees the actor's
ids, and each step's output is split by that map into one StepOutput per
client, in the client's own ids. Chosen over giving each client the high bits
of the engine's ids: no bound on how the engine counts, the engine and
WorkerCore stay unchanged, and the actor needs the per-client table of live
sequences anyway, to cancel a departed client's work. A client hears of every
step while it has sequences in the actor, even steps that ran only other
instances' sequences: its stall watchdog sees the worker progress.

A stopping instance `detach`es: its sequences are cancelled in the actor and
its stream ends; the actor serves on. A vanished one (killed, its node lost)
cannot say so, and Ray does not tell the actor: a streaming generator whose
caller died keeps running (a detached actor's generator still yielded 35 s
after its driver was SIGKILLed, Ray 2.60), and a driver's job state is only
in the dashboard's State API or private GCS calls. So a lease: every `send`
renews its client's, an idle instance's writer sends an empty batch every
HEARTBEAT_S, and a client silent for LEASE_S is detached by the actor. An
instance whose lease lapsed (paused for LEASE_S) finds its stream ended and
its next send refused, fails its sequences with ``worker_failed`` and
attaches again, like a restarted worker. An instance that stops or dies
never kills a shared actor; its death (or the stall watchdog's `kill`, which
stops the worker for every instance, as it is stuck for every instance) is
seen by every attached instance as above, each fails its own sequences and
restarts the worker, and ``get_if_exists`` makes the first one create the
new actor and the rest attach. Every `send`'s reply carries the actor's
totals (instances attached, sequences held), so /readyz shows them beside
this instance's own ``generations``; the ``kv_cache`` figures are the
actor's, all instances together. The first instance's WorkerConfig loads
the model; one asking for another model, dtype or context is refused at
attach (fatal: the server exits saying why).

Ray Client (``ray://``) is refused at startup (Settings.check_ray): its
worker (ray/util/client/worker.py, Ray 2.60) raises "Streaming actor methods
(num_returns="streaming") are not currently supported when using Ray Client"
for any streaming call, and `outputs()` is one (tried: `ray start --head
--ray-client-server-port`, ray.init("ray://..."), a plain actor call
answers, a streaming one raises that RuntimeError).

A cluster in Ray's token mode (RAY_AUTH_MODE=token; `ray start` turns it on
by itself where ~/.ray/auth_token exists) refuses a driver without its token
with a bare "Failed to connect": the server adds what to set
(`_with_auth_hint`). ray.init takes SIGTERM from Python (absl's failure
signal handler); `_restore_signal_handlers` gives it back, so a SIGTERM'd
server still shuts down gracefully and, shared, detaches.

The model: the actor loads ``WorkerConfig.model_path`` on its node. A local
directory must be at the same absolute path on every node (a shared mount,
or the same image); a hub id is resolved by each node (its own hub cache).
A node that lacks the path fails to load with a message naming the node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from chatserver.protocol.worker import (
    CancelRequest,
    GenerateRequest,
    ServerToWorker,
    Shutdown,
    StepOutput,
    WorkerConfig,
    WorkerFailed,
    WorkerToServer,
)
from chatserver.workers import cpu_features

log = logging.getLogger(__name__)

NAMESPACE = "chatserver"
# Step outputs are a few hundred bytes and inlined in RPCs: the object store
# holds nothing of ours. Ray's default would take 30 % of RAM.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
PLACEMENT_WARN_S = 30.0
CONNECT_TIMEOUT_S = 60.0  # a local start takes ~10 s on a busy 2-core machine
# Sharing (module docstring): the most instances one worker serves (an
# ``output`` thread each), how often an idle instance renews its lease, and
# how long a silent one keeps it.
MAX_CLIENTS = 16
HEARTBEAT_S = 2.0
LEASE_S = 10.0
# What an attaching instance must agree on with the config that loaded the model.
SHARED_CONFIG_FIELDS = ("model_id", "model_path", "device", "dtype", "max_context")


def shared_actor_name(share: str, worker_id: int) -> str:
    """Worker ``worker_id`` of the instances sharing ``share`` (--ray-share)."""
    return f"chatserver-share-{share}-worker-{worker_id}"


@dataclass
class RayCluster:
    """The Ray cluster this server's workers run on, and what each worker asks of it.

    Ray's connection is per process (`ray.init` once), so one of these is
    configured per server process (`configure`); every RayWorker, restarted
    ones included, places its actor through it.
    """

    address: str = ""  # empty: start a local Ray instance
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    share: str = ""  # --ray-share: the name of the workers shared with other instances
    # Distinguishes this server's actors from other servers' on one cluster.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    start_seconds: float = 0.0  # how long ray.init took
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _group: PlacementGroup | None = field(default=None, repr=False)
    _failure: BaseException | None = field(default=None, repr=False)

    @property
    def shared(self) -> bool:
        return bool(self.share)

    @property
    def device(self) -> str:
        """The torch device inside an actor: Ray sets CUDA_VISIBLE_DEVICES to its GPUs."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    @property
    def threads(self) -> int:
        return max(1, math.ceil(self.cpus_per_worker))

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    @property
    def needs_group(self) -> bool:
        """More than one unit of resources per worker: reserve them together."""
        return sum(self.bundle.values()) > 1

    def connect(self) -> None:
        """Join the cluster at `address`, or start a small local Ray; once a process.

        `ray.init` runs in a thread that lives as long as the process: a local
        Ray's processes are started with PR_SET_PDEATHSIG, so they are killed
        when the *thread* that started them ends (a host's reader, say, when
        its actor dies), which would take the whole local cluster down.
        """
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if ray.is_initialized():
                return
            done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
            threading.Thread(target=self._own_ray, args=(done,), name="ray", daemon=True).start()
            try:
                # Ray retries an unreachable address for good: say so instead.
                failure = done.get(timeout=CONNECT_TIMEOUT_S)
            except queue.Empty:
                failure = TimeoutError(
                    f"no Ray cluster answered at {self.address or 'the local instance'} "
                    f"within {CONNECT_TIMEOUT_S:.0f} s"
                )
            if failure is not None:
                self._failure = failure
                raise failure

    def _own_ray(self, done: queue.SimpleQueue[BaseException | None]) -> None:
        started = time.perf_counter()
        common: dict[str, Any] = {
            "namespace": NAMESPACE,
            "log_to_driver": True,
            "configure_logging": False,
        }
        try:
            if self.address:
                ray.init(address=self.address, **common)
                where = f"joined the Ray cluster at {self.address}"
            else:
                cpus = max(os.cpu_count() or 1, math.ceil(self.workers * self.cpus_per_worker))
                ray.init(
                    address="local",  # never RAY_ADDRESS: --ray-address decides
                    num_cpus=cpus,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    **common,
                )
                where = f"started a local Ray instance ({cpus} CPUs)"
        except BaseException as exc:
            done.put(_with_auth_hint(exc) if self.address else exc)
            return
        self.start_seconds = time.perf_counter() - started
        log.info("%s in %.1f s", where, self.start_seconds)
        done.put(None)
        threading.Event().wait()  # the process's life: see connect()

    def _placement(self) -> PlacementGroup:
        with self._lock:
            if self._group is None:
                self._group = placement_group(
                    [self.bundle] * self.workers,
                    strategy="SPREAD",
                    name=f"chatserver-{self.instance}",
                )
                ready, _ = ray.wait([self._group.ready()], timeout=PLACEMENT_WARN_S)
                if not ready:
                    log.warning(
                        "Ray placement group of %d x %s still pending after %.0f s: the "
                        "cluster cannot hold every worker; workers start once it can",
                        self.workers,
                        self.bundle,
                        PLACEMENT_WARN_S,
                    )
            return self._group

    def spawn(self, worker_id: int, config: WorkerConfig) -> Any:
        """Create worker ``worker_id``'s actor (connecting first if need be); shared:
        find it, or create it if no instance has yet."""
        self.connect()
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
            "max_restarts": 0,  # the pool restarts workers (module docstring)
            "namespace": NAMESPACE,
        }
        args = (worker_id, config, logging.getLogger().level, self.shared)
        env = cpu_features.isa_env(config.cpu_isa)
        if env:  # before the actor's interpreter imports torch, on whichever node
            options["runtime_env"] = {"env_vars": env}
        if self.shared:
            # No placement group: an instance's group would end the actor with it.
            options.update(
                name=shared_actor_name(self.share, worker_id),
                lifetime="detached",
                get_if_exists=True,
                scheduling_strategy="SPREAD",
            )
            return WorkerActor.options(**options).remote(*args)
        options["name"] = f"chatserver-{self.instance}-worker-{worker_id}-{uuid.uuid4().hex[:6]}"
        if self.needs_group:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._placement(), placement_group_bundle_index=worker_id % self.workers
            )
        else:
            options["scheduling_strategy"] = "SPREAD"
        return WorkerActor.options(**options).remote(*args)


def _with_auth_hint(exc: BaseException) -> BaseException:
    """``exc``, or, when the cluster refused this driver's token, an error saying what
    to set: Ray's own ends in a "Failed to connect" that hides the cause."""
    cause: BaseException | None = exc
    while cause is not None:
        if type(cause).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(cause):
            hint = ConnectionError(
                f"{exc}: the cluster uses Ray token authentication; start the server with "
                "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            )
            hint.__cause__ = exc
            return hint
        cause = cause.__cause__ or cause.__context__
    return exc


def _restore_signal_handlers() -> None:
    """Give SIGTERM and SIGINT back to Python (on the main thread, after ray.init).

    Ray's core worker installs absl's failure signal handler, which takes
    SIGTERM too and ends the process at once: no graceful shutdown, and a
    shared instance would vanish (found only by its lease) instead of detaching.
    Setting each signal's Python handler again puts Python's own C handler
    back, so the loop's handlers (app.py) run as before ray.init.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


# One per server process: Ray itself is connected once per process.
_cluster: RayCluster | None = None


def configure(
    address: str, workers: int, cpus_per_worker: float, gpus_per_worker: float, share: str = ""
) -> RayCluster:
    """Set (once per engine start) the cluster every RayWorker of this process uses.

    ``cpus_per_worker`` 0: this machine's cores shared by the workers.
    ``share``: --ray-share, the name of workers shared with other instances.
    """
    global _cluster
    workers = max(1, workers)
    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    _cluster = RayCluster(address, workers, float(cpus), float(gpus_per_worker), share)
    return _cluster


# --- between a host and its actor (transport, not the worker protocol) -----------


@dataclass(frozen=True, slots=True)
class Attached:
    """`attach`'s answer: the client number, or why this instance may not attach."""

    client: int = 0
    refused: str = ""


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a client's `outputs()`: ``detached`` (the actor serves on,
    without this client) or the actor's decoding loop ended (it serves no one)."""

    detached: bool


@dataclass(frozen=True, slots=True)
class ActorLoad:
    """The actor's totals, the answer to every `send`: /readyz for shared workers."""

    instances: int
    generations: int


class LeaseLapsed(RuntimeError):
    """A client the actor detached (silent for LEASE_S) sent again."""


@dataclass(slots=True)
class _Client:
    """An attached instance, inside the actor."""

    outbox: queue.SimpleQueue[WorkerToServer | StreamEnd]
    heard: float  # time.monotonic() of its last send
    seqs: dict[int, int] = field(default_factory=dict)  # its seq id -> the actor's


def _part_of(out: StepOutput) -> StepOutput:
    """One client's share of a step: the step's figures, none of its sequences yet."""
    return StepOutput(
        out.worker_id,
        batch_size=out.batch_size,
        step_seconds=out.step_seconds,
        kv_used=out.kv_used,
        kv_allocated=out.kv_allocated,
        kv_retained=out.kv_retained,
        prefix_queries=out.prefix_queries,
        prefix_hits=out.prefix_hits,
        grammar_seconds=out.grammar_seconds,
    )


@ray.remote(concurrency_groups={"control": 1, "output": MAX_CLIENTS})
class WorkerActor:
    """A WorkerCore's decoding loop in a thread of a Ray actor, serving one instance or,
    shared, several (module docstring)."""

    def __init__(
        self, worker_id: int, config: WorkerConfig, log_level: int, shared: bool = False
    ) -> None:
        logging.basicConfig(
            level=log_level,
            format=f"%(asctime)s worker-{worker_id} %(levelname)s %(message)s",
            force=True,
        )
        self.worker_id = worker_id
        self.config = config
        self.shared = shared
        self._inbox: queue.SimpleQueue[ServerToWorker] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the tables below: control, output and decode threads
        self._clients: dict[int, _Client] = {}
        self._routes: dict[int, tuple[int, int]] = {}  # the actor's seq id -> (client, its id)
        self._client_ids = itertools.count(1)
        self._seq_ids = itertools.count(1)
        self._loaded: list[WorkerToServer] = []  # WorkerReady or WorkerFailed, for late comers
        self._ended = False
        threading.Thread(target=self._run, name="decode", daemon=True).start()
        if shared:
            threading.Thread(target=self._expire_leases, name="leases", daemon=True).start()

    @ray.method(concurrency_group="control")
    def attach(self, config: WorkerConfig) -> Attached:
        """Register an instance; its stream starts with the load report, if made yet."""
        differ = [
            f"{name} {getattr(config, name)!r} (the worker's: {getattr(self.config, name)!r})"
            for name in SHARED_CONFIG_FIELDS
            if getattr(config, name) != getattr(self.config, name)
        ]
        if differ:
            return Attached(
                refused=f"the shared Ray worker {self.worker_id} serves another setup: this "
                f"instance asks for {', '.join(differ)}; give every instance sharing it the "
                "same --model, --dtype and --max-context, or another --ray-share name"
            )
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                return Attached(
                    refused=f"the shared Ray worker {self.worker_id} already serves "
                    f"{MAX_CLIENTS} instances, its most"
                )
            client = next(self._client_ids)
            entry = _Client(queue.SimpleQueue(), time.monotonic())
            for msg in self._loaded:
                entry.outbox.put(msg)
            if self._ended:
                entry.outbox.put(StreamEnd(detached=False))
            self._clients[client] = entry
        log.info("worker %d: instance %d attached", self.worker_id, client)
        return Attached(client)

    @ray.method(concurrency_group="control")
    def send(self, client: int, batch: list[ServerToWorker]) -> ActorLoad:
        """Requests and cancels, in the client's seq ids; an empty batch renews its lease."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                raise LeaseLapsed(f"instance {client} is no longer attached to this worker")
            entry.heard = time.monotonic()
            for msg in batch:
                if isinstance(msg, GenerateRequest):
                    ours = next(self._seq_ids)
                    self._routes[ours] = (client, msg.seq_id)
                    entry.seqs[msg.seq_id] = ours
                    self._inbox.put(GenerateRequest(ours, msg.prompt_ids, msg.params))
                elif isinstance(msg, CancelRequest):
                    ours = entry.seqs.get(msg.seq_id)
                    if ours is not None:  # else finished already
                        self._inbox.put(CancelRequest(ours))
                elif not self.shared:  # Shutdown: the one instance is done with the worker
                    self._inbox.put(msg)
            return ActorLoad(len(self._clients), len(self._routes))

    @ray.method(concurrency_group="control")
    def detach(self, client: int) -> None:
        """An instance is done: cancel its sequences, end its stream; serve the others."""
        with self._lock:
            self._drop(client, "detached")

    @ray.method(concurrency_group="control")
    def describe(self) -> dict[str, Any]:
        """Who is attached and what the actor holds (operators, tests)."""
        with self._lock:
            return {
                "worker": self.worker_id,
                "actor": ray.get_runtime_context().get_actor_id(),
                "shared": self.shared,
                "instances": sorted(self._clients),
                "generations": len(self._routes),
                "loaded": bool(self._loaded),
            }

    @ray.method(concurrency_group="output", num_returns="streaming")
    def outputs(self, client: int) -> Iterator[list[WorkerToServer | StreamEnd]]:
        """Everything the loop produces for ``client``, a list per report, up to a StreamEnd."""
        with self._lock:
            entry = self._clients.get(client)
        if entry is None:
            yield [StreamEnd(detached=True)]
            return
        outbox = entry.outbox
        while True:
            batch = [outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get())
            yield batch
            if any(isinstance(msg, StreamEnd) for msg in batch):
                return

    def _drop(self, client: int, why: str) -> None:
        """Detach ``client`` (lock held); its sequences' finishes are dropped when they come."""
        entry = self._clients.pop(client, None)
        if entry is None:
            return
        for ours in entry.seqs.values():
            self._inbox.put(CancelRequest(ours))
        entry.outbox.put(StreamEnd(detached=True))
        log.info(
            "worker %d: instance %d %s; %d of its sequences cancelled",
            self.worker_id,
            client,
            why,
            len(entry.seqs),
        )

    def _expire_leases(self) -> None:
        while True:
            time.sleep(LEASE_S / 4)
            now = time.monotonic()
            with self._lock:
                for client in [c for c, e in self._clients.items() if now - e.heard > LEASE_S]:
                    self._drop(client, f"silent for {LEASE_S:.0f} s (its lease lapsed)")

    def _run(self) -> None:
        try:
            self._decode()
        except Exception:  # reported as the loop's end: the hosts treat it as a death
            log.exception("worker %d: decoding loop failed", self.worker_id)
        finally:
            with self._lock:
                self._ended = True
                for entry in self._clients.values():
                    entry.outbox.put(StreamEnd(detached=False))

    def _decode(self) -> None:
        """WorkerCore.serve on queues instead of a pipe."""
        from chatserver.workers.core import build_core, load_failure

        inbox = self._inbox
        try:
            _check_model_path(self.config)
            core, ready = build_core(self.worker_id, self.config)
        except Exception as exc:
            self._announce(load_failure(self.worker_id, exc))
            return
        self._announce(ready)
        core.serve(inbox.get, lambda: not inbox.empty(), self._route)

    def _announce(self, msg: WorkerToServer) -> None:
        """The load report: to every client attached, and every one still to come."""
        with self._lock:
            self._loaded.append(msg)
            for entry in self._clients.values():
                entry.outbox.put(msg)

    def _route(self, out: StepOutput) -> None:
        """Split a step's output by client, into the clients' own seq ids.

        Every client holding sequences hears of the step, with or without
        tokens of its own; outputs of detached clients' sequences are dropped.
        """
        with self._lock:
            routes, clients = self._routes, self._clients
            parts = {c: _part_of(out) for c, entry in clients.items() if entry.seqs}
            for ours, token in out.tokens:
                route = routes.get(ours)
                if route is not None and route[0] in parts:
                    parts[route[0]].tokens.append((route[1], token))
            for ours, cached in out.started:
                route = routes.get(ours)
                if route is not None and route[0] in parts:
                    parts[route[0]].started.append((route[1], cached))
            for ours, token, logprob, top in out.logprobs:
                route = routes.get(ours)
                if route is not None and route[0] in parts:
                    parts[route[0]].logprobs.append((route[1], token, logprob, top))
            for ours, reason in out.finished:
                route = routes.pop(ours, None)
                if route is None or route[0] not in parts:
                    continue
                client, seq_id = route
                clients[client].seqs.pop(seq_id, None)
                parts[client].finished.append((seq_id, reason))
            for client, part in parts.items():
                clients[client].outbox.put(part)


def _check_model_path(config: WorkerConfig) -> None:
    """A local model directory must exist on this node too (module docstring)."""
    from chatserver.models.loading import ModelNotFound

    path = config.model_path
    if path.startswith("/") and not os.path.isdir(path):
        raise ModelNotFound(
            f"model directory {path} does not exist on Ray node {ray.util.get_node_ip_address()}: "
            "put the model at the same path on every node (a shared mount), or serve a hub id"
        )


class RayWorker:
    """A WorkerHost whose worker is a Ray actor; same interface as ProcessWorker.

    Two threads per host, as for a process: the reader creates (or, shared,
    finds) the actor, attaches and iterates its `outputs()` stream, handing
    every message to the loop with `call_soon_threadsafe`; the writer sends
    what the loop queued, a batch per call, each call awaited so the actor
    sees messages in order, and, shared, renews the lease when idle.
    """

    def __init__(
        self, worker_id: int, config: WorkerConfig, cluster: RayCluster | None = None
    ) -> None:
        cluster = cluster if cluster is not None else _cluster
        if cluster is None:
            raise RuntimeError("ray_worker.configure() must run before RayWorker is built")
        self.worker_id = worker_id
        self.config = config
        self.cluster = cluster
        self._outbox: queue.SimpleQueue[ServerToWorker | None] = queue.SimpleQueue()
        self._actor: Any = None
        self._client = 0
        self._spawned = threading.Event()  # the actor exists and is attached, or never will
        self._killed = False
        self._alive = False
        self._reader: threading.Thread | None = None
        self._load: ActorLoad | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerToServer], None],
        on_exit: Callable[[int], None],
    ) -> None:
        self._alive = True
        wid = self.worker_id
        shared = self.cluster.shared

        def read() -> None:
            try:
                actor = self._attach(loop, on_message)
                if not loop.is_closed():  # connected now: Ray has taken SIGTERM
                    loop.call_soon_threadsafe(_restore_signal_handlers)
            finally:
                self._spawned.set()
            ended: StreamEnd | None = None
            try:
                if actor is not None:
                    if self._killed:
                        ray.kill(actor)
                    for ref in actor.outputs.remote(self._client):
                        for msg in ray.get(ref):
                            if isinstance(msg, StreamEnd):
                                ended = ended or msg
                            elif ended is None:
                                loop.call_soon_threadsafe(on_message, msg)
            except RayError as exc:
                log.error("worker %d: Ray actor lost: %s", wid, str(exc).splitlines()[0])
            # Gone: end the writer, free the actor's resources, tell the pool. A
            # shared actor is killed only if its loop ended: it serves no one then.
            self._alive = False
            self._outbox.put(None)
            if actor is not None and (not shared or (ended is not None and not ended.detached)):
                try:
                    ray.kill(actor)
                except RayError:
                    pass
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_exit, wid)

        def write() -> None:
            self._spawned.wait()
            actor = self._actor
            if actor is None:
                return
            while True:
                try:
                    first = self._outbox.get(timeout=HEARTBEAT_S if shared else None)
                except queue.Empty:
                    batch: list[ServerToWorker] = []  # idle and shared: renew the lease
                else:
                    if first is None:
                        return
                    batch = [first]
                    while not self._outbox.empty():
                        more = self._outbox.get()
                        if more is None:
                            self._outbox.put(None)
                            break
                        batch.append(more)
                detach = shared and any(isinstance(msg, Shutdown) for msg in batch)
                if detach:
                    batch = [msg for msg in batch if not isinstance(msg, Shutdown)]
                try:
                    self._load = ray.get(actor.send.remote(self._client, batch))
                    if detach:
                        ray.get(actor.detach.remote(self._client))
                        return
                except RayError:
                    return  # the reader sees the death (or the lapsed lease) too

        self._reader = threading.Thread(target=read, name=f"worker-{wid}-ray-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=write, name=f"worker-{wid}-ray-writer", daemon=True).start()

    def _attach(
        self, loop: asyncio.AbstractEventLoop, on_message: Callable[[WorkerToServer], None]
    ) -> Any:
        """The actor, created (or found) and attached to; None when there is none to read."""
        wid = self.worker_id
        try:
            actor = self.cluster.spawn(wid, self.config)
        except Exception as exc:  # no cluster to run on: retrying will not help
            log.exception("worker %d: no Ray actor", wid)
            msg = WorkerFailed(wid, f"Ray: {type(exc).__name__}: {exc}", fatal=True)
            loop.call_soon_threadsafe(on_message, msg)
            return None
        try:
            attached: Attached = ray.get(actor.attach.remote(self.config))
        except RayError as exc:  # it died meanwhile: the pool restarts the worker
            log.error("worker %d: Ray actor lost: %s", wid, str(exc).splitlines()[0])
            return None
        if attached.refused:
            loop.call_soon_threadsafe(on_message, WorkerFailed(wid, attached.refused, fatal=True))
            return None
        self._actor, self._client = actor, attached.client
        return actor

    def send(self, msg: ServerToWorker) -> None:
        self._outbox.put(msg)

    @property
    def alive(self) -> bool:
        return self._alive

    def details(self) -> dict[str, Any]:
        """What /readyz adds for this worker: a shared actor's totals, as of the last send."""
        if not self.cluster.shared:
            return {}
        load = self._load
        return {
            "shared": {
                "name": self.cluster.share,
                "instances": load.instances if load else None,
                "generations": load.generations if load else None,
            }
        }

    def kill(self) -> None:
        """End the actor at once: a shared one for every instance (it is stuck for all)."""
        self._killed = True
        if self._actor is not None:
            try:
                ray.kill(self._actor)
            except RayError:
                pass

    async def stop(self, grace: float = 10.0) -> None:
        """Shut the worker down; shared, detach from it instead (the others keep it)."""
        self.send(Shutdown())
        reader = self._reader
        if reader is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, reader.join, grace)
        if reader.is_alive() and not self.cluster.shared:
            self.kill()
            await loop.run_in_executor(None, reader.join, 5)
