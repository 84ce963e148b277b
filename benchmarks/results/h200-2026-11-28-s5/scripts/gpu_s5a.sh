#!/usr/bin/env bash
# Fifth session, first call (~8 min on one H200), bf16 LBS 16: the previous commit's code (.old/src, a `git archive`
# of it) against the dropout masks drawn by the keep-mask op plus the compiled cross-entropy chunks, and the op
# alone switched back (LORABENCH_DROPOUT_MASK=inline), so each change has its share; reference+compile and the
# floor from the same call; then where the new step's GPU time goes.
set -u
export PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
B="python -m lorabench bench --presets bf16 --batch-size 16 --steps 10 --warmup-steps 4"
echo "== previous commit"
PYTHONPATH=.old/src timeout 170 $B --engines native --no-floor --run-dir $R/old 2>&1 | grep -E "^\| native"
echo "== inline masks, compiled cross-entropy"
LORABENCH_DROPOUT_MASK=inline PYTHONPATH=src timeout 170 $B --engines native --no-floor --run-dir $R/inline 2>&1 \
    | grep -E "^\| native"
echo "== new defaults, reference+compile, floor"
PYTHONPATH=src timeout 300 $B --engines native,reference+compile --run-dir $R/new 2>&1 | grep -E "^(\||- floor)"
for d in old inline new; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
PYTHONPATH=src timeout 150 python benchmarks/profile_step.py --compile --attention cudnn --batch-size 16 --steps 3 \
    --top 20 2>&1 | grep -v -i warn
