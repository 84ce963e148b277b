"""Our LoRA against PEFT: outputs, adapter gradients, adapter files both ways; invariants of the adapter."""
from __future__ import annotations

import json

import pytest
import torch

from lorabench.checkpoint import load_into, native_to_hf
from lorabench.config import ConfigError, LoRAConfig, ModelConfig
from lorabench.engines import build_engine
from lorabench.kernels.dropout import unpack_mask
from lorabench.adapter_io import read_adapter
from lorabench.lora import LoRALinear, adapter_delta, inject_lora, lora_modules
from lorabench.model import Llama

from conftest import SMALL, hf_model


def peft_model(hf, lora: LoRAConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=list(lora.targets), bias="none", task_type="CAUSAL_LM"))


def random_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)  # non-zero: B = 0 hides bugs


def pair(lora_cfg, seed=0, cfg=SMALL):
    """Our model and a PEFT model with identical base and adapter weights."""
    hf = hf_model(cfg, seed=seed)
    ours = Llama(cfg)
    load_into(ours, hf.state_dict().items(), True, "hf")
    inject_lora(ours, lora_cfg)
    random_adapters(ours, seed)
    pm = peft_model(hf, lora_cfg)
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            layer = pm.get_submodule("base_model.model." + native_to_hf(name))
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    return ours, pm


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN2 = ModelConfig(**{**SMALL.__dict__, "qkv_bias": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6})
QWEN3 = ModelConfig(**{**SMALL.__dict__, "qk_norm": True, "explicit_head_dim": 24, "rope_theta": 1e6})


@pytest.mark.parametrize("targets, cfg", [(("q_proj", "v_proj"), SMALL),
                                          (("k_proj", "o_proj", "gate_proj", "down_proj"), SMALL),
                                          (ALL_LINEAR, SMALL),
                                          (("q_proj", "k_proj", "v_proj"), QWEN2),
                                          (("q_proj", "v_proj", "o_proj"), QWEN3)],
                         ids=["llama-qv", "llama-mix", "llama-all", "qwen2", "qwen3"])
def test_outputs_and_adapter_grads_match_peft(targets, cfg):
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=targets)
    ours, pm = pair(lora, cfg=cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    loss_o = ours.loss(ids, ids)
    loss_p = pm(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_o, loss_p, atol=1e-5, rtol=1e-5)
    loss_o.backward()
    loss_p.backward()
    n = 0
    for name, m in lora_modules(ours).items():
        layer = pm.get_submodule("base_model.model." + native_to_hf(name))
        torch.testing.assert_close(m.lora_A.grad, layer.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.lora_B.grad, layer.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)
        assert m.lora_A.grad.abs().max() > 0
        n += 1
    assert n == SMALL.num_hidden_layers * len(targets)


def test_only_adapters_train_and_frozen_weights_stay_bit_identical(lora_cfg):
    ours, _ = pair(lora_cfg)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    ours.loss(ids, ids).backward()
    opt.step()
    for n, p in ours.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, f"{n} got a gradient"
        else:
            assert not torch.equal(p, adapters[n]), f"{n} did not move"


def test_merged_weights_equal_unmerged_output(lora_cfg):
    ours, _ = pair(lora_cfg)
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    with torch.no_grad():
        before = ours(ids)
        for m in lora_modules(ours).values():
            m.weight.copy_(m.merged_weight())
            m.lora_B.zero_()
        torch.testing.assert_close(ours(ids), before, atol=1e-5, rtol=1e-5)


def test_init_is_pefts_kaiming_uniform_and_zero_b():
    m = Llama(SMALL)
    inject_lora(m, LoRAConfig(r=8))
    layer = m.layers[0].attn.q_proj
    bound = SMALL.hidden_size ** -0.5
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.dtype == torch.float32


def plain_delta(x, a, b, mask, p, scale):
    """The adapter path as autograd records it op by op: the reference for adapter_delta."""
    d = x if mask is None else x * mask / (1 - p)
    return (d @ a.t()) @ b.t() * scale


# bf16 against float64: inputs and outputs round to 8 bits of mantissa, the GEMMs accumulate in fp32
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2)}


def check_delta_against_float64(delta, shape, r, out, p, dtype, seed, scale=4.0):
    """``delta(x, a, b, mask, p, scale)``'s forward and its gradients of x, A and B against the op-by-op
    expression in float64 (same mask)."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    a64 = torch.randn(r, shape[-1], generator=g, dtype=torch.float64)
    b64 = torch.randn(out, r, generator=g, dtype=torch.float64)
    grad = torch.randn(*shape[:-1], out, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) >= p if p else None
    ref = [t.clone().requires_grad_() for t in (x64, a64, b64)]
    want = plain_delta(*ref, mask, p, scale)
    want.backward(grad)
    got_in = [t.to(dtype).requires_grad_() for t in (x64, a64, b64)]
    got = delta(*got_in, mask, p, scale)
    got.backward(grad.to(dtype))
    atol, rtol = TOL[dtype]
    s = want.abs().max()
    torch.testing.assert_close(got.double() / s, want.detach() / s, atol=atol, rtol=rtol)
    for t_got, t_ref in zip(got_in, ref):
        s = t_ref.grad.abs().max()
        torch.testing.assert_close(t_got.grad.double() / s, t_ref.grad / s, atol=atol, rtol=rtol)
    if mask is not None:  # dropped inputs get no gradient
        assert torch.count_nonzero(got_in[0].grad[~mask]) == 0


@pytest.mark.parametrize("shape", [(2, 7, 33), (37, 64)])  # a [B, T, C] block input and odd sizes flat
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_delta_matches_plain_autograd(shape, p, dtype):
    check_delta_against_float64(adapter_delta, shape, 5, 19, p, dtype, seed=len(shape) + int(100 * p))


@pytest.mark.slow
@pytest.mark.parametrize("r", [5, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_adapter_delta_matches_plain_autograd(r, dtype):
    """Compiled (as in a compiled block: Inductor rewrites the graph), dropout on."""
    compiled = torch.compile(adapter_delta)
    check_delta_against_float64(compiled, (3, 11, 40), r, 24, 0.3, dtype, seed=r, scale=2.0)


def test_dropout_keeps_one_minus_p_and_saves_no_dropped_copy():
    """In training the adapter drops inputs with probability p and scales the rest by 1 / (1 - p), as
    F.dropout does; for the backward it keeps x, the mask packed one bit an element and the [tokens, r] product,
    not a dropped float copy of x (which the op-by-op path keeps: 4 more bytes per input element) nor a bool mask
    (a byte an element)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(256, 48, bias=False), r=8, alpha=16, dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 100, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer.delta(x)
    acts = {t.data_ptr(): t for t in saved if t.shape[:-1] == x.shape[:-1]}  # activations, not the adapters
    assert sorted((str(t.dtype), t.shape[-1]) for t in acts.values()) == [("torch.float32", 8), ("torch.float32", 256)]
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert len(masks) == 1 and masks[0].numel() == x.numel() // 8
    mask = unpack_mask(masks[0], x.shape)
    assert abs(mask.float().mean().item() - 0.7) < 0.01  # 102,400 draws: sd 0.0014
    torch.testing.assert_close(y, plain_delta(x, layer.lora_A, layer.lora_B, mask, 0.3, layer.scale))
    layer.eval()  # no dropout outside training
    torch.testing.assert_close(layer.delta(x), plain_delta(x, layer.lora_A, layer.lora_B, None, 0.3, layer.scale))


def test_our_adapter_loads_in_peft(tmp_path, lora_cfg):
    from peft import PeftModel

    hf = hf_model(SMALL, seed=2)
    hf.save_pretrained(tmp_path / "base")
    eng = build_engine("native", SMALL, lora_cfg, model_dir=tmp_path / "base", device=torch.device("cpu"),
                       precision="fp32", seed=0)
    random_adapters(eng.model, 3)
    eng.save_adapter(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    pm = PeftModel.from_pretrained(base, tmp_path / "adapter")
    # every adapter tensor landed: no missing or unexpected keys
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    assert set(saved) == set(loaded)
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    eng.eval()
    with torch.no_grad():
        torch.testing.assert_close(eng.logits(ids), pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_in_ours(tmp_path, lora_cfg):
    hf = hf_model(SMALL, seed=2)
    hf.save_pretrained(tmp_path / "base")
    pm = peft_model(hf_model(SMALL, seed=2), lora_cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft_adapter")
    eng = build_engine("native", SMALL, lora_cfg, model_dir=tmp_path / "base", device=torch.device("cpu"),
                       precision="fp32", seed=0)
    eng.load_adapter(tmp_path / "peft_adapter")
    eng.eval()
    pm.eval()
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(eng.logits(ids), pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_adapter_mismatch_fails_clearly(tmp_path, lora_cfg):
    eng = build_engine("native", SMALL, lora_cfg, model_dir=None, device=torch.device("cpu"), precision="fp32", seed=0)
    eng.save_adapter(tmp_path / "a")
    other = build_engine("native", SMALL, LoRAConfig(r=8, targets=("q_proj",)), model_dir=None,
                         device=torch.device("cpu"), precision="fp32", seed=0)
    with pytest.raises(ConfigError, match="same LoRA settings"):
        other.load_adapter(tmp_path / "a")
    with pytest.raises(ConfigError, match="adapter_config.json: missing"):
        read_adapter(tmp_path / "nothing")


@pytest.mark.parametrize("fused", [False, True])
def test_disabled_adapters_give_the_base_model(lora_cfg, fused):
    """adapters_disabled: the model computes its frozen base alone (HF's model without the adapter), in the plain
    and in the fused-projection path, and the adapters come back afterwards."""
    from lorabench.convert import fuse_projections
    from lorabench.lora import Adapter, adapters_disabled

    hf = hf_model(SMALL, seed=4)
    ours = Llama(SMALL)
    load_into(ours, hf.state_dict().items(), True, "hf")
    inject_lora(ours, LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj", "gate_proj")))
    random_adapters(ours, 4)
    if fused:
        fuse_projections(ours)
    ours.eval()
    assert all(isinstance(m, Adapter) for m in lora_modules(ours).values())
    ids = torch.randint(0, SMALL.vocab_size, (2, 12))
    with torch.no_grad():
        adapted = ours(ids)
        with adapters_disabled(ours):
            base = ours(ids)
        again = ours(ids)
        want = hf(input_ids=ids).logits
    torch.testing.assert_close(base, want, atol=1e-5, rtol=1e-5)
    assert (adapted - want).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_adapters_cross_to_peft_and_back_for_every_family(tmp_path, family):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms, its own head_dim) and Mistral (a 16-token window, 24 tokens here):
    our adapter file loads in PEFT over transformers' model of the family, PEFT's loads in ours, logits equal."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorabench.config import ModelConfig

    extra = {"qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True, "explicit_head_dim": 24},
             "mistral": {"sliding_window": 16}}[family]
    cfg = dataclasses.replace(SMALL, **extra)
    hf_model(cfg, seed=2, attn="sdpa").save_pretrained(tmp_path / "base")
    assert ModelConfig.from_hf_json(tmp_path / "base").hf_model_type == family
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    eng = build_engine("native", cfg, lora, model_dir=tmp_path / "base", device=torch.device("cpu"),
                       precision="fp32", seed=0)
    random_adapters(eng.model, 5)
    eng.save_adapter(tmp_path / "ours")
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ours").eval()
    ids = torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    eng.eval()
    with torch.no_grad():
        torch.testing.assert_close(eng.logits(ids), pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # PEFT's own weights, saved by PEFT, into a fresh engine
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(-0.5)
    pm.save_pretrained(tmp_path / "peft")
    back = build_engine("native", cfg, lora, model_dir=tmp_path / "base", device=torch.device("cpu"),
                        precision="fp32", seed=0)
    back.load_adapter(tmp_path / "peft")
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back.logits(ids), pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert (back.logits(ids) - eng.logits(ids)).abs().max() > 1e-3  # the second adapter is another one


@pytest.mark.parametrize("with_bias", [False, True])
def test_shared_input_deltas_equal_each_adapter_alone_in_float64(with_bias):
    """q/k/v (or gate/up) without dropout share one product with x: outputs and the gradients of x, every A and
    every B equal each adapter's own path (float64, a hand-made ranks mix 4/2/3)."""
    from lorabench.lora import LoRALinear, shared_input_deltas

    g = torch.Generator().manual_seed(3)
    mods = []
    for out, r in ((12, 4), (6, 2), (6, 3)):
        lin = torch.nn.Linear(10, out, bias=with_bias).double()
        m = LoRALinear(lin, r, 2.0 * r + 1, 0.0)
        with torch.no_grad():
            m.lora_A.data = torch.randn(r, 10, generator=g, dtype=torch.float64)
            m.lora_B.data = torch.randn(out, r, generator=g, dtype=torch.float64)
        mods.append(m)
    x = torch.randn(2, 5, 10, generator=g, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 5, m.out_features, generator=g, dtype=torch.float64) for m in mods]

    def grads(outs):
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        params = [x] + [p for m in mods for p in (m.lora_A, m.lora_B)]
        return [o.detach() for o in outs], torch.autograd.grad(loss, params)

    stacked, g_stacked = grads(shared_input_deltas(x, mods))
    alone, g_alone = grads([m.delta(x) for m in mods])
    for a, b in zip(stacked + list(g_stacked), alone + list(g_alone)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(t.abs().max() > 0 for t in g_stacked)


def test_adapters_with_dropout_keep_their_own_masks():
    """With dropout in training each adapter of a shared input draws its own mask (PEFT's independent dropout), so
    the shared product (which has no dropout) must not serve them: training differs from evaluation, the same
    seed gives the same deltas again, and evaluation equals the projection's own forward."""
    from lorabench.model import shared_input

    m = Llama(SMALL)
    inject_lora(m, LoRAConfig(r=4, alpha=16, dropout=0.5, targets=("q_proj", "v_proj")))
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    attn = m.layers[0].attn
    x = torch.randn(1, 8, SMALL.hidden_size)
    m.train()
    torch.manual_seed(1)
    q1, _, v1 = shared_input(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    torch.manual_seed(1)
    q2, _, v2 = shared_input(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    assert torch.equal(q1, q2) and torch.equal(v1, v2)
    m.eval()
    q0, _, v0 = shared_input(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    assert not torch.allclose(q1, q0) and not torch.allclose(v1, v0)
    torch.testing.assert_close(q0, attn.q_proj(x), rtol=1e-6, atol=1e-6)
