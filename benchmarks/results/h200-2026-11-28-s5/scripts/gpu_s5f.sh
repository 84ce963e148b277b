#!/usr/bin/env bash
# Fifth session, sixth call (~6 min on one H200; the variant was not kept: NOTES item 25): the adapter's rank-r expansions written as unrolled sums in
# compiled blocks (lora.rank_r_product) against the previous commit (.old/src), bf16 LBS 16, alternating
# old/new twice (step times vary by ~2%); then where the new step's GPU time goes.
set -u
export PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
B="python -m lorabench bench --presets bf16 --batch-size 16 --steps 20 --warmup-steps 4 --no-floor"
for i in 1 2; do
  for v in old new; do
    src=src; [ $v = old ] && src=.old/src
    echo "== $v $i"
    PYTHONPATH=$src timeout 110 $B --engines native --run-dir $R/${v}$i 2>&1 | grep -E "^\| native"
    cp $R/${v}$i/bench.json ${OUT:-/tmp}/bench_${v}$i.json 2>/dev/null
  done
done
PYTHONPATH=src timeout 120 python benchmarks/profile_step.py --compile --attention cudnn --batch-size 16 --steps 3 \
    --top 14 2>&1 | grep -v -i warn
