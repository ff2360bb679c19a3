"""GPUs and time: the GPU catalogue (memory, dense 16-bit peak, bfloat16 or not) and the names
Slurm and people give its parts; whether an estimate fits one (check_fits, with the fixes when it
does not) and which fine-tuning methods do (method_advice); FLOPs per token, step time and MFU."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .memory import MemoryEstimate, estimate_memory
from .shape import PreflightError, count_params, lora_param_count, model_shape

# ----------------------------------------------------------------------------------------------
# Catalogue
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


def gpu_label(gpu_type_or_gib: str | float | int) -> str:
    """How a report names a GPU: its catalogue name, or "a 24 GiB GPU" for a number."""
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
            out.append(f"training.activation_checkpointing=true (-> {fmt(ckpt)})")
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
               "training.activation_checkpointing=true", "method qlora", "more GPUs with deepspeed zero3"]
    return out


def check_fits(estimate: MemoryEstimate, gpu_type_or_gib: str | float | int,
               headroom: float = 0.9) -> Verdict:
    """Verdict for the estimate on this GPU, keeping (1 - headroom) of its memory free for
    allocator fragmentation and what the estimate misses. Raises PreflightError, one line naming
    the estimated peak, the GPU's memory and the fixes, when it cannot fit."""
    gpu_gib = gpu_memory_gib(gpu_type_or_gib)
    usable = gpu_gib * headroom
    label = gpu_label(gpu_type_or_gib)
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
