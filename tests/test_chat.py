"""Chat records (data/chat.py): messages and ShareGPT conversations rendered with the model's chat template as
transformers renders it, the assistant turns as the response, and the refusals."""
from __future__ import annotations

import json
import shutil

import pytest

from lorabench.assets import TINY_MODEL
from lorabench.cli import main
from lorabench.data.chat import ChatTemplate
from lorabench.data.packing import tokenize_records, tokenize_with_mask
from lorabench.data.samsum import DataError, validate
from lorabench.data.tokenizer import Tokenizer

# a ChatML template with a default system turn and a generation prompt, in the style models ship
CHATML = ("{{ bos_token }}{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TALK = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how are you"},
        {"role": "user", "content": "Tell me a fact"}, {"role": "assistant", "content": "The sky is blue."}]


def model_with_template(tmp_path, template=CHATML, as_file=False):
    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if as_file:
        (d / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_text_is_transformers_apply_chat_template(tmp_path, as_file):
    transformers = pytest.importorskip("transformers")
    d = model_with_template(tmp_path, as_file=as_file)
    ct = ChatTemplate.from_model_dir(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for msgs in (TALK, TALK[:2], [{"role": "system", "content": "S"}] + TALK[:2]):
        for gen in (False, True):
            assert ct.render(msgs, add_generation_prompt=gen) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen)


def test_assistant_turns_are_the_response_and_no_special_tokens_are_added(tmp_path):
    """The label tokens are exactly the two assistant turns with their end-of-turn text, hand-written here; the ids
    are the rendered text's own (BOS from the template, no EOS appended)."""
    d = model_with_template(tmp_path)
    tok, ct = Tokenizer(d), ChatTemplate.from_model_dir(d)
    (rec,) = validate([{"messages": TALK}], "t.jsonl: line 1", chat=ct)
    want_text = ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\nHello, how are you<|im_end|>\n<|im_start|>user\nTell me a fact<|im_end|>\n"
                 "<|im_start|>assistant\nThe sky is blue.<|im_end|>\n")
    assert rec["text"] == want_text
    spans = [want_text[a:b] for a, b in rec["response_spans"]]
    assert spans == ["Hello, how are you<|im_end|>\n", "The sky is blue.<|im_end|>\n"]
    (ids,), (mask,) = tokenize_with_mask([rec], tok)
    assert ids == tokenize_records([rec], tok)[0] == tok.encode(want_text)  # nothing added around the text
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == [tok.decode(tok.encode(s)) for s in spans]


def test_sharegpt_conversations_map_to_roles(tmp_path):
    ct = ChatTemplate.from_model_dir(model_with_template(tmp_path))
    (a,) = validate([{"conversations": [{"from": "human", "value": "Hi there"},
                                        {"from": "gpt", "value": "Hello, how are you"}]}], "t", chat=ct)
    (b,) = validate([{"messages": TALK[:2]}], "t", chat=ct)
    assert a["text"] == b["text"] and a["response_spans"] == b["response_spans"]


def test_chat_refusals_name_the_record(tmp_path):
    ct = ChatTemplate.from_model_dir(model_with_template(tmp_path))
    with pytest.raises(DataError, match=r"t: row 1: messages\[1\]: needs a string 'role'"):
        validate([{"messages": [TALK[0], {"content": "x"}]}], "t", chat=ct)
    with pytest.raises(DataError, match=r"conversations\[0\]: 'from' is 'robot'"):
        validate([{"conversations": [{"from": "robot", "value": "x"}]}], "t", chat=ct)
    with pytest.raises(DataError, match="this model's tokenizer has none"):
        validate([{"messages": TALK}], "t", chat=ChatTemplate.from_model_dir(TINY_MODEL))
    # a template that renders an earlier turn by what follows (the system line names the number of turns)
    odd = ChatTemplate("odd", "{{ messages|length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}", {})
    (rec,) = validate([{"messages": TALK}], "t", chat=odd)
    assert "response_spans" not in rec
    with pytest.raises(DataError, match="does not render turn by turn"):
        tokenize_with_mask([rec], Tokenizer(TINY_MODEL))


def test_a_chat_file_trains_end_to_end_on_the_responses(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    d = model_with_template(tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": TALK[:2] if i % 2 else TALK}) + "\n" for i in range(200)))
    out = tmp_path / "run"
    assert main(["run", "--model-dir", str(d), "--data", str(data), "--val-fraction", "0.1", "--loss-on",
                 "response", "--device", "cpu", "--no-mmlu", "--no-progress", "--seq-len", "64", "--max-steps", "3",
                 "--run-dir", str(out)]) == 0
    r = json.loads((out / "result.json").read_text())
    assert "loss on responses" in r["config"]["data"] and len(r["series"]["label_tokens"]) == 3
    assert r["metrics"]["eval_loss"] is not None
