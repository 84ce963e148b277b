"""Our Llama against HF LlamaForCausalLM: same weights, fp32, CPU -> logits and loss within 1e-5."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lorabench.checkpoint import iter_checkpoint, load_into
from lorabench.config import ConfigError, ModelConfig
from lorabench.model import Llama
from lorabench.shapes import count_params

from conftest import SMALL, hf_model


def native_from_hf(hf, cfg):
    m = Llama(cfg).float().eval()
    load_into(m, hf.state_dict().items(), True, "hf model")
    return m


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_match_hf(attn):
    hf = hf_model(SMALL, attn=attn)
    ours = native_from_hf(hf, SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        logits = ours(ids)
        loss = ours.loss(ids, ids)
    assert logits.shape == ref.logits.shape
    torch.testing.assert_close(logits, ref.logits.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_grouped_query_and_rope_theta_matter():
    """The parity test must be able to fail: a different rope_theta changes the logits."""
    hf = hf_model(SMALL)
    other = ModelConfig(**{**SMALL.__dict__, "rope_theta": 500000.0})
    ours = native_from_hf(hf, other)
    ids = torch.randint(0, SMALL.vocab_size, (1, 40))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() > 1e-3


def assert_loads_like_hf(model_dir, hf):
    """Our model, loaded from ``model_dir`` through the name map, gives hf's logits."""
    ours = Llama(ModelConfig.from_hf_json(model_dir) if (model_dir / "config.json").is_file() else SMALL).eval()
    load_into(ours, iter_checkpoint(model_dir), True, str(model_dir))
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_load_from_transformers_safetensors_dir(tmp_path):
    hf = hf_model(SMALL, seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert ModelConfig.from_hf_json(tmp_path) == SMALL
    assert_loads_like_hf(tmp_path, hf)


def test_load_sharded_safetensors_with_index(tmp_path):
    """transformers' own sharding (model-0000x-of-0000y.safetensors + index) is read shard by shard."""
    hf = hf_model(SMALL, seed=5)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_loads_like_hf(tmp_path, hf)


def test_load_sharded_bin_checkpoint(tmp_path):
    """pytorch_model-0000x-of-0000y.bin shards with an index are read shard by shard."""
    import json

    hf = hf_model(SMALL, seed=4)
    sd = hf.state_dict()
    names = list(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, tmp_path / fname)
        weight_map.update({k: fname for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_loads_like_hf(tmp_path, hf)


def test_missing_and_misshaped_tensors_fail_clearly(tmp_path):
    hf = hf_model(SMALL)
    sd = dict(hf.state_dict())
    sd.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match="missing tensors for layers.1.mlp.up_proj.weight"):
        load_into(Llama(SMALL), sd.items(), True, "ckpt")
    sd = dict(hf.state_dict())
    sd["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ConfigError, match="model.norm.weight has shape"):
        load_into(Llama(SMALL), sd.items(), True, "ckpt")
    with pytest.raises(ConfigError, match="no such folder"):
        list(iter_checkpoint(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no model.safetensors"):
        list(iter_checkpoint(tmp_path))


def test_param_count_llama2_7b():
    from lorabench.config import MODEL_PRESETS

    c = count_params(MODEL_PRESETS["llama2-7b"])
    assert c["total"] == 6_738_415_616  # published Llama-2-7B count (REFERENCE section 2)
    assert c["non_embedding"] == 6_607_343_616
    assert c["per_layer"] == 202_383_360


def test_count_matches_module_numel():
    assert count_params(SMALL)["total"] == sum(p.numel() for p in Llama(SMALL).parameters())


def test_random_init_builds_on_meta_free_path_and_is_deterministic():
    from lorabench.checkpoint import random_hf_weights

    a = dict(random_hf_weights(SMALL, 7, "cpu", torch.float32))
    b = dict(random_hf_weights(SMALL, 7, "cpu", torch.float32))
    c = dict(random_hf_weights(SMALL, 8, "cpu", torch.float32))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert abs(a["model.layers.0.mlp.up_proj.weight"].std().item() - 0.02) < 0.002


def test_tied_embeddings_load_with_or_without_lm_head():
    tied = ModelConfig(**{**SMALL.__dict__, "tie_word_embeddings": True})
    emb = torch.randn(SMALL.vocab_size, SMALL.hidden_size)
    sd = {k: v for k, v in Llama(SMALL).state_dict().items() if not k.startswith(("embed", "lm_head"))}
    from lorabench.checkpoint import native_to_hf

    hf = {f"{native_to_hf(k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}": v for k, v in sd.items()}
    for extra in ({"model.embed_tokens.weight": emb}, {"model.embed_tokens.weight": emb, "lm_head.weight": emb}):
        m = Llama(tied)
        load_into(m, {**hf, **extra}.items(), True, "ckpt")
        assert m.lm_head.weight is m.embed.weight and torch.equal(m.embed.weight, emb)
    with pytest.raises(ConfigError, match="missing tensors for embed.weight"):
        load_into(Llama(tied), hf.items(), True, "ckpt")


@pytest.mark.parametrize("sdpa_has_gqa", [True, False])
def test_matmul_attention_equals_sdpa(sdpa_has_gqa, monkeypatch):
    """The TF32 path's attention (two matmuls) computes SDPA's causal attention: loss and every gradient, fp32,
    grouped-query shape; also where SDPA cannot group heads (torch < 2.5) and k/v are repeated for it."""
    import lorabench.kernels.attention
    from lorabench.config import LoRAConfig
    from lorabench.lora import inject_lora

    monkeypatch.setattr(lorabench.kernels.attention, "_SDPA_HAS_GQA", sdpa_has_gqa)

    ids = torch.randint(0, SMALL.vocab_size, (2, 29), generator=torch.Generator().manual_seed(3))
    out = []
    for impl in ("sdpa", "matmul"):
        m = native_from_hf(hf_model(SMALL), SMALL)
        inject_lora(m, LoRAConfig(r=4, alpha=16, dropout=0.0))
        torch.manual_seed(0)
        for p in m.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)  # B != 0, so the gradients reach through attention both ways
        m.set_attention(impl)
        loss = m.loss(ids, ids)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-6, rtol=1e-6)
    for g1, g0 in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="attention 'nope'"):
        m.set_attention("nope")


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj", "gate_proj", "up_proj")])
def test_fused_projections_compute_the_same(targets):
    """One GEMM for q/k/v and one for gate/up (weights concatenated, resp. interleaved; adapters per projection)
    gives the unfused loss and adapter gradients in fp32; the parts stay views of the fused weight, so export still
    sees them."""
    from lorabench.config import LoRAConfig
    from lorabench.convert import fuse_projections
    from lorabench.lora import inject_lora, lora_modules

    ids = torch.randint(0, SMALL.vocab_size, (2, 23), generator=torch.Generator().manual_seed(4))
    out = []
    for fuse in (False, True):
        m = native_from_hf(hf_model(SMALL), SMALL)
        inject_lora(m, LoRAConfig(r=4, alpha=16, dropout=0.0, targets=targets))
        torch.manual_seed(0)
        for p in m.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1)
        if fuse:
            fuse_projections(m)
            attn = m.layers[1].attn
            assert attn.qkv_weight.shape[0] == attn.q_proj.weight.shape[0] + 2 * attn.k_proj.weight.shape[0]
            assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[attn.q_proj.weight.shape[0]:].data_ptr()
            assert "layers.0.attn.qkv_weight" not in m.state_dict()
            mlp = m.layers[1].mlp  # gate/up interleaved row by row: views with a stride of two rows
            assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[1].data_ptr()
            assert mlp.gate_proj.weight.stride(0) == 2 * mlp.gate_up_weight.stride(0)
        loss = m.loss(ids, ids)
        loss.backward()
        out.append((loss.detach(), {n: (l.lora_A.grad, l.lora_B.grad) for n, l in lora_modules(m).items()},
                    {n: l.merged_weight() for n, l in lora_modules(m).items()}))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-6, rtol=1e-6)
    assert out[1][1].keys() == out[0][1].keys()
    for n in out[0][1]:
        torch.testing.assert_close(out[1][1][n], out[0][1][n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[1][2][n], out[0][2][n], atol=0, rtol=0)


def test_matmul_attention_gradients_against_float64():
    """The matmul attention recomputes its probabilities in the backward; torch's gradcheck holds its q/k/v
    gradients to finite differences in float64 (odd sizes, grouped-query), and fp32 matches SDPA."""
    import torch.nn.functional as F

    from lorabench.kernels.attention import matmul_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: matmul_attention(q, k, v, 2), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    go = torch.randn(2, 4, 7, 6, generator=g)
    out = matmul_attention(q32, k32, v32, 2)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, want.float(), atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out, (q32, k32, v32), go)
    want_grads = torch.autograd.grad(want, (q, k, v), go.double())
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5)
    # bf16 (the softmax in fp32): output and gradients within a few bf16 roundings of float64
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out16 = matmul_attention(q16, k16, v16, 2)
    for a, b in zip((out16, *torch.autograd.grad(out16, (q16, k16, v16), go.bfloat16())), (want, *want_grads)):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_prefix_suffix_attention_is_attention_over_prefix_and_suffix(heads, kv_heads):
    """Suffixes after one shared prefix, attended without copying the prefix (its part and the causal suffix part
    merged by log-sum-exp), equal SDPA over the concatenated keys with the lower-right causal mask: float64 to
    1e-12, odd sizes, grouped-query heads."""
    import torch.nn.functional as F

    from lorabench.kernels.attention import prefix_suffix_attention

    g = torch.Generator().manual_seed(0)
    B, T, P, D = 3, 5, 7, 6
    q = torch.randn(B, heads, T, D, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, kv_heads, T, D, dtype=torch.float64, generator=g) for _ in range(2))
    kp, vp = (torch.randn(1, kv_heads, P, D, dtype=torch.float64, generator=g) for _ in range(2))
    rep = heads // kv_heads
    keys = torch.cat((kp.expand(B, -1, -1, -1), k), 2).repeat_interleave(rep, 1)
    values = torch.cat((vp.expand(B, -1, -1, -1), v), 2).repeat_interleave(rep, 1)
    mask = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)  # query i sees keys up to P + i
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    torch.testing.assert_close(prefix_suffix_attention(q, k, v, kp, vp, rep), want, atol=1e-12, rtol=0)
    # bf16 (two outputs rounded, then merged in fp32): within a few bf16 roundings of float64
    got = prefix_suffix_attention(*(t.bfloat16() for t in (q, k, v, kp, vp)), rep).double()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.slow
def test_compiled_block_keeps_only_masks_for_dropout():
    """A compiled training block with adapter dropout keeps at most the dropout masks beyond what it keeps without
    dropout, and those packed, one bit an element (a bool mask is a byte an element): the dropped copies of the
    adapters' input are recomputed in the backward from the norm's input, not saved (each was a [tokens, hidden]
    tensor in the activation dtype)."""
    from lorabench.config import LoRAConfig
    from lorabench.lora import inject_lora
    from lorabench.model import rope_cos_sin

    B, T, C = 2, 24, SMALL.hidden_size

    def saved_activations(dropout: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = Llama(SMALL)
        inject_lora(m, LoRAConfig(r=4, alpha=16, dropout=dropout, targets=("q_proj", "v_proj")))
        block = torch.compile(m.layers[0])
        x = torch.randn(B, T, C, requires_grad=True)
        cos, sin = rope_cos_sin(T, SMALL.head_dim, SMALL.rope_theta, x.device, x.dtype)
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.data_ptr(), t), lambda t: t):
            block(x, cos, sin)
        weights = {p.data_ptr() for p in m.parameters()}
        return [t for k, t in saved.items() if k not in weights and t.numel() >= B * T]

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    with_dropout = saved_activations(0.1)
    masks = [t for t in with_dropout if t.dtype in (torch.bool, torch.uint8)]
    assert sorted((t.dtype, t.numel()) for t in masks) == [(torch.uint8, B * T * C // 8)] * 2  # q_proj's, v_proj's
    assert nbytes(with_dropout) <= nbytes(saved_activations(0.0)) + nbytes(masks)


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, dict(rope_type="linear", factor=4.0)], ids=["llama3", "linear"])
def test_rope_scaling_matches_hf_past_the_original_context(scaling, tmp_path):
    """Llama 3.1's llama3 RoPE scaling and linear scaling, against HF at positions well past the original 64-token
    context (with head_dim 16 the frequencies fall in all three bands of llama3's rule), through config.json."""
    import json

    from lorabench.config import RopeScaling

    cfg = ModelConfig(**{**SMALL.__dict__, "rope_theta": 500000.0, "rope_scaling": RopeScaling(**scaling)})
    hf = hf_model(cfg)
    ours = native_from_hf(hf, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        torch.testing.assert_close(ours(ids), ref.logits.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.loss(ids, ids), ref.loss, atol=1e-5, rtol=1e-5)
        plain = native_from_hf(hf, SMALL)  # the scaling matters: without it the logits move
        assert (plain(ids) - ref.logits).abs().max() > 1e-3
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_hf_json(tmp_path) == cfg  # what HF reads from config.json, we read too


def test_llama3_bands_are_all_exercised():
    """The test above means something only if some frequencies stay, some are divided and some are blended."""
    from lorabench.config import RopeScaling
    from lorabench.model import rope_inv_freq

    base = rope_inv_freq(SMALL.head_dim, 500000.0)
    scaled = rope_inv_freq(SMALL.head_dim, 500000.0, RopeScaling(**LLAMA3_ROPE))
    ratio = base / scaled
    assert (ratio == 1).any() and ((ratio - 8).abs() < 1e-5).any() and ((ratio > 1.01) & (ratio < 7.9)).any()


def _break_qwen2(model):
    for layer in model.layers:
        layer.attn.q_proj.bias.zero_()


def _break_qwen3(model):
    for layer in model.layers:
        layer.attn.q_norm.weight.fill_(1.0)


@pytest.mark.parametrize("family, extra, arch, broken", [
    ("qwen2", {"qkv_bias": True, "rms_norm_eps": 1e-6}, "Qwen2ForCausalLM", _break_qwen2),
    ("qwen3", {"qk_norm": True, "explicit_head_dim": 24}, "Qwen3ForCausalLM", _break_qwen3),
])
def test_qwen_families_match_hf(tmp_path, family, extra, arch, broken):
    """Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (RMSNorm on each head's queries and keys before RoPE, and a head_dim
    of 24 that is not hidden / heads = 16, as Qwen3-0.6B has): logits and loss against HF's own class through a
    saved folder (config.json's model_type, the tensors by name). Without the feature's weights the logits move."""
    import json

    from lorabench.checkpoint import iter_checkpoint

    cfg = ModelConfig(**{**SMALL.__dict__, **extra, "rope_theta": 1e6})
    hf = hf_model(cfg)
    assert type(hf).__name__ == arch
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    loaded = ModelConfig.from_hf_json(tmp_path)
    assert loaded == cfg and loaded.head_dim == cfg.head_dim
    ours = Llama(loaded).float().eval()
    load_into(ours, iter_checkpoint(tmp_path), True, str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        torch.testing.assert_close(ours(ids), ref.logits.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.loss(ids, ids), ref.loss, atol=1e-5, rtol=1e-5)
        broken(ours)
        assert (ours(ids) - ref.logits).abs().max() > 1e-3


def test_mistral_without_a_window_matches_hf(tmp_path):
    """Mistral (model_type mistral, sliding_window null): HF's MistralForCausalLM through a saved folder."""
    from transformers import MistralConfig, MistralForCausalLM

    from lorabench.checkpoint import iter_checkpoint

    d = {k: v for k, v in SMALL.to_hf_dict().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**{**d, "sliding_window": None})).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    loaded = ModelConfig.from_hf_json(tmp_path)
    ours = Llama(loaded).float().eval()
    load_into(ours, iter_checkpoint(tmp_path), True, str(tmp_path))
    ids = torch.randint(0, SMALL.vocab_size, (2, 50), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset, total", [
    ("llama3-8b", 8_030_261_248), ("llama3.1-8b", 8_030_261_248),  # Meta-Llama-3(.1)-8B: 8.03B
    ("mistral-7b", 7_248_023_552),  # Mistral-7B-v0.3: 7.25B
    ("qwen2.5-7b", 7_615_616_512),  # Qwen2.5-7B: 7.62B (its q/k/v biases included)
    ("llama2-70b", 68_976_648_192),  # Llama-2-70B: 69.0B
])
def test_shape_presets_have_the_published_parameter_counts(preset, total):
    """The presets' sizes against the models' published parameter totals (their safetensors indexes)."""
    from lorabench.config import MODEL_PRESETS

    assert count_params(MODEL_PRESETS[preset])["total"] == total


def test_mistral_sliding_window_is_exact_past_the_window_in_training(tmp_path):
    """Mistral with a 16-token window: our logits equal HF's windowed attention at 16 tokens and at 40 (where
    queries lose their earliest keys), and the adapters' gradients at 40 equal PEFT's; the window matters (without
    it, 40 tokens give other logits); evaluation with a KV cache stops at the window (context_limit); the Unsloth
    engines still refuse a --seq-len past it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from lorabench.checkpoint import iter_checkpoint
    from lorabench.config import LoRAConfig, TrainConfig
    from lorabench.engines import build_engine
    from lorabench.runner import Job, resolve

    d = {k: v for k, v in SMALL.to_hf_dict().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**{**d, "sliding_window": 16})).float().eval()
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_json(tmp_path)
    assert cfg.sliding_window == 16 and cfg.context_limit == 16 and cfg.hf_model_type == "mistral"
    ours = Llama(cfg).float().eval()
    load_into(ours, iter_checkpoint(tmp_path), True, str(tmp_path))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for t in (16, 40):
            ids = torch.randint(0, SMALL.vocab_size, (2, t), generator=g)
            torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits.float(), atol=1e-5, rtol=1e-5)
        unwindowed = Llama(dataclasses.replace(cfg, sliding_window=None)).float().eval()
        unwindowed.load_state_dict(ours.state_dict())
        assert (unwindowed(ids) - ours(ids)).abs().max() > 1e-3
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"))
    eng = build_engine("native", cfg, lora, model_dir=tmp_path, device=torch.device("cpu"), precision="fp32", seed=0)
    peft = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj",
                                                                                                  "v_proj"]))
    gb = torch.Generator().manual_seed(9)
    for name, (a, b) in eng.adapters().items():
        with torch.no_grad():
            b.normal_(0, 0.05, generator=gb)
            mod = peft.get_submodule("base_model.model." + name)
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    eng.loss(ids, ids).backward()
    peft(input_ids=ids, labels=ids).loss.backward()
    for name, (a, b) in eng.adapters().items():
        mod = peft.get_submodule("base_model.model." + name)
        torch.testing.assert_close(a.grad, mod.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.grad, mod.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
    resolve(Job(train=TrainConfig(precision="fp32", seq_len=32), lora=LoRAConfig(), model_dir=tmp_path,
                device="cpu", data="synthetic", progress=False))  # past the window: trained exactly, not refused
    with pytest.raises(ConfigError, match=r"--seq-len 32 \(past the model's sliding_window 16\): training past a "
                       "sliding window .* runs on native, reference, reference\+liger, reference\+compile and "
                       "reference\+bnb; "
                       "--engine unsloth does not have it"):
        resolve(Job(train=TrainConfig(precision="bf16", seq_len=32), lora=LoRAConfig(), model_dir=tmp_path,
                    device="cpu", data="synthetic", progress=False, engine="unsloth"))
