#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what load_tests/gpu_check.sh needs on a lent GPU
# machine, which reaches no package index and takes a 64 MiB working tree:
#   .gpu/model/   the default model's config and tokenizer (random weights are made there)
#   .gpu/wheels/  the server's packages its image lacks, built for its Python 3.12
# Run here after `make install`; then carry ".gpu" in the device call (README, "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct
test -f "$model/config.json" || { echo "no $model: run make install first" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/model .gpu/wheels
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja \
    special_tokens_map.json generation_config.json; do
  if [ -f "$model/$f" ]; then cp "$model/$f" .gpu/model/; fi
done
# The device image has torch, transformers, aiohttp, uvloop and prometheus-client
# (/work/.library/device/KINDS.md lists it); these it lacks, at the versions tested here.
wanted=()
for name in redis hiredis llguidance asyncio-throttle; do
  wanted+=("$name==$(.venv/bin/python -m pip show "$name" | sed -n 's/^Version: //p')")
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels "${wanted[@]}"
du -sh .gpu
