"""The plan step (ftlib/plan.py): a config -> the runs to make. Sweep and task elements are set
through typed values (config.with_values), never a dict round trip; --local trains every element,
one run directory each, exactly as a Slurm array would."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env
from ftlib.config import ConfigError, load_config
from ftlib.plan import expand_runs, prepare_runs
from ftlib.storage import RunDir, read_json, verify_manifest


def _load(*overrides, tmp_path):
    return load_config(TINY_CONFIG, [f"storage.root={tmp_path}", f"data.train={SAMPLE_DATA}", *overrides])


def test_sweep_elements_are_typed_copies_of_the_base(tmp_path):
    cfg = _load("sweep={training.learning_rate: [1.0e-3, 1.0e-4], lora.r: [4, 8]}", tmp_path=tmp_path)
    runs = expand_runs(cfg)
    assert [r.name for r in runs] == ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]
    assert [(r.training["learning_rate"], r.lora["r"]) for r in runs] == [
        (1e-3, 4), (1e-3, 8), (1e-4, 4), (1e-4, 8)]
    assert {r.tracking.group for r in runs} == {"tiny"}
    assert all(not r.sweep and not r.tasks for r in runs)
    assert cfg.training["learning_rate"] == 1e-2 and cfg.lora["r"] == 8   # the base is unchanged
    assert len({r.run_root for r in runs}) == 4


def test_task_elements_set_their_own_sections(tmp_path):
    cfg = _load("tasks={a: {data.max_length: 64}, b: {model.method: lora, quantization.load_in_4bit: false}}",
                tmp_path=tmp_path)
    a, b = expand_runs(cfg)
    assert (a.name, a.data.max_length, a.model.method) == ("tiny-a", 64, "qlora")
    assert (b.name, b.model.method, b.quantization["load_in_4bit"]) == ("tiny-b", "lora", False)


@pytest.mark.parametrize("sweep, message", [
    ("{training.learning_rte: [1.0e-3]}", "training.learning_rte: unknown key; did you mean 'learning_rate'"),
    ("{data.max_length: [fast]}", "data.max_length: 'fast' is not valid: expected an integer"),
    ("{model.method: [lora]}", "quantization.load_in_4bit: model.method is lora"),   # the combination
    ("{learning_rate: [1.0e-3]}", "does not name a config value"),
    ("{training.learning_rate: []}", "sweep.training.learning_rate: expected a non-empty list"),
])
def test_a_bad_sweep_value_is_one_line_naming_the_key(tmp_path, sweep, message):
    cfg = _load(f"sweep={sweep}", tmp_path=tmp_path)
    with pytest.raises(ConfigError) as err:
        expand_runs(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overwrite_output_dir_is_applied_once_and_cleared(tmp_path):
    cfg = _load("training.overwrite_output_dir=true", tmp_path=tmp_path)
    run = RunDir(cfg.run_root)
    run.create()
    (run.checkpoints / "checkpoint-5").mkdir()
    (prepared,) = prepare_runs(expand_runs(cfg))
    assert not (run.checkpoints / "checkpoint-5").exists()
    assert prepared.fresh_start is False and "overwrite_output_dir: false" in run.config.read_text()


@pytest.mark.slow
def test_local_sweep_trains_every_element_in_its_own_run_directory(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--local", f"storage.root={root}",
         f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}", "training.max_steps=4",
         "training.eval_strategy=no", "training.save_steps=4", "export.merged=false", "export.report=false",
         "tracking.backends=[none]", "sweep={training.learning_rate: [1.0e-2, 1.0e-3]}"],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "local: run 1/2: tiny-0" in proc.stdout and "local: run 2/2: tiny-1" in proc.stdout
    rates = []
    for name in ("tiny-0", "tiny-1"):
        run = RunDir(root / name)
        assert run.manifest.is_file() and verify_manifest(run) == []
        assert (run.adapter / "adapter_model.safetensors").is_file()
        assert read_json(run.state)["status"] == "completed" and read_json(run.state)["step"] == 4
        rates.append(load_config(run.config).training["learning_rate"])
    assert rates == [1e-2, 1e-3]
    assert not (root / "tiny").exists(), "the base config itself must not train"
