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
    assert "data: statistics skipped, the tokenizer of" in out   # config.json only: no tokenizer
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_training_data_statistics(tmp_path, capsys, tiny_config, hf_cache):
    from ftlib.data import read_rows, to_sample, tokenize_sample
    from ftlib.model import load_tokenizer, resolve_model_path
    cfg = tiny_config("data.max_length=34")
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    rows, _ = read_rows(str(SAMPLE_DATA), cfg.data)
    lengths = [tokenize_sample(tokenizer, to_sample(r, cfg.data), cfg.data)["full_length"] for _, r in rows]
    too_long = [n for n in lengths if n > 34]
    assert 0 < len(too_long) < len(lengths)                  # the cut-off splits this data

    root = tmp_path / "dry"
    code = submit_main([str(REPO / "configs" / "tiny.yaml"), "--dry-run", "data.max_length=34",
                        f"data.train={SAMPLE_DATA}", f"storage.root={root}", f"storage.hf_cache={hf_cache}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"data: {len(lengths)} samples" in out and f"max {max(lengths)}" in out
    assert f"truncated: {len(too_long)} samples" in out
    assert f"{sum(n - 34 for n in too_long):,} tokens lost" in out
    assert not root.exists()


def test_submission_that_cannot_fit_is_refused_with_the_fix(tmp_path, capsys):
    code = submit_main([str(REPO / "configs" / "mistral.yaml"), f"model.name={_model_dir(tmp_path)}",
                        f"data.train={SAMPLE_DATA}", "slurm.gpu_type=t4", "model.method=full",
                        "quantization=null", "lora=null", f"storage.root={tmp_path}/runs"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not fit" in err and "t4" in err and "method qlora" in err
    assert not (tmp_path / "runs").exists()
