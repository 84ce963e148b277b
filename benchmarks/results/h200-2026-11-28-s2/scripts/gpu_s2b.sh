#!/usr/bin/env bash
# Session 2, second call: MMLU with 1 vs 4 tokenising workers and scoring alone; bf16 LBS 16 with cuDNN attention
# (the new default) vs torch's own SDPA pick, against reference+compile (the best off-the-shelf row at LBS 16).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 280 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:128:1,compiled:128:4 \
    --naive-per-subject 1 2>&1 | grep -v Warn
python -m lorabench bench --presets bf16 --engines native,reference+compile --batch-size 16 --steps 10 \
    --warmup-steps 4 --run-dir $R/lbs16 2>&1 | grep -E "^\|"
LORABENCH_NATIVE_ATTENTION=sdpa python -m lorabench bench --presets bf16 --engines native --batch-size 16 \
    --steps 10 --warmup-steps 4 --run-dir $R/lbs16_sdpa 2>&1 | grep -E "^\| (native|ref)"
for d in lbs16 lbs16_sdpa; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
