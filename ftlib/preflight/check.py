"""Preflight for a RunConfig: estimate GPU memory from the model's config.json before the job
waits in a queue, print it with --dry-run, refuse a submission that cannot fit the GPU type asked
for (the package's other modules do the arithmetic; this one maps the run config onto it)."""
from __future__ import annotations

import itertools
import sys
from typing import Any

from ..config import ConfigError, RunConfig
from ..data import is_local_file, read_rows, tokenized_rows
from ..distributed import deepspeed_config, zero_stage
from ..plan import room_warning
from .gpus import check_fits, estimate_step_time, method_advice
from .memory import estimate_memory
from .report import format_report
from .shape import PreflightError
from .stats import data_statistics as length_statistics

DATA_SAMPLE_ROWS = 5000   # --dry-run tokenizes at most this many rows: seconds, not minutes


def model_config(cfg: RunConfig) -> Any | None:
    """The model's HF config (config.json only: small, cached), or None when it cannot be read."""
    # Imported here, not at the top: transformers (and ftlib.model, which pulls in torch) take
    # seconds to import, and the CLI imports this module for every submission.
    from transformers import AutoConfig

    from ..model import resolve_model_path
    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, ConfigError):
        return None


def estimate(cfg: RunConfig, model_cfg: Any):
    t, q = cfg.training, cfg.quantization
    compute = q.get("bnb_4bit_compute_dtype") or ("bfloat16" if t.get("bf16") else
                                                  "float16" if t.get("fp16") else "float32")
    world = cfg.slurm.nodes * max(cfg.slurm.gpus_per_node, 1)
    return estimate_memory(
        model_cfg, method=cfg.model.method, lora_r=int(cfg.lora.get("r", 8)),
        lora_target_modules=cfg.lora.get("target_modules") or "all-linear", compute_dtype=compute,
        double_quant=bool(q.get("bnb_4bit_use_double_quant")), micro_batch=int(t.get("per_device_train_batch_size", 8)),
        seq_len=cfg.data.max_length, gradient_checkpointing=bool(t.get("activation_checkpointing")),
        optim=str(t.get("optim", "adamw_torch")), world_size=world,
        zero_stage=zero_stage(deepspeed_config(t.get("deepspeed"), cfg.source)),
        gradient_accumulation_steps=int(t.get("gradient_accumulation_steps", 1)),
        lora_dropout=float(cfg.lora.get("lora_dropout", 0.0)),
        # ftlib calls prepare_model_for_kbit_training, which upcasts norms/embeddings to fp32.
        upcast_non_quantized=cfg.model.method == "qlora",
        attn_implementation=cfg.model.attn_implementation or "sdpa")


def training_lengths(cfg: RunConfig, max_rows: int = DATA_SAMPLE_ROWS) -> tuple[list[int], int]:
    """Token lengths (before truncation) of the first max_rows usable rows of data.train, rendered
    and tokenized exactly as training does, and the number of rows in the file. Writes nothing."""
    from ..model import hf_cache_dir, load_tokenizer, resolve_model_path   # here for start-up time (torch)
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    rows, _ = read_rows(cfg.data.train, cfg.data, hf_cache_dir(cfg))
    usable = tokenized_rows(rows, cfg.data, tokenizer)   # bad rows are skipped: the job reports them
    return [tokens["full_length"] for _, _, tokens in itertools.islice(usable, max_rows)], len(rows)


def data_statistics(cfg: RunConfig) -> tuple[dict | None, str]:
    """(statistics, a note) for the report; None with the reason when they cannot be had here."""
    if not is_local_file(cfg.data.train):
        return None, (f"data: {cfg.data.train} is a hub dataset: not read here; the job logs its samples, "
                      "truncations and rows")
    try:
        lengths, total = training_lengths(cfg)
    except (OSError, ValueError) as exc:   # no tokenizer files here (a config-only model dir, offline)
        return None, f"data: statistics skipped, the tokenizer of {cfg.model.name} is not loadable here ({exc})"[:300]
    if not lengths:
        return None, f"data: no usable rows in {cfg.data.train}"
    note = (f"data: statistics of the first {len(lengths):,} of {total:,} rows" if total > len(lengths)
            else f"data: {cfg.data.train}")
    note += f" (packing {'on' if cfg.data.packing else 'off'}: {'packed' if cfg.data.packing else 'dynamic'} " \
            "padding applies)"
    micro_batch = int(cfg.training.get("per_device_train_batch_size", 8))
    return length_statistics(lengths, cfg.data.max_length, micro_batch), note


def preflight(cfg: RunConfig, *, with_data: bool = False) -> str:
    """The report; raises ConfigError (exit 2) when the run cannot fit the requested GPU type.

    with_data (--dry-run) adds the training data's length statistics: tokenizing is quick, but it
    is the user's data, so it is read only when asked."""
    model_cfg = model_config(cfg)
    if model_cfg is None:
        return (f"# preflight: skipped, the config of {cfg.model.name} is not readable here "
                f"(offline? run jobs/prefetch.py {cfg.source})")
    est = estimate(cfg, model_cfg)
    gpu = cfg.slurm.gpu_type if cfg.slurm.gpus_per_node > 0 else None
    advice = method_advice(model_cfg, gpu, cfg.data.max_length) if gpu else None
    step_time = None
    if gpu:
        step_time = estimate_step_time(
            model_cfg, gpu=gpu, micro_batch=est.micro_batch, seq_len=est.seq_len, method=cfg.model.method,
            gradient_accumulation_steps=int(cfg.training.get("gradient_accumulation_steps", 1)),
            world_size=est.world_size, gradient_checkpointing=est.gradient_checkpointing,
            lora_r=int(cfg.lora.get("r", 8)), lora_target_modules=cfg.lora.get("target_modules") or "all-linear")
    stats, note = data_statistics(cfg) if with_data else (None, "")
    report = format_report(est, gpu, advice=advice, data_stats=stats, step_time=step_time)
    if gpu:
        try:
            check_fits(est, gpu)
        except PreflightError as exc:
            raise ConfigError(f"{cfg.source}: preflight: {exc}") from None
    room = room_warning(cfg, est.n_params, est.n_trainable)   # checkpoints + artifacts vs free space
    if room:
        print(room, file=sys.stderr)   # a warning in every mode: submission prints no report
    return "# preflight\n" + report + (f"\n  {note}" if note else "")
