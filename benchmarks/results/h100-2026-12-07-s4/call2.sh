set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-540}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
at "bench qlora native,unsloth-4bit 2 rounds"
rm -rf /tmp/bq
PYTHONPATH=/tmp/site:src timeout 300 python -m lorabench bench --presets qlora --engines native,unsloth-4bit --batch-size 16 --steps 12 --untimed-steps 4 --rounds 2 --no-floor --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -8
cp /tmp/bq/bench.md $O/bench_qlora_rounds2.md 2>/dev/null
at "llama3-8b nf4 all-linear r16 LBS 4 seq 2048 24 GiB"
rm -rf /tmp/b8
PYTHONPATH=/tmp/site:src timeout $(( $(left) - 5 )) python -m lorabench bench --presets qlora --engines native,unsloth-4bit --model llama3-8b --batch-size 4 --seq-len 2048 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lora-r 16 --lora-alpha 32 --memory-budget-gib 24 --steps 8 --untimed-steps 3 --no-floor --run-dir /tmp/b8 2>&1 | grep -v -i warn | tail -8
cp /tmp/b8/bench.md $O/bench_llama3_8b_24gib.md 2>/dev/null; cp /tmp/b8/bench.json $O/bench_llama3_8b.json 2>/dev/null
at "end"
