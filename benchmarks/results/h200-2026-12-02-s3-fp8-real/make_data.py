"""Real human-written text for the FP8 fine-tune check: MMLU's test questions (../shared/data/mmlu, MIT licence)
as plain-text records (``text`` format), each question with its four choices and its answer, shuffled with a fixed
seed; N_TRAIN (default 12,000) for training, 500 for validation. 200 steps of 4 sequences of 128 tokens read
each record at most once.
    python make_data.py ../shared/data/mmlu OUT_DIR [N_TRAIN]
"""
import csv
import json
import random
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
n_train = int(sys.argv[3]) if len(sys.argv) > 3 else 12000
rows = []
for f in sorted((src / "test").glob("*_test.csv")):
    subject = f.name[: -len("_test.csv")].replace("_", " ")
    with open(f, newline="", encoding="utf-8") as fh:
        for q, a, b, c, d, ans in csv.reader(fh):
            rows.append({"text": f"The following is a question about {subject}.\n{q}\nA. {a}\nB. {b}\nC. {c}\n"
                                 f"D. {d}\nAnswer: {ans}"})
random.Random(0).shuffle(rows)
out.mkdir(parents=True, exist_ok=True)
(out / "train.json").write_text(json.dumps(rows[:n_train]))
(out / "val.json").write_text(json.dumps(rows[n_train:n_train + 500]))
print(len(rows), "questions; wrote", out)
