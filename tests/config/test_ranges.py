"""Ranges: every numeric field of every section has its interval (config/ranges.py), a value just
outside it is refused naming the key, the value and the interval, at load and in a sweep element,
and the value at the edge is accepted."""
from __future__ import annotations

import math
import types
import typing

import pytest

from conftest import SAMPLE_DATA, TINY_CONFIG
from ftlib.config import ConfigError, load_config, with_values
from ftlib.config.fields import _own_hints, lora_hints, quantization_hints, training_hints
from ftlib.config.ranges import RANGES, UNRANGED, Range
from ftlib.config.schema import OWN_SECTIONS


def _numeric(tp) -> bool:
    """int, float, or those with None / a list of them: the values that can be out of range."""
    if tp in (int, float):
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list):
        return any(_numeric(a) for a in args if a is not type(None))
    return False


def all_numeric_keys() -> set[str]:
    sections = {"training": training_hints(), "lora": lora_hints(), "quantization": quantization_hints()}
    sections.update({name: _own_hints(cls) for name, cls in OWN_SECTIONS.items()})
    return {f"{section}.{key}" for section, hints in sections.items() for key, tp in hints.items() if _numeric(tp)}


def test_every_numeric_field_has_a_range():
    keys = all_numeric_keys()
    missing = sorted(keys - set(RANGES) - set(UNRANGED))
    assert not missing, f"numeric fields without a range in ftlib/config/ranges.py: {missing}"
    assert len(keys) > 40          # the field reader sees the HF classes, not just ftlib's sections
    assert not set(RANGES) - keys, f"ranges of fields that do not exist: {sorted(set(RANGES) - keys)}"


def outside(spec: Range) -> list[float]:
    """Values just outside the interval (and not one of its special values)."""
    values = []
    if spec.low != -math.inf:
        values.append(spec.low if spec.low_open else spec.low - 1)
    if spec.high != math.inf:
        values.append(spec.high if spec.high_open else spec.high + 1)
    if spec.steps:
        values.append(1.5)
    return [v for v in values if v not in spec.also]


def _as_override(key: str, value: float) -> str:
    text = str(int(value)) if float(value).is_integer() else repr(value)   # "0" suits int and float fields
    return f"{key}=[{text}]" if key == "lora.layers_to_transform" else f"{key}={text}"


BASE = [f"data.train={SAMPLE_DATA}", "slurm.time=2-00:00:00"]   # long enough for any signal_delay_s


@pytest.mark.parametrize("key", sorted(k for k in RANGES if k != "training.warmup_ratio"))
def test_a_value_outside_the_range_is_refused_with_the_range(key):
    spec = RANGES[key]
    cfg = load_config(TINY_CONFIG, BASE)
    for value in outside(spec):
        with pytest.raises(ConfigError) as caught:
            load_config(TINY_CONFIG, [*BASE, _as_override(key, value)])
        message = str(caught.value)
        assert message.startswith(f"the command line: {key}: ") and "\n" not in message
        assert f"is out of range; valid: {spec.text()}" in message
        # A sweep element is checked against the same table.
        element = [value] if key == "lora.layers_to_transform" else value
        with pytest.raises(ConfigError, match=f"sweep: {key}: .* is out of range"):
            with_values(cfg, {key: element}, where="x.yaml: sweep")


def test_the_range_text_says_what_is_valid():
    assert RANGES["training.learning_rate"].text() == "(0, inf)"
    assert RANGES["lora.lora_dropout"].text() == "[0, 1)"
    assert RANGES["data.max_bad_fraction"].text().startswith("[0, 1]")
    assert RANGES["training.max_steps"].text() == "[1, inf) or -1 (-1: train num_train_epochs)"
    assert RANGES["training.save_steps"].text() == \
        "a whole number of steps >= 1, or a fraction in (0, 1) of all steps"
    assert RANGES["training.save_steps"].contains(0.25) and RANGES["training.save_steps"].contains(40)
    assert not RANGES["training.save_steps"].contains(40.5) and not RANGES["training.learning_rate"].contains(math.nan)


def test_the_older_warmup_ratio_is_checked_under_its_own_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name: builtin:tiny-llama, method: lora}}\ndata: {{train: {SAMPLE_DATA}}}\n"
                    "training: {warmup_ratio: 1.5}\n")
    with pytest.raises(ConfigError, match=r"training.warmup_ratio: 1.5 is out of range; valid: \[0, 1\)"):
        load_config(path)


def test_the_stop_signal_must_come_before_the_time_limit():
    with pytest.raises(ConfigError, match=r"slurm.signal_delay_s: 600 s is not shorter than slurm.time \(00:10:00"):
        load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "slurm.time=00:10:00", "slurm.signal_delay_s=600"])
    assert load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "slurm.time=00:10:00",
                                     "slurm.signal_delay_s=599"]).slurm.signal_delay_s == 599


def test_a_launcher_owned_key_is_refused():
    with pytest.raises(ConfigError, match="training.local_rank is not accepted: the launcher sets it"):
        load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "training.local_rank=0"])
