"""Memory held for the whole run, whatever the batch: weights (NF4, 16- or 32-bit), LoRA
adapters, gradients, optimizer state, fp32 master weights, and what is materialized from the
weights for a matmul (autocast copies, dequantized or ZeRO-3-gathered weights). Bytes."""
from __future__ import annotations

import difflib
import math
from typing import Iterable

from .process import Process
from .shape import PreflightError, Shape, lora_tensor_sizes, numel, param_shapes

# ----------------------------------------------------------------------------------------------
# Storage formats: optimizer state, NF4 weights
# ----------------------------------------------------------------------------------------------

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


def optimizer_state_bytes(optim: str, shapes: Iterable[Shape], *, state_bytes: int = 4,
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
    tensors = [numel(x) for x in shapes]
    forced = [numel(x) for x in force_32bit]
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
        return sum(4 * (x[0] + x[1]) if len(x) == 2 else 4 * numel(x)
                   for x in shapes + list(force_32bit))
    known = sorted(_ADAM32 | _ADAM8 | _LION32 | _LION8 | _FACTORED | _STATELESS)
    near = difflib.get_close_matches(opt, known, n=1)
    raise PreflightError(f"unknown optim {optim!r}" + (f" (did you mean {near[0]}?)" if near else ""))


def nf4_bytes(n: int, double_quant: bool, blocksize: int = 64) -> int:
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


# ----------------------------------------------------------------------------------------------
# The terms of the estimate
# ----------------------------------------------------------------------------------------------

def base_weight_bytes(proc: Process) -> int:
    """The model's weights (for full fine-tuning: its trainable parameters) and buffers."""
    s, c, counts = proc.s, proc.compute_bytes, proc.counts
    # Rotary inv_freq and original_inv_freq buffers: head_dim/2 float32 each.
    buffers = 2 * (s.head_dim // 2) * 4
    if proc.method == "full":
        return proc.n_params * proc.full_param_bytes // proc.shard_param + buffers
    # Non-quantized tensors (embeddings, norms, biases, lm_head) stay in the dtype the model
    # was loaded in (= compute dtype); prepare_model_for_kbit_training upcasts them to fp32.
    unquantized = counts["embed"] + counts["lm_head"] + counts["norms"] + counts["bias"]
    if proc.method == "qlora":
        unq_bytes = 4 if proc.upcast_non_quantized else c
        quant = s.num_hidden_layers * sum(nf4_bytes(fi * fo, proc.double_quant, proc.quant_blocksize)
                                          for fi, fo in s.linear_shapes().values())
    else:
        # Plain LoRA: the frozen base lives in the compute dtype (upcast only touches k-bit).
        unq_bytes = c
        quant = counts["linear"] * c
    return (quant + unquantized * unq_bytes + buffers) // proc.shard_param


def trainable_param_bytes(proc: Process) -> int:
    """The LoRA adapters, in the adapter dtype. Full fine-tuning: 0, the trainable parameters
    are the base weights themselves."""
    if proc.method == "full":
        return 0
    return proc.n_lora * proc.adapter_bytes // proc.shard_param


def gradient_bytes(proc: Process) -> int:
    if proc.method == "full":
        grads = proc.n_params * proc.full_param_bytes // proc.shard_grad
    else:
        # Gradients of the adapters only, in the adapter dtype; the frozen base has none.
        grads = proc.n_lora * proc.adapter_bytes // proc.shard_grad
    if proc.zero_stage == 0 and proc.world_size > 1:
        grads *= 2  # DDP's flat gradient buckets are a second copy (gradient_as_bucket_view off)
    return grads


def optimizer_bytes(proc: Process) -> tuple[int, int]:
    """(optimizer states, fp32 master weights)."""
    if proc.method != "full":
        states = optimizer_state_bytes(proc.optim, proc.lora_shapes,
                                       state_bytes=proc.adapter_bytes) // proc.shard_opt
        master = 0
        if proc.mixed and proc.adapter_bytes == 2 and proc.zero_stage >= 1:
            master = 4 * proc.n_lora // proc.shard_opt   # DeepSpeed keeps fp32 masters of 16-bit params
        return states, master
    all_shapes = param_shapes(proc.s)        # embedding first
    force32: list[Shape] = []
    if proc.optim.lower() in _ADAM8 | _LION8:
        # The HF Trainer registers nn.Embedding weights for 32-bit bnb optimizer state.
        force32 = [all_shapes.pop(0)]
    states = optimizer_state_bytes(proc.optim, all_shapes, state_bytes=4,
                                   force_32bit=force32) // proc.shard_opt
    master = 4 * proc.n_params // proc.shard_opt if proc.deepspeed_16 else 0
    return states, master


def autocast_weight_copies(proc: Process) -> tuple[int, int]:
    """(all, one decoder layer's): the compute-dtype copies of fp32 weights that autocast makes
    each forward and keeps for backward. All of them are kept when nothing is recomputed; one
    layer's are what a recomputed layer holds."""
    c, L = proc.compute_bytes, proc.s.num_hidden_layers
    if proc.method != "full":
        if not (proc.mixed and proc.adapter_bytes != c):
            return 0, 0
        # Under autocast each fp32 adapter matrix is cast to the compute dtype once per
        # forward and the copy is saved for backward (autocast's weight cache).
        return (c * proc.n_lora,
                c * sum(lora_tensor_sizes(proc.s, proc.lora_r, proc.layer_targets)) // L)
    if not (proc.mixed and not proc.deepspeed_16):
        return 0, 0
    # autocast casts every fp32 linear weight (and lm_head) to the compute dtype per
    # forward and keeps the copy for backward.
    linear = proc.counts["linear"]
    return c * (linear + (proc.s.vocab_size * proc.s.hidden_size)), c * (linear // L)


def workspace_bytes(proc: Process) -> int:
    """Full weights materialized for a matmul: dequantized (QLoRA) or gathered (ZeRO-3)."""
    c = proc.compute_bytes
    if proc.method == "qlora":
        # bitsandbytes dequantizes one weight to the compute dtype for each matmul (forward,
        # and again for the input gradient); one such weight is live at a time.
        return c * max(fi * fo for fi, fo in proc.s.linear_shapes().values())
    if proc.method == "full" and proc.zero_stage == 3 and proc.world_size > 1:
        # ZeRO-3 gathers each layer's full parameters before using it (and prefetches one).
        return 2 * c * (proc.counts["linear"] // proc.s.num_hidden_layers)
    return 0
