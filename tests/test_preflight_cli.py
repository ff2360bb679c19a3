"""Preflight through the real CLI: the report in --dry-run, and a refusal (exit 2) before anything
is submitted when the run cannot fit the GPU type asked for."""
from __future__ import annotations

import json

from conftest import REPO, SAMPLE_DATA
from ftlib.cli import submit_main

MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False}


def _model_dir(tmp_path):
    path = tmp_path / "mistral-shape"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(MISTRAL_7B))   # config only: no weights needed
    return path


def test_dry_run_prints_memory_estimate_and_advice(tmp_path, capsys):
    code = submit_main([str(REPO / "configs" / "mistral.yaml"), "--dry-run", f"model.name={_model_dir(tmp_path)}",
                        f"data.train={SAMPLE_DATA}", "slurm.gpu_type=a100-40g", f"storage.root={tmp_path}/runs"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable 41,943,040" in out and "fits a100-40g" in out
    assert "qlora" in out and "does not fit" in out      # the method table: full does not fit 40 GB
    assert not (tmp_path / "runs").exists()


def test_submission_that_cannot_fit_is_refused_with_the_fix(tmp_path, capsys):
    code = submit_main([str(REPO / "configs" / "mistral.yaml"), f"model.name={_model_dir(tmp_path)}",
                        f"data.train={SAMPLE_DATA}", "slurm.gpu_type=t4", "model.method=full",
                        "quantization=null", "lora=null", f"storage.root={tmp_path}/runs"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not fit" in err and "t4" in err and "method qlora" in err
    assert not (tmp_path / "runs").exists()
