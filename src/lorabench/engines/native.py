"""The native engine: our Llama (model.py) with our LoRA (lora.py), and the typed options that tune it.

``NativeOptions`` holds every knob of the engine (attention kernel, fused projections, torch.compile and its mode,
the dropout-mask generator). A field left None takes the default of the run's precision and device
(``resolve``), each chosen by measurement (benchmarks/NOTES.md keeps the runs, with card and date); the CLI
exposes each field as a flag and result.json records the resolved values.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from ..checkpoint import hf_to_native, iter_checkpoint, load_into, native_to_hf, random_hf_weights
from ..shard import copy_into
from ..config import ConfigError, LoRAConfig, ModelConfig
from ..convert import apply_checkpointing, compile_blocks, fuse_projections, quantize_projections
from ..kernels.attention import ATTENTION_IMPLS
from ..kernels.dropout import MASK_IMPLS
from ..kernels.fp8 import FP8_RECIPES, GRAD_FORMATS, fp8_shape_problems
from ..kernels.nf4 import kernels_available as nf4_kernels
from ..lora import inject_lora, lora_modules, set_mask_impl
from ..model import Llama
from ..precision import Precision
from ..quantized import NF4_DEQUANT
from ..shapes import PROJECTIONS, projection_shapes
from .base import Engine, canonical_adapters

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes for the training blocks (reduce-overhead: CUDA graphs)."""

GPU_ATTENTION = {"tf32": "matmul", "fp16": "cudnn", "bf16": "cudnn"}
"""Training attention on a GPU by precision: cuDNN's SDPA kernel first for fp16/bf16 (faster for causal attention
forward + backward than the flash kernel eager SDPA picks; compiled graphs of some torch versions pick it anyway),
plain matmuls under TF32 (faster there than SDPA's fp32 kernel); SDPA's own choice for fp32 and on a CPU."""


@dataclass(frozen=True)
class NativeOptions:
    """Tuning of the native engine. None: the default for the run's precision and device (``resolve``)."""

    attention: str | None = None
    """Training attention, one of kernels.attention.ATTENTION_IMPLS (default: GPU_ATTENTION on a GPU, else sdpa)."""
    fused_projections: bool | None = None
    """One GEMM for q/k/v and one for gate/up. Default: on under TF32 on a GPU, where it measured faster; off in
    fp16/bf16, where it measured slower (benchmarks/NOTES.md items 13, 20)."""
    compile: bool | None = None
    """torch.compile each decoder block (default: on with CUDA)."""
    compile_mode: str | None = None
    """torch.compile's mode for the training blocks, one of COMPILE_MODES (default: torch's default; the others
    measured no gain: benchmarks/NOTES.md items 14, 28)."""
    dropout_mask: str | None = None
    """How adapters draw dropout masks, one of kernels.dropout.MASK_IMPLS (default philox16: a Triton kernel,
    eight mask elements per Philox call, on a CPU torch's Bernoulli kernel; kernels/dropout.py)."""
    fp8_grad: str | None = None
    """Under --precision fp8, the FP8 format the input gradients are quantized to (per row) for their GEMMs, one of
    kernels.fp8.GRAD_FORMATS (default e4m3; see kernels/fp8.py)."""
    fp8_skip: tuple[str, ...] | None = None
    """Under --precision fp8, block projections (of shapes.PROJECTIONS) kept in bf16, forward and input gradient,
    the rest in FP8; resolved to a sorted tuple (empty: every projection in FP8, the default). down_proj's input
    carries a trained model's largest activations: ("down_proj",) trades speed for accuracy (benchmarks/NOTES.md
    item 63)."""
    fp8_recipe: str | None = None
    """Under --precision fp8, how FP8 tensors are scaled, one of kernels.fp8.FP8_RECIPES (default rowwise: per
    token and per output channel; tensorwise: one scale per tensor; benchmarks/NOTES.md)."""
    nf4_dequant: str | None = None
    """Under --precision nf4 or nf4-fp8, how each product dequantizes its NF4 weight, one of quantized.NF4_DEQUANT:
    "triton" (one Triton kernel, bit for bit the same values; the default on a GPU where Triton imports: 1.23x the
    qlora row's speed on an H100, benchmarks/NOTES.md item 91) or "torch" (PyTorch ops, fused into the compiled
    block; the default elsewhere, and what a CPU runs either way)."""
    checkpoint_blocks: int | None = None
    """Under a recomputing activation-checkpointing policy (block, matmuls): how many decoder blocks, the first
    ones, run under it; the later blocks keep every activation, so the memory a card has to spare buys back their
    recomputation (None: all of them). The first ones: at the end of the forward every kept activation is held
    either way, and the backward frees the kept blocks' before it recomputes any block (model.py)."""

    def __post_init__(self):
        for field, value, choices in (("attention", self.attention, ATTENTION_IMPLS),
                                      ("fp8-grad", self.fp8_grad, tuple(GRAD_FORMATS)),
                                      ("compile-mode", self.compile_mode, COMPILE_MODES),
                                      ("dropout-mask", self.dropout_mask, MASK_IMPLS),
                                      ("nf4-dequant", self.nf4_dequant, NF4_DEQUANT),
                                      ("fp8-recipe", self.fp8_recipe, FP8_RECIPES)):
            if value is not None and value not in choices:
                raise ConfigError(f"--{field} {value!r}: choose from {', '.join(choices)}")
        if self.checkpoint_blocks is not None and self.checkpoint_blocks < 0:
            raise ConfigError(f"--checkpoint-blocks must be 0 or more, got {self.checkpoint_blocks}")
        unknown = sorted(set(self.fp8_skip or ()) - set(PROJECTIONS))
        if unknown:
            raise ConfigError(f"--fp8-skip {', '.join(unknown)}: not a block projection; choose from "
                              f"{', '.join(PROJECTIONS)}")

    def resolve(self, precision: Precision, device: torch.device) -> "NativeOptions":
        """These options with every None replaced by the default for ``precision`` on ``device``."""
        gpu = device.type == "cuda"
        if precision.weights and self.fused_projections:
            raise ConfigError(f"--fused-projections does not apply to --precision {precision.name} (each quantized "
                              "projection keeps its own scales); leave it off")
        if self.fp8_grad is not None and not precision.fp8_gemms:
            raise ConfigError(f"--fp8-grad applies to FP8 products (--precision fp8, nf4-fp8) only, not "
                              f"{precision.name}")
        if self.nf4_dequant is not None and not precision.nf4_weights:
            raise ConfigError(f"--nf4-dequant applies to --precision nf4 only, not {precision.name}")
        if self.fp8_recipe is not None and not precision.fp8_weights:
            raise ConfigError(f"--fp8-recipe applies to --precision fp8 only, not {precision.name}")
        if self.fp8_skip and not precision.fp8_weights:
            raise ConfigError(f"--fp8-skip applies to --precision fp8 only, not {precision.name}")
        if set(self.fp8_skip or ()) >= set(PROJECTIONS):
            raise ConfigError("--fp8-skip names every block projection: nothing would run in FP8; use "
                              "--precision bf16")
        compile = gpu if self.compile is None else self.compile
        resolved = replace(
            self,
            attention=self.attention or (GPU_ATTENTION.get(precision.name, "sdpa") if gpu else "sdpa"),
            fused_projections=(gpu and precision.tf32) if self.fused_projections is None else self.fused_projections,
            compile=compile,
            compile_mode=self.compile_mode or "default",
            dropout_mask=self.dropout_mask or MASK_IMPLS[0],
            fp8_grad=(self.fp8_grad or "e4m3") if precision.fp8_gemms else None,
            fp8_skip=tuple(sorted(set(self.fp8_skip or ()))) if precision.fp8_weights else None,
            fp8_recipe=(self.fp8_recipe or FP8_RECIPES[0]) if precision.fp8_weights else None,
            nf4_dequant=(self.nf4_dequant or ("triton" if gpu and nf4_kernels() else "torch"))
            if precision.nf4_weights else None,
        )
        return resolved


def resolve_checkpointing(policy: str | None, options: NativeOptions, lora_dropout: float,
                          layers: int | None = None) -> str:
    """The native engine's activation-checkpointing policy: ``policy`` as given, else "adapter-inputs" for
    compiled blocks (resolved ``options``) whose adapters have no dropout (the compiled block recomputes those
    inputs; with dropout every adapter's input is recomputed anyway), else "none". Refuses a
    ``checkpoint_blocks`` the policy does not take or beyond the model's ``layers`` (where given)."""
    given = policy
    policy = policy or ("adapter-inputs" if options.compile and lora_dropout == 0 else "none")
    if policy == "adapter-inputs" and not options.compile:
        raise ConfigError("--activation-checkpointing adapter-inputs works through the compiled blocks' "
                          "recomputation; add --compile (the default on a GPU)")
    n = options.checkpoint_blocks
    if n is not None and policy not in PARTIAL_CHECKPOINTING:
        how = (" (the default here): add --activation-checkpointing block" if given is None else
               ": give --checkpoint-blocks all (a resumed run takes the number from its config.toml)")
        raise ConfigError(f"--checkpoint-blocks {n} applies to --activation-checkpointing "
                          f"{' or '.join(PARTIAL_CHECKPOINTING)}, not {policy}{how}")
    if n is not None and layers is not None and n > layers:
        raise ConfigError(f"--checkpoint-blocks {n}: the model has {layers} decoder blocks; give at most {layers}")
    return policy


PARTIAL_CHECKPOINTING = ("block", "matmuls")
"""The policies --checkpoint-blocks divides between recomputed and kept blocks (offload's copies are chained
block to block, so it runs on all of them)."""


RESOLVED_BY_DEFAULT = ("attention", "fused_projections", "compile", "compile_mode", "dropout_mask")
"""The fields ``resolve`` always fills: options with all of them set are resolved already."""


def build(spec, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, precision: Precision, seed: int,
          native: NativeOptions, attn: str, checkpointing: str | None, sharder=None) -> "NativeEngine":
    """The native engine (engines.build_engine): ``native`` and ``checkpointing`` as the job resolved them, else
    resolved here."""
    if any(getattr(native, f) is None for f in RESOLVED_BY_DEFAULT):
        native = native.resolve(precision, device)
    return NativeEngine(model_cfg, lora, model_dir=model_dir, device=device, dtype=precision.dtype, seed=seed,
                        options=native, checkpointing=resolve_checkpointing(checkpointing, native, lora.dropout,
                                                                            model_cfg.num_hidden_layers),
                        sharder=sharder)


class NativeEngine(Engine):
    name = "native"
    supports_prefix_cache = True

    def __init__(self, model_cfg: ModelConfig, lora: LoRAConfig, *, model_dir, device, dtype, seed: int,
                 options: NativeOptions, checkpointing: str = "none", sharder=None):
        """``options`` resolved (NativeOptions.resolve; build_engine does it: its fp8_grad is set under
        FP8 products, its nf4_dequant under NF4 weights); ``checkpointing``: one of
        config.ACTIVATION_CHECKPOINTING. ``sharder``: called on the model while it is still on the meta device
        (shard.native_sharder), so weights load straight into shards."""
        self.model_cfg, self.lora_cfg, self.model_dir, self.options = model_cfg, lora, model_dir, options
        self.device = torch.device(device)
        with torch.device("meta"):
            model = Llama(model_cfg).to(dtype)
        inject_lora(model, lora)
        grad_dtype = None
        if options.fp8_grad is not None:  # FP8 products (--precision fp8, nf4-fp8)
            bad = fp8_shape_problems(projection_shapes(model_cfg)) if self.device.type == "cuda" else []
            if bad:
                raise ConfigError(f"FP8 products on a GPU need projection sizes that are multiples of 16 "
                                  f"(cuBLASLt's FP8 GEMMs); this model has {', '.join(bad)}")
            grad_dtype = GRAD_FORMATS[options.fp8_grad]
        if options.nf4_dequant is not None:  # --precision nf4, nf4-fp8: NF4 before any weight is loaded (each
            quantize_projections(model, "nf4", grad_dtype, nf4_dequant=options.nf4_dequant)  # quantized as it loads)
        elif grad_dtype is not None:  # --precision fp8: likewise in FP8
            quantize_projections(model, "fp8", grad_dtype, skip=options.fp8_skip or (),
                                 fp8_recipe=options.fp8_recipe or FP8_RECIPES[0])
        set_mask_impl(model, options.dropout_mask)
        if sharder is not None:
            if model_cfg.tie_word_embeddings:
                raise ConfigError("--shard with tied embeddings (tie_word_embeddings) is not supported yet")
            sharder(model)
            self.sharded = True  # (the mesh's shape: mark_sharded, by the runner)
        model.to_empty(device=device)
        if model_cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
        if model_dir is None:
            load_into(model, random_hf_weights(model_cfg, seed, device, dtype), True, "random init")
        else:
            load_into(model, iter_checkpoint(model_dir), True, str(model_dir))
        model.set_attention(options.attention)
        self.checkpointing = checkpointing
        apply_checkpointing(model, checkpointing, options.checkpoint_blocks)
        self.model = model
        self.set_adapters(canonical_adapters(model_cfg, lora, seed), source="canonical init")
        if options.fused_projections:
            fuse_projections(model)
        if options.compile:
            compile_blocks(model, None if options.compile_mode == "default" else options.compile_mode)

    # -- the engine contract --------------------------------------------------------------------------------
    def loss(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.loss(ids, labels, positions)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def forward_hidden(self, ids, kv_caches=None, position_offset: int = 0, attn_mask=None):
        return self.model.hidden(ids, attn_mask=attn_mask, kv_caches=kv_caches, position_offset=position_offset)

    def prefix_kv(self, ids: torch.Tensor):
        return self.model.hidden(ids, return_kv=True)[1]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy, with a KV cache: the prompt once, then one token a forward pass against the keys and values so
        far (the same tokens as the base class's full reruns; tests/test_rouge.py)."""
        h, kvs = self.model.hidden(torch.tensor([prompt], device=self.device), return_kv=True)
        out = []
        for _ in range(max_new_tokens):
            top = self.head(h[:, -1]).argmax(-1)
            if self.sharded:  # every rank runs each forward: all follow rank 0's token
                torch.distributed.broadcast(top, 0)
            nxt = int(top)
            if nxt == eos_id:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            h, new = self.model.hidden(torch.tensor([[nxt]], device=self.device), kv_caches=kvs,
                                       position_offset=len(prompt) + len(out) - 1, return_kv=True)
            kvs = [(torch.cat([k0, k1], dim=2), torch.cat([v0, v1], dim=2)) for (k0, v0), (k1, v1) in zip(kvs, new)]
        return out

    @contextmanager
    def evaluating(self, compiled: bool):
        """Eval mode; the compiled blocks' shape-generic evaluation graph only where ``compiled`` (compiling it
        costs seconds: a short evaluation runs eagerly)."""
        before = self.model.eval_graph_enabled
        self.model.eval_graph_enabled = compiled
        try:
            with super().evaluating(compiled):
                yield
        finally:
            self.model.eval_graph_enabled = before

    def describe(self) -> dict:
        numerics = "adapters: fp32 master weights, computed in the activations' dtype; no autocast"
        tensorwise = self.options.fp8_recipe == "tensorwise"
        gemm = (f"cuBLASLt {'tensorwise' if tensorwise else 'rowwise'}-scaled FP8 GEMMs" if self.device.type == "cuda"
                else "FP8 GEMMs emulated in fp32")
        per = "per tensor" if tensorwise else "per token"
        fp8 = f"activations {per} e4m3, input gradients {per} {self.options.fp8_grad}, {gemm}"
        if self.options.nf4_dequant is not None:
            numerics += ("; block projections NF4 (blocks of 64, double-quantized absmax), dequantized to bf16 for "
                         "each forward and input-gradient product"
                         + (f", then to e4m3 with per-channel scales; {fp8}" if self.options.fp8_grad else "")
                         + "; embeddings, norms, lm_head bf16")
        elif self.options.fp8_grad is not None:
            kept = "".join(f", {p}" for p in self.options.fp8_skip or ())
            scales = "one scale per tensor" if tensorwise else "per-channel scales"
            numerics += f"; block projections e4m3 with {scales}, {fp8}; embeddings, norms{kept}, lm_head bf16"
        return {**asdict(self.options), "activation_checkpointing": self.checkpointing, "numerics": numerics}

    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {native_to_hf(n): m.adapter_params() for n, m in lora_modules(self.model).items()}

    def set_adapters(self, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], source: str):
        mods = lora_modules(self.model)
        native = {}
        for k in adapters:
            try:
                native[k] = hf_to_native(k)
            except KeyError:
                native[k] = None
        unknown = [k for k, n in native.items() if n not in mods]
        missing = set(mods) - set(native.values())
        if unknown or missing:
            raise ConfigError(f"{source}: adapter does not fit the model "
                              f"(unexpected: {unknown[:3]}, missing: {sorted(missing)[:3]})")
        with torch.no_grad():
            for k, (a, b) in adapters.items():
                a_dst, b_dst = mods[native[k]].adapter_params()
                if a.shape != a_dst.shape or b.shape != b_dst.shape:
                    raise ConfigError(f"{source}: {k} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                      f"expected {tuple(a_dst.shape)}, {tuple(b_dst.shape)}")
                copy_into(a_dst, a)
                copy_into(b_dst, b)
