#!/usr/bin/env bash
# The GPU checks, as one command for a lent GPU machine (the device tool's run), from
# the repository root, after load_tests/gpu_bundle.sh here:
#   run(command="bash load_tests/gpu_check.sh", carry=[".gpu"], timeout_s=560)
# 1. the worker's runner on CUDA against transformers' forward, and its step time
#    at batch 1-256 (load_tests.gpu_runner_check);
# 2. the server with --engine gpu (bf16) under load_tests.bench_batching at
#    concurrency 1-256, on random weights of the default model's shape.
# What it prints and writes lands in $OUT: log.txt, runner.json, bench.json.
# Each step has its own time limit, so a failure or a hang still leaves the others'.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
timeout 120 python3 -m load_tests.random_model .gpu/model /tmp/random-smollm2 || exit 1
echo "== runner on CUDA"
timeout 150 python3 -m load_tests.gpu_runner_check --model /tmp/random-smollm2 \
  --json "$OUT/runner.json"
echo "== runner check exit $?; the server, --engine gpu"
timeout 300 python3 -m load_tests.bench_batching --levels 1,16,64,128,256 --rounds 2 \
  --min-requests 8 --idle-seconds 0 --level-duration 40 \
  --server-args "--model /tmp/random-smollm2 --engine gpu --max-batch 256 --skip-quality-gate" \
  --json "$OUT/bench.json"
echo "== done, bench exit $?"
