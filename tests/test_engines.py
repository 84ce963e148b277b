"""Native vs reference (transformers + PEFT): identical weights and batches -> identical training, step by step."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorabench.config import LoRAConfig, TrainConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import NativeOptions, build_engine, canonical_adapters
from lorabench.train import train_loop

from conftest import SMALL

CPU = torch.device("cpu")


def losses(engine_name: str, lora: LoRAConfig, steps: int, attn="eager", seed=0, grad_accum=1):
    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=1, max_steps=steps, lr=1e-2,
                      untimed_steps=0, grad_accum=grad_accum, seed=seed)
    data = synthetic_chunks(64, 32, SMALL.vocab_size, seed=1)
    eng = build_engine(engine_name, SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=seed,
                       attn=attn)
    out = train_loop(eng, data, cfg, CPU, progress=False)
    return np.array(out["series"]["loss"]), eng


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_native_and_reference_train_identically_for_10_steps(attn):
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
    ours, e1 = losses("native", lora, 10)
    ref, e2 = losses("reference", lora, 10, attn=attn)
    assert len(ours) == len(ref) == 10
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert ours[-1] < ours[0]  # it really trained
    for k, (a, b) in e1.adapters().items():
        a2, b2 = e2.adapters()[k]
        torch.testing.assert_close(a, a2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, b2, atol=1e-5, rtol=1e-5)


def test_parity_check_can_fail():
    """A different adapter seed gives a different curve: the comparison above is not vacuous."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    a, _ = losses("native", lora, 5, seed=0)
    b, _ = losses("reference", lora, 5, seed=1)
    assert np.abs(a - b).max() > 1e-4


def test_canonical_adapters_are_pefts_init():
    lora = LoRAConfig(r=8, targets=("q_proj", "down_proj"))
    ad = canonical_adapters(SMALL, lora, seed=0)
    assert sorted(ad)[0] == "model.layers.0.mlp.down_proj"
    a, b = ad["model.layers.1.mlp.down_proj"]
    assert a.shape == (8, SMALL.intermediate_size) and b.shape == (SMALL.hidden_size, 8)
    assert a.abs().max() <= SMALL.intermediate_size ** -0.5 and torch.count_nonzero(b) == 0


def test_reference_engine_keeps_adapters_fp32_over_bf16_base():
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    for name in ("native", "reference"):
        eng = build_engine(name, SMALL, lora, model_dir=None, device=CPU, precision="bf16", seed=0)
        assert {p.dtype for p in eng.trainable_params()} == {torch.float32}, name
        ids = torch.randint(0, SMALL.vocab_size, (1, 8))
        assert eng.logits(ids).dtype == torch.float32


@pytest.mark.slow
def test_compiled_native_trains_like_eager():
    """torch.compile of the blocks (the GPU default) computes the same training in fp32, with or without the
    fused projections and the matmul attention (together: the TF32 default on a GPU)."""
    pytest.importorskip("torch._inductor")
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=1, max_steps=3, lr=1e-2, untimed_steps=0)
    data = synthetic_chunks(16, 32, SMALL.vocab_size, seed=2)
    curves = []
    for compile_, fuse, attention in ((False, False, "sdpa"), (True, False, "sdpa"), (True, True, "matmul")):
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                           native=NativeOptions(compile=compile_, fused_projections=fuse, attention=attention))
        curves.append(train_loop(eng, data, cfg, CPU, progress=False)["series"]["loss"])
    assert eng.model.compiled_layers is not None and eng.model.layers[0].attn.qkv_weight is not None
    np.testing.assert_allclose(curves[1], curves[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(curves[2], curves[0], atol=1e-5, rtol=0)  # fused, matmul attention, compiled


def bf16_curve(name: str, seed: int = 0, dropout_seed: int = 0) -> np.ndarray:
    cfg = TrainConfig(precision="bf16", batch_size=2, seq_len=32, epochs=1, max_steps=8, lr=1e-2, untimed_steps=0,
                      seed=dropout_seed)
    data = synthetic_chunks(32, 32, SMALL.vocab_size, seed=1)
    eng = build_engine(name, SMALL, LoRAConfig(r=4, alpha=16, dropout=0.0), model_dir=None, device=CPU,
                       precision="bf16", seed=seed, attn="sdpa")
    return np.array(train_loop(eng, data, cfg, CPU, progress=False)["series"]["loss"])


BF16_CURVE_GAP = 2.5e-3
"""Largest relative loss gap allowed between native and the reference in bf16 over 8 steps. Native computes the
adapter in bf16 over fp32 master weights, PEFT in fp32: per step the two differ by bf16 rounding of the adapter
path (2^-8 = 0.4% of a rank-4 product that is itself a small part of the output); measured 0.012% and 0.053% on
two x86-64 CPUs (torch 2.13). Other base and adapter weights (seed 1) differ by 0.99% by step 8, four times this
bound."""


def test_bf16_native_follows_the_reference_curve():
    """bf16: native computes the adapter in bf16 with fp32 master weights, PEFT in fp32; the curves agree within
    bf16 rounding, much closer than two different initialisations do."""
    native, ref = bf16_curve("native"), bf16_curve("reference")
    rel = np.abs(native - ref) / ref
    assert rel.max() < BF16_CURVE_GAP, rel
    assert native[-1] < native[0]
    other = bf16_curve("reference", seed=1)  # other base and adapter weights: the bound tells them apart
    assert (np.abs(native - other) / other).max() > 2 * BF16_CURVE_GAP


def test_unsloth_engines_say_what_they_need_on_a_cpu():
    from lorabench.config import ConfigError

    for name, precision in (("unsloth", "bf16"), ("unsloth-fp8", "fp8"), ("unsloth-4bit", "nf4")):
        with pytest.raises(ConfigError, match=f"--engine {name} needs a CUDA GPU"):
            build_engine(name, SMALL, LoRAConfig(), model_dir=None, device=CPU, precision=precision, seed=0)


@pytest.mark.parametrize("name, precision, message", [
    ("reference", "fp8", "--engine reference has no FP8 weights"),
    ("unsloth", "fp8", "--engine unsloth has no FP8 weights"),
    ("unsloth-fp8", "bf16", "run it with --precision fp8"),
    ("unsloth-4bit", "bf16", "--engine unsloth-4bit holds NF4 weights; run it with --precision nf4 .preset qlora."),
    ("unsloth", "nf4", "--engine unsloth has no NF4 weights; --precision nf4 runs on native, reference.bnb and "
                       "unsloth-4bit"),
])
def test_a_row_label_always_says_what_the_weights_were(name, precision, message):
    """FP8 (NF4) weights only under --precision fp8 (nf4), and it only where an engine has such weights: refused
    before anything is built or imported."""
    from lorabench.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_engine(name, SMALL, LoRAConfig(), model_dir=None, device=CPU, precision=precision, seed=0)


def test_random_hf_dir_holds_the_canonical_weights_and_a_matching_tokenizer(tmp_path, monkeypatch):
    """The folder Unsloth loads for --init random: sharded safetensors of exactly the canonical random weights
    (read back through the same loader every engine uses), a tokenizer of the model's vocabulary size, reused
    once complete."""
    import lorabench.engines.unsloth as un
    from lorabench.checkpoint import iter_checkpoint, random_hf_weights, write_hf_shards
    from lorabench.config import ModelConfig
    from lorabench.data.tokenizer import Tokenizer

    monkeypatch.setattr(un.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())  # no room in /dev/shm
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path))
    d = un.random_hf_dir(SMALL, 3, torch.float32, CPU)
    assert d.parent == tmp_path and (d / "complete").is_file()
    want = dict(random_hf_weights(SMALL, 3, CPU, torch.float32))
    got = dict(iter_checkpoint(d))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert ModelConfig.from_hf_json(d) == SMALL
    assert Tokenizer(d).vocab_size == SMALL.vocab_size
    (d / "config.json").write_text("{}")  # a complete folder is reused as it is
    assert un.random_hf_dir(SMALL, 3, torch.float32, CPU) == d and (d / "config.json").read_text() == "{}"
    write_hf_shards(tmp_path / "small", SMALL, random_hf_weights(SMALL, 3, CPU, torch.float32), torch.float32,
                    shard_bytes=20_000)
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # several shards
    assert all(torch.equal(v, want[k]) for k, v in iter_checkpoint(tmp_path / "small"))


@pytest.mark.parametrize("family, fused", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True)])
def test_qwen_native_and_reference_train_identically(family, fused):
    """Qwen2's q/k/v biases and Qwen3's q/k norms with an explicit head_dim through the whole stack: native (plain
    or with fused q/k/v, biases fused too) and transformers + PEFT from the same canonical random weights, 6 steps,
    fp32."""
    from lorabench.config import ModelConfig

    extra = {"qkv_bias": True} if family == "qwen2" else {"qk_norm": True, "explicit_head_dim": 24}
    cfg_m = ModelConfig(**{**SMALL.__dict__, **extra, "rope_theta": 1e6})
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=1, max_steps=6, lr=1e-2, untimed_steps=0)
    data = synthetic_chunks(16, 32, cfg_m.vocab_size, seed=1)
    curves = []
    for name, opts in (("native", NativeOptions(fused_projections=fused)), ("reference", None)):
        eng = build_engine(name, cfg_m, lora, model_dir=None, device=CPU, precision="fp32", seed=0, native=opts)
        curves.append(np.array(train_loop(eng, data, cfg, CPU, progress=False)["series"]["loss"]))
    np.testing.assert_allclose(curves[0], curves[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "fp8", "nf4"])
def test_block_checkpointing_gives_the_same_gradients_and_keeps_less(precision):
    """--activation-checkpointing block and matmuls: the same loss and adapter gradients as keeping everything (the
    recompute redraws the same dropout masks: dropout 0.05 here), while the forward keeps only the blocks' inputs
    (bytes that autograd saves, counted with saved-tensor hooks); matmuls keeps the blocks' matrix products too,
    so its backward runs no product twice where block's recomputes every forward product (counted per aten op).
    block with --checkpoint-blocks 1 (of 2): the same numbers, and only the first block runs twice (counted by a
    forward pre-hook), so its memory and recomputed products lie between none's and block's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
            return func(*args, **(kwargs or {}))

    lora = LoRAConfig(r=4, alpha=16, dropout=0.05)
    ids = torch.from_numpy(synthetic_chunks(2, 32, SMALL.vocab_size, seed=8)).long()
    out, calls = {}, {}
    for name in ("none", "block", "matmuls", "block:1", "block:0", "matmuls:1"):
        policy, _, blocks = name.partition(":")
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision=precision, seed=0,
                           checkpointing=policy, native=NativeOptions(checkpoint_blocks=int(blocks) if blocks else None))
        calls[name] = [0] * len(eng.model.layers)
        for i, layer in enumerate(eng.model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i, n=calls[name]: n.__setitem__(i, n[i] + 1))
        with torch.no_grad():
            for _, b in eng.adapters().values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(11)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = eng.loss(ids, ids)
        with CountProducts() as products:
            loss.backward()
        out[name] = (loss.item(), torch.cat([p.grad.flatten() for p in eng.trainable_params()]), sum(saved),
                     products.n)
    for name in ("block", "matmuls", "block:1", "block:0", "matmuls:1"):
        assert out[name][0] == out["none"][0]
        torch.testing.assert_close(out[name][1], out["none"][1], rtol=0, atol=0)
    assert out["block"][2] < 0.5 * out["none"][2] and out["matmuls"][2] == out["block"][2]
    assert out["matmuls"][3] == out["none"][3] < out["block"][3]
    assert calls["none"] == calls["block:0"] == [1, 1] and calls["block"] == [2, 2] and calls["block:1"] == [2, 1]
    assert out["block"][2] < out["block:1"][2] < out["none"][2] == out["block:0"][2]
    assert out["none"][3] < out["block:1"][3] < out["block"][3] and out["block:0"][3] == out["none"][3]
    assert calls["matmuls:1"] == [2, 1] and out["matmuls:1"][3] == out["none"][3]
    assert out["matmuls"][2] < out["matmuls:1"][2] < out["none"][2]


def test_checkpoint_blocks_is_refused_where_it_cannot_apply():
    """--checkpoint-blocks needs block or matmuls, at most the model's blocks, 0 or more, and the native engine."""
    from lorabench.config import ConfigError
    from lorabench.engines import checkpointing_policy

    for policy in ("none", "offload", "adapter-inputs"):
        with pytest.raises(ConfigError, match=f"--checkpoint-blocks 1 applies to --activation-checkpointing block "
                                              f"or matmuls, not {policy}: give --checkpoint-blocks all"):
            checkpointing_policy("native", policy, NativeOptions(checkpoint_blocks=1, compile=True), 0.0, 2)
    with pytest.raises(ConfigError, match=r"not adapter-inputs \(the default here\): add --activation-checkpointing "
                                          "block"):
        checkpointing_policy("native", None, NativeOptions(checkpoint_blocks=1, compile=True), 0.0, 2)
    with pytest.raises(ConfigError, match="--checkpoint-blocks 3: the model has 2 decoder blocks; give at most 2"):
        build_engine("native", SMALL, LoRAConfig(), model_dir=None, device=CPU, precision="fp32", seed=0,
                     checkpointing="block", native=NativeOptions(checkpoint_blocks=3))
    with pytest.raises(ConfigError, match="--checkpoint-blocks must be 0 or more"):
        NativeOptions(checkpoint_blocks=-1)
    assert checkpointing_policy("native", "matmuls", NativeOptions(checkpoint_blocks=2), 0.0, 2) == "matmuls"
    with pytest.raises(ConfigError, match="--checkpoint-blocks: native engine tuning; --engine reference"):
        from lorabench.engines import check_native_flags
        check_native_flags("reference", NativeOptions(checkpoint_blocks=1))


def test_documents_packing_gives_each_document_its_own_logits_and_matches_transformers():
    """--packing documents: a chunk of three documents (GQA, RoPE) gives, at every token, the logits of its
    document run alone, within 1e-5 in fp32; and training on such chunks follows the reference engine
    (transformers, which reads the boundaries from position_ids) step for step."""
    from lorabench.data.packing import pack_documents

    g = np.random.default_rng(2)
    docs = [g.integers(3, SMALL.vocab_size, size=k).tolist() for k in (9, 17, 6, 20)]
    chunk = pack_documents(docs, None, 32)[0]  # 9 + 17 + 6 tokens, the fourth document left for the next chunk
    eng = build_engine("native", SMALL, LoRAConfig(r=4, alpha=16, dropout=0.0), model_dir=None, device=CPU,
                       precision="fp32", seed=0)
    ids, pos = torch.from_numpy(chunk[0][None]).long(), torch.from_numpy(chunk[2][None]).long()
    with torch.no_grad():
        packed = eng.head(eng.model.hidden(ids, positions=pos))[0]
        start = 0
        for k in (9, 17, 6):
            alone = eng.logits(ids[:, start:start + k])[0]
            torch.testing.assert_close(packed[start:start + k], alone, atol=1e-5, rtol=0)
            start += k
        whole = eng.logits(ids)[0]  # and without the boundaries, the later documents see the earlier ones
        assert (whole[9:] - packed[9:]).abs().max() > 1e-2
    data = pack_documents([g.integers(3, SMALL.vocab_size, size=int(k)).tolist()
                           for k in g.integers(4, 40, size=60)], None, 32)
    cfg = TrainConfig(precision="fp32", batch_size=2, seq_len=32, epochs=1, max_steps=5, lr=1e-2, untimed_steps=0)
    curves = {}
    for name in ("native", "reference"):
        e = build_engine(name, SMALL, LoRAConfig(r=4, alpha=16, dropout=0.0), model_dir=None, device=CPU,
                         precision="fp32", seed=0)
        curves[name] = train_loop(e, data, cfg, CPU, progress=False)["series"]["loss"]
    np.testing.assert_allclose(curves["native"], curves["reference"], rtol=1e-5)


def test_unpacked_rows_train_on_each_record_alone_and_count_no_padding():
    """--packing none: records of 3 to 30 tokens, one a row: the first step's loss is the mean over every record's
    targets, each record run alone (float64 from the engine's logits), at 1 x 8 and 2 x 4 micro-batches (each
    batch cut to its longest row); the step's token count is the records' lengths, padding left out."""
    from lorabench.data.packing import pack_rows

    g = np.random.default_rng(4)
    recs = [g.integers(3, SMALL.vocab_size, size=int(k)).tolist() for k in (3, 30, 7, 12, 25, 5, 18, 9)]
    data = pack_rows(recs, None, 32, pad_id=0)
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in recs:
            t = torch.tensor([r])
            logp = torch.log_softmax(eng.logits(t).double(), -1)[0, :-1]
            total += -logp.gather(-1, t[0, 1:, None]).sum().item()
            count += len(r) - 1
    for lbs, ga in ((8, 1), (4, 2)):
        cfg = TrainConfig(precision="fp32", batch_size=lbs, grad_accum=ga, seq_len=32, epochs=1, max_steps=1,
                          lr=1e-6, untimed_steps=0, shuffle=False, packing="none")
        e = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0)
        out = train_loop(e, data, cfg, CPU, progress=False)["series"]
        assert out["loss"][0] == pytest.approx(total / count, rel=1e-5)
        assert out["tokens"] == [sum(map(len, recs))] and out["label_tokens"] == [count]
        assert out["tokens_sq"] == [sum(len(r) ** 2 for r in recs)]


def test_rows_flops_grow_the_attention_term_with_each_rows_own_length():
    from lorabench.shapes import flops_per_token, rows_flops

    lora = LoRAConfig()
    full = rows_flops(SMALL, lora, 32, 32 ** 2)
    assert full == pytest.approx(32 * flops_per_token(SMALL, lora, 32), rel=1e-12)  # one full row: the old count
    two = rows_flops(SMALL, lora, 8 + 24, 8 ** 2 + 24 ** 2)
    assert two == pytest.approx(8 * flops_per_token(SMALL, lora, 8) + 24 * flops_per_token(SMALL, lora, 24),
                                rel=1e-12)


def _saved_bytes_and_grads(eng, ids):
    """The bytes autograd saves for the backward of one loss, the loss, and the adapters' gradients."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    eng.train()
    torch.manual_seed(5)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = eng.loss(ids, ids)
    loss.backward()
    grads = [p.grad.clone() for p in eng.trainable_params()]
    return sum(saved), loss.item(), grads


def test_reference_block_checkpointing_recomputes_and_trains_the_same():
    """--activation-checkpointing block on the reference engine is transformers' gradient checkpointing: the
    same loss and adapter gradients (dropout 0.05: the masks are replayed) for much less saved activation."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.05)
    ids = torch.from_numpy(synthetic_chunks(2, 32, SMALL.vocab_size, seed=2)).long()
    runs = {}
    for mode in ("none", "block"):
        eng = build_engine("reference", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                           checkpointing=mode)
        assert eng.describe()["activation_checkpointing"] == mode
        runs[mode] = _saved_bytes_and_grads(eng, ids)
    (full, loss0, g0), (ckpt, loss1, g1) = runs["none"], runs["block"]
    assert ckpt < 0.5 * full, (ckpt, full)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flags, message", [
    ({"attention": "matmul"}, "--attention: native engine tuning; --engine reference does not take it"),
    ({"compile": True, "dropout_mask": "bernoulli"}, "--compile, --dropout-mask: native engine tuning"),
    ({"fp8_skip": ("down_proj",)}, "--fp8-skip: native engine tuning; --engine reference does not take it"),
])
def test_native_tuning_flags_are_refused_for_other_engines(flags, message):
    """Another engine would run without them while the command line said otherwise."""
    from lorabench.config import ConfigError
    from lorabench.engines import check_native_flags

    with pytest.raises(ConfigError, match=message):
        check_native_flags("reference", NativeOptions(**flags))
    check_native_flags("native", NativeOptions(**flags))
    from lorabench.engines import checkpointing_policy

    assert checkpointing_policy("reference", "block", NativeOptions(), 0.0) == "block"
    with pytest.raises(ConfigError, match="--activation-checkpointing matmuls runs on native; --engine "):
        checkpointing_policy("unsloth", "matmuls", NativeOptions(), 0.0)


def test_matmuls_checkpointing_is_the_native_engines():
    from lorabench.config import ConfigError

    with pytest.raises(ConfigError, match="--activation-checkpointing matmuls runs on native; --engine "):
        build_engine("reference", SMALL, LoRAConfig(), model_dir=None, device=CPU, precision="fp32", seed=0,
                     checkpointing="matmuls")


@pytest.mark.slow
def test_adapter_inputs_policy_saves_less_and_trains_the_same():
    """--activation-checkpointing adapter-inputs (compiled blocks, adapters on all seven projections, no dropout):
    the same loss and adapter gradients as "none", with fewer bytes saved for the backward (the norms' and SwiGLU's
    outputs recomputed instead of kept)."""
    from lorabench.config import ConfigError

    torch._dynamo.reset()  # graphs compiled by earlier tests for Block.forward count against its recompile limit;
    # past it the blocks would run eagerly and save what eager autograd saves
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=all_linear)
    ids = torch.from_numpy(synthetic_chunks(2, 32, SMALL.vocab_size, seed=2)).long()
    runs = {}
    for policy in ("none", "adapter-inputs"):
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                           native=NativeOptions(compile=True), checkpointing=policy)
        with torch.no_grad():
            for _, b in eng.adapters().values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        runs[policy] = _saved_bytes_and_grads(eng, ids)
    (full, loss0, g0), (less, loss1, g1) = runs["none"], runs["adapter-inputs"]
    tokens, layers = ids.numel(), SMALL.num_hidden_layers
    # at least SwiGLU's output and one norm's output a layer fewer (fp32: 4 bytes an element)
    assert full - less >= layers * tokens * (SMALL.intermediate_size + SMALL.hidden_size) * 4, (full, less)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="adapter-inputs works through the compiled blocks"):
        build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                     checkpointing="adapter-inputs")


def test_offload_moves_each_blocks_input_and_trains_as_block(monkeypatch):
    """--activation-checkpointing offload: each decoder block's input (and nothing else) goes through the host
    copy, each is fetched back before the block after it is recomputed (so the transfer overlaps that block's
    backward), and loss and adapter gradients are block checkpointing's exactly (dropout 0.05: masks replayed)."""
    import lorabench.model as lm
    import lorabench.recompute as rc

    lora = LoRAConfig(r=4, alpha=16, dropout=0.05)
    ids = torch.from_numpy(synthetic_chunks(2, 32, SMALL.vocab_size, seed=2)).long()
    moved, log = [], []

    def logged(layer, policy, x, *args, chain=None):
        i = len(chain)  # this block's place in the forward

        def run(*a):
            log.append(("run", i))
            return layer(*a)
        return rc.checkpointed(run, policy, x, *args, chain=chain, on_pack=lambda t: moved.append(t.shape),
                               on_fetch=lambda copy: log.append(("fetch", chain.index(copy))))

    monkeypatch.setattr(lm, "checkpointed", logged)
    runs = {}
    for policy in ("block", "offload"):
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                           checkpointing=policy)
        with torch.no_grad():
            for _, b in eng.adapters().values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        runs[policy] = _saved_bytes_and_grads(eng, ids)
    n = SMALL.num_hidden_layers
    assert moved == [torch.Size([2, 32, SMALL.hidden_size])] * n
    # block's forward and recomputation first (2n runs, nothing fetched), then offload's forward and backward
    assert len(log) == 5 * n and log[2 * n:3 * n] == [("run", i) for i in range(n)]
    backward = log[3 * n:]
    assert sorted(e for e in backward if e[0] == "fetch") == [("fetch", i) for i in range(n)]
    for i in range(1, n):  # block i - 1's input is on its way before block i runs again
        assert backward.index(("fetch", i - 1)) < backward.index(("run", i))
    (_, loss0, g0), (_, loss1, g1) = runs["block"], runs["offload"]
    assert loss1 == loss0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(Exception, match="--activation-checkpointing offload runs on native, unsloth, "
                                        "unsloth-fp8 and unsloth-4bit; --engine "
                                        "reference has none, block"):
        build_engine("reference", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                     checkpointing="offload")


@pytest.mark.parametrize("policy", ["block", "offload"])
def test_recomputed_blocks_attend_under_the_forwards_kernel_priority(policy, monkeypatch):
    """The backward's recomputation runs each block under the SDPA kernel priority of the forward (--attention):
    outside it an H200 picked flash in the recomputation where the forward had cuDNN, whose saved tensors differ
    in shape, and torch's checkpoint stopped the backward (eager, 2026-12-01)."""
    import contextlib

    import lorabench.model as lm

    depth, calls = [0], []

    @contextlib.contextmanager
    def priority(impl):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_attend = lm.attend
    monkeypatch.setattr(lm, "sdpa_priority", priority)
    monkeypatch.setattr(lm, "attend", lambda *a, **k: calls.append(depth[0] > 0) or real_attend(*a, **k))
    eng = build_engine("native", SMALL, LoRAConfig(r=4, alpha=16, dropout=0.05), model_dir=None, device=CPU,
                       precision="fp32", seed=0, checkpointing=policy)
    ids = torch.from_numpy(synthetic_chunks(2, 32, SMALL.vocab_size, seed=2)).long()
    loss = eng.loss(ids, ids)
    assert len(calls) == SMALL.num_hidden_layers and all(calls)
    loss.backward()
    assert len(calls) == 2 * SMALL.num_hidden_layers and all(calls)  # each block attended again, under it


@pytest.mark.parametrize("policy, passed", [("none", False), ("block", True), ("offload", "unsloth")])
def test_unsloth_engine_passes_its_checkpointing_mode(policy, passed, tmp_path, monkeypatch):
    """Without a GPU, Unsloth's FastLanguageModel stood in by a recorder over transformers + PEFT: the engine asks
    for the checkpointing mode the policy names (in both calls), starts from the canonical adapters and records
    the policy in describe()."""
    import sys
    import types

    import lorabench.engines.unsloth as un
    from peft import LoraConfig, get_peft_model

    from conftest import hf_model

    calls = []

    class FakeFastLanguageModel:
        @staticmethod
        def from_pretrained(path, **kw):
            calls.append(("from_pretrained", kw["use_gradient_checkpointing"]))
            return hf_model(SMALL).to(kw["dtype"]), None

        @staticmethod
        def get_peft_model(model, r, target_modules, lora_alpha, lora_dropout, use_gradient_checkpointing, **kw):
            calls.append(("get_peft_model", use_gradient_checkpointing))
            return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                    target_modules=target_modules, task_type="CAUSAL_LM"))

    monkeypatch.setattr(un, "_import_unsloth", lambda device, name: FakeFastLanguageModel)
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(__version__="fake"))
    lora = LoRAConfig(r=4, alpha=16)
    eng = un.UnslothEngine(SMALL, lora, model_dir=tmp_path, device=CPU, dtype=torch.bfloat16, seed=0,
                           checkpointing=policy)
    assert calls == [("from_pretrained", passed), ("get_peft_model", passed)]
    assert eng.describe()["activation_checkpointing"] == policy
    want = canonical_adapters(SMALL, lora, 0)
    assert set(eng.adapters()) == set(want)
    for k, (a, b) in eng.adapters().items():
        torch.testing.assert_close(a.float(), want[k][0].float(), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_evaluation_forward_has_no_graph_break():
    """Evaluation through the compiled blocks (no_grad, dropout off: q and v read one input, so their adapters run
    as one stacked product) traces whole, without a graph break in every block (torch.compile breaks on an
    autograd.Function under no_grad), and gives the eager engine's logits."""
    import torch._dynamo.utils

    torch._dynamo.reset()
    lora = LoRAConfig(r=4, alpha=16, dropout=0.05)
    ids = torch.from_numpy(synthetic_chunks(2, 32, SMALL.vocab_size, seed=2)).long()
    logits = []
    for compiled in (False, True):
        eng = build_engine("native", SMALL, lora, model_dir=None, device=CPU, precision="fp32", seed=0,
                           native=NativeOptions(compile=compiled))
        with torch.no_grad():
            for _, b in eng.adapters().values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
            eng.model.eval()
            torch._dynamo.utils.counters.clear()
            logits.append(eng.logits(ids))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
