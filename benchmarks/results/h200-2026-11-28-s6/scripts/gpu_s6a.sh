#!/usr/bin/env bash
# Sixth session, first call (<= 10 min on one H200): (1) the bf16 LBS 16 profile with GEMM time by operand shape
# (how much the adapters' rank-8 products cost); (2) flagperf-fp16 LBS 4 native knobs never measured at that
# size: fused projections, CUDA graphs (reduce-overhead), Inductor's coordinate-descent tuning, against the
# default, in one call; (3) if time is left, coordinate-descent tuning at bf16 LBS 16.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/runs; mkdir -p $R
timeout 150 python benchmarks/profile_step.py --compile --attention cudnn --batch-size 16 --top 45 --gemm-shapes \
    2>&1 | grep -v -i warn | tail -80
B="python -m lorabench bench --presets flagperf-fp16 --engines native --steps 16 --warmup-steps 4 --no-floor"
run() {  # name, env assignments...
  local name=$1; shift
  echo "== fp16 $name ($SECONDS s)"
  env "$@" timeout 120 $B --run-dir $R/fp16_$name 2>&1 | grep -E "^\| native"
  cp $R/fp16_$name/bench.json ${OUT:-/tmp}/fp16_$name.json 2>/dev/null
}
run default X=1
run fused LORABENCH_FUSED_PROJECTIONS=1
run graphs LORABENCH_COMPILE_MODE=reduce-overhead
run coord TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
run default2 X=1
if [ $SECONDS -lt 400 ]; then
  for v in coord default; do
    echo "== bf16 LBS 16 $v ($SECONDS s)"
    e=X=1; [ $v = coord ] && e=TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
    env $e timeout 130 python -m lorabench bench --presets bf16 --engines native --batch-size 16 --steps 12 \
        --warmup-steps 4 --no-floor --run-dir $R/bf16_$v 2>&1 | grep -E "^\| native"
  done
fi
echo "done ($SECONDS s)"
