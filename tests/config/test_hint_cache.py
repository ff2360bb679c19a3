"""The cached field tables judge every value as the live ones do, and a warm cache spares the
heavy imports (the ~6 s before a misspelt key or a missing model can be reported)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CONFIG
from ftlib.config import fields, hint_cache

# Values of every kind a YAML file can hold, including wrong ones.
PROBES = [None, True, False, 0, 3, -1, 0.5, 1e-4, "", "no", "steps", "epoch", "linear", "cosine", "adamw_torch",
          "paged_adamw_8bit", "nf4", "fp4", "bfloat16", "float32", "all-linear", "q_proj", "none", "auto",
          ["q_proj", "v_proj"], [1, 2], ["a", 3], [], {"a": 1}, {}, "wandb", ["wandb", "tensorboard"]]

TABLES = {"training": fields._training_hints, "lora": fields._lora_hints,
          "quantization": fields._quantization_hints}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_table_read_back_from_json_judges_every_value_as_the_live_table(name):
    live = TABLES[name]()
    spec = json.loads(json.dumps({key: hint_cache.to_spec(tp) for key, tp in live.items()}))
    rebuilt = {key: hint_cache.from_spec(s) for key, s in spec.items()}
    assert rebuilt.keys() == live.keys()
    differ = [(key, value, fields._check_value(value, live[key]), fields._check_value(value, rebuilt[key]))
              for key in live for value in PROBES
              if fields._check_value(value, live[key]) != fields._check_value(value, rebuilt[key])]
    assert differ == []
    # the table has the choices that make errors useful (not everything turned into "any")
    judged = sum(fields._check_value("not-a-choice-xyz", tp) is not None for tp in rebuilt.values())
    assert judged > len(rebuilt) // 4, judged


def test_a_warm_cache_loads_a_config_without_importing_the_libraries(tmp_path):
    env_code = ("import sys\nfrom ftlib.config import load_config\n"
                f"load_config({str(TINY_CONFIG)!r})\n"
                "print(sorted(m for m in ('transformers', 'peft', 'torch', 'bitsandbytes') if m in sys.modules))")
    env = {"FTLIB_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cold = subprocess.run([sys.executable, "-c", env_code], cwd=REPO, env=env, capture_output=True, text=True)
    assert cold.returncode == 0, cold.stderr[-2000:]
    assert cold.stdout.split("\n")[-2] == "['bitsandbytes', 'peft', 'torch', 'transformers']"
    written = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert written == ["lora", "quantization", "training"]
    warm = subprocess.run([sys.executable, "-c", env_code], cwd=REPO, env=env, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert warm.stdout.split("\n")[-2] == "[]"
    # a wrong key is still refused from the cache, with the nearest name
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"defaults: [{TINY_CONFIG}]\ntraining:\n  learning_rat: 1.0e-4\n")
    proc = subprocess.run([sys.executable, "-c", f"from ftlib.config import load_config; load_config({str(bad)!r})"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert "training.learning_rat: unknown key; did you mean 'learning_rate'" in proc.stderr


def test_a_damaged_or_unwritable_cache_falls_back_to_the_libraries(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLIB_CACHE_DIR", str(tmp_path / "cache"))
    built = []

    def build():
        built.append(1)
        return {"learning_rate": float, "lr_scheduler_type": fields.Literal["linear", "cosine"]}

    first = hint_cache.cached_hints("probe", ("transformers",), build)
    (cached,) = (tmp_path / "cache").iterdir()
    assert hint_cache.cached_hints("probe", ("transformers",), build).keys() == first.keys() and len(built) == 1
    cached.write_text("{not json")                       # damaged: rebuilt and rewritten
    assert hint_cache.cached_hints("probe", ("transformers",), build).keys() == first.keys() and len(built) == 2
    assert json.loads(cached.read_text())["lr_scheduler_type"] == {"literal": ["linear", "cosine"]}
    monkeypatch.setenv("FTLIB_CACHE_DIR", "/proc/no-such-place")   # cannot be written: built, no error
    assert hint_cache.cached_hints("probe", ("transformers",), build).keys() == first.keys() and len(built) == 3
