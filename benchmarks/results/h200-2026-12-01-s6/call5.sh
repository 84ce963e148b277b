#!/usr/bin/env bash
# Call 5: Llama-3.1-8B at the model's whole 131,072 tokens, LBS 1, native offload alone (2 steps, 1 untimed: the
# device time left); Unsloth's offloading row at this length is item 49's (another machine)
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench bench --model llama3.1-8b --presets bf16 --engines native --batch-size 1 --seq-len 131072 \
  --activation-checkpointing offload --steps 2 --untimed-steps 1 --no-floor --run-dir /tmp/long_131k \
  --overwrite 2>&1 | grep -v -i warn | grep -E "^\| native|rror"
cp /tmp/long_131k/bench.json $OUT/bench_long131072_offload_native.json
