"""Two processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, locally (--local --nproc 2) and
as real 2-task Slurm jobs. Each asserts world size 2 and the wrapper type (FIELD-NOTES: several
launch paths silently start one process or unconnected ones)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import NO_SLURM, REPO, SAMPLE_DATA, TINY_CONFIG, slurm_cluster_up, subprocess_env, wait_for
from ftlib.storage import RunDir, read_json, verify_manifest

ZERO3_SHARDED = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_gather_16bit_weights_on_model_save": True},
                 "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
COMMON = ["training.max_steps=6", "training.eval_strategy=no", "training.save_steps=3",
          "tracking.backends=[none]", f"data.train={SAMPLE_DATA}"]
STRATEGIES = {
    "ddp": (["distributed.strategy=ddp"], "DistributedDataParallel", 0),
    "zero2": (["distributed.strategy=deepspeed", "training.deepspeed=zero2", "model.method=lora",
               "quantization=null"], "DeepSpeedEngine", 2),
    "zero3": (["distributed.strategy=deepspeed", "training.deepspeed={zero3}", "model.method=lora",
               "quantization=null"], "DeepSpeedEngine", 3),
}


def _overrides(name, tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ZERO3_SHARDED))
    extra, wrapper, stage = STRATEGIES[name]
    return [o.replace("{zero3}", str(path)) for o in extra], wrapper, stage


def _reference_shapes(tiny_config, tmp_path, method):
    from ftlib.recipe import run_recipe
    overrides = ["training.max_steps=1", "training.eval_strategy=no", "tracking.backends=[none]"]
    if method == "lora":
        overrides += ["model.method=lora", "quantization=null"]
    result = run_recipe(tiny_config(*overrides, root=tmp_path / "single"), log=lambda _: None)
    return {k: v.shape for k, v in load_file(RunDir(result.run_dir).adapter / "adapter_model.safetensors").items()}


def _check_run(run: RunDir, wrapper: str, stage: int, reference_shapes) -> None:
    reports = [read_json(run.root / "distributed" / f"rank-{r}.json") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in reports), reports
    assert all(r["wrapper"] == wrapper and r["zero_stage"] == stage for r in reports), reports
    assert reports[0]["trainable_sha256"] == reports[1]["trainable_sha256"]     # identical across ranks
    if stage == 3:   # really sharded: each rank holds none of the full LoRA tensors locally
        assert all(r["trainable_local_numel"] < r["trainable_full_numel"] for r in reports), reports
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert {k: v.shape for k, v in adapter.items()} == reference_shapes           # full shapes, no 0-size
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in adapter.values())
    assert verify_manifest(run) == []
    assert not list(run.artifacts.glob(".adapter.not-written-by-rank-*"))
    report = read_json(run.root / "report.json")      # rank 0 reports; the other rank just ends
    assert report["fine_tuned"]["loss"] < report["base"]["loss"], report


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_local_two_processes(name, tmp_path, hf_cache, tiny_config):
    from peft import PeftModel
    from ftlib.model import load_base_model, resolve_model_path
    overrides, wrapper, stage = _overrides(name, tmp_path)
    root = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--local", "--nproc", "2",
                           f"storage.root={root}", f"storage.hf_cache={hf_cache}", *COMMON, *overrides],
                          cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = RunDir(root / "tiny")
    method = "lora" if "model.method=lora" in overrides else "qlora"
    _check_run(run, wrapper, stage, _reference_shapes(tiny_config, tmp_path, method))
    cfg = tiny_config(*[o for o in overrides if o.startswith(("model.", "quantization"))])
    PeftModel.from_pretrained(load_base_model(cfg, resolve_model_path(cfg), quantized=method == "qlora"),
                              str(run.adapter))   # reloads


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_cluster_up(), reason=NO_SLURM)
@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_two_task_slurm_job_and_resume_after_requeue(name, tmp_path, hf_cache, tiny_config):
    overrides, wrapper, stage = _overrides(name, tmp_path)
    root = tmp_path / "runs"
    args = [sys.executable, "jobs/submit.py", str(TINY_CONFIG), f"storage.root={root}",
            f"storage.hf_cache={hf_cache}", "slurm.gpus_per_node=0", "distributed.nproc=2",
            "slurm.cpus_per_task=1", "slurm.time=00:20:00", *COMMON, "training.max_steps=30",
            "training.save_steps=5", *overrides]
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(root / "tiny")
    job_id = read_json(run.state)["job_id"]
    wait_for((run.checkpoints / "checkpoint-5" / "ftlib_complete.json").exists, timeout=600, what="a checkpoint")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(run.manifest.exists, timeout=600, poll=1, what="the requeued job to finish")
    log = (root / "tiny" / "slurm").rglob("*_0_log.out")
    text = "".join(p.read_text() for p in log)
    assert "resuming from" in text
    method = "lora" if "model.method=lora" in overrides else "qlora"
    _check_run(run, wrapper, stage, _reference_shapes(tiny_config, tmp_path, method))
    assert read_json(run.state)["step"] == 30
