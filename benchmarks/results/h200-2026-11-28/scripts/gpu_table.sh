#!/usr/bin/env bash
# The README's table: floor, then every seed preset on native and reference, then the strongest off-the-shelf rows.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python benchmarks/floor.py --configs 4x512,16x512,2x4096
python -m lorabench bench --presets flagperf-fp32,flagperf-tf32,flagperf-fp16,bf16 --engines native,reference \
    --steps 12 --warmup-steps 4 --run-dir $OUT/main 2>&1 | grep -E "^\||wrote"
python -m lorabench bench --presets bf16 --engines reference+liger,reference+compile \
    --steps 12 --warmup-steps 4 --run-dir $OUT/extra 2>&1 | grep -E "^\||wrote"
