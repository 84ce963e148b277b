#!/usr/bin/env bash
# Call 3: Llama-3.1-8B at its whole 131,072-token context, LBS 1, both stacks keeping the blocks' inputs in host
# memory (native offload, prefetched; Unsloth's "unsloth" gradient checkpointing), in one call: 2 steps, 1 untimed
# (each step ~47 s; item 62's 3-step run did not fit a call) (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench bench --model llama3.1-8b --presets bf16 --engines native,unsloth --batch-size 1 \
  --seq-len 131072 --activation-checkpointing offload --steps 2 --untimed-steps 1 --no-floor \
  --run-dir /tmp/long --overwrite 2>&1 | grep -v -i warn | tee $OUT/bench_long131072.txt | \
  grep -E "^\| (native|unsloth)|native /|rror|Killed"
cp /tmp/long/bench.json $OUT/bench_long131072_offload.json
