"""Constrained decoding: a sequence's grammar turned into an allowed-token mask, per step.

Structured output (OpenAI's ``response_format``, tool calls the API must
guarantee) is enforced here, in the batching worker, not hoped for from the
model: before a constrained row is sampled its logits outside the grammar's
allowed tokens become -inf; the sampled token then advances that sequence's
matcher. End-of-sequence is allowed only where the grammar accepts, and a
grammar that can take no further token ends its sequence with "stop" at once.

Engine: llguidance (Rust; ``llguidance==1.9.1``). Measured with
``.venv/bin/python -m load_tests.grammar_eval`` on the busy shared 2-core AMD
EPYC (AVX512; load average ~10 while it ran, so absolute times are inflated),
SmolLM2-135M's 49,152-token vocabulary, a pydantic schema of five fields
(nested object, array of bounded strings, enum, bounded integer, pattern),
compact JSON; per-step figures average a real document's 52 tokens:

    engine          compile   mask/step b1  mask/step b16  RSS added  random walks valid
    llguidance      1.7 ms    0.46 ms       7.9 ms         93 MiB     1/1 finished
    llguidance-par  13 ms     1.3 ms        6.8 ms         93 MiB     (its parallel executor)
    xgrammar        2.16 s    2.5 ms        26 ms          30 MiB     8/8 finished
    outlines-core   3.85 s    0.05 ms       0.9 ms         62 MiB     4/10 finished (UNSOUND)

llguidance compiles a schema in about a millisecond, where xgrammar and
outlines-core take seconds per new schema (a new schema per request is the
common case for ``json_schema`` and tool calls, and the compile happens in
the batch's step); outlines-core's regex index is fastest per step but 6 of
10 documents its masks allowed violated the schema (bounds lost in the
regex translation), so it is not sound; xgrammar was 3-5x slower per step
here. llguidance also takes JSON schema, regex and Lark (with ``%json``
embedded, so a tool call's ``<tool_call>`` wrapper and its arguments' schema
are one grammar) through one matcher type. Masks are filled one row after
another: the parallel executor only adds thread hand-offs on 2 cores.
Its one-off cost is the tokenizer's token trie, built with the first mask
ever computed (1.5-7 s under load): `GrammarCompiler` does that when it is
made, in a background thread at worker start (`GrammarBook.warm`).

Memory and cost: ~93 MiB per worker for the grammar tokenizer; compiled
grammars are cached by (kind, source) and each sequence gets a cheap copy;
unconstrained sequences never touch this module.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatserver.protocol.worker import GrammarSpec

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "lark")
# Compiled grammars kept per process; a compile costs ~1 ms, so this bounds memory only.
CACHE_SIZE = 128
# JSON in the compact form json.dumps writes: a sampled model cannot pad it with
# whitespace forever (free whitespace is what a weak model at temperature 1 emits).
# A schema's own "x-guidance" options override these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def lark_json(schema: dict[str, Any]) -> str:
    """``%json {...}`` for a Lark grammar: the schema in the same compact JSON as kind
    "json_schema" (Lark's embedded JSON would otherwise allow free whitespace).

    For example a tool call, wrapper and arguments in one grammar::

        GrammarSpec("lark", f'start: "<tool_call>\\n" {lark_json(schema)} "\\n</tool_call>"')
    """
    options = {**JSON_DEFAULTS, **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": options})


class GrammarError(ValueError):
    """A grammar that does not compile; the message says why, for the client."""


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for a spec (not yet checked; LLMatcher does that)."""
    import llguidance

    ll = llguidance.LLMatcher
    try:
        if spec.kind == "json_schema":
            return ll.grammar_from_json_schema(spec.source, defaults=JSON_DEFAULTS)
        if spec.kind == "json_object":
            return ll.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
        if spec.kind == "regex":
            return ll.grammar_from_regex(spec.source)
        if spec.kind == "lark":
            return ll.grammar_from_lark(spec.source)
    except ValueError as exc:  # a schema that is not a JSON object
        raise GrammarError(f"invalid {spec.kind}: {exc}") from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}; one of {', '.join(KINDS)}")


def tokenizer_from_files(directory: str) -> Any | None:
    """The grammar tokenizer straight from tokenizer.json, without importing transformers.

    `llguidance.hf.from_tokenizer` takes a transformers tokenizer only to
    serialize its Rust tokenizer: tokenizer.json, plus any added tokens that
    only tokenizer_config.json lists. Importing transformers for that took most
    of the worker's 2.6 s grammar warm-up (2-core AMD EPYC, torch capability
    AVX2, no VNNI). None where the files alone might not say the same (added
    tokens missing from tokenizer.json, an end-of-sequence token not found):
    then the caller loads the tokenizer through transformers.
    """
    import llguidance

    root = Path(directory)
    try:
        spec = json.loads((root / "tokenizer.json").read_text())
        config = json.loads((root / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        if added.get(token.get("content")) != int(token_id):
            return None
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    vocab = spec.get("model", {}).get("vocab")
    eos_id = added.get(eos)
    if eos_id is None and isinstance(vocab, dict):
        eos_id = vocab.get(eos)
    if eos_id is None:
        return None
    spec["padding"] = spec["truncation"] = None  # as from_tokenizer serializes it
    return llguidance.LLTokenizer(json.dumps(spec), eos_token=eos_id)


class GrammarCompiler:
    """One tokenizer's grammars: compiled once per (kind, source), copied per sequence.

    Thread-safe (the server validates in its tokenizer threads; a worker uses one).
    """

    def __init__(self, tokenizer: Any) -> None:
        """`tokenizer`: a transformers fast tokenizer, or an llguidance LLTokenizer."""
        import llguidance

        self._ll = llguidance
        if isinstance(tokenizer, llguidance.LLTokenizer):
            self.tokenizer = tokenizer
        else:
            import llguidance.hf

            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.vocab_size: int = self.tokenizer.vocab_size
        self.eos_ids: tuple[int, ...] = tuple(self.tokenizer.eos_tokens)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        # The first mask a tokenizer computes builds its token trie (seconds on a busy
        # machine): done here, so no decoding step pays for it.
        first = llguidance.LLMatcher(self.tokenizer, grammar_text(GrammarSpec("regex", "a")))
        first.compute_bitmask()

    def compiled(self, spec: GrammarSpec) -> Any:
        """A pristine matcher for the spec, compiled on first use; raises GrammarError."""
        key = (spec.kind, spec.source)
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
                return matcher
        matcher = self._ll.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind}: {matcher.get_error()}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def check(self, spec: GrammarSpec) -> None:
        """Raise GrammarError unless the spec compiles against this vocabulary."""
        self.compiled(spec)

    def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh matcher for one sequence (a copy of the cached compiled one)."""
        return self.compiled(spec).deep_copy()


@dataclass(slots=True)
class _Row:
    matcher: Any
    stop_ids: tuple[int, ...]


class GrammarBook:
    """The worker's constrained sequences: one matcher each, masks for a step's rows.

    ``tokenizer_path``: the model's directory. Its tokenizer and the grammar
    tokenizer built from it take seconds to load (2.6 s alone on the 2-core
    AVX2 EPYC; tens of seconds on a busy 2-core machine: longer than the worker
    stall timeout if a step waited for them), so `warm()` loads them in a
    background thread while the worker loads its model, and the worker waits
    for them before it says ready (`wait`). A load that fails fails only the
    constrained sequences, with the reason.
    """

    def __init__(self, tokenizer_path: str) -> None:
        self.tokenizer_path = tokenizer_path
        self._compiler: GrammarCompiler | None = None
        self._loading: threading.Thread | None = None
        self._failure: str | None = None
        self.rows: dict[int, _Row] = {}
        self.seconds = 0.0  # spent computing masks and advancing matchers, since the last take

    def warm(self) -> None:
        """Start loading the grammar tokenizer in the background (once)."""
        if self._loading is None and self._compiler is None:
            self._loading = threading.Thread(target=self._load, name="grammar-load", daemon=True)
            self._loading.start()

    def wait(self) -> None:
        """Block until the background load (if started) has finished or failed."""
        if self._loading is not None:
            self._loading.join()

    def _load(self) -> None:
        try:
            from chatserver.models.loading import ModelSource, load_tokenizer

            path = self.tokenizer_path
            tokenizer = tokenizer_from_files(path) or load_tokenizer(ModelSource(path, path, True))
            self._compiler = GrammarCompiler(tokenizer)
        except Exception as exc:  # the constrained sequences fail; the others never notice
            log.exception("grammar tokenizer failed to load")
            self._failure = f"grammars are unavailable: {type(exc).__name__}: {exc}"

    @property
    def compiler(self) -> GrammarCompiler:
        """The compiler; raises GrammarError when it could not be loaded."""
        if self._compiler is None:
            self.warm()
            assert self._loading is not None
            self._loading.join()
        if self._compiler is None:
            raise GrammarError(self._failure or "grammars are unavailable")
        return self._compiler

    def forget(self, seq_id: int) -> None:
        self.rows.pop(seq_id, None)

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def _row(self, seq_id: int, spec: GrammarSpec, stop_ids: tuple[int, ...]) -> _Row:
        row = self.rows.get(seq_id)
        if row is None:
            row = self.rows[seq_id] = _Row(self.compiler.matcher(spec), stop_ids)
        return row

    def masks(
        self, rows: list[tuple[int, GrammarSpec, tuple[int, ...]]], width: int
    ) -> tuple[torch.Tensor, list[str | None]]:
        """Allowed tokens of each (seq_id, grammar, stop ids) row, as a bool (rows, width) mask.

        ``width``: the logits' width (an lm_head may be padded past the
        vocabulary: those columns are never allowed). A stop id is allowed only
        where the grammar accepts; the tokenizer's own end token only if it is
        one of the row's stop ids. The second list holds, per row, why it cannot
        go on (a grammar that does not compile, a matcher in error), else None.
        """
        import time

        began = time.perf_counter()
        errors: list[str | None] = [None] * len(rows)
        compiler = self.compiler
        words = (compiler.vocab_size + 31) // 32
        bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
        live: list[tuple[Any, int]] = []
        states: list[_Row | None] = []
        for i, (seq_id, spec, stop_ids) in enumerate(rows):
            try:
                row = self._row(seq_id, spec, stop_ids)
            except GrammarError as exc:
                errors[i] = str(exc)
                states.append(None)
                continue
            if row.matcher.is_error():
                errors[i] = f"grammar error: {row.matcher.get_error()}"
                states.append(None)
                continue
            live.append((row.matcher, i))
            states.append(row)
        if live:
            from llguidance.torch import fill_next_token_bitmask

            # One after another: llguidance's parallel executor measured 16 masks in
            # 16-35 ms here against 0.2-0.4 ms in turn (2 busy cores; threads hand off).
            for matcher, i in live:
                fill_next_token_bitmask(matcher, bitmask, i)
        shifts = torch.arange(32, dtype=torch.int32)
        bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(len(rows), -1)
        allowed = torch.zeros((len(rows), width), dtype=torch.bool)
        n = min(width, compiler.vocab_size)
        allowed[:, :n] = bits[:, :n]
        for i, row in enumerate(states):
            if row is None:
                continue
            for eos in compiler.eos_ids:
                if eos < width and eos not in row.stop_ids:
                    allowed[i, eos] = False
            accepting = row.matcher.is_accepting()
            for stop in row.stop_ids:
                if stop < width:
                    allowed[i, stop] = accepting
        self.seconds += time.perf_counter() - began
        return allowed, errors

    def advance(self, seq_id: int, token: int) -> bool:
        """Feed a sampled token; True when the grammar is complete (nothing more can follow).

        A stop token ends the sequence anyway and is not fed. Raises
        GrammarError when the matcher refuses the token (it was not allowed).
        """
        import time

        row = self.rows.get(seq_id)
        if row is None or token in row.stop_ids:
            return False
        began = time.perf_counter()
        try:
            if not row.matcher.consume_token(token):
                raise GrammarError(f"grammar refused token {token}: {row.matcher.get_error()}")
            return bool(row.matcher.is_stopped())
        finally:
            self.seconds += time.perf_counter() - began
