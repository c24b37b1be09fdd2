"""A model directory with a real model's configuration and tokenizer but random weights.

    python -m load_tests.random_model models/SmolLM2-135M-Instruct models/random-smollm2

For speed benchmarks where the real weights cannot go: the GPU device machine
takes a 64 MiB working tree and the default model's weights are 514 MB. A
decode step costs the same whatever the weights' values, so throughput and
latency measured on the copy stand for the real model's; its text is noise,
and greedy replies rarely stop early, so every reply runs to max_tokens.
`SOURCE` needs only `config.json` and the tokenizer files, so a folder of those
(a few MB) is all that has to travel.

`--set num_hidden_layers=1 --set hidden_size=64 ...` shrinks the copy: a model
that decodes in well under a millisecond leaves the server's own delivery path
(detokenizing, framing, sockets) as the bottleneck, and measures it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def write_random_model(
    source: Path, out: Path, seed: int = 0, overrides: dict[str, int] | None = None
) -> Path:
    """Write `out`: `source`'s config (with `overrides`) and tokenizer, weights drawn with `seed`."""
    config = AutoConfig.from_pretrained(source)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"{source}/config.json has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="model directory: config.json + tokenizer")
    parser.add_argument("out", type=Path, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=INT", help="override a config field"
    )
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = int(value)
    print(f"wrote {write_random_model(args.source, args.out, args.seed, overrides)}")


if __name__ == "__main__":
    main()
