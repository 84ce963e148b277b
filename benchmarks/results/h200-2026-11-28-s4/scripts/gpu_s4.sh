#!/usr/bin/env bash
# Fourth session of 2026-11-28, after the adapter path stopped saving dropped copies of its input (lora.py
# _AdapterDelta: prediction -1.0 GiB at flagperf-tf32 LBS 2, -4 GiB at bf16 LBS 16, speed within 1%).
# 1 (~7 min): flagperf-tf32 native vs reference vs reference+liger (the memory bar); bf16 LBS 16 native vs
#   reference+compile; native at LBS 32; floors.  2 (~4 min): bf16 seq 4096 LBS 2 native vs reference+liger;
#   bf16 LBS 4 with dropout 0.05, 50 steps, native vs reference (the curves must fall alike); gpu_check.
# Needs the liger wheel in .whl (see README).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
B="python -m lorabench bench"
if [ "${1:-1}" = 1 ]; then
$B --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 --warmup-steps 4 --run-dir $R/tf32 \
    2>&1 | grep -E "^(\||- floor)"
$B --presets bf16 --engines native,reference+compile --batch-size 16 --steps 10 --warmup-steps 4 --run-dir $R/lbs16 \
    2>&1 | grep -E "^(\||- floor)"
$B --presets bf16 --engines native --batch-size 32 --steps 8 --warmup-steps 3 --run-dir $R/lbs32 2>&1 \
    | grep -E "^(\| native|- floor)"
for d in tf32 lbs16 lbs32; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
else
$B --presets bf16 --engines native,reference+liger --batch-size 2 --seq-len 4096 --steps 8 --warmup-steps 3 \
    --run-dir $R/t4096 2>&1 | grep -E "^(\||- floor)"
$B --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 3e-4 --no-floor --run-dir $R/curve5 \
    2>&1 | grep -E "^\|"
timeout 100 python benchmarks/gpu_check.py 2>&1 | grep -v -i warn | tail -12
for d in t4096 curve5; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
fi
