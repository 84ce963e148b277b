#!/usr/bin/env bash
# The real-weights fine-tune (FP8 issue: fp8 and bf16 final losses within 1%) as spreads over seeds instead of
# one pair: SmolLM2-135M-Instruct, seed LoRA (r8 a32 d0.05 q/v), seq 128, LBS 4, lr 1e-4, 200 steps on the bundled
# dialogues; --seed sets the adapter init, the shuffling and the dropout masks, the same for both precisions.
#   bash run.sh MODEL_DIR OUT_DIR "1 2 3"
# CONTROL=1: bf16 with attention as two matmuls instead (the same maths rounded otherwise), the comparison's floor.
set -u
model=$1 out=$2 seeds=${3:-"1 2 3"}
mkdir -p "$out"
precisions="bf16 fp8"; [ -n "${CONTROL:-}" ] && precisions=control
for s in $seeds; do
  for p in $precisions; do
    [ -f "$out/${p}_seed$s.json" ] && continue
    extra=""; prec=$p; [ $p = control ] && { prec=bf16; extra="--attention matmul"; }
    python -m lorabench run --model-dir "$model" --data src/lorabench/assets/samsum-tiny --device cpu $extra \
      --precision $prec --max-steps 200 --epochs 100 --seq-len 128 --batch-size 4 --lr 1e-4 --seed $s --no-mmlu \
      --no-progress --no-save-adapter --no-tensorboard --run-dir /tmp/spread_${p}_$s > /tmp/spread_${p}_$s.log 2>&1
    echo "$p seed $s rc=$?"
    cp /tmp/spread_${p}_$s/result.json "$out/${p}_seed$s.json"
  done
done
