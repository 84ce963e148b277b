#!/usr/bin/env bash
# Native fast path vs its eager self and the best reference stacks, with the floor, on one GPU in one call.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python benchmarks/floor.py --configs 4x512,16x512,2x4096
python benchmarks/profile_step.py --engine native --compile --top 14 2>&1 | grep -v Warn | tail -16
python -m lorabench bench --presets bf16 --engines native --steps 12 --warmup-steps 4 --run-dir $OUT/b4 2>&1 | tail -3
python -m lorabench bench --presets bf16 --engines native --steps 12 --warmup-steps 4 --batch-size 16 --run-dir $OUT/b16 2>&1 | tail -3
python -m lorabench bench --presets bf16 --engines native --steps 10 --warmup-steps 4 --batch-size 2 --seq-len 4096 --run-dir $OUT/b2k4 2>&1 | tail -3
