#!/usr/bin/env bash
# Sixth session, third call (<= 10 min on one H200): bf16 LBS 16 native vs reference+compile in three rounds with
# the engines alternating (`lorabench bench --rounds 3`), and the floor.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
timeout 540 python -m lorabench bench --presets bf16 --engines native,reference+compile --batch-size 16 --steps 16 \
    --warmup-steps 4 --rounds 3 --run-dir $R/lbs16 2>&1 | grep -E "^(\||- floor)|->"
cp $R/lbs16/bench.json ${OUT:-/tmp}/callC_bf16_lbs16.json 2>/dev/null
echo "done ($SECONDS s)"
