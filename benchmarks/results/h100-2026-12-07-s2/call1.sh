set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
s=$(date +%s)
timeout 60 python .base/quick_nf4_check.py > /tmp/gc.log 2>&1; rc=$?
grep -v -i warn /tmp/gc.log | tail -12
D=triton; [ $rc = 0 ] || D=torch
echo "== gpu_check rc=$rc took $(( $(date +%s)-s )) s; dequant for the bench: $D"
s=$(date +%s)
PYTHONPATH=/tmp/site:src timeout 300 python -m lorabench bench --presets qlora-fp8,qlora --engines native,unsloth-4bit --nf4-dequant $D --batch-size 16 --steps 12 --untimed-steps 4 --rounds 1 --no-floor --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -9
echo "== bench took $(( $(date +%s)-s )) s"
cp /tmp/bq/bench.md $O/ 2>/dev/null
for d in /tmp/bq/*/; do [ -f $d/stderr.log ] && { echo "== $d"; grep -v -i warn $d/stderr.log | tail -3; }; done 2>/dev/null | tail -12
