#!/usr/bin/env bash
# Call 3: the FP8 issue's per-step criterion (7B, random weights, synthetic, 200 steps, dropout 0), settings that
# are not the seed's q/v adapters (items 39, 50, 59, 64: with q/v the random model either stays on its plateau
# or learns in spikes). All: warm-up 10, clip 1.0, cosine. F: v_proj only, lr 2e-4. G: all seven projections (r8 a32),
# lr 1e-4. H: G at dropout 0.05 (the issue's final-loss form).
# bf16 and fp8 of one setting run side by side on the card (curves only; their times are not compared).
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/curves
run() {  # name precision extra-flags...
  local name=$1 p=$2; shift 2
  python -m lorabench run --init random --model llama2-7b --data synthetic --preset $p \
    --max-steps 200 --lr-schedule cosine --lr-warmup-steps 10 --max-grad-norm 1.0 --no-mmlu --no-save-adapter --no-progress \
    --eval-batches 0 --no-tensorboard --run-dir /tmp/c_$name "$@" > /tmp/c_$name.log 2>&1
  echo "curve $name rc=$?"; cp /tmp/c_$name/result.json $OUT/curves/$name.json 2>/dev/null || tail -3 /tmp/c_$name.log
}
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
for s in F G H; do
  case $s in
    F) f="--lr 2e-4 --lora-dropout 0 --lora-targets v_proj";;
    G) f="--lr 1e-4 --lora-dropout 0 --lora-targets $ALL";;
    H) f="--lr 1e-4 --lora-dropout 0.05 --lora-targets $ALL";;
  esac
  run bf16_$s bf16 $f & run fp8_$s fp8 $f & wait
done
python - <<'PY'
import json, os
o = os.environ["OUT"]
for s, what in (("F", "v_proj, lr 2e-4"), ("G", "all seven, lr 1e-4"), ("H", "all seven, lr 1e-4, dropout 0.05")):
    try:
        a = json.load(open(f"{o}/curves/bf16_{s}.json"))["series"]; b = json.load(open(f"{o}/curves/fp8_{s}.json"))["series"]
    except OSError as e:
        print(s, "missing", e); continue
    la, lb = a["loss"], b["loss"]
    gaps = [abs(y - x) / x for x, y in zip(la, lb)]
    i = max(range(10, len(gaps)), key=gaps.__getitem__)
    gn = sorted(a["grad_norm"])
    print(f"{s} ({what}): loss {la[0]:.4f} -> bf16 {la[-1]:.4f} / fp8 {lb[-1]:.4f} ({100*(lb[-1]-la[-1])/la[-1]:+.3f}%); "
          f"largest gap after step 10 {100*gaps[i]:.3f}% at step {i+1}; steps > 1%: {sum(g > 0.01 for g in gaps[10:])}/{len(gaps)-10}; "
          f"bf16 loss at 50/100/150 {la[49]:.3f}/{la[99]:.3f}/{la[149]:.3f}; bf16 grad norm min {gn[0]:.2f} median {gn[len(gn)//2]:.2f} max {gn[-1]:.2f}")
PY
