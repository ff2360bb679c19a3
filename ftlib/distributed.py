"""Distribution: this process's rank, the collectives ftlib needs, DDP / DeepSpeed ZeRO / FSDP
settings for the HF Trainer, and per-rank evidence.

Rank, world size and the rendezvous come from the launcher (torchrun locally, the Slurm
allocation through submitit on a cluster: launch/job.py); this module reads them and decides how
the Trainer shards. Combinations that cannot work are refused with the reason before any work.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .storage import atomic_write_json

# ---------------------------------------------------------------------------- ranks
def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True when any process has the flag: ranks must stop at the same step or they deadlock."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ---------------------------------------------------------------------------- strategies
PRESETS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
PRESET_NAMES = ("zero2", "zero3", "zero3_offload")


def deepspeed_config(value: Any, source: str = "<config>") -> dict[str, Any] | None:
    """training.deepspeed as a dict: a preset name (zero2, zero3, zero3_offload), a JSON path, or a dict."""
    if value in (None, "", False):
        return None
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = PRESETS / f"{value}.json" if value in PRESET_NAMES else Path(os.path.expanduser(str(value)))
    if not path.is_file():
        raise ConfigError(f"{source}: training.deepspeed: {value!r} is neither a preset "
                          f"({', '.join(PRESET_NAMES)}) nor a DeepSpeed JSON file")
    return json.loads(path.read_text())


def zero_stage(ds: dict[str, Any] | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def check_strategy(cfg: RunConfig) -> None:
    """Refuse what cannot work, before submission (called from config validation)."""
    strategy, ds_value = cfg.distributed.strategy, cfg.training.get("deepspeed")
    ds = deepspeed_config(ds_value, cfg.source)
    if ds is not None and strategy in ("ddp", "fsdp"):
        raise ConfigError(f"{cfg.source}: training.deepspeed is set but distributed.strategy={strategy}; "
                          "set distributed.strategy=deepspeed or remove training.deepspeed")
    if strategy == "fsdp" and cfg.slurm.gpus_per_node == 0 and not _cuda():
        raise ConfigError(f"{cfg.source}: distributed.strategy: fsdp needs GPUs (on CPU accelerate "
                          "silently falls back to DDP); use ddp or deepspeed on CPU")
    if strategy == "fsdp" and str(cfg.training.get("optim", "")).startswith("paged_"):
        raise ConfigError(f"{cfg.source}: training.optim: {cfg.training['optim']} keeps unsharded paged "
                          "states, which FSDP cannot shard; use adamw_torch with fsdp")
    if ds is not None and str(cfg.training.get("optim", "")).endswith("8bit") and zero_stage(ds) >= 2:
        raise ConfigError(f"{cfg.source}: training.optim: bitsandbytes 8-bit optimizers do not work with "
                          f"DeepSpeed ZeRO-{zero_stage(ds)} partitioning; use adamw_torch")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def prepare(cfg: RunConfig, log=print) -> RunConfig:
    """The config as the Trainer needs it for the chosen strategy (a copy; the user's is unchanged)."""
    cfg = copy.deepcopy(cfg)
    strategy = cfg.distributed.strategy
    ds = deepspeed_config(cfg.training.get("deepspeed"), cfg.source)
    if strategy == "deepspeed" and ds is None:
        ds = deepspeed_config("zero2")
        log("distributed: strategy deepspeed without training.deepspeed; using the zero2 preset")
    if ds is not None:
        cfg.training["deepspeed"] = ds
    sharded_params = zero_stage(ds) == 3 or strategy == "fsdp"
    if sharded_params and cfg.model.method == "qlora":
        # ZeRO-3 and FSDP flatten parameters of one dtype: 4-bit weights must be stored in the
        # compute dtype (packed), or they cannot be sharded with the rest.
        compute = cfg.quantization.get("bnb_4bit_compute_dtype") or "bfloat16"
        if cfg.quantization.get("bnb_4bit_quant_storage") != compute:
            cfg.quantization["bnb_4bit_quant_storage"] = compute
            log(f"distributed: QLoRA with sharded parameters: bnb_4bit_quant_storage set to {compute}")
    if strategy == "fsdp":
        cfg.training.setdefault("fsdp", "full_shard auto_wrap")
        cfg.training.setdefault("fsdp_config", {"use_orig_params": True, "cpu_ram_efficient_loading": True,
                                                "sync_module_states": True})
    return cfg


def _trainable_checksum(model, stage: int) -> tuple[str, int]:
    """sha256 over the full trainable tensors (gathered under ZeRO-3) and their element count."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return _digest(params)
    return _digest(params)


def _digest(params) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    for name, p in sorted(params, key=lambda item: item[0]):
        data = p.detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        total += data.numel()
    return digest.hexdigest(), total


def write_rank_report(trainer, run_root: Path) -> dict[str, Any]:
    """Per-rank evidence of how training was distributed (read by tests and by a curious user)."""
    import torch.distributed as dist
    args = trainer.args
    ds = args.deepspeed if isinstance(args.deepspeed, dict) else None
    stage = zero_stage(getattr(trainer.accelerator.state, "deepspeed_plugin", None) and
                       trainer.accelerator.state.deepspeed_plugin.deepspeed_config or ds)
    model = trainer.model_wrapped
    inner = trainer.model
    local_numel = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    checksum, full_numel = _trainable_checksum(inner, stage)
    report = {"rank": args.process_index, "world_size": args.world_size,
              "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
              "wrapper": type(model).__name__, "zero_stage": stage,
              "trainable_local_numel": local_numel, "trainable_full_numel": full_numel,
              "trainable_sha256": checksum}
    atomic_write_json(run_root / "distributed" / f"rank-{args.process_index}.json", report)
    return report
