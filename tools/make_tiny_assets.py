"""Build the bundled tiny default under src/lorabench/assets/ (run once; the outputs are committed).

- samsum-tiny/{train,val,test}.json: samsum-format dialogues generated here from templates (samsum's own text is
  CC BY-NC-ND and is not shipped). Summaries follow from the dialogue, so there is something to learn.
- mmlu-tiny/{dev,test}/*.csv: MMLU-layout questions generated here (arithmetic, binary numbers), answers computed.
- tiny-llama/: a BPE tokenizer trained on that text (Llama's special tokens <unk>=0 <s>=1 </s>=2) and a 2.6M
  parameter Llama (the "tiny" shape preset) briefly pre-trained on a separate draw of dialogues and summaries (as
  unrelated documents, without the prompt), saved as bf16
  safetensors in HF layout.

    python tools/make_tiny_assets.py      # about a minute on 2 CPU cores
"""
from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorabench.checkpoint import native_to_hf, write_hf_dir  # noqa: E402
from lorabench.config import MODEL_PRESETS  # noqa: E402
from lorabench.data.packing import format_sample, pack  # noqa: E402
from lorabench.model import Llama  # noqa: E402

ASSETS = ROOT / "src" / "lorabench" / "assets"
NAMES = ["Anna", "Tom", "Maria", "Lukas", "Sara", "Ben", "Olga", "Raj", "Emma", "Jonas", "Lea", "Omar", "Nina", "Paul"]
PLACES = ["the cafe", "the gym", "the library", "the park", "the cinema", "the station", "the office", "the market"]
THINGS = ["the tickets", "the keys", "the charger", "the book", "the cake", "the umbrella", "the report", "the map"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def dialogue(rng: random.Random) -> dict:
    a, b = rng.sample(NAMES, 2)
    kind = rng.randrange(4)
    if kind == 0:
        place, hour, day = rng.choice(PLACES), rng.randint(1, 11), rng.choice(DAYS)
        turns = [f"{a}: Are we still meeting on {day}?", f"{b}: Yes! At {place}?", f"{a}: Sure, at {hour} pm.",
                 f"{b}: Great, see you there."]
        summary = f"{a} and {b} will meet at {place} on {day} at {hour} pm."
    elif kind == 1:
        thing, place = rng.choice(THINGS), rng.choice(PLACES)
        turns = [f"{a}: Have you seen {thing}?", f"{b}: I think I left {thing} at {place}.",
                 f"{a}: Can you bring it tomorrow?", f"{b}: Ok, I will."]
        summary = f"{b} left {thing} at {place} and will bring it to {a} tomorrow."
    elif kind == 2:
        n = rng.randint(2, 9)
        thing = rng.choice(["pizzas", "coffees", "sandwiches", "salads"])
        turns = [f"{a}: I'm ordering food, what do you want?", f"{b}: {n} {thing} for the team please.",
                 f"{a}: Done, they arrive in {rng.choice([10, 20, 30])} minutes."]
        summary = f"{a} is ordering {n} {thing} for the team at {b}'s request."
    else:
        day, place = rng.choice(DAYS), rng.choice(PLACES)
        turns = [f"{a}: I can't come on {day}, sorry.", f"{b}: No problem. Maybe next week?",
                 f"{a}: Yes, let's go to {place} then."]
        summary = f"{a} can't come on {day}; {a} and {b} will go to {place} next week."
    return {"id": f"{rng.getrandbits(32):08x}", "summary": summary, "dialogue": "\r\n".join(turns)}


def mmlu_rows(subject: str, n: int, rng: random.Random) -> list[list[str]]:
    rows = []
    for _ in range(n):
        if subject == "elementary_mathematics":
            x, y = rng.randint(2, 40), rng.randint(2, 40)
            q, ans = f"What is {x} + {y}?", x + y
        else:
            x = rng.randint(3, 31)
            q, ans = f"What is the decimal value of the binary number {x:b}?", x
        opts = {ans}
        while len(opts) < 4:
            opts.add(ans + rng.choice([-3, -2, -1, 1, 2, 3, 4, 10]))
        opts = sorted(opts)
        rng.shuffle(opts)
        rows.append([q, *map(str, opts), "ABCD"[opts.index(ans)]])
    return rows


def main():
    rng = random.Random(20261128)
    data = ASSETS / "samsum-tiny"
    data.mkdir(parents=True, exist_ok=True)
    splits = {"train": 600, "val": 60, "test": 60}
    texts = []
    for split, n in splits.items():
        recs = [dialogue(rng) for _ in range(n)]
        (data / f"{split}.json").write_text(json.dumps(recs, indent=1))
        texts += [format_sample(r) for r in recs]

    mmlu = ASSETS / "mmlu-tiny"
    for subject in ("elementary_mathematics", "college_computer_science"):
        for split, n in (("dev", 5), ("test", 20)):
            (mmlu / split).mkdir(parents=True, exist_ok=True)
            rows = mmlu_rows(subject, n, rng)
            with open(mmlu / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
            texts += [f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer: {r[5]}" for r in rows]

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cfg = MODEL_PRESETS["tiny"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    extra = "The following are multiple choice questions (with answers) about elementary mathematics. 0123456789"
    tok.train_from_iterator(texts + [extra], trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    model_dir = ASSETS / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": cfg.max_position_embeddings,
    }, indent=2))

    # Pre-train on a separate draw of dialogues and of summaries, as unrelated documents: the tiny model starts out
    # as a language model of this text, and the fine-tuning has the dialogue -> summary task left to learn.
    prng = random.Random(7)
    corpus = [text for _ in range(1500) for text in (lambda r: (r["dialogue"], r["summary"]))(dialogue(prng))]
    ids = [[1] + e.ids + [2] for e in tok.encode_batch(corpus, add_special_tokens=False)]
    chunks = torch.from_numpy(pack(ids, 128)).long()
    torch.manual_seed(0)
    model = Llama(cfg)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, 0.0, 0.02) if p.ndim == 2 else torch.nn.init.ones_(p)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps = 250
    for step in range(steps):
        idx = torch.randint(0, len(chunks), (16,))
        loss = model.loss(chunks[idx], chunks[idx])
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    sd = {}
    for name, t in model.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        sd[f"{native_to_hf(module)}.{leaf}"] = t.to(torch.bfloat16)
    write_hf_dir(model_dir, cfg, sd)
    hf = json.loads((model_dir / "config.json").read_text())
    hf["torch_dtype"] = "bfloat16"
    (model_dir / "config.json").write_text(json.dumps(hf, indent=2))
    print("wrote", model_dir, data, mmlu)


if __name__ == "__main__":
    main()
