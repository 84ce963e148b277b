"""MMLU by FlagPerf's rules: its prompt byte for byte, its length rule, its whole-vocabulary argmax, batched and
equal question by question to one prompt per forward pass written here from FlagPerf's description."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lorabench.assets import TINY_MMLU, TINY_MODEL
from lorabench.config import LoRAConfig, ModelConfig
from lorabench.data.tokenizer import Tokenizer
from lorabench.engines import build_engine
from lorabench.mmlu import flagperf as fp
from lorabench.mmlu.data import Question, Subject, load_mmlu

from conftest import need_shared_mmlu

CPU = torch.device("cpu")


def test_prompt_is_flagperfs_byte_for_byte():
    shots = [Question("high_school_geography", i, q, ["w", "x", "y", "z"], g)
             for i, (q, g) in enumerate([(" Shot one?", 0), ("Shot two? ", 3)])]
    q = Question("high_school_geography", 0, "  Which river? \n", ["Nile", "Amazon", "Po", "Rhine"], 0)
    text = fp.build_prompt(Subject("high_school_geography", shots, [q]), q, shots=2)
    assert text == (
        "The following are multiple choice questions (with answers) about  high school geography.\n\n"
        " Shot one?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
        "Shot two? \nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
        "  Which river? \n\nA. Nile\nB. Amazon\nC. Po\nD. Rhine\nAnswer:")


def flagperf_prompt(tok, subject, q, shots, seq_len):
    """FlagPerf's loop as its code reads (REFERENCE 1), written out here independently of the module."""
    words = subject.name.split("_")
    prompt = "The following are multiple choice questions (with answers) about " + "".join(" " + w for w in words)
    prompt += ".\n\n"
    for s in subject.dev[:shots]:
        prompt += s.question + "".join(f"\n{c}. {t}" for c, t in zip("ABCD", s.choices)) + "\nAnswer:"
        prompt += " " + "ABCD"[s.gold] + "\n\n"
    prompt += q.question + "".join(f"\n{c}. {t}" for c, t in zip("ABCD", q.choices)) + "\nAnswer:"
    while len(tok.encode(prompt)) + 1 > seq_len:
        parts = prompt.split("\n\n")
        parts.pop(1)
        prompt = "\n\n".join(parts)
    return prompt


def test_length_rule_drops_shots_then_eats_the_question():
    tok = Tokenizer(TINY_MODEL)
    (sub,) = load_mmlu(TINY_MMLU, ["elementary_mathematics"])
    q = replace(sub.test[0], question="First paragraph of the question.\n\nSecond paragraph: " + sub.test[0].question)
    full = fp.make_request(tok, sub, q, 5, 100_000)
    assert full.shots == 5 and full.dropped == 0 and not full.question_cut
    n = len(full.ids)
    two_fewer = fp.make_request(tok, sub, q, 5, n - 40)
    assert two_fewer.shots < 5 and len(two_fewer.ids) <= n - 40 and not two_fewer.question_cut
    prompt = flagperf_prompt(tok, sub, q, 5, n - 40)
    assert two_fewer.ids == tok.with_bos(tok.encode(prompt))
    question_only = len(tok.with_bos(tok.encode(fp.build_prompt(sub, q, 0))))
    eaten = fp.make_request(tok, sub, q, 5, question_only - 1)  # no shot left: a paragraph of the question goes
    assert eaten.shots == 0 and eaten.question_cut and "First paragraph" not in tok.decode(eaten.ids)
    tight = fp.make_request(tok, sub, q, 5, 8)  # one paragraph left and still too long: cut from the left
    assert tight.question_cut and len(tight.ids) == 8


def test_letter_ids_are_the_second_token_with_bos():
    tok = Tokenizer(TINY_MODEL)
    assert fp.letter_ids(tok) == [tok.with_bos(tok.encode(L))[1] for L in "ABCD"]


def plain_predictions(eng, tok, subjects, shots, seq_len):
    """One prompt per forward pass, argmax over the whole vocabulary at the last position."""
    out = []
    for s in subjects:
        for q in s.test:
            ids = tok.with_bos(tok.encode(flagperf_prompt(tok, s, q, shots, seq_len)))
            with torch.no_grad():
                out.append(int(eng.logits(torch.tensor([ids]))[0, -1].argmax()))
    return out


PREFIX_MODES = [{"prefix_cache": False}, {"prefix_cache": True, "prefix_attention": "split"},
                {"prefix_cache": True, "prefix_attention": "copy"}]


@pytest.mark.parametrize("prefix", PREFIX_MODES, ids=["whole-prompts", "prefix-split", "prefix-copy"])
@pytest.mark.parametrize("real", [False, True])
def test_batched_scores_equal_one_prompt_per_forward(tmp_path, real, prefix):
    """The tiny MMLU sample at seq 512 and, with ../shared, real subjects where the 512 cap drops some shots
    (abstract_algebra keeps 3 with the tiny tokenizer) and where it eats into the question itself
    (high_school_european_history's passages); whole prompts in batches, or each subject's shared header and shots
    run once and the rest after it."""
    tok = Tokenizer(TINY_MODEL)
    subjects = load_mmlu(TINY_MMLU)
    if real:
        subjects = load_mmlu(need_shared_mmlu(), ["abstract_algebra", "high_school_european_history"], limit=6)
    eng = build_engine("native", ModelConfig.from_hf_json(TINY_MODEL), LoRAConfig(), model_dir=TINY_MODEL,
                       device=CPU, precision="fp32", seed=0)
    eng.eval()
    summary = fp.evaluate_flagperf(eng, TINY_MODEL, subjects, 5, 512, CPU, tmp_path, batch_size=5, **prefix)
    lines = [json.loads(x) for x in (tmp_path / "mmlu_flagperf_predictions.jsonl").read_text().splitlines()]
    want = plain_predictions(eng, tok, subjects, 5, 512)
    assert [x["pred_token_id"] for x in lines] == want
    gold = fp.letter_ids(tok)
    assert [x["gold_token_id"] for x in lines] == [gold[q.gold] for s in subjects for q in s.test]
    assert [x["correct"] for x in lines] == [p == x["gold_token_id"] for p, x in zip(want, lines)]
    exact = sum(x["correct"] for x in lines) / len(lines)
    assert summary["acc_exact"] == exact and summary["acc"] == round(exact, 3)
    assert set(lines[0]) == {"subject", "index", "pred_token_id", "gold_token_id", "correct", "shots"}
    if real:
        shots = {x["subject"]: x["shots"] for x in lines}
        assert 0 < shots["abstract_algebra"] < 5 and shots["high_school_european_history"] == 0
        assert summary["question_cut"] >= 6


def test_rigged_model_scores_the_gold_share():
    """A model that always predicts the token of " B" is right exactly on the questions whose key is B."""
    tok = Tokenizer(TINY_MODEL)
    b = fp.letter_ids(tok)[1]

    class Rigged:
        supports_prefix_cache = False

        def forward_hidden(self, ids):
            return torch.zeros(*ids.shape, 1)

        def head(self, h):
            out = torch.zeros(*h.shape[:-1], tok.vocab_size)
            out[..., b] = 1.0
            return out

    subjects = load_mmlu(TINY_MMLU)
    reqs = [fp.make_request(tok, s, q, 5, 512) for s in subjects for q in s.test]
    preds = fp.predict(Rigged(), reqs, CPU, batch_size=4)
    assert preds == [b] * len(reqs)
    share = sum(r.q.gold == 1 for r in reqs) / len(reqs)
    assert 0 < share < 1


@pytest.mark.slow
def test_llama2s_tokenizer_length_rule_and_shared_prefixes(llama2_dir, tmp_path):
    """Llama-2's real tokenizer at the case's 512 tokens on real subjects: the prompts are FlagPerf's loop's own
    (written out in this file), the rule drops shots where the passages are long and eats into the question where one
    passage alone is, the gold token of A is 319 as in FlagPerf's runs, and the prefix-shared predictions of a model
    of Llama-2's vocabulary equal one prompt per forward pass, question by question."""
    tok = Tokenizer(llama2_dir)
    assert fp.letter_ids(tok)[0] == 319
    names = ["college_computer_science", "econometrics", "high_school_european_history"]
    subjects = load_mmlu(need_shared_mmlu(), names, limit=8)
    reqs = [fp.make_request(tok, s, q, 5, 512) for s in subjects for q in s.test]
    assert all(len(r.ids) <= 512 for r in reqs)
    for s, r in zip([s for s in subjects for _ in s.test], reqs):
        if r.dropped <= 5 and len(r.ids) < 512:  # (a prompt cut from the left is not FlagPerf's: its loop fails)
            assert r.ids == tok.with_bos(tok.encode(flagperf_prompt(tok, s, r.q, 5, 512)))
    assert any(0 < r.shots < 5 for r in reqs) and any(r.question_cut for r in reqs)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    eng = build_engine("native", cfg, LoRAConfig(), model_dir=None, device=CPU, precision="fp32", seed=0)
    eng.eval()
    with torch.no_grad():  # one prompt per forward pass (the prompts themselves are checked above)
        want = [int(eng.logits(torch.tensor([r.ids]))[0, -1].argmax()) for r in reqs]
    for prefix in PREFIX_MODES:
        assert fp.predict(eng, reqs, CPU, batch_size=4, **prefix) == want, prefix


def test_both_protocols_with_flagperfs_prompts_made_alongside(tmp_path):
    """--mmlu-protocol both: FlagPerf's prompts made in a thread while lm-eval's questions are scored (as on a GPU)
    give the same two results and files as one after the other."""
    from lorabench.mmlu.evaluate import MmluOptions, evaluate_protocols

    eng = build_engine("native", ModelConfig.from_hf_json(TINY_MODEL), LoRAConfig(), model_dir=TINY_MODEL,
                       device=CPU, precision="fp32", seed=0)
    eng.eval()
    opts = MmluOptions(str(TINY_MMLU), protocol="both")
    runs = {}
    for overlap in (False, True):
        out = tmp_path / str(overlap)
        done = evaluate_protocols(eng, TINY_MODEL, opts, CPU, out, progress=False, overlap=overlap)
        runs[overlap] = ({k: {f: v for f, v in s.items() if f not in ("eval_s", "timing")} for k, s in done.items()},
                         [(out / f).read_text() for f in ("mmlu_predictions.jsonl", "mmlu_flagperf_predictions.jsonl")])
    assert runs[True] == runs[False] and set(runs[True][0]) == {"lm-eval", "flagperf"}
