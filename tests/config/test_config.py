"""Config: inheritance, overrides, HF field names, and one clear line + exit 2 for every mistake."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG
from ftlib.cli import submit_main
from ftlib.config import ConfigError, load_config


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def child_of_tiny(tmp_path, body: str = "", name: str = "run.yaml"):
    return write(tmp_path, f"defaults: [{TINY_CONFIG}]\ndata:\n  train: {SAMPLE_DATA}\n{body}", name)


def test_defaults_inherit_and_command_line_overrides(tmp_path):
    path = child_of_tiny(tmp_path, "training:\n  learning_rate: 0.5\nlora:\n  r: 4\n")
    cfg = load_config(path, ["lora.r=2", "slurm.partition=gpu"])
    assert cfg.training["learning_rate"] == 0.5          # child beats parent
    assert cfg.lora["r"] == 2                            # command line beats child
    assert cfg.lora["lora_alpha"] == 16                  # inherited
    assert cfg.slurm.partition == "gpu"
    assert cfg.name == "tiny"                            # the parent's name is inherited


def test_hf_names_work_and_old_names_are_translated(tmp_path):
    # tiny.yaml sets eval_strategy; the older name on top of it is a conflict, not a silent override.
    path = child_of_tiny(tmp_path, "training:\n  evaluation_strategy: steps\n")
    with pytest.raises(ConfigError, match="evaluation_strategy and training.eval_strategy are both set"):
        load_config(path)
    path = child_of_tiny(tmp_path, "training:\n  warmup_ratio: 0.1\n", "ok.yaml")
    with pytest.raises(ConfigError, match="warmup_ratio and training.warmup_steps are both set"):
        load_config(path)
    standalone = write(tmp_path, f"""
        model: {{name: builtin:tiny-llama, method: lora}}
        data: {{train: {SAMPLE_DATA}}}
        training: {{warmup_ratio: 0.1}}
        """, "standalone.yaml")
    cfg = load_config(standalone, ["training.optim=paged_adamw_8bit", "lora.target_modules=[q_proj,v_proj]",
                             "lora.use_dora=true", "training.bf16=false"])
    assert cfg.training["warmup_steps"] == 0.1 and "warmup_ratio" not in cfg.training
    assert any("warmup_ratio" in note for note in cfg.notes)
    assert cfg.lora["target_modules"] == ["q_proj", "v_proj"]


def test_overwrite_output_dir_means_fresh_start(tmp_path):
    cfg = load_config(child_of_tiny(tmp_path), ["training.overwrite_output_dir=true"])
    assert cfg.fresh_start and "overwrite_output_dir" not in cfg.training


BAD = [
    # (overrides, words the one-line message must contain)
    (["training.learnng_rate=1e-4"], ["training.learnng_rate", "unknown key", "learning_rate"]),
    (["lora.rank=8"], ["lora.rank", "unknown key"]),
    (["quantization.load_in_4bits=true"], ["quantization.load_in_4bits", "load_in_4bit"]),
    (["model.nme=x"], ["model.nme", "name"]),
    (["data.pack=true"], ["data.pack", "packing"]),
    (["slurm.gpus=2"], ["slurm.gpus", "gpus_per_node"]),
    (["trainig.seed=1"], ["trainig", "unknown section", "training"]),
    (["training.learning_rate=fast"], ["training.learning_rate", "expected a number"]),
    (["lora.r=eight"], ["lora.r", "integer"]),
    (["training.lr_scheduler_type=cosin"], ["training.lr_scheduler_type", "cosine"]),
    (["training.optim=adamw_8bit_bnb"], ["training.optim", "adamw"]),
    (["quantization.bnb_4bit_quant_type=nf3"], ["bnb_4bit_quant_type", "nf4"]),
    (["model.method=qlorra"], ["model.method", "qlora"]),
    (["model.backend=unsloth"], ["model.backend", "unsloth", "hf"]),   # accepted once, and ignored
    (["data.chat_template=chatlm"], ["data.chat_template", "chatml"]),
    (["lora.bias=some"], ["lora.bias", "lora_only"]),
    (["training.save_strategy=yes"], ["training.save_strategy", "steps"]),
    (["training.output_dir=/tmp/x"], ["training.output_dir", "run directory"]),
    (["training.hub_token=abc"], ["training.hub_token", "HF_TOKEN"]),
    (["training.fp16=true", "training.bf16=true"], ["training.fp16", "bf16"]),
    (["quantization.load_in_8bit=true"], ["load_in_8bit", "load_in_4bit"]),
    (["model.method=lora"], ["quantization.load_in_4bit", "model.method"]),
    (["data.validation_split=0", "training.eval_strategy=steps"], ["training.eval_strategy", "data.eval"]),
    (["training.load_best_model_at_end=true", "training.save_strategy=epoch"],
     ["load_best_model_at_end", "save_strategy"]),
    (["data.train=/nonexistent/train.jsonl"], ["data.train", "file not found", "/nonexistent/train.jsonl"]),
    (["container.runtime=apptainer"], ["container.image"]),
    (["name=a/b"], ["name"]),
    (["training.seed"], ["key=value"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exits_2_with_one_line_naming_the_key(overrides, words, tmp_path, capsys):
    code = submit_main([str(TINY_CONFIG), "--dry-run", f"data.train={SAMPLE_DATA}",
                        f"storage.root={tmp_path}/runs", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert not (tmp_path / "runs").exists()


def test_unknown_key_in_a_file_names_that_file(tmp_path, capsys):
    parent = write(tmp_path, "training:\n  max_stepz: 3\n", "parent.yaml")
    child = child_of_tiny(tmp_path, "defaults_extra: 1\n")
    code = submit_main([str(child), "--dry-run"])
    assert code == 2 and str(child) in capsys.readouterr().err
    nested = write(tmp_path, f"defaults: [{TINY_CONFIG}, parent.yaml]\n", "nested.yaml")
    code = submit_main([str(nested), "--dry-run", f"data.train={SAMPLE_DATA}"])
    err = capsys.readouterr().err
    assert code == 2 and str(parent) in err and "max_steps" in err


def test_missing_and_broken_files(tmp_path, capsys):
    assert submit_main([str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "config file not found" in capsys.readouterr().err
    broken = write(tmp_path, "training: [unclosed\n", "broken.yaml")
    assert submit_main([str(broken), "--dry-run"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_exit_status_2_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/submit.py", "configs/tiny.yaml", "--local",
                           "training.learnin_rate=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "did you mean 'learning_rate'" in proc.stderr


def test_shipped_configs_validate():
    for name in ("tiny.yaml", "mistral.yaml", "llama3.yaml"):
        cfg = load_config(REPO / "configs" / name, [f"data.train={SAMPLE_DATA}"])
        assert cfg.model.name
    mistral = load_config(REPO / "configs" / "mistral.yaml", [f"data.train={SAMPLE_DATA}"])
    assert mistral.quantization["bnb_4bit_quant_type"] == "nf4"
    assert mistral.quantization["bnb_4bit_use_double_quant"] is True
    assert mistral.lora["r"] == 16 and mistral.lora["lora_alpha"] == 32
    assert mistral.training["optim"] == "paged_adamw_8bit" and mistral.training["bf16"] is True


def test_yaml_no_is_the_string_no_for_strategy_fields(tmp_path):
    cfg = load_config(child_of_tiny(tmp_path, "training:\n  eval_strategy: no\n  save_strategy: no\n"))
    assert cfg.training["eval_strategy"] == "no" and cfg.training["save_strategy"] == "no"
