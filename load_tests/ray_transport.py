"""How a Ray actor's decoding steps should come back to the server: measured, not guessed.

workers/ray_worker.py had two candidates; this compares them on a fake step loop
(a sleep of ``--step-ms`` standing in for the forward pass, one `StepOutput` of
``--batch`` tokens per step), no model, a local Ray instance of 2 CPUs:

* ``stream``: an actor method returning a Ray streaming generator
  (``num_returns="streaming"``) that yields each step's output;
* ``poll``: the step loop in an actor thread puts outputs on a queue that a
  polling call, in its own concurrency group, drains in batches;
* ``queued`` (what ray_worker.py does): the same queue, drained by a streaming
  generator in its own concurrency group that yields what it holds as one list.

For each it prints steps/s (the loop's own pace: what Ray costs the step),
delivery latency p50/p99 (the step's end in the actor to the server holding
it) and CPU per step, driver side and actor side.

    python -m load_tests.ray_transport
    python -m load_tests.ray_transport --step-ms 0 5 20 --batch 1 16 --steps 300
"""

from __future__ import annotations

import argparse
import queue
import resource
import threading
import time
from collections.abc import Iterator, Sequence

import ray

from chatserver.protocol.worker import StepOutput


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@ray.remote(num_cpus=1, concurrency_groups={"poll": 1, "stream": 1})
class FakeWorker:
    def __init__(self) -> None:
        self._out: queue.SimpleQueue[StepOutput | None] = queue.SimpleQueue()

    def _steps(self, steps: int, step_s: float, batch: int) -> Iterator[StepOutput]:
        for i in range(steps):
            if step_s:
                time.sleep(step_s)
            out = StepOutput(0, tokens=[(s, i) for s in range(batch)], batch_size=batch)
            out.step_seconds = time.time()  # when the step ended (one clock: one machine)
            yield out

    @ray.method(concurrency_group="stream", num_returns="streaming")
    def stream(self, steps: int, step_s: float, batch: int) -> Iterator[StepOutput]:
        yield from self._steps(steps, step_s, batch)

    @ray.method(concurrency_group="stream")
    def fill(self, steps: int, step_s: float, batch: int) -> None:
        def run() -> None:
            for out in self._steps(steps, step_s, batch):
                self._out.put(out)
            self._out.put(None)

        threading.Thread(target=run, daemon=True).start()

    @ray.method(concurrency_group="poll")
    def poll(self, timeout: float) -> list[StepOutput | None]:
        try:
            items = [self._out.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._out.get_nowait())
            except queue.Empty:
                return items

    @ray.method(concurrency_group="poll", num_returns="streaming")
    def drain(self) -> Iterator[list[StepOutput | None]]:
        while True:
            items = [self._out.get()]
            while True:
                try:
                    items.append(self._out.get_nowait())
                except queue.Empty:
                    break
            yield items
            if items[-1] is None:
                return

    def cpu(self) -> float:
        return _cpu_seconds()


def measure(mode: str, steps: int, step_ms: float, batch: int) -> dict[str, float]:
    """One run of ``steps`` fake steps through ``mode``; the first step's start-up is left out."""
    actor = FakeWorker.remote()
    actor_cpu = ray.get(actor.cpu.remote())
    driver_cpu = _cpu_seconds()
    latencies: list[float] = []
    first = 0.0

    def took(out: StepOutput) -> None:
        nonlocal first
        latencies.append(time.time() - out.step_seconds)
        first = first or time.perf_counter()

    if mode == "stream":
        for ref in actor.stream.remote(steps, step_ms / 1e3, batch):
            took(ray.get(ref))
    elif mode == "queued":
        actor.fill.remote(steps, step_ms / 1e3, batch)
        for ref in actor.drain.remote():
            for out in ray.get(ref):
                if out is not None:
                    took(out)
    else:
        actor.fill.remote(steps, step_ms / 1e3, batch)
        done = False
        while not done:
            for out in ray.get(actor.poll.remote(1.0)):
                if out is None:
                    done = True
                    break
                took(out)
    wall = time.perf_counter() - first
    actor_cpu = ray.get(actor.cpu.remote()) - actor_cpu
    driver_cpu = _cpu_seconds() - driver_cpu
    ray.kill(actor)
    latencies.sort()
    return {
        "steps_per_s": (steps - 1) / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "driver_us": driver_cpu / steps * 1e6,
        "actor_us": actor_cpu / steps * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=300, help="steps a run (2000 at --step-ms 0)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=128 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    print(f"local Ray started in {time.perf_counter() - started:.1f} s\n")
    print(
        "| mode | step ms | batch | steps/s | latency p50 ms | p99 ms | driver CPU µs/step "
        "| actor CPU µs/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for step_ms in args.step_ms:
        steps = args.steps if step_ms else max(args.steps, 2000)
        for batch in args.batch:
            for mode in ("stream", "poll", "queued"):
                r = measure(mode, steps, step_ms, batch)
                print(
                    f"| {mode} | {step_ms:g} | {batch} | {r['steps_per_s']:,.0f} "
                    f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['driver_us']:.0f} "
                    f"| {r['actor_us']:.0f} |",
                    flush=True,
                )
    ray.shutdown()


if __name__ == "__main__":
    main()
