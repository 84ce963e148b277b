set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-480}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
at "gpu_check nf4"
PYTHONPATH=/tmp/site:src timeout 100 python benchmarks/gpu_check.py nf4 2>&1 | grep -v -i warn | grep -v "| 0 | 0 |"
B="--batch-size 16 --steps 12 --untimed-steps 4 --rounds 1 --no-floor"
at "bench qlora"
rm -rf /tmp/bq /tmp/bf
PYTHONPATH=/tmp/site:src timeout $(( $(left) - 70 )) python -m lorabench bench --presets qlora --engines native,unsloth-4bit --nf4-dequant triton $B --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -7
cp /tmp/bq/bench.md $O/bench_qlora.md 2>/dev/null
at "bench qlora-fp8"
PYTHONPATH=src timeout $(( $(left) - 5 )) python -m lorabench bench --presets qlora-fp8 --engines native --nf4-dequant triton $B --run-dir /tmp/bf 2>&1 | grep -v -i warn | tail -4
cp /tmp/bf/bench.md $O/bench_qlora_fp8.md 2>/dev/null
for d in /tmp/bq/*/ /tmp/bf/*/; do [ -f $d/stderr.log ] && { echo "== $d"; grep -v -i warn $d/stderr.log | tail -3; }; done 2>/dev/null | tail -12
E="eval --init random --model-dir .base/llama2 --mmlu .base/mmlu --precision fp16 --no-progress --mmlu-protocol lm-eval --limit 10 --mmlu-compiled-graph"
for s in .base/src_old src; do
  [ $(left) -gt 45 ] || break
  at "mmlu lm-eval --limit 10, $s"
  rm -rf /tmp/m; PYTHONPATH=$s timeout $(( $(left) - 3 )) python -m lorabench $E --run-dir /tmp/m 2>&1 | grep -v -i warn | grep -i "eval\|mmlu\|phase\|acc" | tail -4
done
at "end"
