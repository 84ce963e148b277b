#!/usr/bin/env bash
# Ready for the next GPU calls (one H200/H100, two calls of ~6 min: `bash gpu_next.sh 1`, then `... 2`): what
# the second session of 2026-11-28 could not measure.
# 1. MMLU end to end with the current defaults (4 tokenising workers on 16 cores, length/padding-capped batches,
#    async uploads, one read-back per subject): the 60 s goal.
# 2. Fused q/k/v and gate/up projections (LORABENCH_FUSED_PROJECTIONS=1) vs not, tf32 and bf16 LBS 16, CUDA
#    graphs for the tf32 blocks (LORABENCH_COMPILE_MODE=reduce-overhead: the step's launch gaps), with the
#    reference rows they are judged against (tf32: reference; LBS 16: reference+compile) and reference+liger at
#    tf32 (its memory is the bar for every row).
# Part 2 starts with gpu_check.py (CUDA numerics of the CE kernel, the attention choices and fused projections).
# Needs the MMLU folder at .mmlu and the liger wheel on PYTHONPATH (see README) for the liger row.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
part=${1:-1}
if [ "$part" = 1 ]; then
timeout 150 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:256 --naive-per-subject 0 2>&1 \
    | grep -v Warn | tail -2
python -m lorabench bench --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 \
    --warmup-steps 4 --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
LORABENCH_FUSED_PROJECTIONS=1 python -m lorabench bench --presets flagperf-tf32 --engines native --steps 12 --no-floor \
    --warmup-steps 4 --run-dir $R/tf32_fused 2>&1 | grep -E "^\| native"
LORABENCH_COMPILE_MODE=reduce-overhead python -m lorabench bench --presets flagperf-tf32 --engines native --no-floor \
    --steps 12 --warmup-steps 4 --run-dir $R/tf32_graphs 2>&1 | grep -E "^\| native"
fi
if [ "$part" = 2 ]; then
python benchmarks/gpu_check.py 2>&1 | grep -v Warn
python -m lorabench bench --presets bf16 --engines native,reference+compile --batch-size 16 --steps 10 \
    --warmup-steps 4 --run-dir $R/lbs16 2>&1 | grep -E "^(\||- floor)"
LORABENCH_FUSED_PROJECTIONS=1 python -m lorabench bench --presets bf16 --engines native --batch-size 16 --no-floor \
    --steps 10 --warmup-steps 4 --run-dir $R/lbs16_fused 2>&1 | grep -E "^\| native"
fi
for d in tf32 tf32_fused tf32_graphs lbs16 lbs16_fused; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
