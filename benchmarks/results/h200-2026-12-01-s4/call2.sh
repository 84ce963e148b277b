#!/usr/bin/env bash
# Call 2: Llama-3.1-8B long context at LBS 1, native block checkpointing vs Unsloth's own (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/long
for S in ${SEQS:-16384 32768 65536}; do
  python -m lorabench bench --model llama3.1-8b --presets bf16 --engines native,unsloth --batch-size 1 \
    --seq-len $S --activation-checkpointing block --steps ${STEPS:-4} --untimed-steps ${UNTIMED:-2} --no-floor \
    --run-dir /tmp/long_$S --overwrite 2>&1 | grep -v -i warn | grep -E "^\||native /|error|->" | tail -8
  cp /tmp/long_$S/bench.json $OUT/long/bench_$S.json; cp /tmp/long_$S/bench.md $OUT/long/bench_$S.md
done
