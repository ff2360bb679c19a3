"""The valid range of every numeric value of the config, in one table.

fields.py has checked each value's type (an int, a float, null where allowed); here each value
is checked against its interval, and a refusal names the key, the value and the interval, so
the fix is in the message. tests/config/test_ranges.py checks that every int/float field of
every section has an entry here (or is listed in UNRANGED with the reason), so a new field
cannot slip past without one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INF = math.inf


@dataclass(frozen=True)
class Range:
    """An interval of numbers; `low_open`/`high_open` exclude the bound itself."""

    low: float = -INF
    high: float = INF
    low_open: bool = False
    high_open: bool = False
    also: tuple[Any, ...] = ()   # special values accepted outside the interval (-1 = "unset")
    steps: bool = False          # Trainer step counts: a whole number, or a fraction < 1 of all steps
    meaning: str = ""

    def contains(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if self.steps and value >= 1 and not float(value).is_integer():
            return False
        return above and below

    def text(self) -> str:
        if self.steps:
            low = "0" if self.low == 0 else _number(self.low)
            text = (f"a whole number of steps >= 1, or a fraction in ({low}, 1) of all steps" if self.low_open
                    else f"a whole number of steps >= 0, or a fraction in [{low}, 1) of all steps")
        else:
            text = (("(" if self.low_open else "[") + _number(self.low) + ", " + _number(self.high)
                    + (")" if self.high_open or self.high == INF else "]"))
        if self.also:
            text += " or " + " or ".join(repr(v) for v in self.also)
        return text + (f" ({self.meaning})" if self.meaning else "")


def _number(value: float) -> str:
    if value in (INF, -INF):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if float(value).is_integer() else repr(value)


def at_least(low: float, meaning: str = "", **kw: Any) -> Range:
    return Range(low=low, meaning=meaning, **kw)


def positive(meaning: str = "", **kw: Any) -> Range:
    return Range(low=0, low_open=True, meaning=meaning, **kw)


def fraction(meaning: str = "", closed: bool = False) -> Range:
    """[0, 1), or [0, 1] when `closed`."""
    return Range(low=0, high=1, high_open=not closed, meaning=meaning)


STEPS = Range(low=0, low_open=True, steps=True)
SEED = Range(low=0, high=2**32 - 1, meaning="numpy seeds are 32-bit")

RANGES: dict[str, Range] = {
    # transformers.TrainingArguments
    "training.per_device_train_batch_size": at_least(1),
    "training.per_device_eval_batch_size": at_least(1),
    "training.gradient_accumulation_steps": at_least(1),
    "training.num_train_epochs": positive(),
    "training.max_steps": at_least(1, also=(-1,), meaning="-1: train num_train_epochs"),
    "training.learning_rate": positive(),
    "training.warmup_steps": Range(low=0, steps=True),
    "training.warmup_ratio": fraction(),
    "training.weight_decay": at_least(0),
    "training.adam_beta1": fraction(),
    "training.adam_beta2": fraction(),
    "training.adam_epsilon": positive(),
    "training.max_grad_norm": positive(),
    "training.label_smoothing_factor": fraction(),
    "training.neftune_noise_alpha": positive(),
    "training.torch_empty_cache_steps": at_least(1),
    "training.logging_steps": STEPS,
    "training.save_steps": STEPS,
    "training.eval_steps": STEPS,
    "training.eval_delay": at_least(0),
    "training.eval_accumulation_steps": at_least(1),
    "training.save_total_limit": at_least(1),
    "training.seed": SEED,
    "training.data_seed": SEED,
    "training.dataloader_num_workers": at_least(0),
    "training.dataloader_prefetch_factor": at_least(1),
    "training.ddp_bucket_cap_mb": at_least(1),
    "training.ddp_timeout": at_least(1, meaning="seconds"),
    # peft.LoraConfig
    "lora.r": at_least(1),
    "lora.lora_alpha": positive(),
    "lora.lora_dropout": fraction(),
    "lora.qalora_group_size": at_least(1),
    "lora.layers_to_transform": at_least(0, meaning="layer indices"),
    # transformers.BitsAndBytesConfig
    "quantization.llm_int8_threshold": positive(),
    # ftlib's own sections
    "data.max_length": at_least(1, meaning="tokens"),
    "data.validation_split": fraction(),
    "data.max_samples": at_least(1),
    "data.max_bad_fraction": fraction(closed=True, meaning="the share of rows that may be dropped as bad"),
    "slurm.nodes": at_least(1),
    "slurm.gpus_per_node": at_least(0, meaning="0: a CPU-only partition"),
    "slurm.cpus_per_task": at_least(1),
    "slurm.signal_delay_s": at_least(0, meaning="seconds"),
    "slurm.max_requeues": at_least(0),
    "slurm.max_preemptions": at_least(0, meaning="null: no limit"),
    "slurm.array_parallelism": at_least(1),
    "distributed.nproc": at_least(1),
}

# Numeric fields with no range here, and why (the completeness test reads this).
UNRANGED: dict[str, str] = {
    "training.local_rank": "refused: the launcher sets it (schema.REFUSED)",
    "lora.trainable_token_indices": "token ids of the model's vocabulary, checked by peft against it",
    "lora.alora_invocation_tokens": "token ids of the model's vocabulary, checked by peft against it",
    "lora.layer_replication": "layer index ranges, checked by peft against the model",
}


def out_of_range(key: str, value: Any) -> str | None:
    """None when `value` of dotted `key` is inside its range (or has none), else the message tail."""
    spec = RANGES.get(key)
    if spec is None or value is None or isinstance(value, bool):
        return None
    is_list = isinstance(value, (list, tuple))   # e.g. lora.layers_to_transform: each item
    for item in (value if is_list else [value]):
        if isinstance(item, (int, float)) and not isinstance(item, bool) and not spec.contains(item):
            shown = f"{item!r} (in {list(value)!r})" if is_list else repr(item)
            return f"{shown} is out of range; valid: {spec.text()}"
    return None
