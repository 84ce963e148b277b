#!/usr/bin/env bash
# What the 2026-11-28 session could not run (see NOTES.md): GPU numerics check, MMLU re-measure, the dropout-0.05
# curve at a stable lr, and a best-LBS sweep. Needs the MMLU folder at .mmlu (or MMLU=path) and liger wheels on
# PYTHONPATH for the liger row.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
MMLU=${MMLU:-.mmlu}
python benchmarks/gpu_check.py 2>&1 | grep -v Warn
timeout 240 python benchmarks/mmlu_speed.py --mmlu "$MMLU" 2>&1 | grep -v Warn
python -m lorabench bench --presets bf16 --engines native,reference --steps 50 --warmup-steps 5 --lr 3e-4 \
    --run-dir "${OUT:-runs}/curve_dropout" 2>&1 | grep -E "^\|"
python benchmarks/floor.py --configs 8x512,16x512,24x512
for lbs in 8 24; do
  python -m lorabench bench --presets bf16 --engines native,reference+compile,reference+liger --batch-size $lbs \
      --steps 10 --warmup-steps 4 --run-dir "${OUT:-runs}/lbs$lbs" 2>&1 | grep -E "^\| (native|ref)"
done
