#!/usr/bin/env bash
# Session 3, first call (one H200): MMLU end to end with the current defaults (issue 3's 60 s goal); where the
# bf16 LBS 16 step's time goes (profile, plain and fused q/k/v + gate/up GEMMs); native at LBS 16 plain / fused,
# LBS 32 fused, LBS 16 with max-autotune GEMMs; tf32 with fused GEMMs and with CUDA graphs; floors at LBS 16, 32.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:256 --naive-per-subject 0 2>&1 \
    | grep -v Warn | tail -3
for f in "" --fuse; do
  timeout 120 python benchmarks/profile_step.py --compile $f --attention cudnn --batch-size 16 --top 22 2>&1 \
      | grep -v Warn
done
B="python -m lorabench bench --presets bf16 --engines native --steps 10 --warmup-steps 4"
$B --batch-size 16 --run-dir $R/lbs16 2>&1 | grep -E "^(\| native|- floor)"
LORABENCH_FUSED_PROJECTIONS=1 $B --batch-size 16 --no-floor --run-dir $R/lbs16_fused 2>&1 | grep -E "^\| native"
LORABENCH_FUSED_PROJECTIONS=1 $B --batch-size 32 --run-dir $R/lbs32_fused 2>&1 | grep -E "^(\| native|- floor)"
T="python -m lorabench bench --presets flagperf-tf32 --engines native --steps 12 --warmup-steps 4 --no-floor"
$T --run-dir $R/tf32 2>&1 | grep -E "^\| native"
LORABENCH_FUSED_PROJECTIONS=1 $T --run-dir $R/tf32_fused 2>&1 | grep -E "^\| native"
LORABENCH_COMPILE_MODE=reduce-overhead $T --run-dir $R/tf32_graphs 2>&1 | grep -E "^\| native"
LORABENCH_COMPILE_MODE=max-autotune-no-cudagraphs LORABENCH_FUSED_PROJECTIONS=1 timeout 200 $B --batch-size 16 \
    --no-floor --run-dir $R/lbs16_autotune 2>&1 | grep -E "^\| native"
for d in lbs16 lbs16_fused lbs32_fused tf32 tf32_fused tf32_graphs lbs16_autotune; do
  cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
