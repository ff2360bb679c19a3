"""Every check of a run that needs more than the config file, in one place, before any launch code
runs; --dry-run, --local and a Slurm submission go through the same function.

config.py has already checked names, types and combinations when the file was loaded (and
plan.expand_runs each sweep/task element's values). Here: files that must exist, the distributed
strategy against what is installed, GGUF types against the quantizer of the machine that will
run the export, the container image and launch (Slurm), and the preflight memory fit (Slurm, and
shown by --dry-run). Every refusal is a ConfigError: one line, exit status 2, nothing submitted.

The same checks run in every mode; only what depends on the machine that runs the job differs:
--local refuses GPU-only settings on a CPU-only machine (a login node without GPUs may submit
them), and a containerized Slurm job is checked against its image, not this Python.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import sys

from .config import ConfigError, RunConfig
from .config.secrets import export_from_files, token_files
from .data import check_data_paths
from .distributed import check_strategy
from .export.gguf import check_gguf_types
from .launch.containers import check_container
from .launch.slurm import container_launch
from .model import check_model_available
from .preflight.check import preflight
from .tiny import BUILTIN_MODELS, BUILTIN_PREFIX


def check_run(cfg: RunConfig, *, slurm: bool, dry_run: bool = False, with_data: bool = False) -> str:
    """Raise ConfigError for a run that cannot work; the preflight report when one is made.

    slurm: the run goes to Slurm (its container is checked); else it runs here (--local).
    dry_run: make the preflight report for --dry-run; with_data adds the training data's
    length statistics (tokenizes up to a few thousand rows of the user's data)."""
    check_builtin_name(cfg)
    check_data_paths(cfg.data, cfg.where)
    token_files()                # WANDB_API_KEY_FILE / HF_TOKEN_FILE: private files, or refused
    check_model_available(cfg)   # a hub model/dataset the offline job could not get: refused here, in seconds
    on_host = not slurm or cfg.container.runtime == "none"
    if on_host:   # a container brings its own packages (checked against the image below)
        check_installed(cfg)
    check_strategy(cfg)
    if not slurm:
        check_this_machine(cfg)
    check_library_settings(cfg)
    check_target_modules(cfg)
    if cfg.export.gguf and on_host:
        # Inside a container the image's own llama.cpp quantizer is used (containers/ftlib.def).
        try:
            check_gguf_types(cfg.export.gguf)
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    if slurm:
        try:
            check_container(cfg.container, container_launch(cfg))
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    if slurm or dry_run:
        # Refuses, before the queue, a run that cannot fit the GPU type asked for.
        return preflight(cfg, with_data=with_data)
    # --local: this process is the run; tokens named by *_FILE variables are read now.
    export_from_files()
    return ""


def check_runs(runs: list[RunConfig], *, slurm: bool, dry_run: bool = False) -> list[str]:
    """check_run for every run of a plan; the data statistics are made for the first run only
    (the elements of a sweep share their data)."""
    return [check_run(cfg, slurm=slurm, dry_run=dry_run, with_data=dry_run and i == 0)
            for i, cfg in enumerate(runs)]


def check_builtin_name(cfg: RunConfig) -> None:
    """A typo'd builtin:NAME is refused naming the valid ones, before anything looks for it (a
    hub lookup would blame the network)."""
    name = cfg.model.name
    if name.startswith(BUILTIN_PREFIX) and name[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
        valid = [BUILTIN_PREFIX + k for k in BUILTIN_MODELS]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{cfg.where('model.name')}: model.name: unknown builtin model {name!r}; {hint}valid: "
                          f"{', '.join(valid)}")


# ---------------------------------------------------------------------------- optional packages
DEEPSPEED = ("deepspeed", "pip install -e .[deepspeed]")
# training.optim prefix -> (module, how to install it); transformers imports them only when the
# Trainer builds the optimizer, on every rank, after the model is loaded.
OPTIMIZER_PACKAGES = {
    "adamw_torch_4bit": ("torchao", "pip install torchao"), "adamw_torch_8bit": ("torchao", "pip install torchao"),
    "galore_": ("galore_torch", "pip install galore-torch"), "apollo_": ("apollo_torch", "pip install apollo-torch"),
    "lomo": ("lomo_optim", "pip install lomo-optim"), "adalomo": ("lomo_optim", "pip install lomo-optim"),
    "grokadamw": ("grokadamw", "pip install grokadamw"), "schedule_free_": ("schedulefree", "pip install schedulefree"),
    "stable_adamw": ("optimi", "pip install torch-optimi"),
    "adamw_anyprecision": ("torchdistx", "pip install torchdistx"),
    "adamw_torch_xla": ("torch_xla", "pip install torch-xla (TPUs)"),
    "adamw_torch_npu_fused": ("torch_npu", "pip install torch-npu (Ascend NPUs)"),
}


def installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None   # None: imports of it are blocked
    return importlib.util.find_spec(module) is not None


# bitsandbytes' optimizers (transformers names them so); adamw_torch_8bit is torchao's.
BNB_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "ademamix", "lion_", "paged_", "rmsprop_bnb")


def check_installed(cfg: RunConfig) -> None:
    """Refuse a setting whose optional package is missing here, naming what to install, instead
    of an ImportError from every rank once the model is loaded."""
    t, needs = cfg.training, []
    bnb = ("bitsandbytes", "pip install bitsandbytes")
    for bits in ("4bit", "8bit"):
        if cfg.quantization.get(f"load_in_{bits}"):
            needs.append((f"quantization.load_in_{bits}", f"{bits[0]}-bit quantization", *bnb))
    if str(t.get("optim", "")).startswith(BNB_OPTIMIZERS):
        needs.append(("training.optim", t["optim"], *bnb))
    if cfg.distributed.strategy == "deepspeed" or t.get("deepspeed"):
        key = "distributed.strategy" if cfg.distributed.strategy == "deepspeed" else "training.deepspeed"
        needs.append((key, "DeepSpeed", *DEEPSPEED))
    if t.get("use_liger_kernel"):
        needs.append(("training.use_liger_kernel", "use_liger_kernel=true", "liger_kernel", "pip install liger-kernel"))
    optim = str(t.get("optim", ""))
    for prefix, (module, install) in OPTIMIZER_PACKAGES.items():
        if optim == prefix or (prefix.endswith("_") and optim.startswith(prefix)):
            needs.append(("training.optim", optim, module, install))
    if cfg.model.attn_implementation == "flash_attention_2":
        needs.append(("model.attn_implementation", "flash_attention_2", "flash_attn", "pip install flash-attn"))
    for key, what, module, install in needs:
        if not installed(module):
            raise ConfigError(f"{cfg.where(key)}: {key}: {what} needs the {module} package, not installed "
                              f"in this Python ({sys.executable}); {install}")


# ---------------------------------------------------------------------------- this machine (--local)
CPU_DEBUG = ("training.bf16=false training.fp16=false quantization.bnb_4bit_compute_dtype=float32 "
             "training.optim=adamw_torch")


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def check_this_machine(cfg: RunConfig) -> None:
    """--local runs here: on a machine without CUDA, refuse the GPU-only settings at once, with
    the overrides that make the same config run on the CPU (a Slurm job's node has the GPUs)."""
    t, q = cfg.training, cfg.quantization
    gpu_only = [f"training.{k}=true" for k in ("bf16", "fp16") if t.get(k)]
    if q.get("load_in_4bit") and q.get("bnb_4bit_compute_dtype") in ("bfloat16", "float16"):
        gpu_only.append(f"quantization.bnb_4bit_compute_dtype={q['bnb_4bit_compute_dtype']}")
    if str(t.get("optim", "")).startswith("paged_"):
        gpu_only.append(f"training.optim={t['optim']}")
    if gpu_only and not cuda_available():
        key = gpu_only[0].split("=")[0]
        raise ConfigError(f"{cfg.where(key)}: {key}: --local runs on this machine, which has no CUDA GPU; "
                          f"{', '.join(gpu_only)} need one: add {CPU_DEBUG} (as the CPU debug command in "
                          "configs/mistral.yaml's header does), or submit to Slurm without --local")


# ---------------------------------------------------------------------------- the libraries' own checks
def check_library_settings(cfg: RunConfig) -> None:
    """Build TrainingArguments, LoraConfig and BitsAndBytesConfig from the config as the recipe
    will, so their own refusals (save_steps not a multiple of eval_steps, ...) come now, in every
    mode, instead of after the model is loaded. Device-dependent values (bf16/fp16, DeepSpeed)
    are left out: the job's machine decides those."""
    import tempfile

    from transformers import TrainingArguments

    from .model import bnb_config, lora_config
    values = {"logging_steps": 10, "save_strategy": "steps", "save_steps": 100, "save_total_limit": 3,
              "seed": 42, **cfg.training}
    for key in ("bf16", "fp16", "deepspeed", "fsdp", "fsdp_config"):
        values.pop(key, None)
    with tempfile.TemporaryDirectory() as scratch:   # never created by TrainingArguments; never the run's
        # use_cpu as the recipe sets it: building TrainingArguments sets up accelerate's process
        # state, which a later --local run in this process shares (a CPU state would stick).
        checks = [("training", lambda: TrainingArguments(output_dir=scratch, use_cpu=not cuda_available(),
                                                         report_to="none", **values))]
        if cfg.model.method in ("qlora", "lora"):
            checks.append(("lora", lambda: lora_config(cfg)))
        if cfg.quantization:
            checks.append(("quantization", lambda: bnb_config(cfg.quantization)))
        for section, build in checks:
            try:
                build()
            except (ValueError, TypeError, ImportError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                # Name where the first key the library mentions came from (else the section's file).
                values = getattr(cfg, section)
                named = [k for k in values if k in first]
                where = cfg.where(f"{section}.{named[0]}") if named else cfg.where(section)
                raise ConfigError(f"{where}: {section}: {first}") from None


# ---------------------------------------------------------------------------- lora.target_modules
@functools.lru_cache(maxsize=8)
def model_modules(path: str, revision: str | None,
                  trust_remote_code: bool) -> tuple[tuple[str, str, bool], ...] | None:
    """(module name, class name, adaptable by LoRA) of every module of the model, built on the
    meta device from its config.json: no weights are read or allocated (a 7B model takes about a
    second). None when the config is not readable here."""
    import torch.nn as nn
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # The layer types peft's LoRA wraps (peft.tuners.lora.model dispatches on these).
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return tuple((name, type(module).__name__, isinstance(module, adaptable))
                 for name, module in model.named_modules() if name)


def check_target_modules(cfg: RunConfig) -> None:
    """Each name (or the regex) of lora.target_modules must match a module of the model, by peft's
    own matching: peft silently ignores a typo beside a valid name and trains fewer adapters."""
    target = cfg.lora.get("target_modules")
    if cfg.model.method == "full" or target is None or (isinstance(target, str) and target.lower() == "all-linear"):
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    from .model import lora_config, resolve_model_path
    try:
        path = resolve_model_path(cfg)
    except ConfigError:   # not here (offline, not cached): check_model_available speaks for that
        path = None
    modules = model_modules(path, cfg.model.revision, cfg.model.trust_remote_code) if path else None
    if modules is None:
        print(f"note: lora.target_modules not checked: the config of {cfg.model.name} is not readable here",
              file=sys.stderr)
        return
    base, where = lora_config(cfg), cfg.where("lora.target_modules")
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, _, can in modules if can})
    for item in [target] if isinstance(target, str) else list(target):
        probe = type(base)(**{**cfg.lora, "task_type": base.task_type,
                              "target_modules": item if isinstance(target, str) else [item]})
        # True or a regex match: a hit; False, None or peft's excluded-module marker (falsy): not.
        matched = [(kind, can) for name, kind, can in modules if check_target_module_exists(probe, name)]
        if not matched:
            close = difflib.get_close_matches(str(item), adaptable, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{where}: lora.target_modules: '{item}' matches no module of {cfg.model.name}; "
                              f"{hint}its adaptable modules: {', '.join(adaptable)} (or all-linear)")
        unadaptable = sorted({kind for kind, can in matched if not can})
        if unadaptable:
            raise ConfigError(f"{where}: lora.target_modules: '{item}' matches {', '.join(unadaptable)} "
                              f"modules, which LoRA cannot adapt; its adaptable modules: {', '.join(adaptable)}")
