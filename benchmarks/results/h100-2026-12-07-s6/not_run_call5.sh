set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-280}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
at "7B block compiled, no debug"
TORCH_LOGS=recompiles,graph_breaks PYTHONPATH=src timeout 80 python -m lorabench run --init random --data synthetic --preset qlora --activation-checkpointing block --max-steps 3 --untimed-steps 1 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ck7 --model llama2-7b --batch-size 2 > $O/ck_7b.log 2>&1
echo "rc=$?"; grep -v -i warn $O/ck_7b.log | grep -i "error\|tokens/s per chip" | tail -2 | cut -c1-200
echo "recompiles: $(grep -c -i 'recompiling' $O/ck_7b.log), graph breaks: $(grep -c -i 'graph break' $O/ck_7b.log)"
at "bench qlora native,unsloth-4bit 1 round"
rm -rf /tmp/bq
PYTHONPATH=/tmp/site:src timeout 150 python -m lorabench bench --presets qlora --engines native,unsloth-4bit --batch-size 16 --steps 12 --untimed-steps 4 --no-floor --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -6
cp /tmp/bq/bench.md $O/bench_qlora.md 2>/dev/null; cp /tmp/bq/bench.json $O/bench_qlora.json 2>/dev/null
at "70B nf4 48 GiB LBS 8 block"
rm -rf /tmp/b70
PYTHONPATH=src timeout $(( $(left) - 3 )) python -m lorabench bench --presets qlora --engines native --model llama2-70b --batch-size 8 --memory-budget-gib 48 --activation-checkpointing block --steps 4 --untimed-steps 2 --no-floor --run-dir /tmp/b70 2>&1 | grep -v -i warn | tail -5
cp /tmp/b70/bench.md $O/bench_70b.md 2>/dev/null; cp /tmp/b70/bench.json $O/bench_70b.json 2>/dev/null
at end
