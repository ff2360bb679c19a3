"""Preflight: predict GPU memory and step time before a job waits in a Slurm queue.

Everything here is a pure function of the model's shape (an HF ``config.json`` dict, a
``PretrainedConfig``, or a path to either) and the training settings: no model is downloaded,
no tensor is allocated, torch is not imported.

Conventions and assumptions (each formula below says why it has the shape it has):

* The model is a Llama-style decoder (Llama, Mistral, Qwen2 ...): RMSNorm, q/k/v/o attention
  projections with grouped-query KV heads, a SiLU-gated MLP (gate/up/down), rotary embeddings,
  an untied or tied ``lm_head``.
* Training runs under the HF Trainer: with ``bf16``/``fp16`` the forward runs under
  ``torch.autocast``; peft keeps LoRA adapters in float32 (``autocast_adapter_dtype=True``,
  its default); the LoRA/QLoRA base model is loaded with ``dtype=compute_dtype``.
* Attention is SDPA/flash (memory-efficient kernels): per token they save q, k, v, the output
  and a float32 logsumexp per head, and no ``seq_len**2`` matrix. ``attn_implementation="eager"``
  adds the ``heads * seq_len`` probabilities per token.
* Activation formulas were derived from what autograd saves in transformers 5.23 / peft 0.21 /
  bitsandbytes 0.50 and checked byte-for-byte on CPU against
  ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_preflight.py).
* The peak is reached either at the start of backward (all saved activations plus the float32
  loss temporaries over the vocabulary) or while one decoder layer is being backpropagated
  (with checkpointing: that layer recomputed); the estimate takes the larger of the two.
* Units: bytes everywhere; ``GiB = 2**30``.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

GiB = 1024 ** 3

__all__ = [
    "GiB", "PreflightError", "ModelShape", "model_shape", "count_params", "lora_param_count",
    "MemoryEstimate", "estimate_memory", "GPUSpec", "GPU_SPECS", "GPU_MEMORY_GIB",
    "GPU_PEAK_TFLOPS", "resolve_gpu", "gpu_memory_gib", "Verdict", "check_fits", "method_advice",
    "StepTimeEstimate", "estimate_step_time", "flops_per_token", "mfu", "data_statistics",
    "format_report", "CUDA_OVERHEAD_BYTES", "LINEAR_MODULES",
]


class PreflightError(ValueError):
    """A run that cannot work as configured (does not fit, unknown GPU, bad argument)."""


# ----------------------------------------------------------------------------------------------
# Model shape
# ----------------------------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2,
               "float16": 2, "fp16": 2, "half": 2}

# The decoder's linear layers as peft names them; "all-linear" means all of these (peft's
# "all-linear" excludes the output layer lm_head).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dtype_bytes(dtype: str) -> int:
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise PreflightError(f"unknown compute dtype {dtype!r}; use bfloat16, float16 or float32")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
                "down_proj": (i, h)}

    def bias_params_per_layer(self) -> int:
        n = 0
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            n += self.hidden_size
        if self.mlp_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        return n


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def model_shape(model_cfg: Any) -> ModelShape:
    """A ModelShape from a config.json dict, a PretrainedConfig, a ModelShape, or a path to a
    config.json or to a model directory holding one."""
    if isinstance(model_cfg, ModelShape):
        return model_cfg
    if isinstance(model_cfg, (str, Path)):
        path = Path(model_cfg)
        if path.is_dir():
            path = path / "config.json"
        model_cfg = json.loads(path.read_text())
    if _cfg_get(model_cfg, "text_config") is not None and _cfg_get(model_cfg, "hidden_size") is None:
        model_cfg = _cfg_get(model_cfg, "text_config")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if _cfg_get(model_cfg, k) is None]
    if missing:
        raise PreflightError(f"model config lacks {', '.join(missing)}")
    h = int(_cfg_get(model_cfg, "hidden_size"))
    heads = int(_cfg_get(model_cfg, "num_attention_heads"))
    model_type = str(_cfg_get(model_cfg, "model_type", ""))
    attention_bias = bool(_cfg_get(model_cfg, "attention_bias", False))
    return ModelShape(
        hidden_size=h,
        intermediate_size=int(_cfg_get(model_cfg, "intermediate_size")),
        num_hidden_layers=int(_cfg_get(model_cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(_cfg_get(model_cfg, "num_key_value_heads", heads)),
        head_dim=int(_cfg_get(model_cfg, "head_dim", h // heads)),
        vocab_size=int(_cfg_get(model_cfg, "vocab_size")),
        tie_word_embeddings=bool(_cfg_get(model_cfg, "tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama/Mistral have them only with attention_bias.
        qkv_bias=attention_bias or model_type in ("qwen2", "qwen2_moe"),
        o_bias=attention_bias,
        mlp_bias=bool(_cfg_get(model_cfg, "mlp_bias", False)),
    )


def count_params(model_cfg: Any) -> dict[str, int]:
    """Parameter counts by kind; ``total`` is what ``model.num_parameters()`` reports."""
    s = model_shape(model_cfg)
    L = s.num_hidden_layers
    embed = s.vocab_size * s.hidden_size
    lm_head = 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size
    linear = L * sum(i * o for i, o in s.linear_shapes().values())
    norms = L * 2 * s.hidden_size + s.hidden_size        # input/post-attention norm per layer + final
    bias = L * s.bias_params_per_layer()
    return {"embed": embed, "lm_head": lm_head, "linear": linear, "norms": norms, "bias": bias,
            "total": embed + lm_head + linear + norms + bias}


def _targets(lora_target_modules: str | Sequence[str] | None) -> tuple[str, ...]:
    if lora_target_modules is None or lora_target_modules == "all-linear":
        return LINEAR_MODULES
    if isinstance(lora_target_modules, str):
        names = [n.strip() for n in lora_target_modules.split(",") if n.strip()]
    else:
        names = list(lora_target_modules)
    known = LINEAR_MODULES + ("lm_head",)
    for name in names:
        if name == "all-linear":
            return LINEAR_MODULES
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise PreflightError(f"unknown LoRA target module {name!r}{hint}; "
                                 f"known: all-linear, {', '.join(known)}")
    return tuple(n for n in known if n in names)


Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _lora_shapes(s: ModelShape, r: int, targets: Sequence[str]) -> list[Shape]:
    """Every LoRA tensor: lora_A.weight is (r, in), lora_B.weight is (out, r) per targeted linear."""
    shapes = s.linear_shapes()
    out: list[Shape] = []
    for _ in range(s.num_hidden_layers):
        for name in targets:
            if name in shapes:
                fin, fout = shapes[name]
                out += [(r, fin), (fout, r)]
    if "lm_head" in targets:
        out += [(r, s.hidden_size), (s.vocab_size, r)]
    return out


def _lora_tensors(s: ModelShape, r: int, targets: Sequence[str]) -> list[int]:
    return [_numel(x) for x in _lora_shapes(s, r, targets)]


def _param_shapes(s: ModelShape) -> list[Shape]:
    """Every parameter tensor of the model, the input embedding first."""
    out: list[Shape] = [(s.vocab_size, s.hidden_size)]
    if not s.tie_word_embeddings:
        out.append((s.vocab_size, s.hidden_size))
    h, q, kv, i = s.hidden_size, s.q_dim, s.kv_dim, s.intermediate_size
    for _ in range(s.num_hidden_layers):
        out += [(fo, fi) for fi, fo in s.linear_shapes().values()] + [(h,), (h,)]
        out += [(q,), (kv,), (kv,)] if s.qkv_bias else []
        out += [(h,)] if s.o_bias else []
        out += [(i,), (i,), (h,)] if s.mlp_bias else []
    out.append((h,))
    return out


def lora_param_count(model_cfg: Any, lora_r: int, lora_target_modules: str | Sequence[str]
                     = "all-linear") -> int:
    """LoRA adds r*(in+out) parameters per targeted linear (A: r x in, B: out x r)."""
    return sum(_lora_tensors(model_shape(model_cfg), lora_r, _targets(lora_target_modules)))


# ----------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------

# CUDA context (~0.3-0.6 GiB with lazy module loading), cuBLAS/cuBLASLt and NCCL workspaces, and
# the allocator's small-block rounding. Invisible to torch.cuda.memory_allocated but not to the OOM.
CUDA_OVERHEAD_BYTES = 1 * GiB

_ADAM32 = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw",
           "adam", "paged_adamw_32bit", "adamw_32bit", "adamw_anyprecision", "adamw_torch_xla",
           "adamw_torch_npu_fused"}
_ADAM8 = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adam8bit", "bnb_adamw_8bit"}
_LION32 = {"lion_32bit", "paged_lion_32bit"}
_LION8 = {"lion_8bit", "paged_lion_8bit"}
_FACTORED = {"adafactor"}
_STATELESS = {"sgd"}
# bitsandbytes keeps tensors smaller than this in 32-bit state (Optimizer2State.min_8bit_size).
_BNB_MIN_8BIT_SIZE = 4096
_BNB_OPTIM_BLOCK = 256


def _optimizer_state_bytes(optim: str, shapes: Iterable[Shape], *, state_bytes: int = 4,
                           force_32bit: Iterable[Shape] = ()) -> int:
    """Optimizer state for parameter tensors of the given shapes.

    32-bit Adam keeps exp_avg and exp_avg_sq in the parameter's dtype (2 * 4 bytes for fp32
    parameters) plus a 4-byte step counter per tensor. bitsandbytes 8-bit Adam keeps two uint8
    states (2 bytes/param) plus a float32 absmax per 256-element block for each state, except for
    tensors under 4096 elements which stay 32-bit; its two 256-entry quantization maps are shared.
    Adafactor (no first moment by default) keeps row and column second-moment statistics for a
    matrix and a full one for a vector, in fp32.
    ``force_32bit`` lists tensors the HF Trainer forces to 32-bit state (embeddings)."""
    opt = optim.lower()
    shapes = list(shapes)
    tensors = [_numel(x) for x in shapes]
    forced = [_numel(x) for x in force_32bit]
    if opt in _STATELESS:
        return 0
    if opt in _ADAM32:
        return sum(2 * state_bytes * n + 4 for n in tensors + forced)
    if opt in _LION32:
        return sum(state_bytes * n for n in tensors + forced)
    if opt in _ADAM8 or opt in _LION8:
        n_states = 2 if opt in _ADAM8 else 1
        # The 256-entry float32 quantization maps are shared by all 8-bit tensors.
        total = n_states * 256 * 4 if any(n >= _BNB_MIN_8BIT_SIZE for n in tensors) else 0
        for n in tensors:
            if n < _BNB_MIN_8BIT_SIZE:
                total += n_states * 4 * n
            else:
                total += n_states * (n + 4 * math.ceil(n / _BNB_OPTIM_BLOCK))
        total += sum(n_states * 4 * n for n in forced)
        return total
    if opt in _FACTORED:
        return sum(4 * (x[0] + x[1]) if len(x) == 2 else 4 * _numel(x)
                   for x in shapes + list(force_32bit))
    known = sorted(_ADAM32 | _ADAM8 | _LION32 | _LION8 | _FACTORED | _STATELESS)
    near = difflib.get_close_matches(opt, known, n=1)
    raise PreflightError(f"unknown optim {optim!r}" + (f" (did you mean {near[0]}?)" if near else ""))


def _nf4_bytes(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes bitsandbytes keeps for one NF4-quantized weight of n elements.

    Two 4-bit codes pack into a uint8 (n/2 bytes). Each block of 64 weights has an absmax
    scale: float32 without double quant; with double quant the absmaxes (minus their mean,
    stored as a float32 offset) are themselves quantized blockwise to 8 bits with a float32
    absmax per 256 blocks and a 256-entry float32 code table. The 16-entry NF4 code table is
    kept per layer too (measured on bitsandbytes 0.50: one table per Linear4bit)."""
    blocks = math.ceil(n / blocksize)
    packed = math.ceil(n / 2)
    code = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code
    return packed + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 + code


@dataclass
class MemoryEstimate:
    """Estimated GPU memory of one training process, in bytes.

    ``total`` = base_weights + trainable_params + gradients + optimizer_states + master_weights
    + weight_copies + activations + max(logits, layer_backward) + dequant_workspace
    + cuda_overhead."""

    method: str
    compute_dtype: str
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    optim: str
    world_size: int
    zero_stage: int
    n_params: int
    n_trainable: int
    tokens_per_step: int
    base_weights: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    master_weights: int
    weight_copies: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    layer_backward: int
    logits: int
    logits_saved: int
    dequant_workspace: int
    cuda_overhead: int
    total: int
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)

    COMPONENTS = ("base_weights", "trainable_params", "gradients", "optimizer_states",
                  "master_weights", "weight_copies", "activations", "logits", "layer_backward",
                  "dequant_workspace", "cuda_overhead")

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def breakdown(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.COMPONENTS}

    def breakdown_gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in self.breakdown().items()}

    def with_changes(self, **changes: Any) -> "MemoryEstimate":
        """Re-estimate with some inputs changed (``micro_batch=1``, ``method="qlora"`` ...)."""
        kwargs = dict(self.inputs)
        model_cfg = kwargs.pop("model_cfg")
        kwargs.update(changes)
        return estimate_memory(model_cfg, **kwargs)


def estimate_memory(
    model_cfg: Any,
    *,
    method: str = "qlora",
    lora_r: int = 16,
    lora_target_modules: str | Sequence[str] = "all-linear",
    compute_dtype: str = "bfloat16",
    double_quant: bool = True,
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optim: str = "adamw_torch",
    world_size: int = 1,
    zero_stage: int = 0,
    gradient_accumulation_steps: int = 1,
    lora_dropout: float = 0.0,
    adapter_dtype: str = "float32",
    upcast_non_quantized: bool = False,
    attn_implementation: str = "sdpa",
    kv_repeat: bool | None = None,
    quant_blocksize: int = 64,
    dropout_mask_bytes: int = 1,
    cuda_overhead_bytes: int = CUDA_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Estimate one training process's peak GPU memory.

    method: "qlora" (4-bit NF4 base + LoRA), "lora" (16-bit base + LoRA) or "full".
    lora_dropout: peft's default is 0.0; any dropout makes each LoRA layer save its own input
        copy plus a dropout mask of ``dropout_mask_bytes`` per element: 1 on CUDA (the fused
        native_dropout keeps a bool mask); CPU's dropout keeps a float noise tensor in the
        adapter dtype instead (4).
    adapter_dtype: peft keeps adapters in float32 by default (autocast_adapter_dtype=True).
    upcast_non_quantized: True when the model went through peft's
        prepare_model_for_kbit_training, which casts embeddings, norms and lm_head to float32
        (and so makes the residual stream float32).
    kv_repeat: whether K/V heads are repeated to all query heads before attention. HF's SDPA path
        repeats them whenever an attention mask is passed (padded batches); flash_attention_2
        never does. None: True for sdpa/eager, False for flash_attention_2.
    world_size/zero_stage: processes and DeepSpeed ZeRO stage (0 = plain DDP or one GPU).
    """
    method = method.lower()
    if method not in ("qlora", "lora", "full"):
        raise PreflightError(f"method must be qlora, lora or full, not {method!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise PreflightError(f"zero_stage must be 0, 1, 2 or 3, not {zero_stage!r}")
    if micro_batch < 1 or seq_len < 1 or world_size < 1:
        raise PreflightError("micro_batch, seq_len and world_size must be >= 1")
    inputs = dict(locals())
    s = model_shape(model_cfg)
    inputs["model_cfg"] = s
    c = _dtype_bytes(compute_dtype)
    a_bytes = _dtype_bytes(adapter_dtype)
    L, h, i, V = s.num_hidden_layers, s.hidden_size, s.intermediate_size, s.vocab_size
    nh, hq, kv = s.num_attention_heads, s.q_dim, s.kv_dim
    T = micro_batch * seq_len                     # tokens in one micro-batch
    counts = count_params(s)
    N = counts["total"]
    shapes = s.linear_shapes()
    targets = _targets(lora_target_modules) if method != "full" else LINEAR_MODULES
    lora_shapes = _lora_shapes(s, lora_r, targets) if method != "full" else []
    P = sum(_numel(x) for x in lora_shapes)
    notes: list[str] = []
    mixed = c != 4
    attn = attn_implementation.lower()
    if kv_repeat is None:
        kv_repeat = attn != "flash_attention_2"
    # ZeRO divides a sharded quantity by the number of processes.
    shard_opt = world_size if zero_stage >= 1 else 1
    shard_grad = world_size if zero_stage >= 2 else 1
    shard_param = world_size if zero_stage >= 3 else 1

    # ---------------- static: weights, trainable parameters, gradients, optimizer -------------
    # Rotary inv_freq and original_inv_freq buffers: head_dim/2 float32 each.
    buffers = 2 * (s.head_dim // 2) * 4
    dequant_workspace = 0
    master = 0
    weight_copies_full = 0       # autocast copies kept for backward when nothing is recomputed
    weight_copies_layer = 0      # the same for one decoder layer (what a recompute holds)
    if method in ("qlora", "lora"):
        # Non-quantized tensors (embeddings, norms, biases, lm_head) stay in the dtype the model
        # was loaded in (= compute dtype); prepare_model_for_kbit_training upcasts them to fp32.
        unq_bytes = 4 if upcast_non_quantized else c
        unquantized = counts["embed"] + counts["lm_head"] + counts["norms"] + counts["bias"]
        if method == "qlora":
            quant = L * sum(_nf4_bytes(fi * fo, double_quant, quant_blocksize)
                            for fi, fo in shapes.values())
            # bitsandbytes dequantizes one weight to the compute dtype for each matmul (forward,
            # and again for the input gradient); one such weight is live at a time.
            dequant_workspace = c * max(fi * fo for fi, fo in shapes.values())
        else:
            # Plain LoRA: the frozen base lives in the compute dtype (upcast only touches k-bit).
            quant = counts["linear"] * c
            unq_bytes = c
        base = (quant + unquantized * unq_bytes + buffers) // shard_param
        trainable = P * a_bytes // shard_param
        # Gradients of the adapters only, in the adapter dtype; the frozen base has none.
        grads = P * a_bytes // shard_grad
        optimizer = _optimizer_state_bytes(optim, lora_shapes, state_bytes=a_bytes) // shard_opt
        if mixed and a_bytes == 2 and zero_stage >= 1:
            master = 4 * P // shard_opt        # DeepSpeed keeps fp32 masters of 16-bit params
        if mixed and a_bytes != c:
            # Under autocast each fp32 adapter matrix is cast to the compute dtype once per
            # forward and the copy is saved for backward (autocast's weight cache).
            weight_copies_full = c * P
            weight_copies_layer = c * sum(_lora_tensors(s, lora_r, [t for t in targets
                                                                    if t in shapes])) // L
    else:
        # Full fine-tuning. Without DeepSpeed the HF Trainer keeps fp32 parameters and runs the
        # forward under autocast (mixed precision): weights 4 + grads 4 + Adam 8 bytes/param, and
        # the fp32 weights are the master copy. With DeepSpeed (ZeRO >= 1) parameters and
        # gradients are 16-bit and the optimizer holds fp32 masters: 2 + 2 + 4 + 8 = 16 bytes.
        deepspeed_16 = zero_stage >= 1 and mixed
        p_bytes = c if deepspeed_16 else 4
        base = N * p_bytes // shard_param + buffers
        trainable = 0  # the trainable parameters are the base weights themselves
        grads = N * p_bytes // shard_grad
        all_shapes = _param_shapes(s)        # embedding first
        force32: list[Shape] = []
        if optim.lower() in _ADAM8 | _LION8:
            # The HF Trainer registers nn.Embedding weights for 32-bit bnb optimizer state.
            force32 = [all_shapes.pop(0)]
        optimizer = _optimizer_state_bytes(optim, all_shapes, state_bytes=4,
                                           force_32bit=force32) // shard_opt
        if deepspeed_16:
            master = 4 * N // shard_opt
        if mixed and not deepspeed_16:
            # autocast casts every fp32 linear weight (and lm_head) to the compute dtype per
            # forward and keeps the copy for backward.
            weight_copies_full = c * (counts["linear"] + (V * h))
            weight_copies_layer = c * (counts["linear"] // L)
        if zero_stage == 3 and world_size > 1:
            # ZeRO-3 gathers each layer's full parameters before using it (and prefetches one).
            dequant_workspace = 2 * c * (counts["linear"] // L)

    if zero_stage == 0 and world_size > 1:
        grads *= 2  # DDP's flat gradient buckets are a second copy (gradient_as_bucket_view off)

    # ---------------- activations: bytes saved for backward per token --------------------------
    # Residual stream dtype: the embedding output's dtype. 16-bit for a 16-bit loaded base;
    # fp32 for fp32 parameters (full fine-tuning without DeepSpeed, or after the k-bit upcast).
    if method == "full":
        res = 4 if (zero_stage == 0 or not mixed) else c
    else:
        res = 4 if (upcast_non_quantized and method == "qlora") else c
    full_w = method == "full"

    def layer_bytes_per_token() -> int:
        b = 0
        # Two RMSNorms. HF's LlamaRMSNorm upcasts its input to fp32 and pow() saves that fp32
        # copy (4h); rsqrt's output (1 fp32 per token) is saved by the multiply. With a trainable
        # weight the normalized tensor is saved too (in the parameter dtype) for the weight grad.
        norm = 4 * h + 4
        if full_w:
            norm += (4 if res == 4 else c) * h
        b += 2 * norm
        # Inputs that linear layers save for their weight gradients.
        if method == "full":
            if mixed and res == 4:
                # fp32 norm outputs feed q, k, v, gate, up; autocast makes a 16-bit copy for
                # each of these linears and each copy is saved. o_proj's input is SDPA's output (saved below);
                # down_proj's is the 16-bit gate*up product.
                b += c * (5 * h) + c * i
            else:
                b += c * h + c * h + c * i     # one shared norm output per group + the product
            if attn == "eager":
                b += c * hq                    # o_proj input is a fresh contiguous copy
        else:
            per_module_copy = lora_dropout > 0 or (mixed and (a_bytes != c or res != c))
            tgt = [t for t in targets if t in shapes]
            if per_module_copy:
                # peft casts x to the adapter dtype (fp32) before lora_A; autocast casts it back to
                # 16 bits, a fresh tensor per LoRA layer, which lora_A saves. Dropout likewise
                # makes one output per LoRA layer, plus its mask (dropout_mask_bytes/element).
                for t in tgt:
                    fin = shapes[t][0]
                    b += c * fin + (dropout_mask_bytes * fin if lora_dropout > 0 else 0)
            else:
                # The LoRA path sees the very tensor the base layer sees: one copy per input.
                if any(t in tgt for t in ("q_proj", "k_proj", "v_proj")):
                    b += c * h
                if any(t in tgt for t in ("gate_proj", "up_proj")):
                    b += c * h
                if "down_proj" in tgt:
                    b += c * i
                if "o_proj" in tgt and attn == "eager":
                    b += c * hq
            # lora_A's output (r per token) is saved by lora_B.
            b += c * lora_r * len(tgt)
        # Attention. SDPA/flash save q, k, v (after RoPE, K/V repeated to all heads on HF's
        # masked SDPA path), the output (which o_proj's input is a view of) and a fp32 logsumexp
        # per head; no seq x seq matrix. Eager saves the fp32 softmax and its 16-bit copy.
        kvb = hq if kv_repeat else kv
        b += c * (hq + 2 * kvb)
        if attn == "eager":
            b += nh * seq_len * (4 + (c if c != 4 else 0))
        else:
            b += c * hq + 4 * nh
        # SiLU-gated MLP: silu saves gate's output, the product saves silu's output and up's.
        # bitsandbytes returns its output in its input's dtype, so after the k-bit upcast (fp32
        # norm outputs feeding gate/up) these three are fp32 even under autocast.
        b += 3 * (4 if (method == "qlora" and res == 4) else c) * i
        return b

    per_layer = layer_bytes_per_token() * T
    # Outside the layers: final norm (as above); lm_head's input when lm_head trains; the
    # rotary cos/sin tables (seq x head_dim, shared by all layers); token ids for the embedding
    # gradient when the embedding trains.
    outside_tok = 4 * h + 4
    if full_w:
        outside_tok += (4 if res == 4 else c) * h + c * h + 8
    elif "lm_head" in targets:
        outside_tok += c * h + c * lora_r
    rope = 2 * seq_len * s.head_dim * res
    outside = outside_tok * T + rope
    acts_no_ckpt = L * per_layer + outside
    # Gradient checkpointing keeps only each decoder layer's input (residual dtype) and
    # recomputes one layer at a time in backward.
    acts_ckpt = L * res * h * T + outside
    activations = acts_ckpt if gradient_checkpointing else acts_no_ckpt
    # Autocast weight copies saved for backward: all of them without checkpointing; with it only
    # those outside the checkpointed layers (lm_head), a recomputed layer holds its own briefly.
    weight_copies = (weight_copies_full - L * weight_copies_layer if gradient_checkpointing
                     else weight_copies_full)
    if method == "qlora" and upcast_non_quantized and mixed:
        # The upcast fp32 lm_head is cast to the compute dtype by autocast and the copy is saved
        # for the input gradient (not inside any checkpointed layer).
        weight_copies += c * V * h

    # Loss: HF upcasts logits to fp32 and cross_entropy saves the fp32 log-probabilities (4 bytes
    # per logit). At LogSoftmaxBackward these coexist with their gradient and the gradient w.r.t.
    # the logits (4 + 4 more): 12 bytes per logit at the peak. Plus int64 labels and the loss.
    logits_saved = 4 * T * V + 8 * T + 4
    logits = 12 * T * V + 8 * T + 4
    # While one layer is backpropagated: its activations (recomputed if checkpointed), its weight
    # copies, and gradients in flight: the residual gradient (fp32 if the stream is) and ~2
    # intermediate-size 16-bit gradients in the MLP backward.
    transient = (res * h + 2 * c * i) * T
    layer_backward = transient + ((per_layer + weight_copies_layer) if gradient_checkpointing else 0)

    total = (base + trainable + grads + optimizer + master + weight_copies + activations
             + max(logits, layer_backward) + dequant_workspace + cuda_overhead_bytes)

    if method == "qlora" and not gradient_checkpointing:
        notes.append("gradient checkpointing is off: activations of every layer are kept")
    if attn == "eager":
        notes.append("eager attention saves a heads x seq x seq probability matrix per layer")
    if optim.lower().startswith("paged_"):
        notes.append("paged optimizer: its states can be evicted to host memory under pressure")
    n_trainable = N if method == "full" else P
    tokens_per_step = T * gradient_accumulation_steps * world_size
    return MemoryEstimate(
        method=method, compute_dtype=compute_dtype, micro_batch=micro_batch, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, optim=optim, world_size=world_size,
        zero_stage=zero_stage, n_params=N, n_trainable=n_trainable,
        tokens_per_step=tokens_per_step, base_weights=base, trainable_params=trainable,
        gradients=grads, optimizer_states=optimizer, master_weights=master,
        weight_copies=weight_copies,
        activations=activations, activations_no_checkpointing=acts_no_ckpt,
        activations_checkpointing=acts_ckpt, layer_backward=layer_backward, logits=logits,
        logits_saved=logits_saved, dequant_workspace=dequant_workspace,
        cuda_overhead=cuda_overhead_bytes, total=total, notes=notes, inputs=inputs)


# ----------------------------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPUSpec:
    """memory_gib: total device memory as nvidia-smi reports it (MiB / 1024), from vendor specs.
    bf16_tflops: dense (no sparsity) 16-bit tensor-core peak with fp32 accumulation.
    bf16: whether the GPU has bfloat16 (Volta and Turing do not: use float16)."""
    name: str
    memory_gib: float
    bf16_tflops: float
    bf16: bool = True


GPU_SPECS: dict[str, GPUSpec] = {g.name: g for g in (
    GPUSpec("b200", 179.1, 2250.0),
    GPUSpec("h200", 140.4, 989.0),
    GPUSpec("gh200", 94.5, 989.0),
    GPUSpec("h100-94g", 93.6, 835.0),          # H100 NVL
    GPUSpec("h100-80g", 79.6, 989.0),          # H100 SXM5 (81559 MiB)
    GPUSpec("h100-pcie", 79.6, 756.0),
    GPUSpec("a100-80g", 80.0, 312.0),
    GPUSpec("a100-40g", 40.0, 312.0),
    GPUSpec("l40s", 45.0, 362.0),
    GPUSpec("l40", 45.0, 181.0),
    GPUSpec("a40", 45.0, 149.7),
    GPUSpec("a6000", 48.0, 154.8),             # RTX A6000
    GPUSpec("rtx6000-ada", 48.0, 364.0),
    GPUSpec("a30", 24.0, 165.0),
    GPUSpec("a10", 22.5, 125.0),
    GPUSpec("l4", 22.5, 121.0),
    GPUSpec("rtx4090", 24.0, 165.2),
    GPUSpec("rtx3090", 24.0, 71.0),
    GPUSpec("v100-32g", 31.7, 125.0, bf16=False),
    GPUSpec("v100-16g", 15.8, 125.0, bf16=False),
    GPUSpec("t4", 15.0, 65.0, bf16=False),
    GPUSpec("p100", 15.9, 18.7, bf16=False),
)}

# Names people and Slurm GRES configurations use for the same parts. A bare family name means the
# part most clusters have: a100 -> the 80 GB A100, h100 -> the 80 GB SXM, v100 -> 16 GB.
_GPU_ALIASES = {
    "a100": "a100-80g", "h100": "h100-80g", "h100-sxm": "h100-80g", "h100-nvl": "h100-94g",
    "v100": "v100-16g", "rtx-a6000": "a6000", "rtxa6000": "a6000", "4090": "rtx4090",
    "rtx-4090": "rtx4090", "geforce-rtx-4090": "rtx4090", "3090": "rtx3090",
    "rtx-3090": "rtx3090", "h200-141g": "h200", "b200-192g": "b200", "l40s-48g": "l40s",
    "a10g": "a10", "a10-24g": "a10", "l4-24g": "l4", "t4-16g": "t4", "a6000-48g": "a6000",
}

GPU_MEMORY_GIB: dict[str, float] = {
    **{name: g.memory_gib for name, g in GPU_SPECS.items()},
    **{alias: GPU_SPECS[name].memory_gib for alias, name in _GPU_ALIASES.items()},
}
GPU_PEAK_TFLOPS: dict[str, float] = {
    **{name: g.bf16_tflops for name, g in GPU_SPECS.items()},
    **{alias: GPU_SPECS[name].bf16_tflops for alias, name in _GPU_ALIASES.items()},
}


def resolve_gpu(gpu_type: str) -> GPUSpec:
    """Resolve a GPU type as written in Slurm options or by people, case-insensitively:
    "a100", "A100:4" (--gpus-per-node=a100:4), "gpu:a100_80gb:2" (--gres), "h100-80g",
    "NVIDIA H100 80GB HBM3" (nvidia-smi), "nvidia_a100-sxm4-40gb" (GRES names)."""
    raw = str(gpu_type)
    t = raw.strip().lower()
    if t.startswith("gpu:"):
        t = t[4:]
    t = re.sub(r":\d+$", "", t)                        # trailing GPU count
    t = re.sub(r"[\s_]+", "-", t)
    t = re.sub(r"^(nvidia|tesla|geforce)-", "", t)
    t = re.sub(r"^(nvidia|tesla)-", "", t)
    if t in GPU_SPECS:
        return GPU_SPECS[t]
    if t in _GPU_ALIASES:
        return GPU_SPECS[_GPU_ALIASES[t]]
    # Family plus an optional memory size anywhere in the string: "a100-sxm4-40gb", "h100-80gb-hbm3".
    fam = re.match(r"(rtx-?a6000|rtx-?6000-?ada|rtx-?\d{4}|[a-z]+\d+[a-z]?)", t)
    mem = re.search(r"(?<![a-z])(\d{2,3})-?g(?:b|ib)?(?![a-z0-9])", t)
    if fam:
        family = fam.group(1).replace("-", "")
        if family == "rtxa6000":
            family = "a6000"
        if family in ("h100",) and ("nvl" in t):
            return GPU_SPECS["h100-94g"]
        if family == "h100" and "pcie" in t:
            return GPU_SPECS["h100-pcie"]
        if mem:
            key = f"{family}-{mem.group(1)}g"
            if key in GPU_SPECS:
                return GPU_SPECS[key]
            for spec in GPU_SPECS.values():         # "a6000-48g", "l40s-48g": memory given but
                if spec.name == family and abs(spec.memory_gib - int(mem.group(1))) <= 4:
                    return spec                     # the family has one size
        if family in GPU_SPECS:
            return GPU_SPECS[family]
        if family in _GPU_ALIASES:
            return GPU_SPECS[_GPU_ALIASES[family]]
    near = difflib.get_close_matches(t, list(GPU_MEMORY_GIB), n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise PreflightError(f"unknown GPU type {raw!r}{hint}; known: {', '.join(sorted(GPU_SPECS))}, "
                         "or give the memory in GiB")


def gpu_memory_gib(gpu_type_or_gib: str | float | int) -> float:
    """GiB of a GPU type string (see resolve_gpu) or a number of GiB passed through."""
    if isinstance(gpu_type_or_gib, (int, float)):
        return float(gpu_type_or_gib)
    text = str(gpu_type_or_gib).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|g)?", text)
    if m:
        return float(m.group(1))
    return resolve_gpu(text).memory_gib


def _gpu_label(gpu_type_or_gib: str | float | int) -> str:
    if isinstance(gpu_type_or_gib, (int, float)):
        return f"a {gpu_type_or_gib:g} GiB GPU"
    try:
        return resolve_gpu(gpu_type_or_gib).name
    except PreflightError:
        return str(gpu_type_or_gib)


# ----------------------------------------------------------------------------------------------
# Verdict and advice
# ----------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    fits: bool
    peak_gib: float
    gpu_gib: float
    usable_gib: float
    gpu: str
    headroom: float
    notes: list[str] = field(default_factory=list)

    @property
    def margin_gib(self) -> float:
        return self.usable_gib - self.peak_gib


def _fixes(estimate: MemoryEstimate, usable_gib: float) -> list[str]:
    """The standard remedies, each with what the estimator predicts after applying it."""
    out: list[str] = []

    def fmt(est: MemoryEstimate, per: str = "") -> str:
        too_much = "" if est.total_gib <= usable_gib else ", still too much"
        return f"{est.total_gib:.1f} GiB{per}{too_much}"

    if estimate.inputs:
        mb = estimate.micro_batch
        if mb > 1:
            one = estimate.with_changes(micro_batch=1)
            out.append(f"per_device_train_batch_size=1 with gradient_accumulation_steps x{mb} "
                       f"(-> {fmt(one)})")
        else:
            out.append("a shorter max sequence length (per_device_train_batch_size is already 1)")
        if not estimate.gradient_checkpointing:
            ckpt = estimate.with_changes(gradient_checkpointing=True)
            out.append(f"gradient_checkpointing=true (-> {fmt(ckpt)})")
        if estimate.method != "qlora":
            out.append(f"method qlora (-> {fmt(estimate.with_changes(method='qlora'))})")
        for n in (2, 4, 8):
            if n > estimate.world_size or estimate.zero_stage != 3:
                z3 = estimate.with_changes(world_size=max(n, estimate.world_size), zero_stage=3)
                if z3.total_gib <= usable_gib or n == 8:
                    out.append(f"{max(n, estimate.world_size)} GPUs with deepspeed zero3 "
                               f"(-> {fmt(z3, ' per GPU')})")
                    break
    else:
        out = ["a smaller per_device_train_batch_size with a larger gradient_accumulation_steps",
               "gradient_checkpointing=true", "method qlora", "more GPUs with deepspeed zero3"]
    return out


def check_fits(estimate: MemoryEstimate, gpu_type_or_gib: str | float | int,
               headroom: float = 0.9) -> Verdict:
    """Verdict for the estimate on this GPU, keeping (1 - headroom) of its memory free for
    allocator fragmentation and what the estimate misses. Raises PreflightError, one line naming
    the estimated peak, the GPU's memory and the fixes, when it cannot fit."""
    gpu_gib = gpu_memory_gib(gpu_type_or_gib)
    usable = gpu_gib * headroom
    label = _gpu_label(gpu_type_or_gib)
    peak = estimate.total_gib
    notes: list[str] = []
    if not isinstance(gpu_type_or_gib, (int, float)):
        try:
            spec = resolve_gpu(gpu_type_or_gib)
            if not spec.bf16 and estimate.compute_dtype.lower() in ("bfloat16", "bf16"):
                notes.append(f"{spec.name} has no bfloat16: use compute dtype float16")
        except PreflightError:
            pass
    if peak > usable:
        what = (f"{estimate.method}, micro-batch {estimate.micro_batch} x seq {estimate.seq_len}, "
                f"checkpointing {'on' if estimate.gradient_checkpointing else 'off'}")
        raise PreflightError(
            f"does not fit: estimated peak {peak:.1f} GiB ({what}) > {usable:.1f} GiB usable "
            f"({headroom:.0%} of {label}'s {gpu_gib:.1f} GiB); fix: "
            + "; or ".join(_fixes(estimate, usable)))
    return Verdict(True, peak, gpu_gib, usable, label, headroom, notes)


def method_advice(model_cfg: Any, gpu_gib: str | float | int, seq_len: int, *,
                  micro_batch: int = 1, lora_r: int = 16,
                  lora_target_modules: str | Sequence[str] = "all-linear",
                  compute_dtype: str = "bfloat16", gradient_checkpointing: bool = True,
                  optim: str = "adamw_torch", headroom: float = 0.9, world_size: int = 1,
                  zero_stage: int = 0, **kwargs: Any) -> list[tuple[str, float, bool]]:
    """Which of full fine-tuning, LoRA and QLoRA fit this GPU for this model and sequence length:
    [(method, estimated GiB, fits)], in that order. ``gpu_gib`` may be a GPU type string."""
    usable = gpu_memory_gib(gpu_gib) * headroom
    rows = []
    for method in ("full", "lora", "qlora"):
        est = estimate_memory(model_cfg, method=method, lora_r=lora_r,
                              lora_target_modules=lora_target_modules, compute_dtype=compute_dtype,
                              micro_batch=micro_batch, seq_len=seq_len,
                              gradient_checkpointing=gradient_checkpointing, optim=optim,
                              world_size=world_size, zero_stage=zero_stage, **kwargs)
        rows.append((method, round(est.total_gib, 2), est.total_gib <= usable))
    return rows


# ----------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------

def flops_per_token(model_cfg: Any, seq_len: int, *, method: str = "qlora",
                    gradient_checkpointing: bool = True, lora_r: int = 16,
                    lora_target_modules: str | Sequence[str] = "all-linear") -> float:
    """Training FLOPs per token actually executed.

    A matmul with N weights costs 2N FLOPs per token forward. Backward costs 2N for the input
    gradient and 2N for the weight gradient; frozen weights skip the latter, so full fine-tuning
    is 6N and LoRA/QLoRA 4N (+6 per adapter parameter). Checkpointing re-runs the forward (+2N).
    N counts matmul weights (decoder linears and lm_head), not the embedding lookup.
    Causal attention (flash skips the masked half): forward QK^T and PV cost 2 * 2*seq*q_dim / 2
    per token per layer, backward twice that, and a recompute once more."""
    s = model_shape(model_cfg)
    counts = count_params(s)
    n_mm = counts["linear"] + s.vocab_size * s.hidden_size
    fwd_attn = 2 * seq_len * s.q_dim * s.num_hidden_layers
    method = method.lower()
    if method == "full":
        f = 6 * n_mm
    else:
        f = 4 * n_mm + 6 * lora_param_count(s, lora_r, lora_target_modules)
    f += 3 * fwd_attn
    if gradient_checkpointing:
        f += 2 * counts["linear"] + fwd_attn
    return float(f)


@dataclass
class StepTimeEstimate:
    flops_per_token: float
    tokens_per_step: int
    peak_tflops: float
    assumed_mfu: float
    seconds_per_step: float
    tokens_per_s: float
    gpu: str


# Fraction of the dense peak a well-configured HF Trainer run reaches (model FLOPs actually run /
# peak). Rules of thumb, not measured here: 16-bit matmuls at ~40%; QLoRA lower because
# bitsandbytes dequantizes every weight twice per step.
DEFAULT_MFU = {"full": 0.40, "lora": 0.40, "qlora": 0.28}


def estimate_step_time(model_cfg: Any, *, gpu: str | float, micro_batch: int, seq_len: int,
                       method: str = "qlora", gradient_accumulation_steps: int = 1,
                       world_size: int = 1, gradient_checkpointing: bool = True,
                       lora_r: int = 16, lora_target_modules: str | Sequence[str] = "all-linear",
                       mfu_fraction: float | None = None) -> StepTimeEstimate:
    """Seconds per optimizer step = FLOPs / (peak * assumed utilization * world_size).
    ``gpu`` is a GPU type or a peak in dense bf16 TFLOP/s."""
    if isinstance(gpu, (int, float)):
        peak, label = float(gpu), f"{gpu:g} TFLOP/s"
    else:
        spec = resolve_gpu(gpu)
        peak, label = spec.bf16_tflops, spec.name
    frac = mfu_fraction if mfu_fraction is not None else DEFAULT_MFU[method.lower()]
    fpt = flops_per_token(model_cfg, seq_len, method=method,
                          gradient_checkpointing=gradient_checkpointing, lora_r=lora_r,
                          lora_target_modules=lora_target_modules)
    tokens = micro_batch * seq_len * gradient_accumulation_steps * world_size
    secs = tokens * fpt / (peak * 1e12 * frac * world_size)
    return StepTimeEstimate(fpt, tokens, peak, frac, secs, tokens / secs, label)


def mfu(tokens_per_s: float, n_params: int, seq_len: int, *, gpu: str | float = "h100",
        n_layers: int | None = None, hidden_size: int | None = None, method: str = "full",
        num_gpus: int = 1) -> float:
    """Model FLOPs utilization of a measured throughput (tokens/s summed over num_gpus).

    Model FLOPs per token follow the PaLM convention: 6N for full fine-tuning (4N for LoRA/QLoRA,
    whose frozen weights need no weight gradient) plus 12 * n_layers * hidden * seq_len for
    attention when n_layers and hidden_size are given; recomputation is not counted (that
    would be hardware FLOPs utilization). ``gpu`` is a type or a peak in TFLOP/s per GPU."""
    peak = float(gpu) if isinstance(gpu, (int, float)) else resolve_gpu(gpu).bf16_tflops
    per_token = (6 if method.lower() == "full" else 4) * n_params
    if n_layers and hidden_size:
        per_token += 12 * n_layers * hidden_size * seq_len
    return tokens_per_s * per_token / (peak * 1e12 * num_gpus)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _nearest_rank(sorted_values: Sequence[int], p: float) -> int:
    """The p-th percentile by nearest rank: the smallest value with at least p% at or below it
    (always an actual sample length)."""
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def _padding_fraction(lengths: Sequence[int], micro_batch: int) -> float:
    """Each batch of micro_batch consecutive samples is padded to its longest member."""
    real = sum(lengths)
    padded = sum(max(lengths[j:j + micro_batch]) * len(lengths[j:j + micro_batch])
                 for j in range(0, len(lengths), micro_batch))
    return 1 - real / padded if padded else 0.0


def data_statistics(lengths: Sequence[int], max_length: int, micro_batch: int) -> dict[str, Any]:
    """Token-length statistics and the padding each batching strategy wastes.

    Lengths longer than max_length are truncated to it before any padding or packing figure.
    Padding fractions are padding tokens / all tokens processed:
      padding_to_max_length: every sample padded to max_length;
      padding_dynamic_unsorted: batches of micro_batch in the given order, each padded to its
        longest sample (DataCollatorWithPadding);
      padding_dynamic_sorted: the same after sorting by length (group_by_length's best case);
      padding_packed: samples packed as ftlib packs them (data.pack_plan, best-fit decreasing)
        into rows of max_length, each row padded to max_length (no sample split across rows)."""
    if not lengths:
        raise PreflightError("data_statistics needs at least one length")
    if max_length < 1 or micro_batch < 1:
        raise PreflightError("max_length and micro_batch must be >= 1")
    raw = [int(n) for n in lengths]
    srt = sorted(raw)
    cut = [min(n, max_length) for n in raw]
    real = sum(cut)
    n = len(raw)
    from .data import pack_plan
    rows = pack_plan(cut, max_length)
    truncated = [x for x in raw if x > max_length]
    return {
        "n_samples": n,
        "min": srt[0],
        "mean": sum(raw) / n,
        "p50": _nearest_rank(srt, 50),
        "p90": _nearest_rank(srt, 90),
        "p99": _nearest_rank(srt, 99),
        "max": srt[-1],
        "n_truncated": len(truncated),
        "truncated_fraction": len(truncated) / n,
        "tokens_lost_to_truncation": sum(x - max_length for x in truncated),
        "real_tokens": real,
        "padding_to_max_length": 1 - real / (n * max_length),
        "padding_dynamic_unsorted": _padding_fraction(cut, micro_batch),
        "padding_dynamic_sorted": _padding_fraction(sorted(cut), micro_batch),
        "padding_packed": 1 - real / (len(rows) * max_length),
        "packed_rows": len(rows),
        "micro_batches_unpacked": math.ceil(n / micro_batch),
        "micro_batches_packed": math.ceil(len(rows) / micro_batch),
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

_LABELS = {
    "base_weights": "base weights", "trainable_params": "trainable (LoRA) params",
    "gradients": "gradients", "optimizer_states": "optimizer states",
    "master_weights": "fp32 master weights", "weight_copies": "autocast weight copies",
    "activations": "activations", "logits": "logits + loss (fp32)",
    "layer_backward": "one-layer backward", "dequant_workspace": "dequant/gather workspace",
    "cuda_overhead": "CUDA context + workspace",
}


def format_report(estimate: MemoryEstimate, gpu: str | float | None = None, *,
                  headroom: float = 0.9, advice: list[tuple[str, float, bool]] | None = None,
                  data_stats: Mapping[str, Any] | None = None,
                  step_time: StepTimeEstimate | None = None) -> str:
    """A readable multi-line preflight report."""
    e = estimate
    lines = [
        "Preflight",
        f"  method {e.method}, compute {e.compute_dtype}, optim {e.optim}, micro-batch "
        f"{e.micro_batch} x seq {e.seq_len} ({e.tokens_per_step:,} tokens/step), checkpointing "
        f"{'on' if e.gradient_checkpointing else 'off'}, world size {e.world_size}"
        + (f", ZeRO-{e.zero_stage}" if e.zero_stage else ""),
        f"  parameters {e.n_params / 1e9:.2f} B, trainable {e.n_trainable:,} "
        f"({100 * e.n_trainable / e.n_params:.2f}%)",
        "  memory per GPU (GiB):",
    ]
    peak_loss = e.logits >= e.layer_backward
    for key, value in e.breakdown().items():
        if value == 0:
            continue
        mark = ""
        if key in ("logits", "layer_backward"):
            mark = "  (peak term)" if (key == "logits") == peak_loss else "  (not at the peak)"
        lines.append(f"    {_LABELS[key]:<28}{value / GiB:8.2f}{mark}")
    lines.append(f"    {'total (estimated peak)':<28}{e.total_gib:8.2f}")
    other = e.activations_no_checkpointing if e.gradient_checkpointing else e.activations_checkpointing
    lines.append(f"    (activations {'without' if e.gradient_checkpointing else 'with'} "
                 f"checkpointing would be {other / GiB:.2f})")
    if gpu is not None:
        try:
            v = check_fits(e, gpu, headroom)
            lines.append(f"  fits {v.gpu}: {v.peak_gib:.1f} of {v.usable_gib:.1f} GiB usable "
                         f"({headroom:.0%} of {v.gpu_gib:.1f}), {v.margin_gib:.1f} GiB spare")
            lines += [f"  note: {n}" for n in v.notes]
        except PreflightError as err:
            lines.append(f"  DOES NOT FIT {_gpu_label(gpu)}: {str(err).removeprefix('does not fit: ')}")
    lines += [f"  note: {n}" for n in e.notes]
    if advice:
        lines.append("  methods on this GPU:")
        for method, gib, fits in advice:
            lines.append(f"    {method:<6}{gib:8.1f} GiB  {'fits' if fits else 'does not fit'}")
    if step_time is not None:
        st = step_time
        lines.append(f"  time: ~{st.seconds_per_step:.2f} s/step, ~{st.tokens_per_s:,.0f} tokens/s "
                     f"({st.flops_per_token / 1e9:.1f} GFLOP/token at {st.assumed_mfu:.0%} of "
                     f"{st.gpu}'s {st.peak_tflops:g} TFLOP/s; an assumption, not a measurement)")
    if data_stats:
        d = data_stats
        lines += [
            f"  data: {d['n_samples']:,} samples, tokens p50 {d['p50']} p90 {d['p90']} "
            f"p99 {d['p99']} max {d['max']}",
            f"    truncated: {d['n_truncated']} samples ({100 * d['truncated_fraction']:.1f}%), "
            f"{d['tokens_lost_to_truncation']:,} tokens lost",
            f"    padding: to max_length {100 * d['padding_to_max_length']:.1f}%, dynamic "
            f"{100 * d['padding_dynamic_unsorted']:.1f}%, length-sorted "
            f"{100 * d['padding_dynamic_sorted']:.1f}%, packed {100 * d['padding_packed']:.1f}% "
            f"({d['packed_rows']} rows)",
        ]
    return "\n".join(lines)
