#!/usr/bin/env bash
# Session 2, third call: where MMLU scoring's GPU time goes (and boolean mask vs lower-right bias), which attention
# kernel the compiled training step really runs (cuDNN priority vs torch's pick), and the dropout-0.05 curve.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python benchmarks/profile_mmlu.py --mmlu .mmlu 2>&1 | grep -v Warn
for att in cudnn sdpa; do
  python benchmarks/profile_step.py --compile --attention $att --batch-size 4 --top 12 2>&1 | grep -v Warn
done
python -m lorabench bench --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 3e-4 \
    --run-dir $R/curve_dropout 2>&1 | grep -E "^\|"
cp $R/curve_dropout/bench.json ${OUT:-/tmp}/bench_curve_dropout.json 2>/dev/null
