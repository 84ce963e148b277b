"""Real human-written text for the FP8 fine-tune check: MMLU's test questions (../shared/data/mmlu, MIT licence)
as plain-text records (``text`` format), each question with its four choices and its answer, shuffled with a fixed
seed; N_TRAIN (default 12,000) for training, 500 for validation. 200 steps of 4 sequences of 128 tokens read
each record at most once. The records are benchmarks/fp8_realweights.py's ``mmlu_text``.
    python make_data.py ../shared/data/mmlu OUT_DIR [N_TRAIN]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from fp8_realweights import mmlu_text  # noqa: E402

src, out = Path(sys.argv[1]), Path(sys.argv[2])
mmlu_text(src, out, n_train=int(sys.argv[3]) if len(sys.argv) > 3 else 12000)
print("wrote", out)
