#!/usr/bin/env bash
# MMLU speed, 50-step loss-curve agreement at the 7B shape, and the best-LBS / long-sequence rows.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python benchmarks/mmlu_speed.py --mmlu .mmlu 2>&1 | grep -v Warn
python -m lorabench bench --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 1e-3 \
    --lora-dropout 0 --run-dir $OUT/curve0 2>&1 | grep -E "^\|"
python -m lorabench bench --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 1e-3 \
    --run-dir $OUT/curve5 2>&1 | grep -E "^\|"
python -m lorabench bench --presets bf16 --engines native,reference+liger,reference+compile --batch-size 16 \
    --steps 10 --warmup-steps 4 --run-dir $OUT/lbs16 2>&1 | grep -E "^\|"
python -m lorabench bench --presets bf16 --engines native,reference+liger --batch-size 2 --seq-len 4096 \
    --steps 10 --warmup-steps 4 --run-dir $OUT/t4096 2>&1 | grep -E "^\|"
