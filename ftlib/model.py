"""Model: tokenizer, base model (hub id, local path or builtin tiny), quantization, LoRA, merge."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .data import is_local_file
from .hub_cache import CacheMiss, HubRepo, cached_snapshot, hub_unreachable, snapshot_problem
from .templates import NAMED_TEMPLATES
from .tiny import BUILTIN_MODELS, BUILTIN_PREFIX, ensure_builtin


def hf_cache_dir(cfg: RunConfig) -> Path:
    """storage.hf_cache: where hub models and datasets are read and downloaded, in every mode."""
    path = Path(os.path.expanduser(cfg.storage.hf_cache))
    if not path.is_absolute() and os.environ.get("SLURM_SUBMIT_DIR"):
        # Relative to where the user submitted (as the sbatch script's HF_HOME is): a job runs
        # elsewhere (in a container: in the run directory).
        return Path(os.environ["SLURM_SUBMIT_DIR"]) / path
    return path


def is_hub_model(name: str) -> bool:
    """A hub id (ORG/NAME), not a builtin, a local path or an existing directory."""
    return not (name.startswith(BUILTIN_PREFIX) or name.startswith((".", "/", "~"))
                or Path(name).expanduser().is_dir())


def resolve_model_path(cfg: RunConfig) -> str:
    """A local directory or a hub id that from_pretrained understands.

    A hub id becomes its snapshot in the shared cache when the run is offline (storage.offline)
    or the Hub cannot be reached, so that no library call retries a dead network."""
    name = cfg.model.name
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):]
        if key not in BUILTIN_MODELS:
            raise ConfigError(f"{cfg.source}: model.name: unknown builtin model '{key}'; valid: "
                              f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
        return str(ensure_builtin(key, hf_cache_dir(cfg)))
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise ConfigError(f"{cfg.source}: model.name: local model directory not found: {name}")
    if path.is_dir():
        return str(path)
    offline = offline_reason(cfg)
    if offline:
        return str(cached_model(cfg, offline))
    return name


def hub_cache_dir(cfg: RunConfig) -> Path:
    return hf_cache_dir(cfg) / "hub"


def offline_reason(cfg: RunConfig) -> str | None:
    """Why a run must read the hub from the cache only (storage.offline, no network), or None."""
    if cfg.storage.offline:
        return "storage.offline is true"
    return hub_unreachable()


def hub_repos(cfg: RunConfig) -> list[HubRepo]:
    """The repositories this run needs from the Hub: its model and its hub datasets, if any."""
    repos = []
    if is_hub_model(cfg.model.name):
        repos.append(HubRepo(cfg.model.name, "model", cfg.model.revision, "model.name"))
    for key in ("train", "eval"):
        spec = getattr(cfg.data, key)
        # As data.read_rows decides: a file by its suffix, a directory saved by datasets, else a hub id.
        if spec and not is_local_file(spec) and not Path(spec).expanduser().exists():
            repos.append(HubRepo(spec, "dataset", None, f"data.{key}"))
    return repos


def _missing_message(cfg: RunConfig, repo: HubRepo, problem: str, offline: str) -> str:
    return (f"{cfg.where(repo.key)}: {repo.key}: {repo.repo_id} {problem}, and this run cannot download it "
            f"({offline}); on a machine with internet run `python jobs/prefetch.py {cfg.source}` "
            "(with the same key=value overrides)")


def cached_model(cfg: RunConfig, offline: str) -> Path:
    """The local snapshot of the run's hub model, or a ConfigError naming what is missing."""
    repo = HubRepo(cfg.model.name, "model", cfg.model.revision, "model.name")
    try:
        return cached_snapshot(repo, hub_cache_dir(cfg))
    except CacheMiss as exc:
        raise ConfigError(_missing_message(cfg, repo, str(exc), offline)) from None


def check_model_available(cfg: RunConfig) -> None:
    """Refuse, before anything is queued or loaded, a run whose hub model or hub dataset the job
    could not get: not in the cache while the run is offline or the Hub is unreachable. Online
    runs download as usual; a run without hub repositories costs nothing here."""
    repos = hub_repos(cfg)
    if not repos:
        return
    offline = offline_reason(cfg)
    if not offline:
        return
    for repo in repos:
        problem = snapshot_problem(repo, hub_cache_dir(cfg))
        if problem:
            raise ConfigError(_missing_message(cfg, repo, problem, offline))


def torch_dtype(name: str | None):
    import torch
    if name in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPUs here lack bf16 units: fp32 is ~6x faster (FIELD-NOTES)
    return getattr(torch, name)


def load_tokenizer(cfg: RunConfig, path: str):
    from transformers import AutoTokenizer
    # cache_dir: a hub id downloads into storage.hf_cache, where the job and prefetch look,
    # whatever this process's HF_HOME (a --local run's may differ; the sbatch script sets it).
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision, cache_dir=str(hub_cache_dir(cfg)),
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding never carries loss (labels -100, attention mask 0), so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if cfg.data.chat_template in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[cfg.data.chat_template]
    elif cfg.data.format != "completion" and not tokenizer.chat_template:
        raise ConfigError(f"{cfg.source}: data.chat_template: the tokenizer of {cfg.model.name} has no "
                          f"chat template; set data.chat_template to one of {', '.join(NAMED_TEMPLATES)}")
    return tokenizer


def bnb_config(quantization: dict[str, Any]):
    from transformers import BitsAndBytesConfig
    values = dict(quantization)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if values.get(key):
            values[key] = torch_dtype(values[key])
    return BitsAndBytesConfig(**values)


def device_map(local_rank: int = 0) -> dict[str, Any] | None:
    import torch
    return {"": local_rank} if torch.cuda.is_available() else None


def load_base_model(cfg: RunConfig, path: str, *, quantized: bool, dtype=None, local_rank: int = 0):
    from transformers import AutoModelForCausalLM
    kwargs: dict[str, Any] = {"revision": cfg.model.revision, "trust_remote_code": cfg.model.trust_remote_code,
                              "dtype": dtype or torch_dtype(cfg.model.dtype), "cache_dir": str(hub_cache_dir(cfg))}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if quantized and cfg.quantization:
        kwargs["quantization_config"] = bnb_config(cfg.quantization)
        kwargs["device_map"] = device_map(local_rank)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantized:
        keep_one_cpu_4bit_path(model)
    return model


def keep_one_cpu_4bit_path(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on the first no-grad forward on CPU.

    bitsandbytes 0.50 converts Linear4bit weights to a CPU-packed format the first time a layer
    runs in eval mode without grad (an evaluation), and every later forward, training included,
    uses it; its results differ by ~3e-2 in the logits. Evaluation would then change training
    numerics, and a resumed run (not yet evaluated) would diverge from an uninterrupted one.
    Returns how many layers were pinned.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    pinned = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            pinned += 1
    return pinned


def lora_config(cfg: RunConfig):
    from peft import LoraConfig
    values = {"task_type": "CAUSAL_LM", **cfg.lora}
    return LoraConfig(**values)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def build_training_model(cfg: RunConfig, path: str, *, local_rank: int = 0, log=print):
    """The base model prepared for training: quantized + LoRA, LoRA, or all weights."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    method = cfg.model.method
    model = load_base_model(cfg, path, quantized=method == "qlora", local_rank=local_rank)
    # A KV cache is useless in training and, when present, stops transformers from building the
    # block-diagonal mask that packed rows need.
    model.config.use_cache = False
    checkpointing = bool(cfg.training.get("activation_checkpointing"))
    if method == "qlora":
        # The Trainer turns activation checkpointing on (training.activation_checkpointing);
        # peft's switch would call transformers' deprecated gradient_checkpointing_enable.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("qlora", "lora"):
        if checkpointing and method == "lora":
            model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(cfg))
    trainable, total = count_parameters(model)
    log(f"model: {cfg.model.name} ({method}), trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / max(total, 1):.3f}%)")
    return model


def merge_adapter(cfg: RunConfig, base_path: str, adapter_dir: Path, dtype=None):
    """The base re-loaded at full/half precision with the adapter merged in.

    Never merged into 4-bit weights: that is lossy (FIELD-NOTES); the merged model is what GGUF
    exports and Ollama serve.
    """
    from peft import PeftModel
    try:  # after ZeRO-3 training, from_pretrained would partition the base across ranks (a
        # collective the other ranks, done, never join): the merge runs on rank 0 alone.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    except ImportError:
        pass
    base = load_base_model(cfg, base_path, quantized=False, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
