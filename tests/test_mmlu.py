"""MMLU: exact prompts, lm-eval's scoring, batched == unbatched == prefix-cached, both layouts, errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorabench.config import ConfigError, LoRAConfig, ModelConfig
from lorabench.data.tokenizer import Tokenizer
from lorabench.engines import build_engine
from lorabench.assets import TINY_MMLU, TINY_MODEL
from lorabench.mmlu.data import (CATEGORY, LETTERS, Question, Subject, build_context, load_mmlu, make_request,
                                 make_requests, subject_requests)
from lorabench.mmlu.evaluate import COMPILED_GRAPH_MIN, MmluOptions, evaluate_mmlu, summarize
from lorabench.mmlu.scoring import length_batches, score_requests

from conftest import assert_logprobs_close, logprob_tol, need_shared_mmlu

CPU = torch.device("cpu")


def test_prompt_is_lm_evals_template_byte_for_byte():
    shots = [Question("high_school_geography", i, q, ["w", "x", "y", "z"], g)
             for i, (q, g) in enumerate([("Shot one?", 0), ("Shot two?", 3)])]
    q = Question("high_school_geography", 0, "  Which river is longest? \n", ["Nile", "Amazon", "Po", "Rhine"], 0)
    text = build_context(Subject("high_school_geography", shots, [q]), q, shots=2)
    assert text == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "Shot one?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
        "Shot two?\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n"
        "Which river is longest?\nA. Nile\nB. Amazon\nC. Po\nD. Rhine\nAnswer:")
    assert build_context(Subject("high_school_geography", shots, [q]), q, shots=0).startswith(
        "The following are multiple choice questions (with answers) about high school geography.\n\nWhich river")


def test_real_question_that_needs_stripping():
    root = need_shared_mmlu()
    (sub,) = load_mmlu(root, ["business_ethics"])
    q = sub.test[3]
    assert q.question.startswith(" ______ is an employee's preferred ratio")
    text = build_context(sub, q, 5)
    assert "\n\n______ is an employee's preferred ratio" in text
    assert text.startswith("The following are multiple choice questions (with answers) about business ethics.\n\n"
                           + sub.dev[0].question.strip() + "\nA. " + sub.dev[0].choices[0] + "\n")
    assert text.endswith("\nD. " + q.choices[3] + "\nAnswer:")


def test_full_set_counts_and_categories():
    root = need_shared_mmlu()
    subs = load_mmlu(root)
    assert len(subs) == 57 and sum(len(s.test) for s in subs) == 14042 and sum(len(s.dev) for s in subs) == 285
    assert {s.name for s in subs} == set(CATEGORY)


def tiny_engine():
    cfg = ModelConfig.from_hf_json(TINY_MODEL)
    return build_engine("native", cfg, LoRAConfig(), model_dir=TINY_MODEL, device=CPU, precision="fp32", seed=0)


def tiny_requests(extra_real=False):
    tok = Tokenizer(TINY_MODEL)
    subs = load_mmlu(TINY_MMLU)
    if extra_real:
        # long prompts: shots dropped; high_school_us_history also mixes a left-truncated context (which shares no
        # prefix with the others) into a group
        subs += load_mmlu(need_shared_mmlu(), ["astronomy", "high_school_us_history", "marketing"], limit=6)
    return [make_request(tok, s, q, 5, 512) for s in subs for q in s.test]


def test_batched_equals_unbatched_equals_prefix_cached():
    eng = tiny_engine()
    eng.eval()
    reqs = tiny_requests()
    one = torch.tensor(score_requests(eng, reqs, CPU, batch_size=1, use_prefix_cache=False))
    batched = torch.tensor(score_requests(eng, reqs, CPU, batch_size=7, use_prefix_cache=False))
    cached = torch.tensor(score_requests(eng, reqs, CPU, batch_size=7, use_prefix_cache=True,
                                         prefix_attention="copy"))  # per-row copies of the prefix, SDPA
    cached_one = torch.tensor(score_requests(eng, reqs, CPU, batch_size=1, use_prefix_cache=True))  # lone rows
    split = torch.tensor(score_requests(eng, reqs, CPU, batch_size=7, use_prefix_cache=True,
                                        prefix_attention="split"))  # no per-row copies of the prefix
    assert_logprobs_close(batched, one)
    assert_logprobs_close(cached, one)
    assert_logprobs_close(cached_one, one)
    assert_logprobs_close(split, one)
    with pytest.raises(ValueError, match="prefix_attention 'share'"):
        score_requests(eng, reqs, CPU, batch_size=7, use_prefix_cache=True, prefix_attention="share")
    # and against a plain full forward of each context, read at its last position
    r = reqs[3]
    with torch.no_grad():
        logp = torch.log_softmax(eng.logits(torch.tensor([r.context]))[0, -1], -1)
    assert_logprobs_close(one[3], logp[[c[0] for c in r.conts]])


def test_prefix_cache_with_real_subjects_and_long_prompts():
    eng = tiny_engine()
    eng.eval()
    reqs = tiny_requests(extra_real=True)
    assert any(r.shots < 5 for r in reqs)  # the tiny model's 512 context forces dropped shots on real subjects
    assert any(r.truncated for r in reqs)
    one = torch.tensor(score_requests(eng, reqs, CPU, batch_size=1, use_prefix_cache=False))
    cached = torch.tensor(score_requests(eng, reqs, CPU, batch_size=5, use_prefix_cache=True, prefix_attention="copy"))
    split = torch.tensor(score_requests(eng, reqs, CPU, batch_size=5, use_prefix_cache=True, prefix_attention="split"))
    assert_logprobs_close(cached, one)
    assert_logprobs_close(split, one)


class RiggedEngine:
    """Always prefers one letter's token: accuracy must equal the share of questions whose gold is that letter."""

    model_cfg = ModelConfig.from_hf_json(TINY_MODEL)
    supports_prefix_cache = False

    def __init__(self, token_id, vocab):
        self.token_id, self.vocab = token_id, vocab

    def forward_hidden(self, ids):
        return torch.zeros(*ids.shape, 1)

    def head(self, h):
        out = torch.zeros(*h.shape[:-1], self.vocab)
        out[..., self.token_id] = 5.0
        return out

    def eval(self):
        pass

    def train(self):
        pass


def test_rigged_model_scores_exactly_the_gold_share():
    tok = Tokenizer(TINY_MODEL)
    reqs = tiny_requests()
    letter_tok = reqs[0].conts[1][0]  # " B"
    eng = RiggedEngine(letter_tok, tok.vocab_size)
    scores = score_requests(eng, reqs, CPU, batch_size=4, use_prefix_cache=True)
    s = summarize(reqs, scores, 5)
    share = sum(r.q.gold == 1 for r in reqs) / len(reqs)
    assert 0 < share < 1
    assert s["acc"] == pytest.approx(share)


def test_both_layouts_give_the_same_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    subs = load_mmlu(TINY_MMLU)
    (tmp_path / "all").mkdir()
    for split in ("dev", "test"):
        rows = [{"question": q.question, "subject": s.name, "choices": q.choices, "answer": q.gold}
                for s in subs for q in getattr(s, split)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all" / f"{split}-00000-of-00001.parquet")
    other = load_mmlu(tmp_path)
    assert [s.name for s in other] == [s.name for s in subs]
    for a, b in zip(subs, other):
        assert [build_context(a, q, 5) for q in a.test] == [build_context(b, q, 5) for q in b.test]
        assert [q.index for q in b.test] == list(range(len(b.test)))


def test_malformed_rows_and_unknown_subjects(tmp_path):
    shutil.copytree(TINY_MMLU, tmp_path / "m")
    f = tmp_path / "m" / "test" / "elementary_mathematics_test.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:2] + ["What?,1,2,3"] + lines[3:]) + "\n")
    with pytest.raises(ConfigError, match=r"elementary_mathematics_test.csv: row 3 has 4 fields"):
        load_mmlu(tmp_path / "m")
    f.write_text("\n".join(lines[:1] + ["What?,1,2,3,4,E"]) + "\n")
    with pytest.raises(ConfigError, match=r"row 2 answer 'E' is not one of A, B, C, D"):
        load_mmlu(tmp_path / "m")
    f.write_bytes(lines[0].encode() + b"\nCaf\xe9?,1,2,3,4,A\n")
    with pytest.raises(ConfigError, match=r"elementary_mathematics_test.csv: not UTF-8 text \(byte 0xe9 at line 2\)"):
        load_mmlu(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"--subjects: astrology not in"):
        load_mmlu(TINY_MMLU, ["astrology"])
    with pytest.raises(ConfigError, match="nothing: no such folder"):
        load_mmlu(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="not a folder with test/"):
        load_mmlu(f)


def test_too_long_drops_shots_then_truncates():
    tok = Tokenizer(TINY_MODEL)
    (sub,) = load_mmlu(TINY_MMLU, ["elementary_mathematics"])
    q = sub.test[0]
    full = make_request(tok, sub, q, 5, 10_000)
    assert full.shots == 5 and not full.truncated
    tight = make_request(tok, sub, q, 5, len(full.context) - 5)
    assert tight.shots == 4 and len(tight.context) + 1 <= len(full.context) - 5
    tiny = make_request(tok, sub, q, 5, 8)
    assert tiny.shots == 0 and tiny.truncated and len(tiny.context) + 1 == 8


def test_eval_command_writes_predictions(tmp_path):
    import json

    from lorabench.cli import main

    assert main(["eval", "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path), "--limit", "3"]) == 0
    preds = [json.loads(x) for x in (tmp_path / "mmlu_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and {p["gold"] for p in preds} <= set(LETTERS)
    assert [p["index"] for p in preds if p["subject"] == "elementary_mathematics"] == [0, 1, 2]
    s = json.loads((tmp_path / "mmlu.json").read_text())
    assert s["questions"] == 6 and s["categories"]["STEM"]["questions"] == 6


def test_hub_name_reads_cais_layout_through_datasets(monkeypatch):
    import sys
    import types

    subs = load_mmlu(TINY_MMLU)

    def load_dataset(name, config, split):
        assert (name, config) == ("cais/mmlu", "all")
        return [{"question": q.question, "subject": s.name, "choices": q.choices, "answer": q.gold}
                for s in subs for q in getattr(s, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    other = load_mmlu("cais/mmlu", ["elementary_mathematics"], limit=4)
    assert [s.name for s in other] == ["elementary_mathematics"] and len(other[0].test) == 4
    assert build_context(other[0], other[0].test[1], 5) == build_context(subs[1], subs[1].test[1], 5)


class CharTokenizer:
    """Characters as tokens, with one merge: ': ' before a final 'B' becomes one token. So ' A' is two
    tokens (multi-token continuation) and letter B's context ends differently from the others' (per-letter split)."""

    bos_id, eos_id, add_bos = 1, 2, True

    def encode(self, text):
        ids = [3 + ord(ch) % 2000 for ch in text]
        if text.endswith(": B"):
            ids[-3:-1] = [2040]
        return ids

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def with_bos(self, ids):
        return [1] + ids


def test_multi_token_and_per_letter_splits_score_only_the_continuation():
    eng = tiny_engine()
    eng.eval()
    (sub,) = load_mmlu(TINY_MMLU, ["elementary_mathematics"], limit=2)
    reqs = make_requests(CharTokenizer(), [(sub, q) for q in sub.test], 1, 512)
    r = reqs[0]
    assert not r.single_token
    assert r.contexts[1] != r.contexts[0] and r.conts[1] == [3 + ord("B")]  # B: context ends in the merge
    assert r.conts[0] == [3 + ord(" "), 3 + ord("A")]  # A: the space and the letter
    scores = score_requests(eng, reqs, CPU, batch_size=4, use_prefix_cache=True)
    for r, s in zip(reqs, scores):
        for k in range(4):
            seq = r.contexts[k] + r.conts[k]
            with torch.no_grad():
                logp = torch.log_softmax(eng.logits(torch.tensor([seq]))[0], -1)
            n = len(r.contexts[k])
            want = sum(logp[n - 1 + j, t].item() for j, t in enumerate(r.conts[k]))
            assert s[k] == pytest.approx(want, abs=logprob_tol(want))


def test_prefix_mask_forms_agree(monkeypatch):
    """The lower-right causal bias and the explicit boolean mask give the same attention (GQA included)."""
    from lorabench.mmlu import scoring as mmlu

    if mmlu._lower_right_causal() is None:
        pytest.skip("this torch has no lower-right causal bias with GQA")
    import torch.nn.functional as F

    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    bias = mmlu._prefix_mask(5, 7, CPU)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    monkeypatch.setattr(mmlu, "_lower_right_causal", lambda: None)
    mask = mmlu._prefix_mask(5, 7, CPU)
    assert type(bias).__name__ == "CausalBias" and type(mask) is torch.Tensor  # the two forms, each once
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_background_tokenising_gives_the_same_requests(monkeypatch):
    """The worker processes that tokenise while scoring runs build exactly the requests of the inline path, in
    order, also when a subject is split into several tasks."""
    from lorabench.mmlu import data as mmlu_data

    monkeypatch.setattr(mmlu_data, "TOKENIZE_CHUNK", 2)  # the tiny subjects' test sets are split in pieces
    subs = load_mmlu(TINY_MMLU)
    assert max(len(s.test) for s in subs) > 2
    inline = [r for chunk in subject_requests(TINY_MODEL, subs, 5, 512, background=0) for r in chunk]
    worker = [r for chunk in subject_requests(TINY_MODEL, subs, 5, 512, background=2) for r in chunk]
    assert len(subs) == 2 and len(worker) == len(inline) == sum(len(s.test) for s in subs)
    for a, b in zip(inline, worker):
        assert (a.q, a.contexts, a.conts, a.shots, a.truncated) == (b.q, b.contexts, b.conts, b.shots, b.truncated)


@pytest.mark.slow
@pytest.mark.parametrize("prefix_attention", ["copy", "split"])
def test_compiled_blocks_score_like_eager(tmp_path, prefix_attention):
    """The GPU default compiles the blocks; its shape-generic eval graph (suffix batches of every size, the
    prefix's keys and values copied per row or not) gives the eager scores in fp32. A short evaluation does not
    compile it."""
    pytest.importorskip("torch._inductor")
    from dataclasses import replace

    from torch._dynamo.utils import counters

    from lorabench.convert import compile_blocks

    eng = tiny_engine()
    opts = MmluOptions(str(TINY_MMLU), batch_size=3, prefix_attention=prefix_attention)
    eager = evaluate_mmlu(eng, TINY_MODEL, opts, CPU, tmp_path / "eager", progress=False)
    compile_blocks(eng.model)
    graphs = counters["stats"]["unique_graphs"]
    short = evaluate_mmlu(eng, TINY_MODEL, opts, CPU, tmp_path / "short", progress=False)
    assert counters["stats"]["unique_graphs"] == graphs  # too few questions to pay for compiling: eager
    assert short["acc"] == eager["acc"] and eng.model.eval_graph_enabled
    compiled = evaluate_mmlu(eng, TINY_MODEL, replace(opts, compiled_graph=True), CPU, tmp_path / "compiled",
                             progress=False)
    assert counters["stats"]["unique_graphs"] > graphs
    assert compiled["acc"] == eager["acc"]
    read = [[json.loads(x)["logprobs"] for x in (tmp_path / d / "mmlu_predictions.jsonl").read_text().splitlines()]
            for d in ("eager", "compiled")]
    assert_logprobs_close(torch.tensor(read[1]), torch.tensor(read[0]))
    # FlagPerf's protocol takes the same option: its compiled predictions are its eager ones
    from lorabench.mmlu.flagperf import evaluate_flagperf

    subjects = load_mmlu(TINY_MMLU)
    calls = []
    eng.model.eval_layers = tuple((lambda f: lambda *a: calls.append(1) or f(*a))(f) for f in eng.model.eval_layers)
    runs = {}
    for graph in (False, True):
        calls.clear()
        evaluate_flagperf(eng, TINY_MODEL, subjects, 5, 512, CPU, tmp_path / f"fp{graph}", batch_size=3,
                          compiled_graph=graph, prefix_attention=prefix_attention)
        runs[graph] = (tmp_path / f"fp{graph}" / "mmlu_flagperf_predictions.jsonl").read_text()
        assert bool(calls) == graph
    assert runs[True] == runs[False]


def test_gpu_defaults_for_all_of_mmlu():
    """All 14,042 questions on a GPU: batches capped by count and tokens, tokenising in workers, and lm-eval's
    protocol through the compiled graph (it pays for its compile there), FlagPerf's alone eagerly; a CPU, a short
    evaluation and an explicit choice run as asked or eagerly."""
    opts = MmluOptions(str(TINY_MMLU)).resolve(True, 14042, 100_000)
    assert (opts.batch_size, opts.batch_tokens, opts.kv_tokens) == (256, 16384, 100_000)
    assert opts.tokenize_workers >= 1 and opts.compiled_graph is True

    def graph(gpu=True, questions=14042, **kw):
        return MmluOptions(str(TINY_MMLU), **kw).resolve(gpu, questions, 100_000).compiled_graph

    assert graph(protocol="both") is True and graph(protocol="flagperf") is False
    assert graph(gpu=False) is False and graph(questions=COMPILED_GRAPH_MIN - 1) is False
    assert graph(questions=COMPILED_GRAPH_MIN) is True
    assert graph(compiled_graph=False) is False and graph(questions=10, compiled_graph=True) is True


def test_length_batches_by_count_tokens_and_padding():
    lengths = [5, 1, 3, 3, 9, 2, 40]
    # count only: ascending runs of two
    assert length_batches(lengths, 2, None) == [[1, 5], [2, 3], [0, 4], [6]]
    # token cap 12: [1,2,3,3] pads to 4x3=12; adding 5 would pad to 5x5=25; 40 exceeds the cap alone
    assert length_batches(lengths, 10, 12, max_padding=10.0) == [[1, 5, 2, 3], [0], [4], [6]]
    # padding cap 20%: 1 then 2 pads to 4 for 3 real tokens (33%) -> new batch; 2, 3, 3 pads to 9 for 8 (12.5%)
    # fits; adding 5 would pad to 20 for 13 (54%)
    assert length_batches(lengths, 10, 1000, max_padding=0.2) == [[1], [5, 2, 3], [0], [4], [6]]
    # K/V cap 30 after a 10-token prefix: two items of 2 need 2 x 12 = 24; a third of 3 would need 39
    assert length_batches([1, 2, 3], 10, None, prefix=10, kv_tokens=30) == [[0, 1], [2]]
    # every index exactly once, whatever the caps
    for bs, bt in ((1, None), (3, 7), (100, 1)):
        assert sorted(i for b in length_batches(lengths, bs, bt) for i in b) == list(range(len(lengths)))


def test_out_of_memory_halves_the_batches_and_retries(tmp_path, capsys):
    """A batch too big for the device: the run halves its caps and finishes with the same scores."""
    eng = tiny_engine()
    opts = MmluOptions(str(TINY_MMLU), batch_size=8)
    ref = evaluate_mmlu(eng, TINY_MODEL, opts, CPU, tmp_path / "ref", progress=False)
    sizes = []
    plain = eng.forward_hidden

    def small_memory(ids, *args, **kw):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return plain(ids, *args, **kw)

    eng.forward_hidden = small_memory
    got = evaluate_mmlu(eng, TINY_MODEL, opts, CPU, tmp_path / "oom", progress=False)
    assert max(sizes) > 2 and sizes[-1] <= 2
    read = [[json.loads(x)["logprobs"] for x in (tmp_path / d / "mmlu_predictions.jsonl").read_text().splitlines()]
            for d in ("ref", "oom")]
    assert_logprobs_close(torch.tensor(read[1]), torch.tensor(read[0]))
    assert got["acc"] == ref["acc"]
    out = capsys.readouterr()
    assert "out of device memory" in out.out + out.err


def test_evaluation_writes_each_questions_own_scores(tmp_path, monkeypatch):
    """The whole evaluation (worker processes tokenising subjects in several tasks, each subject's scores read back
    after the next subject is queued) writes, line by line, what scoring each question alone gives."""
    from lorabench.mmlu import data as mmlu_data

    monkeypatch.setattr(mmlu_data, "TOKENIZE_CHUNK", 2)
    eng = tiny_engine()
    opts = MmluOptions(str(TINY_MMLU), batch_size=3, tokenize_workers=2)
    evaluate_mmlu(eng, TINY_MODEL, opts, CPU, tmp_path, progress=False)
    subs = load_mmlu(TINY_MMLU)
    reqs = make_requests(Tokenizer(TINY_MODEL), [(s, q) for s in subs for q in s.test], 5,
                         eng.model_cfg.max_position_embeddings)
    want = score_requests(eng, reqs, CPU, batch_size=1, use_prefix_cache=False)
    lines = [json.loads(x) for x in (tmp_path / "mmlu_predictions.jsonl").read_text().splitlines()]
    assert [(x["subject"], x["index"]) for x in lines] == [(r.q.subject, r.q.index) for r in reqs]
    assert_logprobs_close(torch.tensor([x["logprobs"] for x in lines]), torch.tensor(want))
