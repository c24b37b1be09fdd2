"""The worker's runner on a GPU, before any server: does it compute what transformers
computes there, and how long does a step take at each batch size?

    python -m load_tests.gpu_runner_check --model models/random-smollm2 --json out.json

Run by load_tests/gpu_check.sh on a lent GPU machine, where the CUDA path meets
a real device for the first time; `--device cpu` runs the same checks here
(tests/test_load_tests.py does, on a small random model).

* Agreement: three prompts prefilled, then two decode steps of all three
  batched, through LlamaRunner in float32 (TF32 off) against transformers' own
  forward of the same weights on the same device, each sequence alone. Bound
  1e-3, the CPU tests' (tests/test_runner.py). The bf16 runner's largest
  deviation from those float32 logits is printed, not checked: random weights
  give near-flat logits, whose argmax rounding decides.
* Step time: one bf16 decode step of B sequences at ~`--context` cached
  positions (the runner alone, then WorkerCore.step with greedy sampling),
  median of `--steps` after warm-up, the device synchronized. B / step is the
  output tokens/s a server could reach at that concurrency if nothing else
  took time.

Exit status 1 when an agreement check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from chatserver.models.llama_weights import read_llama_weights
from chatserver.protocol.worker import GenerateRequest, SamplingParams, WorkerConfig
from chatserver.workers.core import build_core
from chatserver.workers.runner import LlamaRunner, StepItem
from load_tests.machine import describe_machine, machine

PROMPTS = ([1, 9690, 314, 253, 3578, 30], [1, 504, 5248, 282, 4649, 314], [1, 17, 28, 339, 42])


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def agreement(model_dir: str, device: str) -> dict[str, float]:
    """Largest |logit difference| of LlamaRunner (float32, bf16) against transformers'
    float32 forward, over prefill and two batched decode steps."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    steps = [[42 + s for s in range(len(PROMPTS))], [7] * len(PROMPTS)]
    expected: list[torch.Tensor] = []
    with torch.inference_mode():
        for s, ids in enumerate(PROMPTS):
            sequence = list(ids)
            rows = [hf(torch.tensor([sequence], device=device)).logits[0, -1]]
            for step in steps:
                sequence.append(step[s])
                rows.append(hf(torch.tensor([sequence], device=device)).logits[0, -1])
            expected.append(torch.stack(rows).float())
    del hf
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = read_llama_weights(model_dir, dtype, device)
        if weights is None:
            raise SystemExit(f"{model_dir}: not a model LlamaRunner reads")
        runner = LlamaRunner(weights, 256, slots=len(PROMPTS))
        got = [
            [runner.forward([StepItem(s, s, ids, 0, True)], s + 1)[0]]
            for s, ids in enumerate(PROMPTS)
        ]
        for k, step in enumerate(steps):
            items = [StepItem(s, s, [step[s]], len(ids) + k, True) for s, ids in enumerate(PROMPTS)]
            for s, row in enumerate(runner.forward(items, len(PROMPTS))):
                got[s].append(row)
        worst[str(dtype).removeprefix("torch.")] = max(
            (torch.stack(rows).float() - want).abs().max().item()
            for rows, want in zip(got, expected, strict=True)
        )
        del runner, weights
    return worst


def step_times(
    model_dir: str, device: str, batches: list[int], context: int, steps: int
) -> tuple[str, list[dict[str, float]]]:
    """The kernels serving bf16 here, and the median time of one bf16 decode step of
    B sequences at each B: the runner alone, then a WorkerCore (sampling included)."""
    config = WorkerConfig(
        model_dir,
        "check",
        device,
        "bfloat16",
        context + steps + 16,
        max(batches),
        512,
        0,
        skip_quality_gate=True,
    )
    core, ready = build_core(0, config)
    runner = core.runner
    assert isinstance(runner, LlamaRunner)
    rows = []
    for batch in batches:
        prompt = [1] + [100 + i % 900 for i in range(context - 1)]
        for s in range(batch):
            runner.forward([StepItem(s, s, prompt, 0, False)], batch)
        times = []
        for k in range(steps + 3):
            items = [StepItem(s, s, [5], context + k, True) for s in range(batch)]
            synchronize(device)
            started = time.perf_counter()
            runner.forward(items, batch)
            synchronize(device)
            times.append(time.perf_counter() - started)
        runner_s = statistics.median(times[3:])
        for s in range(batch):
            params = SamplingParams(max_tokens=steps + 3)  # no stop tokens: runs to max
            core.submit(GenerateRequest(batch * 1000 + s, prompt, params))
        core_times = []
        while core.has_work:
            synchronize(device)
            started = time.perf_counter()
            out = core.step()
            synchronize(device)
            if len(out.tokens) == batch:  # every sequence decoding, none prefilling
                core_times.append(time.perf_counter() - started)
        core_s = statistics.median(core_times[2:] or core_times)
        rows.append(
            {
                "batch": batch,
                "runner_step_ms": round(runner_s * 1e3, 3),
                "runner_tok_s": round(batch / runner_s, 1),
                "core_step_ms": round(core_s * 1e3, 3),
                "core_tok_s": round(batch / core_s, 1),
            }
        )
        print(
            f"| {batch} | {runner_s * 1e3:.2f} | {batch / runner_s:,.0f} "
            f"| {core_s * 1e3:.2f} | {batch / core_s:,.0f} |",
            flush=True,
        )
    return ready.kernels, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.gpu_runner_check", description=__doc__)
    p.add_argument("--model", required=True, help="model directory (load_tests.random_model's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,16,64,128,256", help="decode batch sizes to time")
    p.add_argument("--context", type=int, default=128, help="cached positions a sequence has")
    p.add_argument("--steps", type=int, default=20, help="timed steps a batch size")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    facts = machine()
    print(describe_machine(facts))
    if args.device.startswith("cuda"):
        print(
            torch.cuda.get_device_name(args.device), "torch", torch.__version__, torch.version.cuda
        )
    worst = agreement(args.model, args.device)
    passed = worst["float32"] <= 1e-3
    print(
        f"agreement with transformers' float32 forward: float32 max |diff| "
        f"{worst['float32']:.2e} ({'ok' if passed else 'FAILED, bound 1e-3'}), "
        f"bfloat16 {worst['bfloat16']:.2e}",
        flush=True,
    )
    print("| batch | runner step ms | runner tok/s | core step ms | core tok/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    batches = [int(b) for b in args.batches.split(",")]
    kernels, steps = step_times(args.model, args.device, batches, args.context, args.steps)
    if args.json:
        record = {
            "machine": facts,
            "device": args.device,
            "kernels": kernels,
            "agreement": worst,
            "agreement_passed": passed,
            "steps": steps,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
