"""Decode attention over slot views against a paged cache's gather, per layer.

Why workers/kv_cache.py keeps each running sequence in a contiguous slot:
on a CPU without a paged-attention kernel a block-table cache must gather
every sequence's blocks into one tensor per layer before attention. This
times one layer's decode attention both ways with the default model's shapes
(SmolLM2-135M: 9 query heads, 3 key/value heads, head_dim 64).

    python -m load_tests.kv_layout                # bf16 and float32
    python -m load_tests.kv_layout --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from load_tests.machine import add_timing_arguments, median_seconds, start_timing

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SHAPES = ((1, 256), (16, 256), (16, 1024), (4, 2048), (32, 512))  # (sequences, positions)


def time_call(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median microseconds of `fn` over `repeats` calls, after warm-up."""
    return median_seconds(fn, repeats, warmup=3) * 1e6


def measure(sequences: int, positions: int, dtype: torch.dtype, block: int, repeats: int) -> dict:
    q = torch.randn(sequences, HEADS, 1, HEAD_DIM, dtype=dtype)
    # The runner's layout: [slots, kv_heads, capacity, head_dim], running slots first.
    slots = torch.randn(sequences + 8, KV_HEADS, positions, HEAD_DIM, dtype=dtype)
    # A paged pool: [blocks, block, kv_heads, head_dim], each sequence's blocks scattered.
    blocks = positions // block
    pool = torch.randn(sequences * blocks * 2, block, KV_HEADS, HEAD_DIM, dtype=dtype)
    table = torch.randperm(pool.shape[0])[: sequences * blocks]

    def slot_view() -> torch.Tensor:
        k = v = slots[:sequences, :, :positions]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def paged() -> torch.Tensor:
        def gather() -> torch.Tensor:
            rows = pool.index_select(0, table).view(sequences, positions, KV_HEADS, HEAD_DIM)
            return rows.transpose(1, 2)

        return F.scaled_dot_product_attention(q, gather(), gather(), enable_gqa=True)

    slot_us, paged_us = time_call(slot_view, repeats), time_call(paged, repeats)
    return {
        "sequences": sequences,
        "positions": positions,
        "dtype": str(dtype).removeprefix("torch."),
        "slot_view_us": round(slot_us, 1),
        "paged_gather_us": round(paged_us, 1),
        "ratio": round(paged_us / slot_us, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.kv_layout", description=__doc__)
    p.add_argument("--dtype", choices=("bfloat16", "float32", "both"), default="both")
    p.add_argument("--block", type=int, default=16, help="paged cache block size")
    add_timing_arguments(p, repeats=50)
    args = p.parse_args(argv)
    info = start_timing(args)
    dtypes = ("bfloat16", "float32") if args.dtype == "both" else (args.dtype,)
    rows = [
        measure(n, length, getattr(torch, name), args.block, args.repeats)
        for name in dtypes
        for n, length in SHAPES
    ]
    print("\n| dtype | sequences | positions | slot view µs | paged gather µs | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['sequences']} | {r['positions']} | {r['slot_view_us']} "
            f"| {r['paged_gather_us']} | {r['ratio']}x |"
        )
    print("\none layer's decode attention, median of --repeats calls")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
