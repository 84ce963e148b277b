#!/usr/bin/env bash
# Session 2, first call: MMLU end to end (eager vs compiled blocks, batch sizes), the attention kernels per shape
# (floor.py lists each), and the tf32 row with matmul attention vs SDPA. Needs the MMLU folder at .mmlu.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 330 python benchmarks/mmlu_speed.py --mmlu .mmlu 2>&1 | grep -v Warn
python benchmarks/floor.py --configs 4x512,16x512,2x4096
python benchmarks/floor.py --dtype tf32 --configs 2x512
python -m lorabench bench --presets flagperf-tf32 --engines native,reference --steps 12 --warmup-steps 4 \
    --run-dir $R/tf32 2>&1 | grep -E "^\|"
LORABENCH_NATIVE_ATTENTION=sdpa python -m lorabench bench --presets flagperf-tf32 --engines native --steps 12 \
    --warmup-steps 4 --run-dir $R/tf32_sdpa 2>&1 | grep -E "^\| (native|ref)"
for d in tf32 tf32_sdpa; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
