set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-570}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
at "70B nf4 48 GiB LBS 8 block"
rm -rf /tmp/b70
PYTHONPATH=src timeout 150 python -m lorabench bench --presets qlora --engines native --model llama2-70b --batch-size 8 --memory-budget-gib 48 --activation-checkpointing block --steps 4 --untimed-steps 2 --no-floor --run-dir /tmp/b70 2>&1 | grep -v -i warn | tail -5
cp /tmp/b70/bench.md $O/bench_70b_48gib_block.md 2>/dev/null; cp /tmp/b70/bench.json $O/bench_70b_48gib_block.json 2>/dev/null
at "profile 7B nf4 triton compiled LBS 16"
PYTHONPATH=src timeout 100 python benchmarks/profile_step.py --engine native --compile --precision nf4 --nf4-dequant triton --batch-size 16 --top 25 > $O/profile_nf4.txt 2>&1
echo "rc=$?"; grep -v -i warn $O/profile_nf4.txt | head -40
at "profile_mmlu lm-eval --limit 30, eager"
PYTHONPATH=src:benchmarks timeout 120 python benchmarks/profile_mmlu.py --mmlu .base/mmlu --model-dir .base/llama2 --limit 30 --top 25 > $O/profile_mmlu.txt 2>&1
echo "rc=$?"; grep -v -i warn $O/profile_mmlu.txt | head -60
for mode in eager compiled; do
  at "MMLU lm-eval 57 subjects, 7B random fp16, $mode"
  extra=""; [ $mode = compiled ] && extra="--mmlu-compiled-graph"
  rm -rf /tmp/ev_$mode
  PYTHONPATH=src timeout $(( $(left) / 2 + 20 )) python -m lorabench eval --init random --model-dir .base/llama2 --mmlu .base/mmlu --precision fp16 --mmlu-protocol lm-eval $extra --no-progress --run-dir /tmp/ev_$mode > $O/ev_$mode.log 2>&1
  echo "rc=$?"; grep -v -i warn $O/ev_$mode.log | tail -4 | cut -c1-250
  cp /tmp/ev_$mode/result.json $O/ev_${mode}_result.json 2>/dev/null
done
at end
