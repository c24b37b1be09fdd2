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

The model: the actor loads ``WorkerConfig.model_path`` on its node. A local
directory must be at the same absolute path on every node (a shared mount,
or the same image); a hub id is resolved by each node (its own hub cache).
A node that lacks the path fails to load with a message naming the node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
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
    ServerToWorker,
    Shutdown,
    WorkerConfig,
    WorkerFailed,
    WorkerToServer,
)

log = logging.getLogger(__name__)

NAMESPACE = "chatserver"
# Step outputs are a few hundred bytes and inlined in RPCs: the object store
# holds nothing of ours. Ray's default would take 30 % of RAM.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
PLACEMENT_WARN_S = 30.0
CONNECT_TIMEOUT_S = 60.0  # a local start takes ~10 s on a busy 2-core machine


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
    # Distinguishes this server's actors from other servers' on one cluster.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    start_seconds: float = 0.0  # how long ray.init took
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _group: PlacementGroup | None = field(default=None, repr=False)
    _failure: BaseException | None = field(default=None, repr=False)

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
            done.put(exc)
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
        """Create worker ``worker_id``'s actor (connecting first if need be)."""
        self.connect()
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
            "max_restarts": 0,  # the pool restarts workers (module docstring)
            "name": f"chatserver-{self.instance}-worker-{worker_id}-{uuid.uuid4().hex[:6]}",
            "namespace": NAMESPACE,
        }
        if self.needs_group:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._placement(), placement_group_bundle_index=worker_id % self.workers
            )
        else:
            options["scheduling_strategy"] = "SPREAD"
        return WorkerActor.options(**options).remote(worker_id, config, logging.getLogger().level)


# One per server process: Ray itself is connected once per process.
_cluster: RayCluster | None = None


def configure(
    address: str, workers: int, cpus_per_worker: float, gpus_per_worker: float
) -> RayCluster:
    """Set (once per engine start) the cluster every RayWorker of this process uses.

    ``cpus_per_worker`` 0: this machine's cores shared by the workers.
    """
    global _cluster
    workers = max(1, workers)
    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    _cluster = RayCluster(address, workers, float(cpus), float(gpus_per_worker))
    return _cluster


@ray.remote(concurrency_groups={"control": 1, "output": 1})
class WorkerActor:
    """A WorkerCore's decoding loop in a thread of a Ray actor (module docstring)."""

    def __init__(self, worker_id: int, config: WorkerConfig, log_level: int) -> None:
        logging.basicConfig(
            level=log_level,
            format=f"%(asctime)s worker-{worker_id} %(levelname)s %(message)s",
            force=True,
        )
        self.worker_id = worker_id
        self.config = config
        self._inbox: queue.SimpleQueue[ServerToWorker] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[WorkerToServer | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="decode", daemon=True).start()

    @ray.method(concurrency_group="control")
    def send(self, batch: list[ServerToWorker]) -> None:
        for msg in batch:
            self._inbox.put(msg)

    @ray.method(concurrency_group="output", num_returns="streaming")
    def outputs(self) -> Iterator[list[WorkerToServer]]:
        """Everything the loop produces, a list per report, until it ends."""
        while True:
            batch = [self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get())
            ended = batch[-1] is None
            yield [msg for msg in batch if msg is not None]
            if ended:
                return

    def _run(self) -> None:
        try:
            self._decode()
        except Exception:  # reported as the loop's end: the host treats it as a death
            logging.getLogger(__name__).exception("worker %d: decoding loop failed", self.worker_id)
        finally:
            self._outbox.put(None)

    def _decode(self) -> None:
        """WorkerCore.serve on queues instead of a pipe."""
        from chatserver.workers.core import build_core, load_failure

        inbox, outbox = self._inbox, self._outbox
        try:
            _check_model_path(self.config)
            core, ready = build_core(self.worker_id, self.config)
        except Exception as exc:
            outbox.put(load_failure(self.worker_id, exc))
            return
        outbox.put(ready)
        core.serve(inbox.get, lambda: not inbox.empty(), outbox.put)


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

    Two threads per host, as for a process: the reader creates the actor and
    iterates its `outputs()` stream, handing every message to the loop with
    `call_soon_threadsafe`; the writer sends what the loop queued, a batch per
    call, each call awaited so the actor sees messages in order.
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
        self._spawned = threading.Event()  # the actor exists, or never will
        self._killed = False
        self._alive = False
        self._reader: threading.Thread | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerToServer], None],
        on_exit: Callable[[int], None],
    ) -> None:
        self._alive = True
        wid = self.worker_id

        def read() -> None:
            try:
                self._actor = self.cluster.spawn(wid, self.config)
            except Exception as exc:  # no cluster to run on: retrying will not help
                log.exception("worker %d: no Ray actor", wid)
                msg = WorkerFailed(wid, f"Ray: {type(exc).__name__}: {exc}", fatal=True)
                loop.call_soon_threadsafe(on_message, msg)
            finally:
                self._spawned.set()
            actor = self._actor
            try:
                if actor is not None:
                    if self._killed:
                        ray.kill(actor)
                    for ref in actor.outputs.remote():
                        for msg in ray.get(ref):
                            loop.call_soon_threadsafe(on_message, msg)
            except RayError as exc:
                log.error("worker %d: Ray actor lost: %s", wid, str(exc).splitlines()[0])
            # Gone: end the writer, free the actor's resources, tell the pool.
            self._alive = False
            self._outbox.put(None)
            if actor is not None:
                try:
                    ray.kill(actor)
                except RayError:
                    pass
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_exit, wid)

        def write() -> None:
            self._spawned.wait()
            while (msg := self._outbox.get()) is not None:
                batch = [msg]
                while not self._outbox.empty():
                    more = self._outbox.get()
                    if more is None:
                        self._outbox.put(None)
                        break
                    batch.append(more)
                if self._actor is None:
                    return
                try:
                    ray.get(self._actor.send.remote(batch))
                except RayError:
                    return  # the reader sees the death too

        self._reader = threading.Thread(target=read, name=f"worker-{wid}-ray-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=write, name=f"worker-{wid}-ray-writer", daemon=True).start()

    def send(self, msg: ServerToWorker) -> None:
        self._outbox.put(msg)

    @property
    def alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        self._killed = True
        if self._actor is not None:
            try:
                ray.kill(self._actor)
            except RayError:
                pass

    async def stop(self, grace: float = 10.0) -> None:
        self.send(Shutdown())
        reader = self._reader
        if reader is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, reader.join, grace)
        if reader.is_alive():
            self.kill()
            await loop.run_in_executor(None, reader.join, 5)
