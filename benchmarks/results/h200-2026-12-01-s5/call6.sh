#!/usr/bin/env bash
# Call 6: offload with each block's input fetched back during the next block's backward: the device check, then
# Llama-3.1-8B at 16k, LBS 1, native offload and native block in one call
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python benchmarks/gpu_check.py offload 2>&1 | grep -v -i warn | tail -10
for policy in offload block; do
  python -m lorabench bench --model llama3.1-8b --presets bf16 --engines native --batch-size 1 --seq-len 16384 \
    --activation-checkpointing $policy --steps 4 --untimed-steps 2 --no-floor --run-dir /tmp/long_$policy \
    --overwrite 2>&1 | grep -v -i warn | grep -E "^\| native|rror"
  cp /tmp/long_$policy/bench.json $OUT/bench_long16k_${policy}_prefetch.json
done
