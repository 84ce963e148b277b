set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s)
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ck() {  # $1 tag, rest: args (no checkpoint debug)
  tag=$1; shift; rm -rf /tmp/ck_$tag
  TORCH_LOGS=recompiles,graph_breaks PYTHONPATH=src timeout 110 python -m lorabench run --init random --data synthetic --preset qlora --activation-checkpointing block --max-steps 3 --untimed-steps 1 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ck_$tag "$@" > $O/ck_$tag.log 2>&1
  echo "rc=$?"; grep -v -i warn $O/ck_$tag.log | grep -i "error\|tokens/s per chip" | tail -2 | cut -c1-200
  echo "recompiles: $(grep -c -i 'recompiling' $O/ck_$tag.log), graph breaks: $(grep -c -i 'graph break' $O/ck_$tag.log)"
}
at "7B block compiled, no debug"; ck 7b --model llama2-7b --batch-size 2
at "7B block eager, no debug"; ck 7be --model llama2-7b --batch-size 2 --no-compile
at "70B block 48 GiB LBS 8, no debug"; ck 70b --model llama2-70b --batch-size 8 --memory-budget-gib 48
at end
