set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-585}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
ck() {  # $1 tag, rest: args
  tag=$1; shift; rm -rf /tmp/ck_$tag
  TORCH_LOGS=recompiles,graph_breaks PYTHONPATH=src timeout 120 python .base/ckdebug.py run --init random --data synthetic --preset qlora --activation-checkpointing block --max-steps 2 --untimed-steps 1 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ck_$tag "$@" > $O/ck_$tag.log 2>&1
  echo "rc=$?"; grep -v -i warn $O/ck_$tag.log | grep -i "error\|tokens/s per chip\|peak memory" | tail -3 | cut -c1-300
  echo "recompiles: $(grep -c -i 'recompiling' $O/ck_$tag.log), graph breaks: $(grep -c -i 'graph break' $O/ck_$tag.log), lines $(wc -l < $O/ck_$tag.log)"
}
at "70B qlora block, 48 GiB, LBS 8 (debug)"
ck 70b48 --model llama2-70b --batch-size 8 --memory-budget-gib 48
at "70B qlora block, no budget, LBS 2 (debug)"
ck 70b --model llama2-70b --batch-size 2
at "bench qlora native,unsloth-4bit 2 rounds"
rm -rf /tmp/bq
PYTHONPATH=/tmp/site:src timeout $(( $(left) - 5 )) python -m lorabench bench --presets qlora --engines native,unsloth-4bit --batch-size 16 --steps 12 --untimed-steps 4 --rounds 2 --no-floor --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -10
cp /tmp/bq/bench.md $O/bench_qlora.md 2>/dev/null; cp /tmp/bq/bench.json $O/bench_qlora.json 2>/dev/null
at "end"
