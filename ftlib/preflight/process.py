"""One training process as the memory estimate sees it (Process): estimate_memory's checked
settings and the sizes derived from them once (byte widths, ZeRO sharding, the residual stream's
dtype), shared by the formulas of model_state.py and activations.py."""
from __future__ import annotations

from dataclasses import dataclass

from .shape import ModelShape, Shape, numel


@dataclass(frozen=True)
class Process:
    s: ModelShape
    method: str                  # "qlora", "lora" or "full"
    compute_bytes: int           # bytes per element of the compute dtype ("c" in the formulas)
    adapter_bytes: int           # ... of the LoRA adapters
    counts: dict[str, int]       # count_params
    targets: tuple[str, ...]     # LoRA targets (LINEAR_MODULES for full fine-tuning)
    lora_r: int
    lora_shapes: list[Shape]     # every LoRA tensor; none for full fine-tuning
    double_quant: bool
    quant_blocksize: int
    optim: str
    world_size: int
    zero_stage: int
    seq_len: int
    tokens: int                  # tokens in one micro-batch ("T")
    gradient_checkpointing: bool
    lora_dropout: float
    dropout_mask_bytes: int
    upcast_non_quantized: bool
    attn: str                    # attn_implementation, lower case
    kv_repeat: bool

    @property
    def n_params(self) -> int:
        return self.counts["total"]

    @property
    def n_lora(self) -> int:
        return sum(numel(x) for x in self.lora_shapes)

    @property
    def n_trainable(self) -> int:
        return self.n_params if self.method == "full" else self.n_lora

    @property
    def layer_targets(self) -> list[str]:
        """The targets inside a decoder layer (all but lm_head)."""
        shapes = self.s.linear_shapes()
        return [t for t in self.targets if t in shapes]

    @property
    def mixed(self) -> bool:
        """Mixed precision: a 16-bit compute dtype."""
        return self.compute_bytes != 4

    # ZeRO divides a sharded quantity by the number of processes.
    @property
    def shard_opt(self) -> int:
        return self.world_size if self.zero_stage >= 1 else 1

    @property
    def shard_grad(self) -> int:
        return self.world_size if self.zero_stage >= 2 else 1

    @property
    def shard_param(self) -> int:
        return self.world_size if self.zero_stage >= 3 else 1

    @property
    def deepspeed_16(self) -> bool:
        """Full fine-tuning. Without DeepSpeed the HF Trainer keeps fp32 parameters and runs the
        forward under autocast (mixed precision): weights 4 + grads 4 + Adam 8 bytes/param, and
        the fp32 weights are the master copy. With DeepSpeed (ZeRO >= 1) parameters and
        gradients are 16-bit and the optimizer holds fp32 masters: 2 + 2 + 4 + 8 = 16 bytes."""
        return self.zero_stage >= 1 and self.mixed

    @property
    def full_param_bytes(self) -> int:
        """Bytes per parameter and per gradient of full fine-tuning (see deepspeed_16)."""
        return self.compute_bytes if self.deepspeed_16 else 4

    @property
    def residual_bytes(self) -> int:
        """Residual stream dtype: the embedding output's dtype. 16-bit for a 16-bit loaded base;
        fp32 for fp32 parameters (full fine-tuning without DeepSpeed, or after the k-bit upcast)."""
        if self.method == "full":
            return 4 if (self.zero_stage == 0 or not self.mixed) else self.compute_bytes
        return 4 if (self.upcast_non_quantized and self.method == "qlora") else self.compute_bytes
