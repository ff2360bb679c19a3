"""Preflight for a RunConfig: estimate GPU memory from the model's config.json before the job
waits in a queue, print it with --dry-run, refuse a submission that cannot fit the GPU type asked
for (preflight.py does the arithmetic; this module maps the run config onto it)."""
from __future__ import annotations

from typing import Any

from ..config import ConfigError, RunConfig
from ..distributed import deepspeed_config, zero_stage


def model_config(cfg: RunConfig) -> Any | None:
    """The model's HF config (config.json only: small, cached), or None when it cannot be read."""
    from transformers import AutoConfig

    from ..model import resolve_model_path
    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, ConfigError):
        return None


def estimate(cfg: RunConfig, model_cfg: Any):
    from ..preflight import estimate_memory
    t, q = cfg.training, cfg.quantization
    compute = q.get("bnb_4bit_compute_dtype") or ("bfloat16" if t.get("bf16") else
                                                  "float16" if t.get("fp16") else "float32")
    world = cfg.slurm.nodes * max(cfg.slurm.gpus_per_node, 1)
    return estimate_memory(
        model_cfg, method=cfg.model.method, lora_r=int(cfg.lora.get("r", 8)),
        lora_target_modules=cfg.lora.get("target_modules") or "all-linear", compute_dtype=compute,
        double_quant=bool(q.get("bnb_4bit_use_double_quant")), micro_batch=int(t.get("per_device_train_batch_size", 8)),
        seq_len=cfg.data.max_length, gradient_checkpointing=bool(t.get("gradient_checkpointing")),
        optim=str(t.get("optim", "adamw_torch")), world_size=world,
        zero_stage=zero_stage(deepspeed_config(t.get("deepspeed"), cfg.source)),
        gradient_accumulation_steps=int(t.get("gradient_accumulation_steps", 1)),
        lora_dropout=float(cfg.lora.get("lora_dropout", 0.0)),
        # ftlib calls prepare_model_for_kbit_training, which upcasts norms/embeddings to fp32.
        upcast_non_quantized=cfg.model.method == "qlora",
        attn_implementation=cfg.model.attn_implementation or "sdpa")


def preflight(cfg: RunConfig) -> str:
    """The report; raises ConfigError (exit 2) when the run cannot fit the requested GPU type."""
    from ..preflight import PreflightError, check_fits, format_report, method_advice
    model_cfg = model_config(cfg)
    if model_cfg is None:
        return (f"# preflight: skipped, the config of {cfg.model.name} is not readable here "
                f"(offline? run jobs/prefetch.py {cfg.source})")
    est = estimate(cfg, model_cfg)
    gpu = cfg.slurm.gpu_type if cfg.slurm.gpus_per_node > 0 else None
    advice = method_advice(model_cfg, gpu, cfg.data.max_length) if gpu else None
    report = format_report(est, gpu, advice=advice)
    if gpu:
        try:
            check_fits(est, gpu)
        except PreflightError as exc:
            raise ConfigError(f"{cfg.source}: preflight: {exc}") from None
    return "# preflight\n" + report
