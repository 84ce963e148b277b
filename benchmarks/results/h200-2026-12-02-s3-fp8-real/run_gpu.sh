#!/usr/bin/env bash
# The real-weights FP8 fine-tune on the GPU's own FP8 kernels: SmolLM2-135M-Instruct, seed LoRA (r8 a32 d0.05 q/v),
# seq 128, LBS 4, lr 1e-4, 200 steps, fp8 against bf16 per seed, plus bf16 run twice (the GPU's run-to-run noise).
#   bash run_gpu.sh MODEL_DIR DATA NAME "SEEDS" RESULTS_DIR ["KINDS"]
# DATA: src/lorabench/assets/samsum-tiny (the bundled templated dialogues) or a make_data.py folder (MMLU text).
set -u
model=$1 data=$2 name=$3 seeds=$4 res=$5 kinds=${6:-"bf16 fp8 bf16-again"}
mkdir -p "$res"
for s in $seeds; do
  for p in $kinds; do
    prec=${p%-again}
    t0=$(date +%s)
    PYTHONPATH=src python -m lorabench run --model-dir "$model" --data "$data" --device cuda --precision $prec \
      --max-steps 200 --epochs 100 --seq-len 128 --batch-size 4 --lr 1e-4 --seed $s --no-mmlu --no-progress \
      --no-save-adapter --no-tensorboard --run-dir /tmp/rg_${name}_${p}_$s > /tmp/rg_${name}_${p}_$s.log 2>&1
    echo "$name $p seed $s rc=$? $(( $(date +%s) - t0 )) s"
    cp /tmp/rg_${name}_${p}_$s/result.json "$res/${name}_${p}_seed$s.json" 2>/dev/null || tail -5 /tmp/rg_${name}_${p}_$s.log
  done
done
