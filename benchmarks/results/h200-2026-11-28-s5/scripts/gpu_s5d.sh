#!/usr/bin/env bash
# Fifth session, fourth call (~8 min on one H200, the machine of call C): flagperf-fp16 LBS 4 came out 1.595x
# in call C (17,768 tok/s; 18,493 in the last session): the previous commit's code (.old/src) vs the new code with
# inline masks vs the new defaults, side by side; then flagperf-tf32 native (old and new) vs reference and
# reference+liger (the memory bar).
set -u
export PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
B="python -m lorabench bench --steps 16 --warmup-steps 4 --no-floor"
for v in old inline new; do
  src=src; [ $v = old ] && src=.old/src
  mask=; [ $v = inline ] && mask=inline
  echo "== fp16 $v"
  LORABENCH_DROPOUT_MASK=$mask PYTHONPATH=$src timeout 100 $B --presets flagperf-fp16 --engines native \
      --run-dir $R/fp16_$v 2>&1 | grep -E "^\| native"
done
echo "== tf32 old"
PYTHONPATH=.old/src timeout 100 $B --presets flagperf-tf32 --engines native --run-dir $R/tf32_old 2>&1 | grep -E "^\| native"
echo "== tf32 new"
PYTHONPATH=src:/tmp/site timeout 240 python -m lorabench bench --steps 12 --warmup-steps 4 --presets flagperf-tf32 \
    --engines native,reference,reference+liger --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
for d in fp16_old fp16_inline fp16_new tf32_old tf32; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
