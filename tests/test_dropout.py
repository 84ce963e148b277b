"""Dropout keep-masks (kernels/dropout.py): their rate; the Philox reference against published answers and the
Triton kernel against the reference; that a compiled adapter's backward uses the very mask its forward drew (a
second draw would train on gradients of a different function) and that two adapters' masks stay independent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorabench.config import ConfigError, LoRAConfig
from lorabench.kernels.dropout import (BLOCK, MASK_IMPLS, keep_mask, pack_mask, philox4x32, philox_keep_mask,
                                       unpack_mask)
from lorabench.lora import LoRALinear, inject_lora, lora_modules, set_mask_impl


@pytest.mark.parametrize("impl", MASK_IMPLS)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
def test_keep_mask_keeps_one_minus_p(impl, p):
    torch.manual_seed(0)
    x = torch.empty(300, 1000, dtype=torch.bfloat16)
    packed = keep_mask(x, p, impl)
    if impl == "inline":
        assert packed.dtype == torch.bool and packed.shape == x.shape
    else:  # the op's masks: one bit an element
        assert packed.dtype == torch.uint8 and packed.shape == (300 * 1000 // 8,)
    m = unpack_mask(packed, x.shape)
    assert m.dtype == torch.bool and m.shape == x.shape
    assert abs(m.float().mean().item() - (1 - p)) < 0.003  # 300,000 draws: sd <= 0.0009
    if p:  # rows are not copies of each other
        assert not torch.equal(m[0], m[1])


@pytest.mark.parametrize("counter, key, want", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_reference_gives_the_published_answers(counter, key, want):
    """Philox4x32-10's known-answer vectors (Random123's kat_vectors: zeros, all ones, digits of pi)."""
    got = philox4x32([torch.tensor([c]) for c in counter], key)
    assert tuple(int(w) for w in got) == want


def test_philox16_reference_mask():
    """The kernel's reference: rate 1 - round(p * 65536) / 65536, a different mask for another seed, and each
    tile's eight blocks taken from the low and high halves of the four words of the same Philox calls."""
    shape = (3, 5, 1999)  # 29,985 elements: 4 tiles, the last ragged
    m = philox_keep_mask(shape, 0.05, seed=123)
    assert m.shape == shape and m.dtype == torch.bool
    assert abs(m.float().mean().item() - (1 - 3277 / 65536)) < 0.004  # sd 0.0013
    assert not torch.equal(m, philox_keep_mask(shape, 0.05, seed=124))
    flat = m.reshape(-1)
    words = philox4x32([torch.arange(BLOCK), *(torch.zeros(BLOCK, dtype=torch.long),) * 3], (123, 0))
    for w in range(4):
        assert torch.equal(flat[2 * w * BLOCK:(2 * w + 1) * BLOCK], (words[w] & 0xFFFF) >= 3277)
        assert torch.equal(flat[(2 * w + 1) * BLOCK:(2 * w + 2) * BLOCK], (words[w] >> 16) >= 3277)
    assert philox_keep_mask((7,), 0.0, seed=1).all()


@pytest.mark.parametrize("shape", [(5, 8), (3, 5, 1999), (1,), (2, 9)])
def test_packed_masks_hold_one_bit_an_element(shape):
    """pack_mask against a hand-packed byte, and unpack_mask(pack_mask(m)) == m for sizes that are not multiples
    of 8 (the last byte's spare bits are 0)."""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(shape, generator=g) < 0.5
    packed = pack_mask(m)
    n = m.numel()
    assert packed.dtype == torch.uint8 and packed.shape == (-(-n // 8),)
    flat = m.reshape(-1).tolist() + [False] * (8 * packed.numel() - n)
    assert packed.tolist() == [sum(int(b) << k for k, b in enumerate(flat[i:i + 8])) for i in range(0, len(flat), 8)]
    assert torch.equal(unpack_mask(packed, shape), m)
    assert torch.equal(unpack_mask(packed, shape, backward=True), m)
    assert unpack_mask(m, shape) is m  # a bool mask (the inline draw) is used as it is


INTERPRETED = """
import sys, torch
from lorabench.kernels import dropout
kernel = dropout._triton_kernel()
for shape, p in ((3, 5, 1999), 0.05), ((2, 8 * dropout.BLOCK), 0.5), ((7,), 0.3):
    packed = torch.empty(dropout.packed_size(torch.Size(shape).numel()), dtype=torch.uint8)
    seed = 0x1234_5678_9ABC_DEF
    dropout._launch(kernel, packed, p, seed)
    out = dropout.unpack_mask(packed, shape)
    want = dropout.philox_keep_mask(shape, p, seed)
    print(shape, p, int((out != want).sum()), "differ")
    if not torch.equal(out, want):
        sys.exit(1)
"""


def test_philox16_kernel_matches_its_reference_in_the_interpreter():
    """The Triton kernel itself, run by Triton's CPU interpreter: bit for bit the reference's mask (ragged tiles,
    whole tiles, a tile mostly empty). In a fresh process: the interpreter must be on before triton is imported.
    On a GPU, benchmarks/gpu_check.py compares the compiled kernel the same way."""
    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64 (its interpreter runs here)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" 0 differ") == 3, done.stdout


def identity_adapter(n: int, p: float, impl: str) -> LoRALinear:
    """r = in = out, A = B = I: the adapter's output is x * mask * scale / (1 - p), so the mask can be read off it."""
    layer = LoRALinear(torch.nn.Linear(n, n, bias=False), r=n, alpha=n, dropout=p)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(n))
        layer.lora_B.copy_(torch.eye(n))
    layer.mask_impl = impl
    return layer


@pytest.mark.slow
@pytest.mark.parametrize("impl", MASK_IMPLS)
def test_compiled_backward_uses_the_forward_mask(impl):
    torch.manual_seed(0)
    n, p = 16, 0.5
    layer = identity_adapter(n, p, impl)
    x = (torch.rand(6, 10, n) + 0.5).requires_grad_()  # no zeros: a zero output means a dropped element
    y = torch.compile(layer.delta)(x)
    y.sum().backward()
    forward_kept, backward_kept = y != 0, x.grad != 0
    assert 0.3 < forward_kept.float().mean().item() < 0.7
    assert torch.equal(forward_kept, backward_kept)
    torch.testing.assert_close(y[forward_kept], x[forward_kept] / (1 - p))  # scale = alpha / r = 1
    torch.testing.assert_close(x.grad[backward_kept], torch.full_like(x.grad[backward_kept], 1 / (1 - p)))


class TwoProjections(torch.nn.Module):
    """q_proj and v_proj reading the same input, as in attention; base weights zero, so only the adapters show."""

    def __init__(self, n: int):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(n, n, bias=False), torch.nn.Linear(n, n, bias=False)
        torch.nn.init.zeros_(self.q_proj.weight)
        torch.nn.init.zeros_(self.v_proj.weight)

    def forward(self, x):
        return self.q_proj(x) + 2 * self.v_proj(x)


@pytest.mark.slow
@pytest.mark.parametrize("impl", MASK_IMPLS)
def test_adapters_on_one_input_draw_independent_masks_when_compiled(impl):
    """Each gradient element is 2 (kept by q's mask) + 4 (kept by v's), so one shared mask would leave only 0
    and 6; independent masks at p = 0.5 give all of 0, 2, 4 and 6."""
    torch.manual_seed(0)
    n = 16
    model = TwoProjections(n)
    inject_lora(model, LoRAConfig(r=n, alpha=n, dropout=0.5, targets=("q_proj", "v_proj")))
    set_mask_impl(model, impl)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.eye(n))
            m.lora_B.copy_(torch.eye(n))
    x = torch.randn(6, 10, n, requires_grad=True)
    torch.compile(model)(x).sum().backward()
    assert sorted(torch.unique(x.grad).tolist()) == [0.0, 2.0, 4.0, 6.0]


def test_set_mask_impl_sets_every_adapter_and_names_the_choices():
    model = torch.nn.Sequential(identity_adapter(4, 0.1, "philox16"), identity_adapter(4, 0.1, "philox16"))
    set_mask_impl(model, "bernoulli")
    assert [m.mask_impl for m in model] == ["bernoulli", "bernoulli"]
    with pytest.raises(ConfigError, match="philox16, bernoulli, inline"):
        set_mask_impl(model, "philox")
    assert [m.mask_impl for m in model] == ["bernoulli", "bernoulli"]
