"""End to end on the tiny config in local mode: real 4-bit QLoRA on CPU, real W&B offline run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, subprocess_env
from ftlib.storage import RunDir, verify_manifest


def _logged_losses(run: RunDir) -> list[float]:
    newest = max(run.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_submit_local_runs_the_tiny_job_end_to_end(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", "configs/tiny.yaml", "--local", f"storage.root={root}",
         f"storage.hf_cache={hf_cache}"],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(root / "tiny")

    losses = _logged_losses(run)
    assert losses[-1] < losses[0] - 1.0, losses            # it learned, clearly
    assert verify_manifest(run) == []
    manifest = json.loads(run.manifest.read_text())
    listed = {entry["path"] for entry in manifest["files"]}
    assert "artifacts/adapter/adapter_model.safetensors" in listed
    assert "artifacts/merged/model.safetensors" in listed

    resolved = yaml.safe_load(run.config.read_text())
    assert resolved["model"]["name"] == "builtin:tiny-llama"
    assert resolved["training"]["learning_rate"] == pytest.approx(1e-2)
    assert resolved["storage"]["root"] == str(root)

    run_id = (run.root / "wandb_run_id").read_text().strip()
    offline = list((run.root / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    records = (offline[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in records and b"eval/loss" in records    # the metrics reached W&B

    provenance = json.loads(run.provenance.read_text())
    assert provenance["packages"]["transformers"].startswith("5.")
    assert len(provenance["starts"]) == 1

    log = (run.root / "train.log").read_text()
    assert "step 60/60" in log and "tok/s" in log and "ETA" in log
    state = json.loads(run.state.read_text())
    assert state["status"] == "completed" and state["step"] == 60

    # A second invocation finds the run complete and changes nothing.
    before = run.manifest.read_bytes()
    again = subprocess.run(
        [sys.executable, "jobs/submit.py", "configs/tiny.yaml", "--local", f"storage.root={root}",
         f"storage.hf_cache={hf_cache}"],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert run.manifest.read_bytes() == before


def _batch(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the word.\n\napple"}],
                                           tokenize=False, add_generation_prompt=True) + "elppa",
             "The opposite of happy is sad."]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_adapter_reloads_and_merged_model_matches(tiny_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlib.model import load_base_model, resolve_model_path
    from ftlib.recipe import run_recipe

    cfg = tiny_config("training.max_steps=20", "tracking.backends=[none]")
    result = run_recipe(cfg, log=lambda line: None)
    assert result.status == "completed" and result.global_step == 20
    run = RunDir(result.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    batch = _batch(tokenizer)

    trained = result.model.eval()
    with torch.no_grad():
        trained_logits = trained(**batch).logits
    base_path = resolve_model_path(cfg)
    fresh = PeftModel.from_pretrained(load_base_model(cfg, base_path, quantized=True), str(run.adapter)).eval()
    with torch.no_grad():
        reloaded_logits = fresh(**batch).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, atol=1e-5, rtol=0)

    full_base = load_base_model(cfg, base_path, quantized=False, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(full_base, str(run.adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(run.merged, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = unmerged(**batch).logits, merged(**batch).logits
    assert (got - expected).abs().max().item() < 1e-5
    # The adapter changed the model: the merged logits differ from the plain base's.
    with torch.no_grad():
        plain = load_base_model(cfg, base_path, quantized=False, dtype=torch.float32)(**batch).logits
    assert (got - plain).abs().max().item() > 1e-2


def test_same_config_and_seed_give_the_same_weights(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from ftlib.recipe import run_recipe

    adapters = []
    for name in ("a", "b"):
        cfg = tiny_config("training.max_steps=10", "tracking.backends=[none]", root=tmp_path / name)
        adapters.append(load_file(RunDir(run_recipe(cfg, log=lambda _: None).run_dir).adapter
                                  / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", "configs/tiny.yaml", "--dry-run", "--local",
         f"storage.root={root}", "training.learning_rate=5e-4"],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "learning_rate: 0.0005" in proc.stdout
    assert f"run directory: {root / 'tiny'}" in proc.stdout
    assert not root.exists()


def test_lora_with_8bit_optimizer_tensorboard_and_eval_file(tiny_config, tmp_path):
    from ftlib.recipe import run_recipe
    from ftlib.tiny import write_sample_dataset

    eval_file = write_sample_dataset(tmp_path / "eval.jsonl", n=8)
    cfg = tiny_config("model.method=lora", "quantization=null", "training.optim=adamw_bnb_8bit",
                      "tracking.backends=[tensorboard]", f"data.eval={eval_file}", "data.validation_split=0",
                      "training.max_steps=10", "training.eval_steps=5", "training.save_steps=5")
    result = run_recipe(cfg, log=lambda _: None)
    run = RunDir(result.run_dir)
    assert result.status == "completed" and result.eval_loss is not None
    optimizer_state = torch.load(run.checkpoints / "checkpoint-10" / "optimizer.pt", weights_only=False)
    # bitsandbytes' optimizer ran (its state is in the checkpoint, a torch AdamW has exp_avg); it
    # keeps tensors under min_8bit_size (4096) in 32-bit, which every tiny LoRA tensor is.
    states = list(optimizer_state["state"].values())
    assert states and all("__bnb_optimizer_quant_state__" in s and "exp_avg" not in s for s in states)
    assert list(run.tensorboard.rglob("events.out.tfevents.*"))
    assert verify_manifest(run) == []


def test_full_fine_tuning_writes_the_model_itself(tiny_config):
    from ftlib.recipe import run_recipe

    cfg = tiny_config("model.method=full", "quantization=null", "lora=null", "training.max_steps=5",
                      "training.eval_strategy=no", "tracking.backends=[none]", "training.learning_rate=1e-4")
    result = run_recipe(cfg, log=lambda _: None)
    run = RunDir(result.run_dir)
    assert not run.adapter.exists() and (run.merged / "model.safetensors").exists()
    assert verify_manifest(run) == []
