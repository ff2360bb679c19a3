"""Peak GPU memory of one training process: estimate_memory adds up, term by term, what
model_state.py (weights, gradients, optimizer state: held for the whole run) and activations.py
(saved activations, the loss, one layer's backward: growing with the batch) compute.

Conventions and assumptions (each formula in those modules says why it has the shape it has):

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
  ``torch.autograd.graph.saved_tensors_hooks`` (tests/preflight/test_preflight.py).
* The peak is reached either at the start of backward (all saved activations plus the float32
  loss temporaries over the vocabulary) or while one decoder layer is being backpropagated
  (with checkpointing: that layer recomputed); the estimate takes the larger of the two.
* Units: bytes everywhere; ``GiB = 2**30``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .activations import (activation_bytes, layer_backward_bytes, layer_bytes_per_token,
                          loss_bytes, saved_weight_copies)
from .model_state import (autocast_weight_copies, base_weight_bytes, gradient_bytes,
                          optimizer_bytes, trainable_param_bytes, workspace_bytes)
from .process import Process
from .shape import (LINEAR_MODULES, GiB, PreflightError, count_params, dtype_bytes, lora_shapes,
                    lora_targets, model_shape)

# CUDA context (~0.3-0.6 GiB with lazy module loading), cuBLAS/cuBLASLt and NCCL workspaces, and
# the allocator's small-block rounding. Invisible to torch.cuda.memory_allocated but not to the OOM.
CUDA_OVERHEAD_BYTES = 1 * GiB


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
    compute_bytes, adapter_bytes = dtype_bytes(compute_dtype), dtype_bytes(adapter_dtype)
    counts = count_params(s)
    targets = lora_targets(lora_target_modules) if method != "full" else LINEAR_MODULES
    attn = attn_implementation.lower()
    proc = Process(
        s=s, method=method, compute_bytes=compute_bytes, adapter_bytes=adapter_bytes,
        counts=counts, targets=targets, lora_r=lora_r,
        lora_shapes=lora_shapes(s, lora_r, targets) if method != "full" else [],
        double_quant=double_quant, quant_blocksize=quant_blocksize, optim=optim,
        world_size=world_size, zero_stage=zero_stage, seq_len=seq_len,
        tokens=micro_batch * seq_len, gradient_checkpointing=gradient_checkpointing,
        lora_dropout=lora_dropout, dropout_mask_bytes=dropout_mask_bytes,
        upcast_non_quantized=upcast_non_quantized, attn=attn,
        kv_repeat=(attn != "flash_attention_2") if kv_repeat is None else kv_repeat)

    base = base_weight_bytes(proc)
    trainable = trainable_param_bytes(proc)
    grads = gradient_bytes(proc)
    optimizer, master = optimizer_bytes(proc)
    copies_all, copies_layer = autocast_weight_copies(proc)
    workspace = workspace_bytes(proc)
    per_layer = layer_bytes_per_token(proc) * proc.tokens
    acts_no_ckpt, acts_ckpt = activation_bytes(proc, per_layer)
    activations = acts_ckpt if gradient_checkpointing else acts_no_ckpt
    weight_copies = saved_weight_copies(proc, copies_all, copies_layer)
    logits_saved, logits = loss_bytes(proc)
    layer_backward = layer_backward_bytes(proc, per_layer, copies_layer)
    total = (base + trainable + grads + optimizer + master + weight_copies + activations
             + max(logits, layer_backward) + workspace + cuda_overhead_bytes)

    return MemoryEstimate(
        method=method, compute_dtype=compute_dtype, micro_batch=micro_batch, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, optim=optim, world_size=world_size,
        zero_stage=zero_stage, n_params=proc.n_params, n_trainable=proc.n_trainable,
        tokens_per_step=proc.tokens * gradient_accumulation_steps * world_size,
        base_weights=base, trainable_params=trainable, gradients=grads,
        optimizer_states=optimizer, master_weights=master, weight_copies=weight_copies,
        activations=activations, activations_no_checkpointing=acts_no_ckpt,
        activations_checkpointing=acts_ckpt, layer_backward=layer_backward, logits=logits,
        logits_saved=logits_saved, dequant_workspace=workspace,
        cuda_overhead=cuda_overhead_bytes, total=total, notes=_notes(proc), inputs=inputs)


def _notes(proc: Process) -> list[str]:
    notes: list[str] = []
    if proc.method == "qlora" and not proc.gradient_checkpointing:
        notes.append("gradient checkpointing is off: activations of every layer are kept")
    if proc.attn == "eager":
        notes.append("eager attention saves a heads x seq x seq probability matrix per layer")
    if proc.optim.lower().startswith("paged_"):
        notes.append("paged optimizer: its states can be evicted to host memory under pressure")
    return notes
