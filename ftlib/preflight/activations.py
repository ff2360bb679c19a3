"""Memory that grows with the batch: the tensors autograd saves for backward (per decoder layer,
per token; outside the layers), the autocast weight copies among them, the float32 loss over the
vocabulary, and what one layer's backward holds. Bytes. The formulas mirror what transformers,
peft and bitsandbytes save; memory.py's docstring says which versions and how it was checked."""
from __future__ import annotations

from .process import Process

# ----------------------------------------------------------------------------------------------
# One decoder layer, per token
# ----------------------------------------------------------------------------------------------

def layer_bytes_per_token(proc: Process) -> int:
    """Bytes one decoder layer saves for backward per token: its two RMSNorms, the inputs its
    linear layers keep for their weight gradients, attention, and the MLP."""
    return (2 * _norm_bytes(proc) + _linear_input_bytes(proc) + _attention_bytes(proc)
            + _mlp_bytes(proc))


def _norm_bytes(proc: Process) -> int:
    """One RMSNorm. HF's LlamaRMSNorm upcasts its input to fp32 and pow() saves that fp32 copy
    (4h); rsqrt's output (1 fp32 per token) is saved by the multiply. With a trainable weight
    the normalized tensor is saved too (in the parameter dtype) for the weight grad."""
    h, c, res = proc.s.hidden_size, proc.compute_bytes, proc.residual_bytes
    norm = 4 * h + 4
    if proc.method == "full":
        norm += (4 if res == 4 else c) * h
    return norm


def _linear_input_bytes(proc: Process) -> int:
    """Inputs that linear layers save for their weight gradients."""
    s, c, res = proc.s, proc.compute_bytes, proc.residual_bytes
    h, i, hq = s.hidden_size, s.intermediate_size, s.q_dim
    if proc.method == "full":
        if proc.mixed and res == 4:
            # fp32 norm outputs feed q, k, v, gate, up; autocast makes a 16-bit copy for
            # each of these linears and each copy is saved. o_proj's input is SDPA's output (saved below);
            # down_proj's is the 16-bit gate*up product.
            b = c * (5 * h) + c * i
        else:
            b = c * h + c * h + c * i     # one shared norm output per group + the product
        if proc.attn == "eager":
            b += c * hq                    # o_proj input is a fresh contiguous copy
        return b
    b = 0
    shapes = s.linear_shapes()
    tgt = proc.layer_targets
    per_module_copy = proc.lora_dropout > 0 or (proc.mixed and (proc.adapter_bytes != c or res != c))
    if per_module_copy:
        # peft casts x to the adapter dtype (fp32) before lora_A; autocast casts it back to
        # 16 bits, a fresh tensor per LoRA layer, which lora_A saves. Dropout likewise
        # makes one output per LoRA layer, plus its mask (dropout_mask_bytes/element).
        for t in tgt:
            fin = shapes[t][0]
            b += c * fin + (proc.dropout_mask_bytes * fin if proc.lora_dropout > 0 else 0)
    else:
        # The LoRA path sees the very tensor the base layer sees: one copy per input.
        if any(t in tgt for t in ("q_proj", "k_proj", "v_proj")):
            b += c * h
        if any(t in tgt for t in ("gate_proj", "up_proj")):
            b += c * h
        if "down_proj" in tgt:
            b += c * i
        if "o_proj" in tgt and proc.attn == "eager":
            b += c * hq
    # lora_A's output (r per token) is saved by lora_B.
    b += c * proc.lora_r * len(tgt)
    return b


def _attention_bytes(proc: Process) -> int:
    """Attention. SDPA/flash save q, k, v (after RoPE, K/V repeated to all heads on HF's
    masked SDPA path), the output (which o_proj's input is a view of) and a fp32 logsumexp
    per head; no seq x seq matrix. Eager saves the fp32 softmax and its 16-bit copy."""
    s, c = proc.s, proc.compute_bytes
    hq, nh = s.q_dim, s.num_attention_heads
    kvb = hq if proc.kv_repeat else s.kv_dim
    b = c * (hq + 2 * kvb)
    if proc.attn == "eager":
        b += nh * proc.seq_len * (4 + (c if c != 4 else 0))
    else:
        b += c * hq + 4 * nh
    return b


def _mlp_bytes(proc: Process) -> int:
    """SiLU-gated MLP: silu saves gate's output, the product saves silu's output and up's.
    bitsandbytes returns its output in its input's dtype, so after the k-bit upcast (fp32
    norm outputs feeding gate/up) these three are fp32 even under autocast."""
    c, res = proc.compute_bytes, proc.residual_bytes
    return 3 * (4 if (proc.method == "qlora" and res == 4) else c) * proc.s.intermediate_size


# ----------------------------------------------------------------------------------------------
# The whole micro-batch
# ----------------------------------------------------------------------------------------------

def activation_bytes(proc: Process, per_layer: int) -> tuple[int, int]:
    """(without, with) gradient checkpointing: what the micro-batch saves for backward, given
    one layer's share (per_layer, bytes)."""
    s, res, T = proc.s, proc.residual_bytes, proc.tokens
    outside = _outside_layer_bytes(proc)
    no_checkpointing = s.num_hidden_layers * per_layer + outside
    # Gradient checkpointing keeps only each decoder layer's input (residual dtype) and
    # recomputes one layer at a time in backward.
    checkpointing = s.num_hidden_layers * res * s.hidden_size * T + outside
    return no_checkpointing, checkpointing


def _outside_layer_bytes(proc: Process) -> int:
    """Outside the layers: final norm (as above); lm_head's input when lm_head trains; the
    rotary cos/sin tables (seq x head_dim, shared by all layers); token ids for the embedding
    gradient when the embedding trains."""
    s, c, res = proc.s, proc.compute_bytes, proc.residual_bytes
    h = s.hidden_size
    outside_tok = 4 * h + 4
    if proc.method == "full":
        outside_tok += (4 if res == 4 else c) * h + c * h + 8
    elif "lm_head" in proc.targets:
        outside_tok += c * h + c * proc.lora_r
    rope = 2 * proc.seq_len * s.head_dim * res
    return outside_tok * proc.tokens + rope


def saved_weight_copies(proc: Process, copies_all: int, copies_layer: int) -> int:
    """Autocast weight copies saved for backward: all of them without checkpointing; with it only
    those outside the checkpointed layers (lm_head), a recomputed layer holds its own briefly."""
    L, c = proc.s.num_hidden_layers, proc.compute_bytes
    saved = copies_all - L * copies_layer if proc.gradient_checkpointing else copies_all
    if proc.method == "qlora" and proc.upcast_non_quantized and proc.mixed:
        # The upcast fp32 lm_head is cast to the compute dtype by autocast and the copy is saved
        # for the input gradient (not inside any checkpointed layer).
        saved += c * proc.s.vocab_size * proc.s.hidden_size
    return saved


def loss_bytes(proc: Process) -> tuple[int, int]:
    """(saved for backward, at the peak). HF upcasts logits to fp32 and cross_entropy saves the
    fp32 log-probabilities (4 bytes per logit). At LogSoftmaxBackward these coexist with their
    gradient and the gradient w.r.t. the logits (4 + 4 more): 12 bytes per logit at the peak.
    Plus int64 labels and the loss."""
    T, V = proc.tokens, proc.s.vocab_size
    return 4 * T * V + 8 * T + 4, 12 * T * V + 8 * T + 4


def layer_backward_bytes(proc: Process, per_layer: int, copies_layer: int) -> int:
    """While one layer is backpropagated: its activations (recomputed if checkpointed), its
    weight copies, and gradients in flight: the residual gradient (fp32 if the stream is) and ~2
    intermediate-size 16-bit gradients in the MLP backward."""
    s, c = proc.s, proc.compute_bytes
    transient = (proc.residual_bytes * s.hidden_size + 2 * c * s.intermediate_size) * proc.tokens
    return transient + ((per_layer + copies_layer) if proc.gradient_checkpointing else 0)
