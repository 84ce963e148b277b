#!/usr/bin/env bash
# Sixth session, last call (~5 min on one H200): kernels/adapter.py's Triton kernels (the adapter's input-side
# products with the dropout mask read in place) in bf16/fp16 at the 7B shape against float64, their eager times
# against the plain path, then bf16 LBS 16 native with them off and on, alternating (same seeds and masks, so the
# final losses must agree to bf16 rounding). Ran at commit 0d86d53; the kernels were reverted after it (-1.2%,
# +1.9 GiB: benchmarks/NOTES.md item 31), so it needs that commit's tree.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python benchmarks/gpu_check.py adapter_kernels 2>&1 | grep -v -i warn
R=/tmp/runs; mkdir -p $R
for v in plain1 kernels1 plain2 kernels2; do
  k=0; [ ${v%?} = kernels ] && k=1
  echo "== bf16 LBS 16 $v ($SECONDS s)"
  LORABENCH_ADAPTER_KERNELS=$k timeout 75 python -m lorabench bench --presets bf16 --engines native --batch-size 16 \
      --steps 16 --warmup-steps 4 --no-floor --run-dir $R/$v 2>&1 | grep -E "^\| native"
  cp $R/$v/bench.json ${OUT:-/tmp}/callE_bf16_lbs16_$v.json 2>/dev/null
done
echo "done ($SECONDS s)"
