"""How far int8 moves each prompt's logits alone and in a batch, against float32.

Sixteen short chat prompts (tests/test_runner.py's, 35-47 tokens) are prefilled
one at a time and then all in one step, in float32 and in int8, and the last
position's logits compared: relative distance to float32's alone and batched,
between alone and batched, and how often the top token is float32's. This is
what chose int8's row scaling (workers/kernels.py): ``--scale-rows-above N``
overrides the kernels' threshold (steps of more rows than N get each row scaled
to |x| <= 1 around the GEMM), so the older setting can be measured beside today's.

    python -m load_tests.batch_effect
    python -m load_tests.batch_effect --scale-rows-above 64 --int8-kernels vnni
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatserver.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from chatserver.models.prompt import render
from chatserver.workers import cpu_features, precision
from chatserver.workers.calibration import DownCalibration
from chatserver.workers.runner import LlamaRunner, StepItem
from load_tests.machine import describe_machine, machine

PROMPTS = (  # tests/test_runner.py's
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does, and why computers need one at all.",
    "Say hello.",
    "What is 2 + 2?",
    "Give me a tip for learning to cook, please, as a complete beginner who has never used a stove.",
    "Name a planet.",
)


def prompt_ids(tokenizer: AutoTokenizer) -> list[list[int]]:
    """16 distinct prompts: the eight above, then the same with a trailing space."""
    return [
        render(tokenizer, [{"role": "user", "content": PROMPTS[i % 8] + " " * (i // 8)}])
        for i in range(16)
    ]


def last_logits(runner: LlamaRunner, prompts: list[list[int]], together: bool) -> torch.Tensor:
    if together:
        items = [StepItem(i, i, ids, 0, True) for i, ids in enumerate(prompts)]
        return runner.forward(items, len(prompts))
    return torch.cat([runner.forward([StepItem(0, 0, ids, 0, True)], 1) for ids in prompts])


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME))
    p.add_argument("--int8-kernels", default="auto", choices=precision.INT8_KERNEL_CHOICES)
    p.add_argument("--scale-rows-above", type=int, help="override the kernels' threshold")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine(machine())}")
    kernels = precision.int8_kernels(cpu_features.detect(), args.int8_kernels)
    if args.scale_rows_above is not None:
        kernels = dataclasses.replace(kernels, scale_rows_above=args.scale_rows_above)
    print(
        f"int8 kernels: {kernels.name}, rows scaled in steps of more than {kernels.scale_rows_above}"
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    prompts = prompt_ids(tokenizer)
    exact = last_logits(LlamaRunner(model, 1024, slots=16), prompts, together=False)
    int8 = LlamaRunner(
        model, 1024, slots=16, int8=kernels, calibration=DownCalibration(args.model, None)
    )
    alone = last_logits(int8, prompts, together=False)
    batched = last_logits(int8, prompts, together=True)
    top = exact.argmax(dim=1)
    rows = [
        ("alone vs float32", relative(alone, exact), (alone.argmax(dim=1) == top).sum()),
        ("batched vs float32", relative(batched, exact), (batched.argmax(dim=1) == top).sum()),
        ("batched vs alone", relative(batched, alone), None),
    ]
    print("| comparison | mean relative distance | worst prompt | top token = float32's |")
    print("|---|---:|---:|---:|")
    for name, distance, agree in rows:
        matched = "" if agree is None else f"{int(agree)} of {len(prompts)}"
        print(f"| {name} | {distance.mean():.3f} | {distance.max():.3f} | {matched} |")


if __name__ == "__main__":
    main()
