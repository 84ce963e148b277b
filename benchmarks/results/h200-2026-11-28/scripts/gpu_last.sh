#!/usr/bin/env bash
# 50-step loss curves at a stable lr (native vs reference eager, and reference sdpa as the bf16 noise yardstick),
# then MMLU speed.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python -m lorabench bench --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 3e-4 \
    --lora-dropout 0 --run-dir $OUT/c0 2>&1 | grep -E "^\|"
python -m lorabench bench --presets bf16 --engines reference --attn sdpa --steps 50 --warmup-steps 5 --lr 3e-4 \
    --lora-dropout 0 --run-dir $OUT/c0sdpa 2>&1 | grep -E "^\|"
timeout 300 python benchmarks/mmlu_speed.py --mmlu .mmlu 2>&1 | grep -v Warn
