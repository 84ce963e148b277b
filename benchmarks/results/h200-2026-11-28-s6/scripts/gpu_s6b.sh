#!/usr/bin/env bash
# Sixth session, second call (<= 10 min on one H200): the same-run ratios of the table, each row run in three
# rounds with the engines alternating (`lorabench bench --rounds`), so the machine's drift between runs (5% in
# call A) hits both sides alike: flagperf-fp16 native vs reference; flagperf-tf32 native vs reference and
# reference+liger (+ floor); bf16 seq 4096 LBS 2 native vs reference+liger (+ floor), two rounds.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
B="python -m lorabench bench"
echo "== fp16 ($SECONDS s)"
timeout 200 $B --presets flagperf-fp16 --engines native,reference --steps 16 --warmup-steps 4 --rounds 3 \
    --no-floor --run-dir $R/fp16 2>&1 | grep -E "^\|"
echo "== tf32 ($SECONDS s)"
timeout 200 $B --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 --warmup-steps 4 \
    --rounds 3 --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
echo "== seq 4096 ($SECONDS s)"
timeout 150 $B --presets bf16 --engines native,reference+liger --batch-size 2 --seq-len 4096 --steps 8 \
    --warmup-steps 3 --rounds 2 --run-dir $R/t4096 2>&1 | grep -E "^(\||- floor)"
for d in fp16 tf32 t4096; do cp $R/$d/bench.json ${OUT:-/tmp}/callB_$d.json 2>/dev/null; done
echo "done ($SECONDS s)"
