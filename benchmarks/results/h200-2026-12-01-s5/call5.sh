#!/usr/bin/env bash
# Call 5: Llama-3.1-8B at 64k, LBS 1, both stacks offloading the blocks' inputs (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench bench --model llama3.1-8b --presets bf16 --engines native,unsloth --batch-size 1 --seq-len 65536 \
  --activation-checkpointing offload --steps 4 --untimed-steps 2 --no-floor --run-dir /tmp/long64 --overwrite 2>&1 | \
  grep -v -i warn | grep -E "^\||native /|rror|->"
cp /tmp/long64/bench.json $OUT/bench_long64k_offload.json
