"""The ``n`` choices of one OpenAI completion: their parameters, their streams together.

A request for ``n`` choices is ``n`` generations of one prompt, started at once
(engine.submit_many: admitted all or none, on one worker, whose scheduler
prefills the shared prompt once). Choice ``i`` of a seeded request samples with
``seed + i``, so the request is reproducible and its choices differ. The
request's usage counts the prompt once and the completions of all choices, as
OpenAI's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from chatserver.api.openai import protocol
from chatserver.protocol.sampling import RequestParams

if TYPE_CHECKING:
    from chatserver.engine.engine import GenerationStream

_INT64 = 1 << 63
_ENDED = object()


def _int64(value: int) -> int:
    """``value`` wrapped into the int64 range seeds travel in (the sampler seeds its
    generator with the seed modulo 2**64, so wrapping changes nothing it draws)."""
    return (value + _INT64) % (2 * _INT64) - _INT64


def choice_params(params: RequestParams, n: int) -> list[RequestParams]:
    """Each choice's parameters: the request's, with ``seed + i`` for choice ``i``."""
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=_int64(params.seed + i)) for i in range(n)]


def usage(streams: Sequence[GenerationStream]) -> dict[str, Any]:
    """One request's usage: its prompt once (the cached part: what no choice computed),
    the tokens of every choice."""
    first = streams[0]
    return protocol.usage(
        first.prompt_tokens,
        sum(s.completion_tokens for s in streams),
        min(s.cached_tokens for s in streams),
    )


async def drain(
    streams: Sequence[GenerationStream], check: Callable[[GenerationStream], None]
) -> None:
    """Wait until every stream has ended, ``check``-ing each as it ends: the first
    failure raises at once (the caller's exit then cancels the others)."""
    tasks = {asyncio.ensure_future(s.collect()): s for s in streams}
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                check(tasks[task])
    finally:
        for task in pending:
            task.cancel()


async def _next(stream: GenerationStream) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _ENDED


async def merged(
    streams: Sequence[GenerationStream], keepalive: float
) -> AsyncIterator[tuple[int, str | None] | None]:
    """The streams' deltas as they come, as ``(index, delta)``; ``(index, None)`` once
    stream ``index`` has ended; None after ``keepalive`` seconds without either (0:
    never), which streaming transports send as a keep-alive.

    One read is pending per stream, taken again only once its delta was handled, so
    a consumer that falls behind still gets each stream's queued text as one delta.
    """
    pending: dict[asyncio.Future[Any], int] = {}

    def read(index: int) -> None:
        pending[asyncio.ensure_future(_next(streams[index]))] = index

    for index in range(len(streams)):
        read(index)
    try:
        while pending:
            done, _ = await asyncio.wait(
                pending,
                timeout=keepalive if keepalive > 0 else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                yield None
                continue
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                delta = task.result()
                if delta is _ENDED:
                    yield index, None
                else:
                    yield index, delta
                    read(index)
    finally:
        for task in pending:
            task.cancel()
