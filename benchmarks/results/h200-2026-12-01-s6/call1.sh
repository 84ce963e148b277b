#!/usr/bin/env bash
# Call 1: blockwise FP8 GEMMs (1 x 128 by 128 x 128) on the card: kernels vs emulation, then speed vs rowwise
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python benchmarks/gpu_check.py fp8_gemm fp8_blocks 2>&1 | grep -v Warn | tee $OUT/gpu_check_fp8.txt | tail -40
python benchmarks/fp8_gemm.py --only blockwise 2>&1 | grep -v Warn | tee $OUT/fp8_gemm_blockwise.txt | tail -45
