"""How fast a decode step could be if it were nothing but its matmuls, per kernel path.

A step of N streams multiplies N rows by every weight of the model once. This
times exactly those matmuls: every layer's fused q/k/v, o, gate/up and down
plus the LM head, at the default model's shapes, with a separate copy of the
weights per layer so they stream from memory as they do when serving. It
prints each kernel path's rate (GOPS: 2 x multiply-adds per second) and the
tok/s a step made only of them would reach, a ceiling for `bench_batching`
at that many streams: attention, norms, sampling and the server come on top.

    python -m load_tests.gemm_ceiling
    python -m load_tests.gemm_ceiling --rows 1,16,32 --json out.json

The int8 path is fbgemm's dynamic int8 GEMM with the weights this CPU's
kernels use (workers/kernels.py: 7-bit without VNNI), the one int8-avx2 and
int8-vnni run for most of a step.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chatserver.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from chatserver.models.loading import model_config, resolve_model
from chatserver.workers import cpu_features
from chatserver.workers.kernels import Int8Linear
from chatserver.workers.precision import int8_kernels
from load_tests.machine import add_timing_arguments, median_seconds, start_timing

# SmolLM2-135M-Instruct's shapes, used when the converted model is not there.
FALLBACK_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
}


def model_shape(spec: str) -> dict[str, int]:
    try:
        source = resolve_model(spec, DEFAULT_MODELS_DIR, DEFAULT_MODEL_NAME)
        config = model_config(source)
        return {key: int(config[key]) for key in FALLBACK_SHAPE}
    except Exception:  # noqa: BLE001 - no converted model: the default shape is enough here
        return dict(FALLBACK_SHAPE)


def step_weights(shape: dict[str, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random weights of one step's matmuls: per layer q/k/v, o, gate/up, down; the LM head."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    per_layer = [(qkv, hidden), (hidden, hidden), (2 * inner, hidden), (hidden, inner)]
    layers = [
        torch.randn(out, inp) * 0.05
        for _ in range(shape["num_hidden_layers"])
        for out, inp in per_layer
    ]
    return layers, torch.randn(shape["vocab_size"], hidden) * 0.05


def time_step(
    calls: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]], repeats: int
) -> float:
    """Median seconds of one pass over every matmul of a step."""

    def one_pass() -> None:
        for matmul, x in calls:
            matmul(x)

    return median_seconds(one_pass, repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.gemm_ceiling", description=__doc__)
    p.add_argument(
        "--rows", default="1,4,16,32,64", help="streams per step (rows), comma-separated"
    )
    p.add_argument("--model", default="default", help="whose shapes (a model directory or default)")
    p.add_argument("--layers", type=int, default=0, help="layers to time (0: the model's)")
    add_timing_arguments(p, repeats=10)
    args = p.parse_args(argv)
    info = start_timing(args)
    shape = model_shape(args.model)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    kernels = int8_kernels(cpu_features.detect())
    layers, head = step_weights(shape)
    weights = [*layers, head]
    macs_per_row = sum(w.numel() for w in weights)
    paths: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
        "float32": [lambda x, w=w: F.linear(x, w) for w in weights],
        f"fbgemm int8 ({kernels.name} weights)": [
            Int8Linear(w, kernels.weight_max, kernels.scale_rows_above) for w in weights
        ],
    }
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for path, matmuls in paths.items():
            calls = [
                (mm, torch.randn(rows, w.shape[1])) for mm, w in zip(matmuls, weights, strict=True)
            ]
            seconds = time_step(calls, args.repeats)
            results.append(
                {
                    "rows": rows,
                    "path": path,
                    "step_ms": round(seconds * 1e3, 3),
                    "gops": round(2 * macs_per_row * rows / seconds / 1e9, 1),
                    "ceiling_tok_s": round(rows / seconds, 1),
                }
            )
    print(
        f"\n{shape['num_hidden_layers']} layers + LM head, {macs_per_row / 1e6:.1f} M "
        "multiply-adds a row; median of --repeats passes"
    )
    print("\n| rows | kernel path | matmuls ms a step | GOPS | ceiling tok/s |")
    print("|---:|---|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']} | {r['path']} | {r['step_ms']} | {r['gops']} | {r['ceiling_tok_s']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "shape": shape, "rows": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
