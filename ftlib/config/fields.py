"""Check one section's keys and values against the fields it mirrors: ftlib's dataclasses, or
transformers' TrainingArguments / BitsAndBytesConfig and peft's LoraConfig (their own names and
types, so the HF docs apply). A wrong key gets the nearest valid name; a wrong value the
expected type or choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from functools import lru_cache
from typing import Any, Literal

from .hint_cache import cached_hints
from .schema import REFUSED, ConfigError


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
    if origin in (typing.Union, types.UnionType):
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
    return cached_hints("training", ("transformers",), _training_hints)


def _training_hints() -> dict[str, Any]:
    from transformers import TrainingArguments
    hints = typing.get_type_hints(TrainingArguments)
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    out = {k: v for k, v in hints.items() if k in names}
    out["overwrite_output_dir"] = bool   # ftlib's meaning: start afresh instead of resuming
    out.update({"evaluation_strategy": out["eval_strategy"], "warmup_ratio": float})
    return out


@lru_cache(maxsize=None)
def lora_hints() -> dict[str, Any]:
    return cached_hints("lora", ("peft",), _lora_hints)


def _lora_hints() -> dict[str, Any]:
    from peft import LoraConfig
    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(LoraConfig) if f.init}


DTYPE_NAMES = ["float32", "bfloat16", "float16", "uint8", "int8"]


@lru_cache(maxsize=None)
def quantization_hints() -> dict[str, Any]:
    return cached_hints("quantization", ("transformers",), _quantization_hints)


def _quantization_hints() -> dict[str, Any]:
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
