"""GPU paths: QLoRA with bf16 compute on one GPU, NCCL DDP and QLoRA + FSDP on two.

Marked `gpu`: they skip, with the reason, where torch sees no CUDA device (CI, the CPU machines,
a CPU build of torch). On a GPU machine set up with a CUDA torch (`FTLIB_TORCH=torch==2.13.0
bash setup.sh`) they run as they are: `pytest -m gpu`.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env
from ftlib.storage import RunDir, read_json, verify_manifest

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="no CUDA device visible to torch (CPU machine or CPU torch)")
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA devices, torch sees {GPUS}")

# 256-wide layers: real 4-bit blocks, bf16 compute as configs/mistral.yaml has it.
GPU_QLORA = ["model.name=builtin:tiny-llama-256", "training.bf16=true", "training.fp16=false",
             "quantization.bnb_4bit_compute_dtype=bfloat16", "training.max_steps=20",
             "training.eval_strategy=no", "training.save_steps=10", "tracking.backends=[none]",
             f"data.train={SAMPLE_DATA}"]


@needs_gpu
def test_qlora_on_one_gpu_trains_in_4bit_with_bf16_compute(tiny_config, tmp_path):
    import bitsandbytes as bnb
    from ftlib.recipe import run_recipe

    losses: list[float] = []

    def log(line: str) -> None:   # progress lines: "step 5/20 | loss 6.489 | lr ..."
        if line.startswith("step ") and "| loss " in line:
            losses.append(float(line.split("| loss ")[1].split()[0]))

    result = run_recipe(tiny_config(*GPU_QLORA, "training.logging_steps=1"), log=log)
    assert result.status == "completed" and result.global_step == 20
    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    run = RunDir(result.run_dir)
    assert verify_manifest(run) == []
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())


def _two_gpu_run(tmp_path, hf_cache, *overrides) -> RunDir:
    root = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--local", "--nproc", "2",
                           f"storage.root={root}", f"storage.hf_cache={hf_cache}", *GPU_QLORA, *overrides],
                          cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunDir(root / "tiny")


def _reports(run: RunDir) -> list[dict]:
    return [read_json(run.root / "distributed" / f"rank-{r}.json") for r in (0, 1)]


@needs_two
def test_ddp_on_two_gpus_uses_nccl(tmp_path, hf_cache):
    run = _two_gpu_run(tmp_path, hf_cache, "distributed.strategy=ddp")
    reports = _reports(run)
    assert all(r["world_size"] == 2 and r["backend"] == "nccl" for r in reports), reports
    assert all(r["wrapper"] == "DistributedDataParallel" for r in reports), reports
    assert reports[0]["trainable_sha256"] == reports[1]["trainable_sha256"]
    assert verify_manifest(run) == []


@needs_two
def test_qlora_with_fsdp_on_two_gpus_saves_full_adapter(tmp_path, hf_cache, tiny_config):
    from ftlib.recipe import run_recipe

    run = _two_gpu_run(tmp_path, hf_cache, "distributed.strategy=fsdp")
    reports = _reports(run)
    assert all(r["world_size"] == 2 and r["backend"] == "nccl" for r in reports), reports
    assert all(r["wrapper"] == "FullyShardedDataParallel" for r in reports), reports
    single = run_recipe(tiny_config(*GPU_QLORA, "training.max_steps=1", root=tmp_path / "single"),
                        log=lambda _: None)
    reference = load_file(RunDir(single.run_dir).adapter / "adapter_model.safetensors")
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in adapter.values())
    assert verify_manifest(run) == []
