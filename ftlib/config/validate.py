"""Validate a loaded config into a RunConfig: every section's fields (fields.py), then the
combinations of individually valid values that cannot work together; and `with_values`, which
sets a few keys of a validated config (a sweep element) checking only what changed.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from ..templates import TEMPLATE_CHOICES
from .fields import (_bad_value, _check_section, _check_value, _own_hints, _suggest, _where, lora_hints,
                     quantization_hints, training_hints)
from .ranges import RANGES, out_of_range
from .schema import OWN_SECTIONS, REFUSED, RENAMED, TOP_LEVEL, ConfigError, RunConfig


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
            problem = out_of_range(old, value)   # checked under the name the user wrote
            if problem:
                raise ConfigError(f"{_where(origins, old, source)}: {old}: {problem}")
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
    _check_name(name, origins, source)
    cfg = RunConfig(name=name, source=source, training=training, lora=lora, quantization=quantization,
                    fresh_start=fresh_start, sweep=sweep, tasks=tasks, notes=notes, **sections, origins=dict(origins))
    _check_consistency(cfg, origins)
    return cfg


def with_values(cfg: RunConfig, values: dict[str, Any], *, where: str) -> RunConfig:
    """A copy of a validated config with some dotted keys set (a sweep or task element).

    Only the keys that change are checked, against the same field types as at load, and then the
    combination as a whole: the config is never turned back into a dict and validated again.
    `where` names the values' origin in errors (e.g. "configs/x.yaml: sweep").
    """
    sections = {name: dataclasses.replace(getattr(cfg, name)) for name in OWN_SECTIONS}
    hf = {"training": (dict(cfg.training), training_hints()), "lora": (dict(cfg.lora), lora_hints()),
          "quantization": (dict(cfg.quantization), quantization_hints())}
    top: dict[str, Any] = {}
    for dotted, value in values.items():
        section, _, key = str(dotted).partition(".")
        if section == "name" and not key:
            top["name"] = value
            continue
        if section in OWN_SECTIONS and key:
            hints = _own_hints(OWN_SECTIONS[section])
            if key not in hints:
                raise ConfigError(f"{where}: {dotted}: unknown key; {_suggest(key, list(hints))}")
            problem = _check_value(value, hints[key])
            if problem:
                raise _bad_value(section, key, value, problem, {}, where)
            setattr(sections[section], key, value)
        elif section in hf and key:
            target, hints = hf[section]
            leaf, *deeper = key.split(".")
            if dotted in REFUSED:
                raise ConfigError(f"{where}: {dotted} is not accepted: {REFUSED[dotted]}")
            if leaf not in hints:
                raise ConfigError(f"{where}: {dotted}: unknown key; {_suggest(leaf, list(hints))}")
            if deeper:   # e.g. training.gradient_checkpointing_kwargs.use_reentrant
                node = target.setdefault(leaf, {})
                for part in deeper[:-1]:
                    node = node.setdefault(part, {})
                node[deeper[-1]] = value
                continue
            problem = _check_value(value, hints[leaf])
            if problem:
                raise _bad_value(section, leaf, value, problem, {}, where)
            if section == "training" and leaf == "overwrite_output_dir":
                top["fresh_start"] = bool(value)
            elif section == "training" and f"training.{leaf}" in RENAMED:
                target[RENAMED[f"training.{leaf}"]] = value
            else:
                target[leaf] = value
        else:
            raise ConfigError(f"{where}: {dotted!r} does not name a config value (section.key, e.g. "
                              "training.learning_rate)")
    for dotted, value in values.items():   # each changed value against its range, named as written
        problem = out_of_range(str(dotted), value)
        if problem:
            raise ConfigError(f"{where}: {dotted}: {problem}")
    new = dataclasses.replace(cfg, **sections, training=hf["training"][0], lora=hf["lora"][0],
                              quantization=hf["quantization"][0], **top)
    _check_name(new.name, {}, where)
    _check_consistency(new, {})
    return new


def _check_name(name: Any, origins: dict, source: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{_where(origins, 'name', source)}: name: {name!r} must be a plain directory "
                          "name (no '/')")


def _check_consistency(cfg: RunConfig, origins: dict) -> None:
    """Combinations of individually valid values that cannot work together."""
    src, t, q = cfg.source, cfg.training, cfg.quantization

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{_where(origins, key, src)}: {key}: {message}")

    _check_ranges(cfg, origins)
    if not cfg.model.name:
        fail("model.name", "is required: a hub id (mistralai/Mistral-7B-v0.1), a local path, "
                           "or builtin:tiny-llama")
    _check_model_source(cfg, origins)
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
    if cfg.container.runtime != "none" and not cfg.container.image:
        fail("container.image", f"container.runtime is {cfg.container.runtime}; set container.image to "
                                "the image path (e.g. /shared/images/ftlib.sif)")
    limit_min = slurm_time_minutes(cfg.slurm.time, f"{_where(origins, 'slurm.time', src)}: slurm.time")
    if cfg.slurm.signal_delay_s >= limit_min * 60:
        fail("slurm.signal_delay_s", f"{cfg.slurm.signal_delay_s} s is not shorter than slurm.time "
                                     f"({cfg.slurm.time}, {limit_min} min): the stop signal would come as soon "
                                     "as the job starts; lower it or raise slurm.time")
    extra_sbatch_options(cfg.slurm.extra_sbatch, f"{_where(origins, 'slurm.extra_sbatch', src)}: slurm.extra_sbatch")
    for backend in cfg.tracking.backends:
        if backend not in ("wandb", "tensorboard", "none"):
            raise _bad_value("tracking", "backends", backend, "one of wandb, tensorboard, none", origins, src)


def _check_ranges(cfg: RunConfig, origins: dict) -> None:
    """Every numeric value against its interval (ranges.RANGES: one table for all sections)."""
    for key in RANGES:
        section, _, leaf = key.partition(".")
        values = getattr(cfg, section)
        value = values.get(leaf) if isinstance(values, dict) else getattr(values, leaf, None)
        problem = out_of_range(key, value)
        if problem:
            raise ConfigError(f"{_where(origins, key, cfg.source)}: {key}: {problem}")


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _check_model_source(cfg: RunConfig, origins: dict) -> None:
    """Remote code runs only from a pinned commit: a branch can change under a running sweep, and
    its code runs as the user on every node. (A builtin name is checked in ftlib.validation.)"""
    name, src = cfg.model.name, cfg.source
    if name.startswith("builtin:"):
        return
    local = name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()
    if cfg.model.trust_remote_code and not local and not _COMMIT.match(str(cfg.model.revision or "")):
        where = _where(origins, "model.trust_remote_code", src)
        raise ConfigError(f"{where}: model.trust_remote_code: true runs Python code from the {name} "
                          f"repository as you; pin model.revision to a commit hash (40 hex digits, from "
                          f"the repository's history), not "
                          f"{repr(cfg.model.revision) if cfg.model.revision else 'the default branch'}")


# ---------------------------------------------------------------------------- Slurm values
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def slurm_time_minutes(value: str | int, source: str = "slurm.time") -> int:
    """Slurm time formats (MM, HH:MM:SS, D-HH:MM:SS, MM:SS) -> whole minutes (rounded up)."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    match = _SLURM_TIME.match(text)
    if not match:
        raise ConfigError(f"{source}: {value!r} is not a Slurm time; use HH:MM:SS, D-HH:MM:SS or minutes")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if match.group(2) is None:  # MM:SS
        hours, minutes, seconds = 0, int(match.group(3)), int(match.group(4))
    total_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_s // 60))


def extra_sbatch_options(lines: list[str], source: str = "slurm.extra_sbatch") -> dict[str, Any]:
    """'#SBATCH --mail-type=END' / '--mail-type=END' / '--exclusive' -> submitit additional_parameters."""
    extra: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        if not text.startswith("--"):
            raise ConfigError(f"{source}: {line!r} must look like '--option=value'")
        key, _, value = text[2:].partition("=")
        extra[key] = value if value else True
    return extra


def print_notes(cfg: RunConfig) -> None:
    for note in cfg.notes:
        print(note, file=sys.stderr)
