#!/usr/bin/env bash
# Fifth session, last call (~7 min on one H200, the machine of calls C-D): bf16 LBS 4 with dropout 0.05, 50 steps,
# native (philox16 masks) vs reference: the curves must fall alike; flagperf-fp16 native vs reference again with
# more steps (call C's native run was 6% below call D's); gpu_check (compiled cross-entropy on CUDA included).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
B="python -m lorabench bench"
timeout 200 $B --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 3e-4 --no-floor \
    --run-dir $R/curve 2>&1 | grep -E "^\|"
timeout 130 $B --presets flagperf-fp16 --engines native,reference --steps 24 --warmup-steps 4 --no-floor \
    --run-dir $R/fp16b 2>&1 | grep -E "^\|"
for d in curve fp16b; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
timeout 100 python benchmarks/gpu_check.py 2>&1 | grep -v -i warn | tail -24
