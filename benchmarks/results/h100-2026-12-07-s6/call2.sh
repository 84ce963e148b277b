set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-585}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
at "7B qlora block ckpt, the old custom op"
rm -rf /tmp/ckc
PYTHONPATH=src timeout 100 python .base/ck_custom.py run --init random --data synthetic --preset qlora --activation-checkpointing block --max-steps 2 --untimed-steps 1 --batch-size 2 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ckc --model llama2-7b > $O/ck_custom.log 2>&1
echo "rc=$?"; grep -v -i warn $O/ck_custom.log | grep -i "error\|tokens/s per chip" | tail -3 | cut -c1-300
at "llama3-8b nf4 all-linear r16 LBS 4 seq 2048 24 GiB, block"
rm -rf /tmp/b8
PYTHONPATH=/tmp/site:src timeout 220 python -m lorabench bench --presets qlora --engines native,unsloth-4bit --model llama3-8b --batch-size 4 --seq-len 2048 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lora-r 16 --lora-alpha 32 --memory-budget-gib 24 --activation-checkpointing block --steps 8 --untimed-steps 3 --no-floor --run-dir /tmp/b8 2>&1 | grep -v -i warn | tail -8
cp /tmp/b8/bench.md $O/bench_llama3_8b_24gib_block.md 2>/dev/null; cp /tmp/b8/bench.json $O/bench_llama3_8b_24gib_block.json 2>/dev/null
at "70B nf4 48 GiB LBS 8 block"
rm -rf /tmp/b70
PYTHONPATH=src timeout $(( $(left) - 5 )) python -m lorabench bench --presets qlora --engines native --model llama2-70b --batch-size 8 --memory-budget-gib 48 --activation-checkpointing block --steps 6 --untimed-steps 2 --no-floor --run-dir /tmp/b70 2>&1 | grep -v -i warn | tail -8
cp /tmp/b70/bench.md $O/bench_70b_48gib_block.md 2>/dev/null; cp /tmp/b70/bench.json $O/bench_70b_48gib_block.json 2>/dev/null
at "end"
