"""Compare grammar engines for constrained decoding on this CPU (issue 14).

For each of llguidance, xgrammar and outlines-core (each one skipped, saying so,
when it is not installed) in a fresh subprocess, with the default model's
tokenizer: the time to compile a realistic JSON schema (and compute the first mask) (a pydantic model with
nested object, array and enum fields), the time to compute the allowed-token
mask per decoding step at batch 1 and 16 (stepping through a valid document's
tokens, so every step is one a real generation takes), the resident memory the
engine added, and a soundness check (random walks over allowed tokens: every
finished one must parse and validate against the schema).

    .venv/bin/python -m load_tests.grammar_eval [--libs llguidance,llguidance-par,xgrammar,outlines-core]

Prints one JSON line per library and a table. workers/grammar.py cites its figures.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
# llguidance-par: llguidance with its parallel executor for batch 16.
LIBS = ("llguidance", "llguidance-par", "xgrammar", "outlines-core")
WALKS = 10
WALK_STEPS = 150


def schema() -> dict[str, Any]:
    """The benchmark schema: five fields, nested object, array, enum, bounded string."""
    from pydantic import BaseModel, Field

    class Colour(enum.StrEnum):
        red = "red"
        green = "green"
        blue = "blue"

    class Address(BaseModel):
        street: str = Field(max_length=40)
        city: str = Field(max_length=30)
        zip: str = Field(pattern=r"^[0-9]{5}$")

    class Person(BaseModel):
        name: str = Field(max_length=40)
        age: int = Field(ge=0, le=150)
        colour: Colour
        tags: list[Annotated[str, Field(max_length=12)]] = Field(max_length=4)
        address: Address

    return Person.model_json_schema()


def example() -> str:
    return json.dumps(
        {
            "name": "Ada Lovelace",
            "age": 36,
            "colour": "green",
            "tags": ["math", "engines"],
            "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
        },
        separators=(",", ":"),  # the compact form every engine is asked for
    )


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Engine:
    """One library behind the same calls: compile, new matcher, masks, advance."""

    name = ""

    def compile(self, schema_text: str) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def masks(self, matchers: list[Any], bitmask: Any) -> None: ...

    def advance(self, matcher: Any, token: int) -> bool: ...


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tokenizer: Any, parallel: bool = False) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer)
        self.parallel = parallel
        self.executor = llguidance.LLExecutor() if parallel else None

    def compile(self, schema_text: str) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema_text, overrides={"whitespace_flexible": False}
        )
        first = self.ll.LLMatcher(self.tok, grammar)  # compiling is building the first matcher
        assert not first.is_error(), first.get_error()
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tok, compiled)

    def masks(self, matchers: list[Any], bitmask: Any) -> None:
        from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

        if self.parallel and len(matchers) > 1:
            pairs = [(m, i) for i, m in enumerate(matchers)]
            fill_next_token_bitmask_par(self.executor, pairs, bitmask)
        else:  # what workers/grammar.py does
            for i, m in enumerate(matchers):
                fill_next_token_bitmask(m, bitmask, i)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)

    def compile(self, schema_text: str) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(
            schema_text, any_whitespace=False, separators=(",", ":")
        )

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def masks(self, matchers: list[Any], bitmask: Any) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self, tokenizer: Any) -> None:
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        decode = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids)
        vocab: dict[bytes, list[int]] = {}
        for text, i in tokenizer.get_vocab().items():
            if i in special:
                continue
            vocab.setdefault(bytes(decode[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(tokenizer.eos_token_id, vocab)

    def compile(self, schema_text: str) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        return self.oc.Index(
            build_regex_from_schema(schema_text, whitespace_pattern=""), self.vocab
        )

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def masks(self, matchers: list[Any], bitmask: Any) -> None:
        row = bitmask.shape[1]
        for i, m in enumerate(matchers):
            m.write_mask_into(bitmask[i].data_ptr(), row, 4)

    def advance(self, matcher: Any, token: int) -> bool:
        matcher.advance(token, return_tokens=False)
        return True


def allowed(bitmask: Any, row: int, vocab: int) -> list[int]:
    import numpy as np

    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")
    return bits[:vocab].nonzero()[0].tolist()


def evaluate(lib: str) -> dict[str, Any]:
    import jsonschema
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    before = rss()
    started = time.perf_counter()
    engine: Engine = {
        "llguidance": LLGuidance,
        "llguidance-par": lambda t: LLGuidance(t, parallel=True),
        "xgrammar": XGrammar,
        "outlines-core": OutlinesCore,
    }[lib](tokenizer)
    setup_s = time.perf_counter() - started
    text = json.dumps(schema())
    started = time.perf_counter()
    compiled = engine.compile(text)
    compile_s = time.perf_counter() - started
    vocab = len(tokenizer)
    width = (vocab + 31) // 32
    # Some engines build their lexer lazily: the first mask is part of the compile cost.
    started = time.perf_counter()
    engine.masks([engine.matcher(compiled)], torch.zeros((1, width), dtype=torch.int32))
    first_mask_s = time.perf_counter() - started
    memory = rss() - before
    tokens = tokenizer(example(), add_special_tokens=False)["input_ids"]
    result: dict[str, Any] = {
        "lib": lib,
        "tokenizer_setup_s": round(setup_s, 3),
        "compile_s": round(compile_s, 4),
        "first_mask_s": round(first_mask_s, 4),
        "rss_added_mib": round(memory / 2**20, 1),
        "steps": len(tokens),
    }
    for batch in (1, 16):
        matchers = [engine.matcher(compiled) for _ in range(batch)]
        bitmask = torch.zeros((batch, width), dtype=torch.int32)
        spent = 0.0
        for token in tokens:
            began = time.perf_counter()
            engine.masks(matchers, bitmask)
            spent += time.perf_counter() - began
            bit = (int(bitmask[0, token // 32]) >> (token % 32)) & 1
            if not bit:
                result[f"rejected_valid_b{batch}"] = tokenizer.decode([token])
                break
            for m in matchers:
                engine.advance(m, token)
        result[f"mask_ms_per_step_b{batch}"] = round(1000 * spent / len(tokens), 4)
    # Soundness: random walks over allowed tokens; the finished ones must validate.
    rng = random.Random(0)
    finished = valid = 0
    for _ in range(WALKS):
        m = engine.matcher(compiled)
        bitmask = torch.zeros((1, width), dtype=torch.int32)
        out: list[int] = []
        for _ in range(WALK_STEPS):
            engine.masks([m], bitmask)
            choices = [t for t in allowed(bitmask, 0, vocab) if t != tokenizer.eos_token_id]
            if not choices:
                break
            token = rng.choice(choices)
            out.append(token)
            engine.advance(m, token)
        try:
            doc = json.loads(tokenizer.decode(out))
        except ValueError:
            continue  # unfinished within WALK_STEPS
        finished += 1
        try:
            jsonschema.validate(doc, schema())
            valid += 1
        except jsonschema.ValidationError:
            pass
    result["walks_finished"] = finished
    result["walks_valid"] = valid
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(evaluate(args.one)))
        return
    import importlib.util

    rows = []
    for lib in args.libs.split(","):
        module = lib.removesuffix("-par").replace("-", "_")
        if importlib.util.find_spec(module) is None:
            print(f"{lib}: not installed, skipped (.venv/bin/pip install {lib})")
            continue
        proc = subprocess.run(
            [sys.executable, "-m", "load_tests.grammar_eval", "--one", lib],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            print(f"{lib}: failed\n{proc.stderr[-2000:]}")
            continue
        line = proc.stdout.strip().splitlines()[-1]
        print(line)
        rows.append(json.loads(line))
    keys = [
        "compile_s",
        "first_mask_s",
        "mask_ms_per_step_b1",
        "mask_ms_per_step_b16",
        "rss_added_mib",
    ]
    keys += ["walks_finished", "walks_valid"]
    print(f"{'lib':<14}" + "".join(f"{k:>22}" for k in keys))
    for row in rows:
        print(f"{row['lib']:<14}" + "".join(f"{row.get(k, '-')!s:>22}" for k in keys))


if __name__ == "__main__":
    main()
