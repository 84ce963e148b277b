"""FP8 frozen projections (kernels/fp8.py, --precision fp8) against float64 and against the bf16 model.

The references here are written independently of the code under test: float64 scales, a direct float64 -> FP8
cast (one rounding), and products of the dequantized values in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabench.config import ConfigError, LoRAConfig, ModelConfig, TrainConfig
from lorabench.data.synthetic import synthetic_chunks
from lorabench.engines import NativeOptions, build_engine
from lorabench.kernels import fp8
from lorabench.kernels.fp8 import cast_fp8, fp8_linear, quantize_rows, scaled_mm
from lorabench.train import train_loop

from conftest import repeated_pairs


CPU = torch.device("cpu")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16_ULP = 2.0 ** -8  # relative spacing of bf16 at the bottom of a binade: one rounding of the output moves it this much


def ref_quantize(x: torch.Tensor, dtype, multiplier=None):
    """Rowwise quantization in float64: scale = amax / max, one rounding from float64 to the FP8 format."""
    x = x.double() if multiplier is None else x.double() * multiplier.double()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    return (x / scale).to(dtype), scale


def rows_with_range(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span 1e-4..1e3, one row of zeros and one outlier element."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64) * torch.logspace(-4, 3, m, dtype=torch.float64)[:, None]
    x[1] = 0.0
    x[2, 5] = 5e3
    return x


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_rowwise_scales_and_values_match_float64(dtype):
    x = rows_with_range(9, 160)
    q, scale = quantize_rows(x.float(), dtype)
    q_ref, scale_ref = ref_quantize(x.float(), dtype)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=2e-7, atol=0)  # fp32 division: one rounding
    assert scale[1].item() == 1.0 and q[1].float().abs().max().item() == 0.0  # zeros: scale 1, no 0/0
    top = torch.finfo(dtype).max
    nonzero = [i for i in range(9) if i != 1]
    assert torch.all(q[nonzero].float().abs().amax(-1) == top)  # every row's largest value lands on the format's max
    # the fp32 path divides after a rounding to fp32 (two roundings): it may differ from the one-rounding float64
    # reference only at a tie, by one FP8 step, and on a handful of elements
    differ = q.float() != q_ref.float()
    assert differ.sum().item() <= 3
    # and every value is within half an FP8 step of x / scale: 2^-4 (e4m3) or 2^-3 (e5m2) relative for normals,
    # half the subnormal spacing below
    mant = 3 if dtype == E4M3 else 2
    tiny = torch.finfo(dtype).smallest_normal
    v = x.float().double() / scale.double()
    err = (q.double() - v).abs()
    bound = torch.where(v.abs() >= tiny, v.abs() * 2.0 ** -(mant + 1), torch.full_like(v, tiny * 2.0 ** -(mant + 1)))
    assert torch.all(err <= bound * (1 + 1e-6))


def test_scales_are_amax_times_the_float32_reciprocal_of_the_max():
    """A scale is amax x float32(1 / max), a multiply (the quotient differs by an ulp for about half of all rows):
    PyTorch's CUDA kernels divide by a Python number that way and its CPU kernels do not, so only the multiply
    gives every device, and the NF4 -> e4m3 Triton kernel, the same scales (an H100 showed the quotient's
    scales differing from the card's in 6,087 of 11,008 rows)."""
    x = rows_with_range(64, 96, seed=3).float()
    for dtype in (E4M3, E5M2):
        inv = torch.tensor(1 / torch.finfo(dtype).max, dtype=torch.float32)
        amax = x.abs().amax(-1, keepdim=True)
        want = torch.where(amax > 0, amax * inv, torch.ones_like(amax))
        assert torch.equal(quantize_rows(x, dtype)[1], want)
        assert torch.equal(fp8.quantize_tensor(x, dtype)[1], (x.abs().max() * inv).reshape(1, 1))
        assert not torch.equal(amax / torch.finfo(dtype).max, amax * inv)  # the two really differ here


def test_casts_saturate_at_the_formats_largest_value():
    big = torch.tensor([1e6, -1e6, 448.0, 57344.0 * 4])
    assert cast_fp8(big, E4M3).float().tolist() == [448.0, -448.0, 448.0, 448.0]
    assert cast_fp8(big, E5M2).float().tolist() == [57344.0, -57344.0, 448.0, 57344.0]
    # a folded multiplier (the weight scales of the input gradient) larger than the row's own range cannot overflow:
    # the row scale is taken after it
    q, s = quantize_rows(torch.ones(2, 32), E5M2, multiplier=torch.full((32,), 1e30))
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()


def test_emulated_scaled_mm_matches_float64():
    g = torch.Generator().manual_seed(1)
    a, sa = quantize_rows(torch.randn(7, 48, generator=g) * 3)
    b, sb = quantize_rows(torch.randn(24, 48, generator=g) * 0.02)
    sb = sb.view(-1) * torch.linspace(0.5, 2, 24)  # distinct per-column scales: a transposed scale would show
    y = scaled_mm(a, sa, b, sb, torch.bfloat16)
    ref = (a.double() @ b.double().t()) * sa.double() * sb.double()[None, :]
    # the FP8 products are exact in fp32; the fp32 sum of 48 terms adds ~48 * 2^-24 relative; bf16 output: one rounding
    torch.testing.assert_close(y.double(), ref, rtol=BF16_ULP, atol=1e-12)


@pytest.mark.parametrize("grad_fmt", ["e4m3", "e5m2"])
def test_fp8_linear_forward_and_input_gradient_match_float64(grad_fmt):
    gdt = fp8.GRAD_FORMATS[grad_fmt]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 48, generator=g, dtype=torch.float64) * 0.02
    w[3] *= 50  # an outlier output channel gets its own scale
    wq, ws = quantize_rows(w.float())
    ws = ws.view(-1)
    x = (torch.randn(3, 5, 48, generator=g) * 2).bfloat16().requires_grad_()
    gy = torch.randn(3, 5, 40, generator=g).bfloat16()
    y = fp8_linear(x, wq, ws, gdt)
    y.backward(gy)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    # float64 reference: quantize x per token; y = dequant(xq) dequant(Wq)^T
    w_deq = wq.double() * ws.double()[:, None]
    xq, xs = ref_quantize(x.detach().reshape(15, 48), E4M3)
    y_ref = (xq.double() * xs) @ w_deq.t()
    torch.testing.assert_close(y.detach().reshape(15, 40).double(), y_ref, rtol=2 * BF16_ULP,
                               atol=2 * BF16_ULP * y_ref.abs().max().item())
    # dx = dy W: the weight's scales folded into dy before dy is quantized per token, then times Wq
    gq, gs = ref_quantize(gy.reshape(15, 40), gdt, multiplier=ws)
    dx_ref = (gq.double() * gs) @ wq.double()
    torch.testing.assert_close(x.grad.reshape(15, 48).double(), dx_ref, rtol=2 * BF16_ULP,
                               atol=2 * BF16_ULP * dx_ref.abs().max().item())
    # and both are FP8 approximations of the exact products: close, but not equal (it really quantized)
    exact_y = x.detach().double().reshape(15, 48) @ w.t()
    err = ((y.detach().reshape(15, 40).double() - exact_y).norm() / exact_y.norm()).item()
    assert 1e-3 < err < 6e-2


def test_tensorwise_scale_and_values_match_float64():
    """One scale for the whole tensor: amax / the format's max (fp32 division, one rounding), the largest element
    on the format's max, zeros scaled by 1; values as the float64 one-rounding cast of x / scale but for ties."""
    x = rows_with_range(9, 160)
    for dtype in (E4M3, E5M2):
        q, scale = fp8.quantize_tensor(x.float(), dtype)
        amax = x.float().double().abs().max()
        want = amax / torch.finfo(dtype).max
        assert scale.shape == (1, 1) and abs(scale.item() / want.item() - 1) <= 2e-7
        assert q.float().abs().max().item() == torch.finfo(dtype).max
        ref = (x.float().double() / scale.double()).to(dtype)
        assert (q.float() != ref.float()).sum().item() <= 3
    q, scale = fp8.quantize_tensor(torch.zeros(3, 16))
    assert scale.item() == 1.0 and not q.float().any()


def test_tensorwise_fp8_linear_forward_and_input_gradient_match_float64():
    """--fp8-recipe tensorwise: the weight quantized with one scale (quantize_weight repeats it per row), the
    activations and the gradients each with one; y and dx are the float64 products of those quantized values."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 48, generator=g, dtype=torch.float64) * 0.02
    w[3] *= 50  # an outlier channel: under one scale it sets every row's resolution
    wq, ws = fp8.quantize_weight(w.float(), E4M3, "tensorwise")
    assert ws.shape == (40,) and torch.all(ws == ws[0])
    x = (torch.randn(3, 5, 48, generator=g) * 2).bfloat16().requires_grad_()
    gy = torch.randn(3, 5, 40, generator=g).bfloat16()
    y = fp8_linear(x, wq, ws, E4M3, "tensorwise")
    y.backward(gy)
    xd = x.detach().reshape(15, 48).double()
    xs = xd.abs().max() / 448
    y_ref = ((xd / xs).to(E4M3).double() * xs) @ (wq.double() * ws[0].double()).t()
    torch.testing.assert_close(y.detach().reshape(15, 40).double(), y_ref, rtol=2 * BF16_ULP,
                               atol=2 * BF16_ULP * y_ref.abs().max().item())
    gd = gy.reshape(15, 40).double()
    gs = gd.abs().max() / 448
    dx_ref = ((gd / gs).to(E4M3).double() * gs) @ (wq.double() * ws[0].double())
    torch.testing.assert_close(x.grad.reshape(15, 48).double(), dx_ref, rtol=2 * BF16_ULP,
                               atol=2 * BF16_ULP * dx_ref.abs().max().item())
    # the rowwise recipe of the same tensors gives other numbers (it really scaled per tensor)
    rowwise = fp8_linear(x.detach(), *fp8.quantize_weight(w.float(), E4M3), E4M3, "rowwise")
    assert not torch.equal(rowwise, y.detach())


def test_projection_sizes_cuBLASLt_cannot_take_are_named():
    assert fp8.fp8_shape_problems({"q_proj": (64, 64), "gate_proj": (64, 88)}) == ["gate_proj 64->88"]


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    why = fp8.fp8_gemm_supported(torch.device("cuda"))
    assert "A100" in why and "sm89" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.fp8_gemm_supported(torch.device("cuda")) is None
    assert fp8.fp8_gemm_supported(CPU) is None  # emulated


# -- the model in FP8 ----------------------------------------------------------------------------------------

FP8_CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)


def _engine(precision: str, lora: LoRAConfig, **kw):
    return build_engine("native", FP8_CFG, lora, model_dir=kw.pop("model_dir", None), device=CPU,
                        precision=precision, seed=0, **kw)


def test_fp8_engine_holds_one_quantized_copy_of_the_same_weights(lora_cfg):
    e8, e16 = _engine("fp8", lora_cfg), _engine("bf16", lora_cfg)
    p8 = dict(e8.model.named_parameters())
    p16 = dict(e16.model.named_parameters())
    buf8 = dict(e8.model.named_buffers())
    n_fp8 = 0
    for name, p in p16.items():
        if ".lora_" in name:
            continue
        if ".attn." in name and "norm" not in name or ".mlp." in name:
            q, s = quantize_rows(p.detach())  # the bf16 model's weight, quantized: what the fp8 model holds
            assert p8[name].dtype == E4M3 and not p8[name].requires_grad
            assert torch.equal(p8[name].float(), q.float()), name
            assert torch.equal(buf8[name + "_scale"], s.view(-1)), name
            n_fp8 += 1
        else:  # embeddings, norms, lm_head stay in bf16, bit for bit
            assert p8[name].dtype == torch.bfloat16 and torch.equal(p8[name], p), name
    assert n_fp8 == 7 * FP8_CFG.num_hidden_layers


def test_fp8_weights_load_quantized_from_a_checkpoint(tmp_path, lora_cfg):
    from lorabench.checkpoint import random_hf_weights, write_hf_dir

    tensors = dict(random_hf_weights(FP8_CFG, 5, CPU, torch.float32))
    write_hf_dir(tmp_path, FP8_CFG, tensors)
    eng = _engine("fp8", lora_cfg, model_dir=tmp_path)
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    q, s = quantize_rows(w)  # fp32 in the checkpoint: quantized from fp32, not through bf16
    mod = eng.model.layers[1].mlp.down_proj
    assert torch.equal(mod.weight.float(), q.float()) and torch.equal(mod.weight_scale, s.view(-1))


def test_fp8_logits_and_adapter_gradients_follow_bf16(lora_cfg):
    ids = torch.from_numpy(synthetic_chunks(2, 32, FP8_CFG.vocab_size, seed=4)).long()
    out = {}
    for prec in ("fp8", "bf16", "fp32"):
        eng = _engine(prec, lora_cfg)
        with torch.no_grad():
            for a, b in eng.adapters().values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))  # B = 0 would hide the A gradient
        loss = eng.loss(ids, ids)
        loss.backward()
        out[prec] = (eng.logits(ids).detach(), loss.item(),
                     torch.cat([p.grad.flatten() for p in eng.trainable_params()]))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    logits_err, grad_err = rel(out["fp8"][0], out["fp32"][0]), rel(out["fp8"][2], out["fp32"][2])
    # e4m3 rounds each operand to 2^-4 relative (3.7e-2 for one product of Gaussians, REFERENCE 6b): errors of that
    # order, well above bf16's, and far below what a wrong scale or a missing adapter path gives (order 1)
    assert 1e-3 < logits_err < 0.1 and rel(out["bf16"][0], out["fp32"][0]) < logits_err
    assert grad_err < 0.25
    assert abs(out["fp8"][1] - out["fp32"][1]) / out["fp32"][1] < 1e-2


def test_fp8_training_tracks_bf16_and_learns():
    """20 steps of the same data and init, dropout 0: the two curves stay within 1% of each other and fall."""
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    # learnable: the same two chunks every step (each a period-8 pattern repeated), so the loss falls steadily
    rng = np.random.default_rng(1)
    pair = [np.tile(rng.integers(0, FP8_CFG.vocab_size, 8), 4) for _ in range(2)]
    data = np.stack(pair * 20).astype(np.int32)
    curves = {}
    for prec in ("fp8", "bf16"):
        cfg = TrainConfig(precision=prec, batch_size=2, seq_len=32, epochs=1, max_steps=20, lr=3e-2, untimed_steps=0,
                          shuffle=False)
        out = train_loop(_engine(prec, lora), data, cfg, CPU, progress=False)
        curves[prec] = np.array(out["series"]["loss"])
    assert curves["fp8"][-1] < curves["fp8"][0] - 0.05
    np.testing.assert_allclose(curves["fp8"], curves["bf16"], rtol=1e-2)


def test_fp8_merged_weight_is_the_dequantized_weight_plus_the_update(lora_cfg):
    eng = _engine("fp8", lora_cfg)
    m = eng.model.layers[0].attn.q_proj
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    ref = m.weight.double() * m.weight_scale.double()[:, None] + m.scale * (m.lora_B.double() @ m.lora_A.double())
    torch.testing.assert_close(m.merged_weight().double(), ref, rtol=BF16_ULP, atol=1e-6)


def test_fp8_options_that_do_not_apply_are_refused(lora_cfg):
    with pytest.raises(ConfigError, match="--fused-projections"):
        _engine("fp8", lora_cfg, native=NativeOptions(fused_projections=True))
    with pytest.raises(ConfigError, match=r"--fp8-grad applies to FP8 products \(.*\) only, not bf16"):
        _engine("bf16", lora_cfg, native=NativeOptions(fp8_grad="e5m2"))
    with pytest.raises(ConfigError, match="--fp8-grad"):
        NativeOptions(fp8_grad="e3m4")
    eng = _engine("fp8", lora_cfg, native=NativeOptions(fp8_grad="e5m2"))
    assert eng.model.layers[0].mlp.up_proj.grad_dtype == E5M2 and "e5m2" in eng.describe()["numerics"]
    for precision in ("bf16", "nf4-fp8"):
        with pytest.raises(ConfigError, match=f"--fp8-recipe applies to --precision fp8 only, not {precision}"):
            _engine(precision, lora_cfg, native=NativeOptions(fp8_recipe="tensorwise"))
    with pytest.raises(ConfigError, match="--fp8-recipe 'blockwise': choose from rowwise, tensorwise"):
        NativeOptions(fp8_recipe="blockwise")
    assert _engine("fp8", lora_cfg).options.fp8_recipe == "rowwise"


def test_tensorwise_engine_holds_one_scale_a_weight_and_computes_with_it(lora_cfg):
    """--fp8-recipe tensorwise: each block projection holds the bf16 weight quantized with one scale (on every
    adapted and plain projection, loaded from the same checkpoint path), the logits are those of the rowwise model
    with those weights put in but every product scaled per tensor, and training learns."""
    e_t = _engine("fp8", lora_cfg, native=NativeOptions(fp8_recipe="tensorwise"))
    e16 = _engine("bf16", lora_cfg)
    p16 = dict(e16.model.named_parameters())
    for name, m in e_t.model.named_modules():
        if getattr(m, "weight_scale", None) is not None:
            q, s = fp8.quantize_tensor(p16[name + ".weight"].detach())
            assert torch.equal(m.weight.float(), q.float()) and torch.all(m.weight_scale == s.item()), name
            assert m.fp8_recipe == "tensorwise", name
    assert "one scale per tensor" in e_t.describe()["numerics"]
    ids = torch.from_numpy(synthetic_chunks(2, 32, FP8_CFG.vocab_size, seed=4)).long()
    e_r = _engine("fp8", lora_cfg)
    with torch.no_grad():
        assert not torch.equal(e_t.logits(ids), e_r.logits(ids))
        for (name, m_t), m_r in zip(e_t.model.named_modules(), e_r.model.modules()):
            if getattr(m_t, "weight_scale", None) is not None:
                m_r.weight.copy_(m_t.weight)
                m_r.weight_scale.copy_(m_t.weight_scale)
                m_r.fp8_recipe = "tensorwise"
        torch.testing.assert_close(e_t.logits(ids), e_r.logits(ids), rtol=0, atol=0)
    lora = LoRAConfig(r=4, alpha=16, dropout=0.0)
    data = repeated_pairs(FP8_CFG.vocab_size)
    cfg = TrainConfig(precision="fp8", batch_size=2, seq_len=32, epochs=1, max_steps=10, lr=3e-2, untimed_steps=0,
                      shuffle=False)
    curve = train_loop(_engine("fp8", lora, native=NativeOptions(fp8_recipe="tensorwise")), data, cfg, CPU,
                       progress=False)["series"]["loss"]
    assert curve[-1] < curve[0] - 0.05



def test_fp8_skip_keeps_the_named_projections_in_bf16(lora_cfg):
    """--fp8-skip down_proj,q_proj: those projections (q_proj adapted) hold the bf16 model's weights, the rest the
    fp8 model's; the logits are those of the fp8 model with the bf16 engine's down_proj and q_proj put in, bit for
    bit (and not the plain fp8 model's)."""
    from lorabench.quantized import Fp8Linear

    e = _engine("fp8", lora_cfg, native=NativeOptions(fp8_skip=("down_proj", "q_proj", "down_proj")))
    e8, e16 = _engine("fp8", lora_cfg), _engine("bf16", lora_cfg)
    assert e.options.fp8_skip == ("down_proj", "q_proj")
    assert "norms, down_proj, q_proj, lm_head bf16" in e.describe()["numerics"]
    for layer, l8, l16 in zip(e.model.layers, e8.model.layers, e16.model.layers):
        assert type(layer.mlp.down_proj) is torch.nn.Linear and layer.attn.q_proj.weight_scale is None
        assert torch.equal(layer.mlp.down_proj.weight, l16.mlp.down_proj.weight)
        assert torch.equal(layer.attn.q_proj.weight, l16.attn.q_proj.weight)
        assert isinstance(layer.mlp.up_proj, Fp8Linear) and layer.attn.v_proj.weight_scale is not None
        assert torch.equal(layer.mlp.up_proj.weight.float(), l8.mlp.up_proj.weight.float())
        l8.mlp.down_proj, l8.attn.q_proj = l16.mlp.down_proj, l16.attn.q_proj  # the mix, assembled by hand
    ids = torch.from_numpy(synthetic_chunks(2, 32, FP8_CFG.vocab_size, seed=4)).long()
    with torch.no_grad():
        got, mixed = e.logits(ids), e8.logits(ids)
        plain = _engine("fp8", lora_cfg).logits(ids)
    assert torch.equal(got, mixed) and not torch.equal(got, plain)


def test_fp8_skip_is_checked(lora_cfg):
    with pytest.raises(ConfigError, match="--fp8-skip down: not a block projection; choose from q_proj"):
        NativeOptions(fp8_skip=("down_proj", "down"))
    with pytest.raises(ConfigError, match="--fp8-skip applies to --precision fp8 only, not bf16"):
        _engine("bf16", lora_cfg, native=NativeOptions(fp8_skip=("down_proj",)))
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(ConfigError, match="nothing would run in FP8; use --precision bf16"):
        _engine("fp8", lora_cfg, native=NativeOptions(fp8_skip=every))
    assert _engine("fp8", lora_cfg).options.fp8_skip == () and _engine("bf16", lora_cfg).options.fp8_skip is None


@pytest.mark.parametrize("precision, numerics", [("fp8", "e4m3"), ("nf4", "NF4")])
def test_quantized_run_and_eval_on_the_cli(tmp_path, monkeypatch, precision, numerics):
    """The CLI end to end with quantized frozen weights on a CPU (fp8 emulated; nf4, the qlora preset's
    precision): a short run of the bundled tiny model with its MMLU sample (scored in that precision), then `eval`
    of the adapter it wrote, in it too; the settings recorded say what ran."""
    import json

    from lorabench.cli import main

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["run", "--no-progress", "--device", "cpu", "--precision", precision, "--max-steps", "3",
                 "--run-dir", str(run)]) == 0
    r = json.loads((run / "result.json").read_text())
    assert r["config"]["precision"] == precision and numerics in r["config"]["engine_options"]["numerics"]
    assert r["metrics"]["mmlu_questions"] == 40 and 0.0 <= r["metrics"]["mmlu_acc"] <= 1.0
    assert precision != "fp8" or "emulated" in (run / "report.md").read_text()
    ev = tmp_path / "eval"
    assert main(["eval", "--no-progress", "--device", "cpu", "--precision", precision, "--adapter",
                 str(run / "adapter"), "--run-dir", str(ev)]) == 0
    e = json.loads((ev / "eval.json").read_text())
    assert e["precision"] == precision
    # the same weights, adapter and questions in the same precision: the run's own MMLU score
    assert e["mmlu"]["acc"] == pytest.approx(r["metrics"]["mmlu_acc"], abs=1e-9)


def test_fp8_keeps_qwen2_biases_in_bf16(lora_cfg):
    """Qwen2's q/k/v biases stay bf16 beside the FP8 weights and are added: fp8 follows bf16 as closely as without
    biases, and changing the biases moves it far more (they are used)."""
    cfg = ModelConfig(**{**FP8_CFG.__dict__, "qkv_bias": True})
    ids = torch.from_numpy(synthetic_chunks(2, 32, cfg.vocab_size, seed=4)).long()
    e8 = build_engine("native", cfg, lora_cfg, model_dir=None, device=CPU, precision="fp8", seed=0)
    e16 = build_engine("native", cfg, lora_cfg, model_dir=None, device=CPU, precision="bf16", seed=0)
    q = e8.model.layers[0].attn.q_proj
    assert q.weight.dtype == E4M3 and q.bias.dtype == torch.bfloat16
    with torch.no_grad():
        l8, l16 = e8.logits(ids), e16.logits(ids)
        err = ((l8 - l16).norm() / l16.norm()).item()
        for layer in e8.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.attn, name).bias.mul_(20)  # biases ~N(0, 0.02): scaled up so they dominate
        moved = ((e8.logits(ids) - l16).norm() / l16.norm()).item()
    assert err < 0.1 and moved > 2 * err


def _fp8_blocks():
    """benchmarks/fp8_blocks.py: the blockwise scales measured against the engine's per-channel ones (NOTES item
    58); gpu_check compares cuBLASLt's blockwise GEMM with its emulation, so the emulation is checked here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import fp8_blocks
    finally:
        sys.path.pop(0)
    return fp8_blocks


def test_blockwise_scales_and_their_emulated_gemms_match_float64():
    """Group scales per 128 values of a row and block scales per 128 x 128, partial edge groups/blocks included (K
    200 = 128 + 72, N 150 = 128 + 22), against float64 amaxes worked out here; the emulated forward and input
    gradient against float64 products of the dequantized values."""
    fb = _fp8_blocks()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 200, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 5, dtype=torch.float64)[:, None]
    x[1, 128:] = 0.0  # a group of zeros: scale 1
    w = torch.randn(150, 200, generator=g, dtype=torch.float64) * 0.02
    w[140, 10] = 3.0  # an outlier in the partial row block (rows 128-149), first column block
    xq, xs = fb.quantize_groups(x.float())
    wq, ws = fb.quantize_weight_blocks(w.float())
    assert xs.shape == (5, 2) and ws.shape == (2, 2)
    amax_x = torch.stack([x[:, :128].abs().amax(1), x[:, 128:].abs().amax(1)], 1)
    want_xs = torch.where(amax_x > 0, amax_x / 448, torch.ones_like(amax_x))
    torch.testing.assert_close(xs.double(), want_xs, rtol=2e-7, atol=0)
    want_ws = torch.tensor([[w[r0:r1, c0:c1].abs().max().item() / 448 for c0, c1 in ((0, 128), (128, 200))]
                            for r0, r1 in ((0, 128), (128, 150))], dtype=torch.float64)
    torch.testing.assert_close(ws.double(), want_ws, rtol=2e-7, atol=0)
    assert ws[1, 0] == pytest.approx(3.0 / 448, rel=1e-6)  # the outlier's block only
    # dequantized values within half an e4m3 step (2^-4 relative) of the originals wherever they are normal
    for q, s, full, rows in ((xq, xs, x, 1), (wq, ws, w, 128)):
        deq = fb.dequantize_groups(q, s) if rows == 1 else fb.dequantize_blocks(q, s)
        big = full.abs() >= s.double().repeat_interleave(rows, 0).repeat_interleave(128, 1)[:full.shape[0],
                                                                                         :full.shape[1]] * 2 ** -6
        assert torch.all(((deq.double() - full).abs() <= full.abs() * 2 ** -4 * (1 + 1e-6))[big])
    y = fb.scaled_mm_blocks(xq, xs, wq, ws, torch.float32)
    x_deq = xq.double() * torch.repeat_interleave(xs.double(), 128, 1)[:, :200]
    w_deq = wq.double() * ws.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:150, :200]
    want = x_deq @ w_deq.t()  # fp32 sums of 200 terms: ~1e-6 relative
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    xi = x.float().requires_grad_()
    gy = torch.randn(5, 150, generator=g)
    fb.block_linear(xi, wq, ws).backward(gy)
    gq, gs = fb.quantize_groups(gy)
    g_deq = gq.double() * torch.repeat_interleave(gs.double(), 128, 1)[:, :150]
    want = g_deq @ w_deq
    torch.testing.assert_close(xi.grad.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
