#!/usr/bin/env bash
# Call 1: the loss head's chunks by rows (microbenchmark), offload against block on the device, and the chunk
# change A/B on the Llama-3-8B seed row (carry .base: `git archive 012d719 src`, the tree before the change)
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python benchmarks/ce_chunks.py 2>&1 | grep -v -i warn
python benchmarks/gpu_check.py offload 2>&1 | grep -v -i warn | tail -6
python benchmarks/ab.py --a .base/before/src --b src --preset bf16 --model llama3-8b --batch-size 8 --rounds 2 \
  --steps 10 --untimed-steps 3 --run-dir /tmp/ab -- --seq-len 1024 2>&1 | grep -v -i warn | tail -8
cp /tmp/ab/ab.json $OUT/ab_ce_chunks_llama3.json
