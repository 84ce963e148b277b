#!/usr/bin/env bash
# Fifth session, third call (~9 min on one H200): the table rows with the new defaults (philox16 masks, compiled
# cross-entropy chunks): bf16 LBS 16 native vs reference+compile (20 steps: step times vary by ~2%), the floor;
# bf16 seq 4096 LBS 2 native vs reference+liger; flagperf-fp16 native vs reference.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
B="python -m lorabench bench"
timeout 280 $B --presets bf16 --engines native,reference+compile --batch-size 16 --steps 20 --warmup-steps 4 \
    --run-dir $R/lbs16 2>&1 | grep -E "^(\||- floor)"
timeout 190 $B --presets bf16 --engines native,reference+liger --batch-size 2 --seq-len 4096 --steps 8 --warmup-steps 3 \
    --run-dir $R/t4096 2>&1 | grep -E "^(\||- floor)"
timeout 100 $B --presets flagperf-fp16 --engines native,reference --steps 12 --warmup-steps 4 --no-floor \
    --run-dir $R/fp16 2>&1 | grep -E "^\|"
for d in lbs16 t4096 fp16; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
