#!/usr/bin/env bash
# Call 4: Llama-3.1-8B long context, LBS 1, both stacks keeping the blocks' inputs in host memory (native offload,
# prefetched; Unsloth's "unsloth" gradient checkpointing): 32k (4 steps, 2 untimed) and the model's whole 131,072
# (3 steps, 1 untimed) (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for spec in 32768:4:2 131072:3:1; do
  IFS=: read seq steps untimed <<< "$spec"
  python -m lorabench bench --model llama3.1-8b --presets bf16 --engines native,unsloth --batch-size 1 \
    --seq-len $seq --activation-checkpointing offload --steps $steps --untimed-steps $untimed --no-floor \
    --run-dir /tmp/long_$seq --overwrite 2>&1 | grep -v -i warn | grep -E "^\| (native|unsloth)|native /|rror"
  cp /tmp/long_$seq/bench.json $OUT/bench_long${seq}_offload.json
done
