"""Precision vs quality vs speed of the worker's runner, per dtype and kernel path, on this machine.

    python -m load_tests.precision
    python -m load_tests.precision --dtypes float32,int8:avx2,int8:vnni

Quality: perplexity of the default model on a fixed text (chatserver/workers/
quality_text.txt, first 512 tokens), scored in one prefill and again one token
a step through the KV cache (the kernels a single stream decodes with, which
differ for int8); whether the test prompt is still answered correctly; and the
quality gate's verdict (what a worker would decide at start). Speed: decode
throughput of a WorkerCore in this process (no server), one sequence and 16
sequences of 64 greedy tokens, prefill included. `--dtype auto`'s chain
(workers/precision.py) is ordered from this table on each kind of CPU.

A dtype is `float32`, `bfloat16`, `float16`, `int8` (kernels chosen from this
CPU's features), `int8:vnni` / `int8:avx2` (forced kernel path) or `int4`. Candidates
are measured with the gate off, so a failing one still gets its row.
"""

from __future__ import annotations

import argparse
import math
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from chatserver.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from chatserver.models.prompt import render
from chatserver.protocol.worker import GenerateRequest, SamplingParams, WorkerConfig
from chatserver.workers import quality_gate
from chatserver.workers.core import build_core
from load_tests.machine import describe_machine, machine
from load_tests.prompts import BUILTIN_PROMPTS


def throughput(core, prompts: list[list[int]], max_tokens: int) -> float:
    for i, ids in enumerate(prompts):
        core.submit(GenerateRequest(10_000 + i, ids, SamplingParams(max_tokens=max_tokens)))
    started, produced = time.perf_counter(), 0
    while core.has_work:
        produced += len(core.step().tokens)
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default=str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME))
    parser.add_argument("--dtypes", default="float32,bfloat16,int8:avx2,int8:vnni,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the runner (server's --compile)"
    )
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    text_ids = tokenizer(quality_gate.QUALITY_TEXT.read_text())["input_ids"][:512]
    question = render(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    prompts = [render(tokenizer, [{"role": "user", "content": p}]) for p in BUILTIN_PROMPTS[:16]]
    probe = quality_gate.probe_ids(tokenizer)
    fp32_model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    gate_reference = quality_gate.GateReference.from_logits(
        quality_gate.reference_logits(fp32_model, probe), probe
    )
    del fp32_model
    print(describe_machine(machine()))
    print(
        f"model {args.model_dir}, {args.threads} torch threads, compile={args.compile}, "
        f"perplexity over {len(text_ids)} tokens\n"
    )
    print(
        "| dtype | kernels | perplexity | vs float32 | perplexity, decode | vs float32 "
        "| capital of France? | quality gate | 1 stream tok/s | 16 streams tok/s |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|")
    reference = None
    for spec in args.dtypes.split(","):
        dtype, _, kernels = spec.partition(":")
        config = WorkerConfig(
            args.model_dir,
            "m",
            "cpu",
            dtype,
            2048,
            16,
            512,
            args.threads,
            compile=args.compile,
            int8_kernels=kernels or "auto",
            skip_quality_gate=True,
        )
        core, ready = build_core(0, config)
        gate = quality_gate.check(
            core.runner,
            gate_reference,
            probe,
            ready.dtype,
            ready.kernels,
            quality_gate.GateBounds(),
        )
        ppl = math.exp(core.runner.score(text_ids))
        ppl_decode = math.exp(core.runner.score(text_ids, chunk=1))
        reference = reference or ppl
        core.submit(
            GenerateRequest(0, question, SamplingParams(max_tokens=12, stop_token_ids=(2,)))
        )
        answer: list[int] = []
        while core.has_work:
            answer += [t for _, t in core.step().tokens]
        correct = "Paris" in tokenizer.decode(answer)
        one = throughput(core, prompts[:1], args.max_tokens)
        many = throughput(core, prompts, args.max_tokens)
        verdict = "pass" if gate.passed else f"FAIL: {gate.reason}"
        print(
            f"| {ready.dtype} | {ready.kernels} | {ppl:.2f} | {100 * (ppl / reference - 1):+.1f}% | "
            f"{ppl_decode:.2f} | {100 * (ppl_decode / reference - 1):+.1f}% | "
            f"{'Paris' if correct else 'wrong'} | {verdict} | {one:.1f} | {many:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
