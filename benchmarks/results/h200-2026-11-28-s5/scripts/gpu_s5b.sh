#!/usr/bin/env bash
# Fifth session, second call (~6 min on one H200): the Triton philox16 mask against its reference, bit for bit,
# and the three mask kernels timed alone; bf16 LBS 16 native with philox16 (the new default) vs the Bernoulli op;
# where the step's GPU time goes now, with the idle gaps between kernels.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
timeout 120 python -c 'import sys, torch; sys.path.insert(0, "benchmarks"); import gpu_check as g
g.check_dropout_masks(torch.device("cuda"))' 2>&1 | grep -v -i warn
B="python -m lorabench bench --presets bf16 --batch-size 16 --steps 10 --warmup-steps 4"
echo "== bernoulli"
LORABENCH_DROPOUT_MASK=bernoulli timeout 170 $B --engines native --no-floor --run-dir $R/bern 2>&1 | grep -E "^\| native"
echo "== philox16"
timeout 200 $B --engines native --run-dir $R/philox 2>&1 | grep -E "^(\| native|- floor)"
for d in bern philox; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
timeout 150 python benchmarks/profile_step.py --compile --attention cudnn --batch-size 16 --steps 3 --top 16 2>&1 \
    | grep -v -i warn
