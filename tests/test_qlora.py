"""--precision nf4 (QLoRA): the native engine with its block projections stored as NF4 (quantized.py).

The references: the bf16 engine of the same seed (its weights quantized by kernels.nf4.quantize_nf4, itself tested
against float64 and bitsandbytes in test_nf4.py), the bf16 engine computing over the dequantized weights (the same
model in another storage), and bitsandbytes' own Linear4bit where it is installed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorabench.checkpoint import load_into, random_hf_weights, write_hf_dir
from lorabench.config import ConfigError, LoRAConfig, ModelConfig, TrainConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import NativeOptions, build_engine
from lorabench.kernels.fp8 import quantize_rows
from lorabench.kernels.nf4 import quantize_nf4
from lorabench.quantized import Nf4Linear, is_nf4, nf4_weight
from lorabench.shapes import PROJECTIONS
from lorabench.train import train_loop

from conftest import repeated_pairs

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)


def _engine(precision: str, lora: LoRAConfig, **kw):
    return build_engine("native", CFG, lora, model_dir=kw.pop("model_dir", None), device=CPU, precision=precision,
                        seed=0, **kw)


def _projections(model):
    for i, layer in enumerate(model.layers):
        for part in (layer.attn, layer.mlp):
            for name in PROJECTIONS:
                if hasattr(part, name):
                    yield f"layers.{i}.{name}", part, name


def test_nf4_engine_holds_each_block_projection_quantized_from_the_bf16_weights(lora_cfg):
    e4, e16 = _engine("nf4", lora_cfg), _engine("bf16", lora_cfg)
    n = 0
    for (where, p4, name), (_, p16, _) in zip(_projections(e4.model), _projections(e16.model), strict=True):
        m4, m16 = getattr(p4, name), getattr(p16, name)
        want = quantize_nf4(m16.weight.detach())
        assert is_nf4(m4) and not m4.weight.requires_grad, where
        assert torch.equal(m4.weight.reshape(-1), want.packed) and torch.equal(m4.weight_absmax, want.absmax), where
        assert torch.equal(nf4_weight(m4).dequantize(), want.dequantize()), where
        assert (name in lora_cfg.targets) == hasattr(m4, "lora_A"), where
        n += 1
    assert n == 7 * CFG.num_hidden_layers
    p4, p16 = dict(e4.model.named_parameters()), dict(e16.model.named_parameters())
    for name in ("embed.weight", "lm_head.weight", "norm.weight", "layers.0.attn_norm.weight"):
        assert name in p4 and p4[name].dtype == torch.bfloat16 and torch.equal(p4[name], p16[name]), name
    assert "NF4" in e4.describe()["numerics"]


def test_nf4_store_takes_4_point_1_bits_a_weight():
    """A 4096 x 4096 projection: 4 bits a weight for the codes, 8 bits per block of 64 for the absmax codes and a
    float32 per 256 blocks (QLoRA's double quantization: 4.127 bits a weight), plus the 16 + 256 float32 code
    tables."""
    m = Nf4Linear(4096, 4096, device="meta")
    n = 4096 * 4096
    total = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    assert total == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * (1 + 16 + 256)
    assert 4.12 < 8 * total / n < 4.13


def _dequantized_bf16_engine(e4, lora):
    """The bf16 engine with every block projection's weight replaced by the NF4 engine's, dequantized."""
    e16 = _engine("bf16", lora)
    with torch.no_grad():
        for (_, p4, name), (_, p16, _) in zip(_projections(e4.model), _projections(e16.model), strict=True):
            getattr(p16, name).weight.copy_(nf4_weight(getattr(p4, name)).dequantize())
    return e16


def _loss_logits_grads(eng, ids):
    """(loss, logits, adapter gradients) of ``eng`` on ``ids``, its B matrices drawn first (B = 0 would hide A's
    gradient)."""
    with torch.no_grad():
        for a, b in eng.adapters().values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    loss = eng.loss(ids, ids)
    loss.backward()
    return loss.detach(), eng.logits(ids).detach(), torch.cat([p.grad.flatten() for p in eng.trainable_params()])


def test_nf4_computes_as_bf16_over_the_dequantized_weights(lora_cfg):
    """Logits, loss and adapter gradients of the NF4 model equal those of the bf16 model holding its dequantized
    weights: the same products in the same dtype, only the storage differs (so any difference is a bug: a weight
    in the wrong module, a wrong block scale, a missing adapter or input gradient)."""
    ids = torch.from_numpy(synthetic_chunks(2, 32, CFG.vocab_size, seed=4)).long()
    e4 = _engine("nf4", lora_cfg)
    e16 = _dequantized_bf16_engine(e4, lora_cfg)
    grads = [_loss_logits_grads(eng, ids) for eng in (e4, e16)]
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # and the NF4 model is not the bf16 one: quantization moved the logits
        assert not torch.equal(grads[0][1], _engine("bf16", lora_cfg).logits(ids))


def test_nf4_trains_as_bf16_over_the_dequantized_weights_and_learns():
    """Ten steps of the same data and init (dropout 0): the loss curves are equal step for step, and fall."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    data = repeated_pairs(CFG.vocab_size)
    cfg = TrainConfig(precision="bf16", batch_size=2, seq_len=32, epochs=1, max_steps=10, lr=3e-2, untimed_steps=0,
                      shuffle=False)
    e4 = _engine("nf4", lora)
    e16 = _dequantized_bf16_engine(e4, lora)
    c4 = np.array(train_loop(e4, data, cfg, CPU, progress=False)["series"]["loss"])
    c16 = np.array(train_loop(e16, data, cfg, CPU, progress=False)["series"]["loss"])
    np.testing.assert_array_equal(c4, c16)
    assert c4[-1] < c4[0] - 0.05


def _dequantized_fp8_engine(e4, lora, **kw):
    """The fp8 engine with every block projection holding the NF4 engine's weight dequantized to bf16 and then
    quantized per row, as --precision fp8 quantizes a bf16 checkpoint's weight."""
    e8 = _engine("fp8", lora, **kw)
    with torch.no_grad():
        for (_, p4, name), (_, p8, _) in zip(_projections(e4.model), _projections(e8.model), strict=True):
            wq, scale = quantize_rows(nf4_weight(getattr(p4, name)).dequantize())
            getattr(p8, name).weight.copy_(wq)
            getattr(p8, name).weight_scale.copy_(scale.view(-1))
    return e8


def test_nf4_fp8_computes_as_fp8_over_the_dequantized_weights(lora_cfg):
    """--precision nf4-fp8: logits, loss and adapter gradients equal those of the fp8 model holding the NF4
    weights dequantized (the same FP8 GEMMs over the same e4m3 weights, only the storage differs), and differ
    from nf4's bf16 products (so the FP8 path ran)."""
    ids = torch.from_numpy(synthetic_chunks(2, 32, CFG.vocab_size, seed=4)).long()
    e48 = _engine("nf4-fp8", lora_cfg)
    e8 = _dequantized_fp8_engine(e48, lora_cfg)
    results = [_loss_logits_grads(eng, ids) for eng in (e48, e8, _engine("nf4", lora_cfg))]
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, bf16 in zip(results[0], results[2]):
        assert not torch.equal(got, bf16)
    assert "then to e4m3" in e48.describe()["numerics"]
    assert e48.options.fp8_grad == "e4m3" and e48.options.nf4_dequant == "torch"
    # the e4m3 row scales are made once, as each weight loads (the products do not reduce over the weight again)
    for (_, p48, name), (_, p8, _) in zip(_projections(e48.model), _projections(e8.model), strict=True):
        assert torch.equal(getattr(p48, name).weight_fp8_scale, getattr(p8, name).weight_scale)
    assert all(getattr(p, name).weight_fp8_scale is None for _, p, name in _projections(_engine("nf4", lora_cfg).model))


def test_nf4_fp8_trains_as_fp8_over_the_dequantized_weights():
    """Ten steps, same data and init: the nf4-fp8 loss curve is the fp8 engine's over the dequantized weights,
    step for step (the backward's FP8 input gradients included, here in e5m2, which both engines are given)."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    data = repeated_pairs(CFG.vocab_size)
    cfg = TrainConfig(precision="bf16", batch_size=2, seq_len=32, epochs=1, max_steps=10, lr=3e-2, untimed_steps=0,
                      shuffle=False)
    opts = NativeOptions(fp8_grad="e5m2")
    e48 = _engine("nf4-fp8", lora, native=opts)
    e8 = _dequantized_fp8_engine(e48, lora, native=opts)
    c48 = np.array(train_loop(e48, data, cfg, CPU, progress=False)["series"]["loss"])
    c8 = np.array(train_loop(e8, data, cfg, CPU, progress=False)["series"]["loss"])
    np.testing.assert_array_equal(c48, c8)
    assert c48[-1] < c48[0] - 0.05


def test_nf4_merged_weight_is_the_dequantized_weight_plus_the_update(lora_cfg):
    m = _engine("nf4", lora_cfg).model.layers[0].attn.v_proj
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    ref = nf4_weight(m, torch.float64).dequantize() + m.scale * (m.lora_B.double() @ m.lora_A.double())
    torch.testing.assert_close(m.merged_weight().double(), ref, rtol=2.0 ** -8, atol=1e-6)  # one bf16 rounding


def test_nf4_options_that_do_not_apply_are_refused(lora_cfg):
    for precision, options, message in (
            ("nf4", {"fused_projections": True}, "--fused-projections does not apply to --precision nf4"),
            ("nf4", {"fp8_grad": "e5m2"}, r"--fp8-grad applies to FP8 products \(--precision fp8, nf4-fp8\) only, "
                                          "not nf4"),
            ("nf4-fp8", {"fp8_skip": ("down_proj",)}, "--fp8-skip applies to --precision fp8 only, not nf4-fp8"),
            ("bf16", {"nf4_dequant": "triton"}, "--nf4-dequant applies to --precision nf4 only, not bf16"),
            ("nf4", {"nf4_dequant": "cuda"}, "--nf4-dequant 'cuda': choose from torch, triton")):
        with pytest.raises(ConfigError, match=message):
            _engine(precision, lora_cfg, native=NativeOptions(**options))
    assert _engine("nf4", lora_cfg).options.nf4_dequant == "torch"  # off a GPU: what runs there either way
    from lorabench.kernels.nf4 import kernels_available
    from lorabench.precision import get_precision

    on_gpu = {p: NativeOptions().resolve(get_precision(p), torch.device("cuda")).nf4_dequant
              for p in ("nf4", "nf4-fp8")}
    assert on_gpu == dict.fromkeys(on_gpu, "triton" if kernels_available() else "torch")  # the measured default
    eng = _engine("nf4", lora_cfg, native=NativeOptions(nf4_dequant="triton"))
    assert eng.options.nf4_dequant == "triton"
    assert {m.nf4_dequant for _, p, name in _projections(eng.model) for m in [getattr(p, name)]} == {"triton"}
    with pytest.raises(ConfigError, match="--engine reference has no NF4 weights; --precision nf4 runs on native"):
        build_engine("reference", CFG, lora_cfg, model_dir=None, device=CPU, precision="nf4", seed=0)


def test_nf4_is_refused_where_it_cannot_be_sharded():
    from lorabench.precision import get_precision
    from lorabench.shard import check

    with pytest.raises(ConfigError, match="--shard fsdp does not shard NF4 weights yet"):
        check("fsdp", "native", get_precision("nf4"), 2, False, False)


# -- checkpoints -----------------------------------------------------------------------------------------------

def _bnb_style(tensors: dict[str, torch.Tensor], nested_for=lambda name: True) -> dict[str, torch.Tensor]:
    """``tensors`` as bitsandbytes saves a 4-bit model: each block projection's weight as its packed codes
    ([n / 2, 1] uint8) beside its quant state (``<name>.weight.absmax`` ...), the rest as they are."""
    out = {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            q = quantize_nf4(t, double_quant=nested_for(name))
            out[name] = q.packed.view(-1, 1)
            out.update(q.quant_state(name))
        else:
            out[name] = t
    return out


def test_a_bitsandbytes_nf4_checkpoint_loads_as_it_is(tmp_path, lora_cfg):
    """A checkpoint quantized by bitsandbytes' rules, some weights with double quantization and some without: an
    nf4 model keeps each weight's own codes and state (the undouble-quantized ones with float32 absmax, which a
    re-quantization would not give); a bf16 model loads the same checkpoint dequantized."""
    tensors = dict(random_hf_weights(CFG, 5, CPU, torch.bfloat16))
    plain = "model.layers.1.self_attn.q_proj.weight"
    write_hf_dir(tmp_path, CFG, _bnb_style(tensors, nested_for=lambda n: n != plain))
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                 "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    e4 = _engine("nf4", lora_cfg, model_dir=tmp_path)
    e16 = _engine("bf16", lora_cfg, model_dir=tmp_path)
    q_plain = e4.model.layers[1].attn.q_proj
    assert q_plain.weight_absmax.dtype == torch.float32 and q_plain.weight_nested_absmax is None
    want = quantize_nf4(tensors[plain], double_quant=False)
    assert torch.equal(q_plain.weight_absmax, want.absmax)
    down = e4.model.layers[0].mlp.down_proj
    want = quantize_nf4(tensors["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(down.weight.reshape(-1), want.packed) and torch.equal(down.weight_absmax, want.absmax)
    assert down.weight_offset.item() == want.offset and torch.equal(down.weight_nested_absmax, want.nested_absmax)
    for (_, p4, name), (_, p16, _) in zip(_projections(e4.model), _projections(e16.model), strict=True):
        assert torch.equal(nf4_weight(getattr(p4, name)).dequantize(), getattr(p16, name).weight), name
    assert torch.equal(e16.model.embed.weight, tensors["model.embed_tokens.weight"])


def test_a_damaged_or_other_quantized_checkpoint_is_refused(lora_cfg):
    tensors = _bnb_style(dict(random_hf_weights(CFG, 5, CPU, torch.bfloat16)))

    def load(ts, precision="nf4"):
        load_into(_engine(precision, lora_cfg).model, iter(ts.items()), True, "ckpt")

    cut = {k: v for k, v in tensors.items() if k != "model.layers.0.mlp.up_proj.weight.nested_absmax"}
    with pytest.raises(ConfigError, match=r"ckpt: the 4-bit weight model.layers.0.mlp.up_proj.weight is incomplete"):
        load(cut)
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in tensors.items()}
    with pytest.raises(ConfigError, match=r"4-bit FP4 \(bnb_4bit_quant_type='fp4'\) weight; lorabench reads NF4"):
        load(fp4, "bf16")
    with pytest.raises(ConfigError, match=r"8-bit \(load_in_8bit\)"):
        load({**tensors, "model.layers.0.mlp.up_proj.SCB": torch.ones(3)})
    bad = dict(tensors)
    bad[key] = torch.tensor(list(b'{"quant_type": "nf4"'), dtype=torch.uint8)  # cut short
    with pytest.raises(ConfigError, match="up_proj.weight is not a readable bitsandbytes NF4 weight"):
        load(bad)


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed here")


def test_bitsandbytes_linear4bit_weights_load_and_compute_as_there(bnb, lora_cfg):
    """Each block projection made by bitsandbytes' Linear4bit (nf4, double quantization, bf16 compute) and its
    state dict streamed into the nf4 model: every projection dequantizes bit for bit as bitsandbytes dequantizes
    it, and computes its output as Linear4bit does. Rows here are multiples of 64 wide, as in the models people
    quantize: bitsandbytes 0.50's CPU dequantize_4bit is wrong for other widths (on a [64, 96] weight its error
    is 4x the quantization's, ours within it; its codes and absmax equal ours there too)."""
    import bitsandbytes.functional as F

    cfg = ModelConfig(**{**CFG.__dict__, "intermediate_size": 128})
    tensors = dict(random_hf_weights(cfg, 5, CPU, torch.bfloat16))
    layers = {}
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        w = tensors.pop(name)
        lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True)
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        lin = lin.to("cpu")
        layers[name] = lin
        tensors.update({f"{name[:-len('.weight')]}.{k}": v for k, v in lin.state_dict().items()})
    e4 = build_engine("native", cfg, lora_cfg, model_dir=None, device=CPU, precision="nf4", seed=0)
    load_into(e4.model, iter(tensors.items()), True, "bitsandbytes")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    for i, layer in enumerate(e4.model.layers):
        for part, prefix in ((layer.attn, "self_attn"), (layer.mlp, "mlp")):
            for name in PROJECTIONS:
                if not hasattr(part, name):
                    continue
                lin = layers[f"model.layers.{i}.{prefix}.{name}.weight"]
                mod = getattr(part, name)
                theirs = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
                assert torch.equal(nf4_weight(mod).dequantize(), theirs), (i, name)
                xi = x[:, :mod.in_features]
                with torch.no_grad():
                    got = mod.base_forward(xi) if hasattr(mod, "lora_A") else mod(xi)
                    torch.testing.assert_close(got, lin(xi), rtol=0, atol=0)


def test_native_nf4_follows_peft_over_bitsandbytes(bnb):
    """The same seed's base quantized by each (codes equal: test_nf4.py), adapters from the same init, dropout 0:
    native nf4 and PEFT over bitsandbytes' Linear4bit (reference+bnb) train within bf16 rounding of each other over
    8 steps, as native and PEFT do in bf16 (test_engines.BF16_CURVE_GAP), while other weights (seed 1) do not.
    Rows a multiple of 64 wide (bitsandbytes' CPU dequantization, see above)."""
    from test_engines import BF16_CURVE_GAP

    cfg = ModelConfig(**{**CFG.__dict__, "intermediate_size": 128})
    data = synthetic_chunks(32, 32, cfg.vocab_size, seed=1)
    train = TrainConfig(precision="nf4", batch_size=2, seq_len=32, epochs=1, max_steps=8, lr=1e-2, untimed_steps=0)

    def curve(engine, seed=0):
        eng = build_engine(engine, cfg, LoRAConfig(r=4, alpha=16, dropout=0.0), model_dir=None, device=CPU,
                           precision="nf4", seed=seed)
        return eng, np.array(train_loop(eng, data, train, CPU, progress=False)["series"]["loss"])

    ref, theirs = curve("reference+bnb")
    assert "Linear4bit" in ref.describe()["numerics"]
    ours = curve("native")[1]
    rel = np.abs(ours - theirs) / theirs
    assert rel.max() < BF16_CURVE_GAP, rel
    other = curve("reference+bnb", seed=1)[1]
    assert (np.abs(ours - other) / other).max() > 2 * BF16_CURVE_GAP


@pytest.mark.slow
@pytest.mark.parametrize("precision,checkpointing", [("nf4", "none"), ("nf4-fp8", "none"), ("nf4", "block"),
                                                    ("nf4", "block:1")])
def test_compiled_nf4_blocks_train_as_eager(precision, checkpointing):
    """torch.compile of NF4 blocks (the GPU default) computes the training of the eager ones, without a graph
    break, also recomputed under block checkpointing (where graph breaks made the recomputation save a different
    number of tensors on torch 2.11: benchmarks/NOTES.md item 105), and with only the first block recomputed
    (--checkpoint-blocks 1: the same compiled block runs inside torch's checkpoint and outside it). In bf16 a fused
    graph rounds its intermediates differently from eager ops (2^-8 relative each, mostly averaging out in the
    loss): 3e-5 relative measured, 1e-3 allowed."""
    pytest.importorskip("torch._inductor")
    import torch._dynamo.utils

    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    cfg = TrainConfig(precision=precision, batch_size=2, seq_len=32, epochs=1, max_steps=3, lr=1e-2,
                      untimed_steps=0)
    data = synthetic_chunks(16, 32, CFG.vocab_size, seed=2)
    torch._dynamo.utils.counters.clear()
    policy, _, blocks = checkpointing.partition(":")
    blocks = int(blocks) if blocks else None
    engines = [_engine(precision, lora, native=NativeOptions(compile=c, checkpoint_blocks=blocks),
                       checkpointing=policy) for c in (False, True)]
    curves = [train_loop(e, data, cfg, CPU, progress=False)["series"]["loss"] for e in engines]
    assert engines[1].model.compiled_layers is not None and not torch._dynamo.utils.counters["graph_break"]
    assert all((e.model.activation_checkpointing, e.model.checkpoint_blocks) == (policy, blocks) for e in engines)
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3)


@pytest.mark.parametrize("quant", [{"quant_method": "gptq", "bits": 4},
                                   {"quant_method": "bitsandbytes", "load_in_8bit": True},
                                   {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                    "bnb_4bit_quant_type": "fp4"}])
def test_config_of_another_quantization_is_refused_naming_the_field(tmp_path, quant):
    """A checkpoint quantized otherwise than bitsandbytes' NF4 (GPTQ, 8-bit, FP4) is refused at its config.json,
    before any tensor is read; bitsandbytes' NF4 config is read."""
    hf = CFG.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps({**hf, "quantization_config": quant}))
    with pytest.raises(ConfigError, match=r"config.json: quantization_config = .* is not supported: lorabench reads "
                                          "unquantized checkpoints and bitsandbytes' 4-bit NF4 ones"):
        ModelConfig.from_hf_json(tmp_path)
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps({**hf, "quantization_config": nf4}))
    assert ModelConfig.from_hf_json(tmp_path) == CFG
