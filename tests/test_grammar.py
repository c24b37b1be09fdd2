"""chatserver.workers.grammar and the sampler's use of it: masks that hold whatever the logits.

Random logits stand in for a model that wants to write anything at all: what
comes out must still be what the grammar says, and its end token must come
only where the grammar accepts. A worker core over the real model checks the
wiring (scheduler finish, logprobs in StepOutput, neighbours unaffected).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from chatserver.models.sampling import Sampler
from chatserver.protocol.worker import GenerateRequest, GrammarSpec, SamplingParams, WorkerConfig
from chatserver.workers.core import build_core
from chatserver.workers.grammar import (
    GrammarBook,
    GrammarCompiler,
    GrammarError,
    lark_json,
    tokenizer_from_files,
)

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct"
EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["colour", "n", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def book() -> GrammarBook:
    return GrammarBook(str(MODEL))


def run(
    book: GrammarBook,
    spec: GrammarSpec,
    seeds: range,
    width: int,
    steps: int = 80,
    temperature: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """Sample ``len(seeds)`` sequences together from random logits under ``spec``;
    each one's tokens and whether the sampler reported its grammar complete."""
    sampler = Sampler(torch.device("cpu"), book)
    ids = [1000 + s for s in seeds]
    params = {
        i: SamplingParams(temperature=temperature, seed=s, stop_token_ids=(EOS,), grammar=spec)
        for i, s in zip(ids, seeds, strict=True)
    }
    out: dict[int, list[int]] = {i: [] for i in ids}
    done: dict[int, bool] = dict.fromkeys(ids, False)
    gen = torch.Generator().manual_seed(seeds[0])
    running = list(ids)
    for _ in range(steps):
        if not running:
            break
        logits = torch.randn((len(running), width), generator=gen) * 4
        tokens = sampler.sample(logits, running, [params[i] for i in running])
        for seq_id, token in zip(list(running), tokens, strict=True):
            assert token is not None
            if token == EOS:
                running.remove(seq_id)
                sampler.forget(seq_id)
                continue
            out[seq_id].append(token)
            if seq_id in sampler.completed:
                done[seq_id] = True
                running.remove(seq_id)
                sampler.forget(seq_id)
    return [(out[i], done[i] or i not in running) for i in ids]


def test_json_schema_output_is_valid_from_random_logits(book, tokenizer) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    results = run(book, spec, range(8), len(tokenizer), steps=50)
    for tokens, finished in results:
        assert finished, tokenizer.decode(tokens)
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)
    assert not book.rows  # forgotten with their sequences


def test_padded_logits_never_pick_past_the_vocabulary(book, tokenizer) -> None:
    """An lm_head wider than the tokenizer (padded to a multiple): those columns stay out."""
    spec = GrammarSpec("regex", r"[a-z]{3,8}")
    for tokens, _ in run(book, spec, range(4), len(tokenizer) + 64, steps=10):
        assert all(t < len(tokenizer) for t in tokens)
        text = tokenizer.decode(tokens)
        assert text.isalpha() and text.islower() and 3 <= len(text) <= 8, text


def test_end_token_only_where_the_grammar_accepts(book, tokenizer) -> None:
    """Logits that want nothing but EOS still get the grammar's text first."""
    sampler = Sampler(torch.device("cpu"), book)
    spec = GrammarSpec("regex", r"ab+")
    params = SamplingParams(stop_token_ids=(EOS,), grammar=spec)  # greedy
    logits = torch.zeros((1, len(tokenizer)))
    logits[0, EOS] = 100.0
    first = sampler.sample(logits.clone(), [7], [params])[0]
    assert first != EOS and tokenizer.decode([first]).startswith("a")
    tokens = [first]
    while tokens[-1] != EOS and len(tokens) < 10:
        tokens.append(sampler.sample(logits.clone(), [7], [params])[0])
    assert tokens[-1] == EOS
    assert re.fullmatch("ab+", tokenizer.decode(tokens[:-1]))


def test_lark_with_embedded_json_for_tool_calls(book, tokenizer) -> None:
    """A fixed wrapper around schema-constrained JSON, as tool calling uses."""
    grammar = f'start: "<tool_call>\\n" args "\\n</tool_call>"\nargs: {lark_json(SCHEMA)}'
    spec = GrammarSpec("lark", grammar)
    for tokens, finished in run(book, spec, range(2), len(tokenizer), steps=60):
        text = tokenizer.decode(tokens)
        assert finished, text
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
        body = text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        jsonschema.validate(json.loads(body), SCHEMA)


def test_json_object_is_an_object(book, tokenizer) -> None:
    spec = GrammarSpec("json_object")
    sampler = Sampler(torch.device("cpu"), book)
    params = SamplingParams(stop_token_ids=(EOS,), grammar=spec, logprobs=3)
    logits = torch.zeros((1, len(tokenizer)))
    for text, bias in (("{}", 50.0), ('{"', 20.0)):
        for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
            logits[0, t] += bias
    token = sampler.sample(logits, [9], [params])[0]
    assert tokenizer.decode([token]).startswith("{")
    sampler.forget(9)


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json_schema", '{"type": "objekt"}'),
        GrammarSpec("json_schema", "[1, 2"),
        GrammarSpec("regex", "(ab"),
        GrammarSpec("lark", "start: missing_rule"),
        GrammarSpec("yaml", "a: b"),
    ],
)
def test_invalid_grammars_are_refused_with_a_reason(book, spec: GrammarSpec) -> None:
    with pytest.raises(GrammarError) as info:
        book.compiler.check(spec)
    assert str(info.value)


def test_a_bad_grammar_fails_its_row_alone(book, tokenizer) -> None:
    sampler = Sampler(torch.device("cpu"), book)
    logits = torch.randn((3, len(tokenizer)))
    params = [
        SamplingParams(),
        SamplingParams(grammar=GrammarSpec("regex", "(ab")),
        SamplingParams(grammar=GrammarSpec("regex", "[0-9]+"), stop_token_ids=(EOS,)),
    ]
    got = sampler.sample(logits, [1, 2, 3], params)
    assert got[0] == int(logits[0].argmax()) and got[1] is None
    assert tokenizer.decode([got[2]]).isdigit()


def test_compiled_grammars_are_cached(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer)
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    assert compiler.compiled(spec) is compiler.compiled(spec)
    assert compiler.matcher(spec) is not compiler.matcher(spec)


# --- logprobs --------------------------------------------------------------------------


def test_logprobs_come_from_the_sampled_distribution(tokenizer) -> None:
    sampler = Sampler(torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn((3, 500), generator=gen) * 3
    params = [
        SamplingParams(logprobs=5),  # greedy: log_softmax at temperature 1
        SamplingParams(temperature=0.5, seed=1, logprobs=20),
        SamplingParams(temperature=0.8, top_k=3, seed=2, logprobs=10),
    ]
    tokens = sampler.sample(logits, [1, 2, 3], params)
    entries = {e[0]: e for e in sampler.logprobs}
    assert set(entries) == {1, 2, 3}
    greedy = torch.log_softmax(logits[0], -1)
    seq, token, lp, top = entries[1]
    assert token == tokens[0] == int(logits[0].argmax())
    assert math.isclose(lp, float(greedy[token]), abs_tol=1e-5) and len(top) == 5
    tempered = torch.log_softmax(logits[1] / 0.5, -1)
    _, token, lp, top = entries[2]
    assert math.isclose(lp, float(tempered[token]), abs_tol=1e-4) and len(top) == 20
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    # top_k 3: exactly three tokens have a probability, and they sum to one.
    _, token, lp, top = entries[3]
    assert len(top) == 3 and token in [t for t, _ in top]
    assert math.isclose(sum(math.exp(v) for _, v in top), 1.0, abs_tol=1e-4)
    assert dict(top)[token] == lp


def test_rows_without_logprobs_report_none() -> None:
    sampler = Sampler(torch.device("cpu"))
    sampler.sample(torch.randn((2, 50)), [1, 2], [SamplingParams(), SamplingParams(logprobs=0)])
    assert [(e[0], e[3]) for e in sampler.logprobs] == [(2, ())]


# --- the worker core: scheduler finish, StepOutput, neighbours -------------------------


@pytest.fixture(scope="module")
def core():
    config = WorkerConfig(
        model_path=str(MODEL),
        model_id="SmolLM2-135M-Instruct",
        device="cpu",
        dtype="float32",
        max_context=512,
        max_batch=4,
        prefill_chunk=256,
        threads=0,
        skip_quality_gate=True,
    )
    return build_core(0, config)[0]


def drain(core, requests: list[GenerateRequest]) -> tuple[dict, dict, list]:
    for r in requests:
        core.submit(r)
    tokens: dict[int, list[int]] = {r.seq_id: [] for r in requests}
    finished: dict[int, str] = {}
    logprobs: list = []
    while core.has_work:
        out = core.step()
        for seq_id, token in out.tokens:
            tokens[seq_id].append(token)
        finished.update(out.finished)
        logprobs.extend(out.logprobs)
    return tokens, finished, logprobs


def test_core_finishes_a_complete_grammar_and_leaves_neighbours_alone(core, tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = SamplingParams(max_tokens=12, stop_token_ids=(EOS,))
    alone, _, _ = drain(core, [GenerateRequest(1, prompt, plain)])
    spec = GrammarSpec("json_schema", json.dumps({"enum": ["red", "green"]}))
    constrained = SamplingParams(max_tokens=12, stop_token_ids=(EOS,), grammar=spec, logprobs=2)
    tokens, finished, logprobs = drain(
        core, [GenerateRequest(2, prompt, plain), GenerateRequest(3, prompt, constrained)]
    )
    assert tokens[2] == alone[1]  # float32 greedy: the neighbour changes nothing
    assert json.loads(tokenizer.decode(tokens[3])) in ("red", "green")
    assert finished[3] == "stop"
    assert [e[1] for e in logprobs] == tokens[3] and all(e[0] == 3 for e in logprobs)
    assert not core.grammars.rows


def test_the_grammar_tokenizer_from_files_is_transformers_one(model_dir: Path, tmp_path: Path):
    import llguidance.hf

    direct = tokenizer_from_files(str(model_dir))
    assert direct is not None
    through = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    assert direct.vocab_size == through.vocab_size and direct.eos_tokens == through.eos_tokens
    for token in range(direct.vocab_size):
        assert direct.decode_bytes([token]) == through.decode_bytes([token]), token
        assert direct.is_special_token(token) == through.is_special_token(token), token
    # Added tokens that only tokenizer_config.json lists: left to transformers.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"49152": {"content": "<|extra|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_from_files(str(tmp_path)) is None
    assert tokenizer_from_files(str(tmp_path / "absent")) is None
