#!/usr/bin/env bash
# Ready for the next GPU call (one H200/H100, ~8 min): what the third session of 2026-11-28 built but could not
# measure, and the open questions of benchmarks/NOTES.md items 12-16.
# 1. MMLU end to end, cold, eager blocks vs compiled (compiling takes 13-16 s of a ~60 s run; eager skips it),
#    with each subject's batches queued before the previous subject's scores are read back (new, unmeasured);
#    scoring alone and the naive one-question loop in the same run.
# 2. bf16 LBS 16: native with CUDA graphs for the training blocks (launch gaps were ~11 ms of a 404 ms step)
#    against plain native and reference+compile, with the floor.
# 3. flagperf-tf32: native (matmul attention recomputing its probabilities) vs reference and reference+liger (the
#    memory bar: 32.3 GiB), with the floor that now also times the compiled matmul attention.
# Needs the MMLU folder at .mmlu and the liger wheel in .whl (see README).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants eager:256,compiled:256 --naive-per-subject 2 \
    2>&1 | grep -v -i warn
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
python -m lorabench bench --presets bf16 --engines native,reference+compile --batch-size 16 --steps 10 \
    --warmup-steps 4 --run-dir $R/lbs16 2>&1 | grep -E "^(\||- floor)"
LORABENCH_COMPILE_MODE=reduce-overhead python -m lorabench bench --presets bf16 --engines native --batch-size 16 \
    --steps 10 --warmup-steps 4 --no-floor --run-dir $R/lbs16_graphs 2>&1 | grep -E "^\| native"
python -m lorabench bench --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 \
    --warmup-steps 4 --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
for d in lbs16 lbs16_graphs tf32; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
