"""Our scheduler + runner against transformers' own continuous batching, same prompts.

    python -m load_tests.compare_hf_batching --sequences 16 --max-tokens 64 --dtype float32

Both run in this process on the CPU with the same torch threads; the number is
output tokens per second over the whole batch (all prompts submitted at once).
The result decides which one chatserver's workers use (see
chatserver/workers/runner.py).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from chatserver.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from chatserver.models.prompt import render
from chatserver.protocol.worker import GenerateRequest, SamplingParams, WorkerConfig
from chatserver.workers.core import build_core
from load_tests.prompts import BUILTIN_PROMPTS


def ours(
    model_dir: str, prompts: list[list[int]], max_tokens: int, dtype: str
) -> tuple[float, int]:
    core, _ = build_core(
        0, WorkerConfig(model_dir, "m", "cpu", dtype, 2048, 64, 256, torch.get_num_threads())
    )
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        core.submit(GenerateRequest(i, ids, SamplingParams(max_tokens=max_tokens)))
    produced = 0
    while core.has_work:
        produced += len(core.step().tokens)
    return time.perf_counter() - started, produced


def hf_cb(
    model_dir: str, prompts: list[list[int]], max_tokens: int, dtype: str
) -> tuple[float, int]:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1)
    model.generate_batch(prompts[:2], generation_config=config)  # warm-up
    started = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=config)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(o.generated_tokens) for o in outputs.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default=str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME))
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = [
        render(tokenizer, [{"role": "user", "content": BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]}])
        for i in range(args.sequences)
    ]
    print(
        f"{args.sequences} sequences x {args.max_tokens} tokens, {args.dtype}, {args.threads} threads"
    )
    print("| implementation | seconds | output tokens | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, fn in (
        ("chatserver scheduler + LlamaRunner", ours),
        ("transformers generate_batch (CB manager)", hf_cb),
    ):
        elapsed, produced = fn(args.model_dir, prompts, args.max_tokens, args.dtype)
        print(f"| {name} | {elapsed:.2f} | {produced} | {produced / elapsed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
