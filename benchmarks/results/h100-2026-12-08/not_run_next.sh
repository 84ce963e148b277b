# The next call (not run: no device time left). From the repository root with .base/ (llama2-dir.sh's folder as
# .base/llama2, the MMLU CSVs as .base/mmlu) and .whl/unsloth-site.tgz carried; prints a short table per step.
set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
at "llama3-8b nf4 24 GiB block: all blocks vs --checkpoint-blocks 24, 20 (NOTES item 111), Unsloth beside"
rm -rf /tmp/b8
PYTHONPATH=/tmp/site:src timeout 420 python -m lorabench bench --presets qlora --engines native,unsloth-4bit \
  --model llama3-8b --batch-size 4 --seq-len 2048 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lora-r 16 --lora-alpha 32 --memory-budget-gib 24 --activation-checkpointing block \
  --variant 'k24:--checkpoint-blocks 24' --variant 'k20:--checkpoint-blocks 20' \
  --steps 10 --untimed-steps 3 --rounds 2 --no-floor --run-dir /tmp/b8 2>&1 | grep -v -i warn | tail -10
cp /tmp/b8/bench.md $O/bench_llama3_8b_24gib_partial.md 2>/dev/null
at "70B nf4 48 GiB block, LBS 10 and 12"
rm -rf /tmp/b70
PYTHONPATH=src timeout 170 python -m lorabench bench --presets qlora --engines native --model llama2-70b \
  --batch-size 10,12 --memory-budget-gib 48 --activation-checkpointing block --steps 4 --untimed-steps 2 --no-floor \
  --run-dir /tmp/b70 2>&1 | grep -v -i warn | tail -6
cp /tmp/b70/bench.md $O/bench_70b_48gib_lbs.md 2>/dev/null
at end
