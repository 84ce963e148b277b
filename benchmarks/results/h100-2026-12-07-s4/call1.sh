set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=${1:-540}
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
at "gpu_check nf4"
PYTHONPATH=src timeout 80 python benchmarks/gpu_check.py nf4 2>&1 | grep -v -i warn | tail -24
E="eval --init random --model-dir .base/llama2 --mmlu .base/mmlu --precision fp16 --no-progress --mmlu-protocol both"
at "mmlu both, 57 subjects"
rm -rf /tmp/m; PYTHONPATH=src timeout 260 python -m lorabench $E --run-dir /tmp/m 2>&1 | grep -v -i warn | tail -25
cp /tmp/m/eval.json $O/mmlu_eval.json 2>/dev/null; cp /tmp/m/*.md $O/ 2>/dev/null
at "70B nf4, 48 GiB budget, block checkpointing"
rm -rf /tmp/b70
PYTHONPATH=src timeout $(( $(left) - 130 )) python -m lorabench bench --presets qlora --engines native --model llama2-70b --batch-size 8 --memory-budget-gib 48 --activation-checkpointing block --steps 6 --untimed-steps 2 --no-floor --run-dir /tmp/b70 2>&1 | grep -v -i warn | tail -6
cp /tmp/b70/bench.md $O/bench_70b_nf4.md 2>/dev/null; cp /tmp/b70/*.json $O/ 2>/dev/null
for d in /tmp/b70/*/; do [ -f $d/stderr.log ] && { echo "== $d"; grep -v -i warn $d/stderr.log | tail -3; }; done 2>/dev/null | tail -8
at "ab qlora-fp8 prev vs new"
[ $(left) -gt 100 ] && PYTHONPATH=src timeout $(( $(left) - 5 )) python benchmarks/ab.py --a .base/src_prev --b src --preset qlora-fp8 --batch-size 16 --steps 12 --rounds 1 --run-dir /tmp/ab 2>&1 | grep -v -i warn | tail -8
at "end"
