set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-570}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
at "7B block compiled, no debug"
TORCH_LOGS=recompiles,graph_breaks PYTHONPATH=src timeout 90 python -m lorabench run --init random --data synthetic --preset qlora --activation-checkpointing block --max-steps 3 --untimed-steps 1 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ck7 --model llama2-7b --batch-size 2 > $O/ck_7b.log 2>&1
echo "rc=$?"; grep -v -i warn $O/ck_7b.log | grep -i "error\|tokens/s per chip\|peak" | tail -3 | cut -c1-250
echo "recompiles: $(grep -c -i 'recompiling' $O/ck_7b.log), graph breaks: $(grep -c -i 'graph break' $O/ck_7b.log)"
at "bench qlora native,unsloth-4bit 3 rounds"
rm -rf /tmp/bq
PYTHONPATH=/tmp/site:src timeout 330 python -m lorabench bench --presets qlora --engines native,unsloth-4bit --batch-size 16 --steps 12 --untimed-steps 4 --rounds 3 --no-floor --run-dir /tmp/bq 2>&1 | grep -v -i warn | tail -8
cp /tmp/bq/bench.md $O/bench_qlora.md 2>/dev/null; cp /tmp/bq/bench.json $O/bench_qlora.json 2>/dev/null
at "llama3-8b nf4 all-linear r16 LBS 4 seq 2048 24 GiB, block"
rm -rf /tmp/b8
PYTHONPATH=/tmp/site:src timeout $(( $(left) - 3 )) python -m lorabench bench --presets qlora --engines native,unsloth-4bit --model llama3-8b --batch-size 4 --seq-len 2048 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lora-r 16 --lora-alpha 32 --memory-budget-gib 24 --activation-checkpointing block --steps 8 --untimed-steps 3 --no-floor --run-dir /tmp/b8 2>&1 | grep -v -i warn | tail -8
cp /tmp/b8/bench.md $O/bench_llama3_8b_24gib_block.md 2>/dev/null; cp /tmp/b8/bench.json $O/bench_llama3_8b_24gib_block.json 2>/dev/null
at end
