set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-380}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
echo "== gpu_check nf4 (with bitsandbytes from the bundle) at $(( $(date +%s)-T0 )) s"
PYTHONPATH=/tmp/site:src timeout 100 python benchmarks/gpu_check.py nf4 2>&1 | grep -v -i warn; r1=${PIPESTATUS[0]}
echo "== sweep at $(( $(date +%s)-T0 )) s"
PYTHONPATH=src timeout 60 python .base/sweep_nf4.py 2>&1 | grep -v -i warn; r2=${PIPESTATUS[0]}
D=triton; [ $r1 = 0 ] && [ $r2 = 0 ] || D=torch
SC=""; [ -f /tmp/sc/sitecustomize.py ] && SC=/tmp/sc: && cat /tmp/sc/sitecustomize.py
echo "== checks rc=$r1,$r2 at $(( $(date +%s)-T0 )) s; dequant for the bench: $D"
B="--batch-size 16 --steps 12 --untimed-steps 4 --rounds 1 --no-floor"
PYTHONPATH=${SC}/tmp/site:src timeout $(( $(left) - 5 )) python -m lorabench bench --presets qlora-fp8,qlora --engines native,unsloth-4bit --nf4-dequant $D $B --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -9
echo "== bench done at $(( $(date +%s)-T0 )) s"
cp /tmp/bq/bench.md $O/bench_qlora.md 2>/dev/null
for d in /tmp/bq/*/; do [ -f $d/stderr.log ] && { echo "== $d"; grep -v -i warn $d/stderr.log | tail -3; }; done 2>/dev/null | tail -12
if [ $(left) -gt 110 ]; then
  PYTHONPATH=src timeout $(( $(left) - 5 )) python -m lorabench bench --presets fp8 --engines native --variant "tensorwise:--fp8-recipe tensorwise" $B --run-dir /tmp/bt 2>&1 | grep -v -i warn | tail -6
  cp /tmp/bt/bench.md $O/bench_tensorwise.md 2>/dev/null
  echo "== tensorwise done at $(( $(date +%s)-T0 )) s"
fi
