"""Precision vs quality vs speed of the worker's runner, per dtype, on this machine.

    python -m load_tests.precision

Quality: perplexity of the default model on a fixed text (tests/data/
quality_text.txt, first 512 tokens), scored in one prefill and again one token
a step through the KV cache (the kernels a single stream decodes with, which
differ for int8), and whether the test prompt is still answered correctly. Speed: decode throughput of a WorkerCore in this process
(no server), one sequence and 16 sequences of 64 greedy tokens, prefill
included. The CPU default dtype (engine.CPU_DEFAULT_DTYPE) is chosen from this.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from transformers import AutoTokenizer

from chatserver.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, REPO_ROOT
from chatserver.models.prompt import render
from chatserver.protocol.worker import GenerateRequest, SamplingParams, WorkerConfig
from chatserver.workers.core import build_core
from load_tests.prompts import BUILTIN_PROMPTS

QUALITY_TEXT = REPO_ROOT / "tests" / "data" / "quality_text.txt"


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
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the runner (server's --compile)"
    )
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    text_ids = tokenizer(Path(QUALITY_TEXT).read_text())["input_ids"][:512]
    question = render(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    prompts = [render(tokenizer, [{"role": "user", "content": p}]) for p in BUILTIN_PROMPTS[:16]]
    print(f"model {args.model_dir}, {args.threads} torch threads, compile={args.compile}")
    print(
        "| dtype | perplexity | vs float32 | perplexity, decode | vs float32 "
        "| capital of France? | 1 stream tok/s | 16 streams tok/s |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    reference = None
    for dtype in args.dtypes.split(","):
        config = WorkerConfig(
            args.model_dir, "m", "cpu", dtype, 2048, 16, 512, args.threads, compile=args.compile
        )
        core, _ = build_core(0, config)
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
        print(
            f"| {dtype} | {ppl:.2f} | {100 * (ppl / reference - 1):+.1f}% | "
            f"{ppl_decode:.2f} | {100 * (ppl_decode / reference - 1):+.1f}% | "
            f"{'Paris' if correct else 'wrong'} | {one:.1f} | {many:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
