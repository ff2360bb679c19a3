"""Config: load YAML (with `defaults:` inheritance), apply `key=value` overrides, validate -> RunConfig.

Sections that mirror a library's class (`training` = transformers.TrainingArguments, `lora` =
peft.LoraConfig, `quantization` = transformers.BitsAndBytesConfig) are checked against that
class's own fields, so users write the names they know from the HF docs. ftlib's own sections are
dataclasses below. Every error is one line naming the file (or the command line), the key, and the
fix; the CLI turns a ConfigError into exit status 2 before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import sys
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .templates import TEMPLATE_CHOICES

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
    backend: Literal["hf", "unsloth"] = "hf"


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
    max_requeues: int = 3
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

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("source", "notes"):
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
    "training.hub_token": "secrets travel only in the environment: export HF_TOKEN",
    "training.use_cpu": "ftlib uses the CPU when no GPU is visible",
    "lora.base_model_name_or_path": "set model.name instead",
}
# Older names used by many guides -> the current TrainingArguments name (accepted with a note).
RENAMED = {"training.evaluation_strategy": "eval_strategy", "training.warmup_ratio": "warmup_steps"}


# ---------------------------------------------------------------------------- loading
def _leaf_origins(node: Any, source: str, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaf_origins(value, source, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): source}
    return {prefix.rstrip("."): source}


def _load_yaml(path: Path, origins: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        where = f" (inherited by {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: config file not found{where}; check the path")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: defaults inherit in a cycle; remove it from defaults")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as exc:  # YAML syntax errors carry a multi-line message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    merged: dict = {}
    for parent in data.pop("defaults", None) or []:
        parent_path = (path.parent / str(parent)).resolve()
        if not parent_path.suffix:
            parent_path = parent_path.with_suffix(".yaml")
        merged = _merge(merged, _load_yaml(parent_path, origins, (*seen, path.resolve())))
    origins.update(_leaf_origins(data, str(path)))
    return _merge(merged, data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("sweep", "tasks"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Load, inherit, override, resolve and validate a run config."""
    path = Path(path)
    origins: dict[str, str] = {}
    data = _load_yaml(path, origins)
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not key=value "
                              "(e.g. training.learning_rate=1e-4)")
    try:
        cli = OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{COMMAND_LINE}: bad override: {str(exc).splitlines()[0]}") from None
    origins.update(_leaf_origins(cli, COMMAND_LINE))
    data = _merge(data, cli)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: cannot resolve an interpolation: {str(exc).splitlines()[0]}") from None
    return validate(resolved, source=str(path), origins=origins)


# ---------------------------------------------------------------------------- validation
def _where(origins: dict[str, str], key: str, default: str) -> str:
    if key in origins:
        return origins[key]
    for leaf, source in origins.items():
        if leaf.startswith(key + "."):
            return source
    return default


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
    # A key that starts a valid name is a strong hint too (slurm.gpus -> gpus_per_node).
    close += [name for name in valid if name.startswith(key) and name not in close][:1]
    if close:
        return "did you mean " + " or ".join(f"'{name}'" for name in close) + "?"
    return f"valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any) -> str | None:
    """None when `value` fits annotation `tp`, else a short description of what was expected."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None:
            return None if type(None) in args else "a value (not null)"
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            choices = [m.value for e in enums for m in e]
            return None if value in choices else f"one of {', '.join(map(str, choices))}"
        problems = [_check_value(value, a) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p)
    if origin is Literal:
        choices = typing.get_args(tp)
        return None if value in choices else f"one of {', '.join(map(str, choices))}"
    if origin in (list, tuple, typing.List):
        if not isinstance(value, (list, tuple)):
            return "a list"
        inner = typing.get_args(tp)
        if inner and inner[0] is not Ellipsis:
            for item in value:
                problem = _check_value(item, inner[0])
                if problem:
                    return f"a list of {problem}"
        return None
    if origin is dict or tp is dict:
        return None if isinstance(value, dict) else "a mapping"
    if value is None:
        return "a value (not null)"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        return None if value in choices else f"one of {', '.join(map(str, choices))}"
    return None  # a class we do not model: let the library judge it


def _bad_value(section: str, key: str, value: Any, expected: str, origins: dict, source: str) -> ConfigError:
    where = _where(origins, f"{section}.{key}", source)
    hint = ""
    if isinstance(value, str) and expected.startswith("one of "):
        close = difflib.get_close_matches(value, [c.strip() for c in expected[7:].split(",")], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: {section}.{key}: {value!r} is not valid: expected {expected}{hint}")


def _check_section(section: str, values: Any, hints: dict[str, Any], origins: dict, source: str,
                   required: tuple[str, ...] = ()) -> dict[str, Any]:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{_where(origins, section, source)}: {section}: expected a mapping of keys, "
                          f"got {values!r}")
    for key, value in values.items():
        full = f"{section}.{key}"
        if full in REFUSED:
            raise ConfigError(f"{_where(origins, full, source)}: {full} is not accepted: {REFUSED[full]}")
        if key not in hints:
            raise ConfigError(f"{_where(origins, full, source)}: {full}: unknown key; "
                              f"{_suggest(key, list(hints))}")
        if value is False and _check_value(False, hints[key]) and not _check_value("no", hints[key]):
            # YAML reads a bare `no` as false: `eval_strategy: no` means the string "no".
            values[key] = value = "no"
        problem = _check_value(value, hints[key])
        if problem:
            raise _bad_value(section, key, value, problem, origins, source)
    for key in required:
        if not values.get(key):
            raise ConfigError(f"{source}: {section}.{key} is required; set it in the config or "
                              f"as {section}.{key}=... on the command line")
    return values


@lru_cache(maxsize=None)
def training_hints() -> dict[str, Any]:
    from transformers import TrainingArguments
    hints = typing.get_type_hints(TrainingArguments)
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    out = {k: v for k, v in hints.items() if k in names}
    out["overwrite_output_dir"] = bool   # ftlib's meaning: start afresh instead of resuming
    out.update({"evaluation_strategy": out["eval_strategy"], "warmup_ratio": float})
    return out


@lru_cache(maxsize=None)
def lora_hints() -> dict[str, Any]:
    from peft import LoraConfig
    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(LoraConfig) if f.init}


DTYPE_NAMES = ["float32", "bfloat16", "float16", "uint8", "int8"]


@lru_cache(maxsize=None)
def quantization_hints() -> dict[str, Any]:
    import inspect
    from transformers import BitsAndBytesConfig
    known = {"load_in_8bit": bool, "load_in_4bit": bool, "llm_int8_threshold": float,
             "llm_int8_skip_modules": list[str] | None, "llm_int8_enable_fp32_cpu_offload": bool,
             "llm_int8_has_fp16_weight": bool,
             "bnb_4bit_compute_dtype": Literal["float32", "bfloat16", "float16"] | None,
             "bnb_4bit_quant_type": Literal["fp4", "nf4"], "bnb_4bit_use_double_quant": bool,
             "bnb_4bit_quant_storage": Literal[tuple(DTYPE_NAMES)] | None}
    params = inspect.signature(BitsAndBytesConfig.__init__).parameters
    return {name: known.get(name, Any) for name in params if name not in ("self", "kwargs")}


def _own_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def validate(data: dict[str, Any], source: str = "<config>", origins: dict | None = None) -> RunConfig:
    origins = origins or {}
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{_where(origins, key, source)}: {key}: unknown section; "
                              f"{_suggest(key, TOP_LEVEL)}")
    notes: list[str] = []
    sections: dict[str, Any] = {}
    for name, cls in OWN_SECTIONS.items():
        values = _check_section(name, data.get(name), _own_hints(cls), origins, source)
        sections[name] = cls(**values)

    training = dict(_check_section("training", data.get("training"), training_hints(), origins, source))
    for old, new in RENAMED.items():
        key = old.split(".", 1)[1]
        if key in training:
            if new in training:
                raise ConfigError(f"{_where(origins, old, source)}: {old} and training.{new} are both set; "
                                  f"keep training.{new}")
            value = training.pop(key)
            if key == "warmup_ratio" and not 0 <= value < 1:
                raise ConfigError(f"{_where(origins, old, source)}: {old}: {value} must be in [0, 1)")
            training[new] = value
            notes.append(f"note: {old} is the older name; transformers now calls it training.{new} "
                         f"(set to {value!r})")
    fresh_start = bool(training.pop("overwrite_output_dir", False))
    lora = _check_section("lora", data.get("lora"), lora_hints(), origins, source)
    quantization = _check_section("quantization", data.get("quantization"), quantization_hints(), origins,
                                  source)
    sweep = data.get("sweep") or {}
    tasks = data.get("tasks") or {}
    name = data.get("name") or Path(source).stem
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{_where(origins, 'name', source)}: name: {name!r} must be a plain directory "
                          "name (no '/')")
    cfg = RunConfig(name=name, source=source, training=training, lora=lora, quantization=quantization,
                    fresh_start=fresh_start, sweep=sweep, tasks=tasks, notes=notes, **sections)
    _check_consistency(cfg, origins)
    return cfg


def _check_consistency(cfg: RunConfig, origins: dict) -> None:
    """Combinations of individually valid values that cannot work together."""
    src, t, q = cfg.source, cfg.training, cfg.quantization

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{_where(origins, key, src)}: {key}: {message}")

    if not cfg.model.name:
        fail("model.name", "is required: a hub id (mistralai/Mistral-7B-v0.1), a local path, "
                           "or builtin:tiny-llama")
    if not cfg.data.train:
        fail("data.train", "is required: a JSONL/JSON/Parquet/CSV file or a hub dataset id")
    if cfg.data.chat_template not in TEMPLATE_CHOICES:
        raise _bad_value("data", "chat_template", cfg.data.chat_template,
                         f"one of {', '.join(TEMPLATE_CHOICES)}", origins, src)
    if t.get("fp16") and t.get("bf16"):
        fail("training.fp16", "fp16 and bf16 are both true; keep one (bf16 on Ampere or newer GPUs)")
    if q.get("load_in_4bit") and q.get("load_in_8bit"):
        fail("quantization.load_in_8bit", "load_in_4bit and load_in_8bit are both true; keep one")
    quantized = q.get("load_in_4bit") or q.get("load_in_8bit")
    if cfg.model.method == "qlora" and not quantized:
        fail("model.method", "qlora needs quantization.load_in_4bit: true (or load_in_8bit); "
                             "or set model.method=lora")
    if cfg.model.method != "qlora" and quantized:
        fail("quantization.load_in_4bit", f"model.method is {cfg.model.method}, which trains an "
                                          "unquantized base; set model.method=qlora or drop quantization")
    if cfg.model.method == "full" and cfg.lora:
        fail("lora", "model.method is full, which trains every weight without LoRA; remove the lora "
                     "section or set model.method=lora")
    if not 0 <= cfg.data.validation_split < 1:
        fail("data.validation_split", f"{cfg.data.validation_split} must be in [0, 1)")
    has_eval = bool(cfg.data.eval) or cfg.data.validation_split > 0
    if t.get("eval_strategy", "no") != "no" and not has_eval:
        fail("training.eval_strategy", "evaluation needs data: set data.eval to a file or "
                                       "data.validation_split (e.g. 0.1)")
    if t.get("load_best_model_at_end"):
        if t.get("eval_strategy", "no") == "no":
            fail("training.load_best_model_at_end", "needs training.eval_strategy (steps or epoch)")
        if t.get("eval_strategy") != t.get("save_strategy", "steps"):
            fail("training.load_best_model_at_end", "needs training.save_strategy equal to "
                                                    "training.eval_strategy")
    if t.get("max_steps", -1) in (None, 0):
        fail("training.max_steps", "must be positive, or -1 to train num_train_epochs")
    for key in ("max_length",):
        if getattr(cfg.data, key) <= 0:
            fail(f"data.{key}", "must be positive")
    if cfg.distributed.nproc < 1:
        fail("distributed.nproc", "must be at least 1")
    if cfg.container.runtime != "none" and not cfg.container.image:
        fail("container.image", f"container.runtime is {cfg.container.runtime}; set container.image to "
                                "the image path (e.g. /shared/images/ftlib.sif)")
    for backend in cfg.tracking.backends:
        if backend not in ("wandb", "tensorboard", "none"):
            raise _bad_value("tracking", "backends", backend, "one of wandb, tensorboard, none", origins, src)


def print_notes(cfg: RunConfig) -> None:
    for note in cfg.notes:
        print(note, file=sys.stderr)
