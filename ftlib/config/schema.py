"""The config's schema: ftlib's own sections as dataclasses, RunConfig (the one typed value that
travels from the command line to the job), and the tables of refused and renamed keys.

Sections that mirror a library's class (`training` = transformers.TrainingArguments, `lora` =
peft.LoraConfig, `quantization` = transformers.BitsAndBytesConfig) stay dicts here, checked
against that class's own fields (fields.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

COMMAND_LINE = "the command line"


class ConfigError(ValueError):
    """A config problem; its message is one line that names the key and the fix."""


# ---------------------------------------------------------------------------- ftlib's own sections
@dataclass
class ModelSection:
    name: str = ""                       # hub id, local path, or builtin:tiny-llama
    revision: str | None = None
    method: Literal["qlora", "lora", "full"] = "qlora"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    # Only transformers' own model classes: "unsloth" was accepted once and silently trained with
    # them, so it is refused now (an unknown choice, naming "hf") until ftlib really drives unsloth.
    backend: Literal["hf"] = "hf"


@dataclass
class DataSection:
    train: str = ""                      # local file (jsonl/json/parquet/csv) or hub dataset id
    eval: str | None = None              # a separate eval file; else validation_split of train
    format: Literal["alpaca", "chat", "completion"] = "alpaca"
    chat_template: str = "tokenizer"     # tokenizer's own, or a named one (templates.py)
    system_prompt: str | None = None
    max_length: int = 1024
    packing: bool = False
    train_on_inputs: bool = False
    validation_split: float = 0.0
    bad_rows: Literal["skip", "fail"] = "skip"
    max_bad_fraction: float = 0.1        # with bad_rows=skip: stop when a larger share of rows is bad
    split: str = "train"                 # split of a hub dataset
    subset: str | None = None            # config name of a hub dataset
    max_samples: int | None = None
    cache_dir: str | None = None         # default: <storage.root>/.cache/data


@dataclass
class ExportSection:
    adapter: bool = True
    merged: bool = True
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gguf: list[str] = field(default_factory=list)   # f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k
    ollama: bool = False
    system_prompt: str | None = None     # Ollama SYSTEM line; default: data.system_prompt
    report: bool = True                  # report.md: base vs fine-tuned on held-out prompts


@dataclass
class SlurmSection:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"               # HH:MM:SS, D-HH:MM:SS or minutes
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_type: str | None = None          # e.g. a100 -> --gpus-per-node=a100:N
    cpus_per_task: int = 8
    mem: str | None = "64G"
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None
    signal_delay_s: int = 120            # USR2 this long before the time limit -> checkpoint + requeue
    max_requeues: int = 3                # requeues at the time limit (USR2) before the job fails
    max_preemptions: int | None = 20     # restarts by Slurm itself (preemption, requeue, node failure); null: no limit
    array_parallelism: int = 8
    extra_sbatch: list[str] = field(default_factory=list)   # extra "#SBATCH ..." option lines
    setup: list[str] = field(default_factory=list)          # shell lines before srun (module load ...)


@dataclass
class ContainerSection:
    runtime: Literal["none", "apptainer", "enroot", "charliecloud"] = "none"
    image: str | None = None
    binds: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN"])


@dataclass
class TrackingSection:
    backends: list[str] = field(default_factory=lambda: ["wandb"])   # wandb, tensorboard, none
    project: str = "ftlib"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["offline", "online"] = "offline"


@dataclass
class StorageSection:
    root: str = "./runs"
    hf_cache: str = "~/.cache/huggingface"
    offline: bool = False                # HF_HUB_OFFLINE=1: compute nodes without internet


@dataclass
class DistributedSection:
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = "auto"
    nproc: int = 1                       # processes for --local runs


@dataclass
class RunConfig:
    name: str
    source: str
    model: ModelSection
    data: DataSection
    training: dict[str, Any]
    lora: dict[str, Any]
    quantization: dict[str, Any]
    export: ExportSection
    slurm: SlurmSection
    container: ContainerSection
    tracking: TrackingSection
    storage: StorageSection
    distributed: DistributedSection
    fresh_start: bool = False            # training.overwrite_output_dir: ignore old checkpoints
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict, repr=False)   # dotted key -> file or command line

    def where(self, key: str) -> str:
        """Where `key`'s value came from (a config file, or the command line), for error messages."""
        if key in self.origins:
            return self.origins[key]
        return next((src for leaf, src in self.origins.items() if leaf.startswith(key + ".")), self.source)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("source", "notes", "origins"):
            out.pop(key)
        out["training"] = dict(self.training, overwrite_output_dir=self.fresh_start)
        out.pop("fresh_start")
        return out

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))

    @property
    def run_root(self) -> Path:
        return Path(os.path.expanduser(self.storage.root)).resolve() / self.name


OWN_SECTIONS = {"model": ModelSection, "data": DataSection, "export": ExportSection,
                "slurm": SlurmSection, "container": ContainerSection,
                "tracking": TrackingSection, "storage": StorageSection,
                "distributed": DistributedSection}
TOP_LEVEL = ["name", "defaults", "training", "lora", "quantization", "sweep", "tasks", *OWN_SECTIONS]

# Keys that ftlib owns in the HF sections, refused with the reason.
REFUSED = {
    "training.output_dir": "the run directory owns it; set storage.root and name instead",
    "training.logging_dir": "the run directory owns it",
    "training.run_name": "set name instead",
    "training.resume_from_checkpoint": "ftlib resumes from the newest complete checkpoint by itself; "
                                       "set training.overwrite_output_dir=true to start afresh",
    "training.hub_token": "secrets travel only in the environment: export HF_TOKEN (or HF_TOKEN_FILE "
                          "naming a 0600 file)",
    "training.use_cpu": "ftlib uses the CPU when no GPU is visible",
    "training.local_rank": "the launcher sets it (torchrun, or Slurm through submitit)",
    "lora.base_model_name_or_path": "set model.name instead",
}
# Older names used by many guides -> the current TrainingArguments name (accepted with a note).
RENAMED = {"training.evaluation_strategy": "eval_strategy", "training.warmup_ratio": "warmup_steps",
           "training.gradient_checkpointing": "activation_checkpointing",
           "training.gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
