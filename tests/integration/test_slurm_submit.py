"""Real jobs through the local Slurm cluster (slurm/start-cluster.sh), submitted by ftlib."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import NO_SLURM, REPO, SAMPLE_DATA, TINY_CONFIG, sacct_state, slurm_cluster_up, subprocess_env, wait_for
from ftlib.storage import RunDir, read_json, verify_manifest

pytestmark = pytest.mark.slurm


if not slurm_cluster_up():
    pytest.skip(NO_SLURM, allow_module_level=True)


def submit_command(hf_cache, root, *overrides, config=TINY_CONFIG, wait=True):
    return [sys.executable, "jobs/submit.py", str(config), f"storage.root={root}", f"storage.hf_cache={hf_cache}",
            f"data.train={SAMPLE_DATA}", "slurm.time=00:15:00", *overrides, *(["--wait"] if wait else [])]


def submit(hf_cache, root, *overrides, config=TINY_CONFIG, wait=True, timeout=600):
    return subprocess.run(submit_command(hf_cache, root, *overrides, config=config, wait=wait), cwd=REPO,
                          env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=timeout)


def test_submitted_job_completes_with_artifacts_and_shows_in_status(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = submit(hf_cache, root, "training.max_steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted Slurm job" in proc.stdout and "log:" in proc.stdout and "W&B:" in proc.stdout
    run = RunDir(root / "tiny")
    state = read_json(run.state)
    assert sacct_state(state["job_id"]) == "COMPLETED"
    assert verify_manifest(run) == []
    log = Path(state["log"]).read_text()
    assert "step 20/20" in log and "export: manifest" in log
    status = subprocess.run([sys.executable, "jobs/status.py", "--root", str(root)], cwd=REPO,
                            capture_output=True, text=True)
    row = [line for line in status.stdout.splitlines() if line.startswith("tiny ")][0]
    assert "COMPLETED" in row and "20/20" in row and "complete" in row
    prov = read_json(run.provenance)
    assert prov["starts"][0]["slurm_job_id"] == state["job_id"]
    assert "commit" in prov["git"]


def _local_reference(tiny_config, tmp_path, overrides):
    from ftlib.recipe import run_recipe
    result = run_recipe(tiny_config(*overrides, root=tmp_path / "reference"), log=lambda _: None)
    return load_file(RunDir(result.run_dir).adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("how", ["usr2", "scontrol"])
def test_requeue_mid_training_resumes_to_the_uninterrupted_adapter(how, tmp_path, hf_cache, tiny_config):
    overrides = ("training.max_steps=150", "training.save_steps=10", "training.eval_strategy=no",
                 "training.logging_steps=10")
    root = tmp_path / "runs"
    proc = submit(hf_cache, root, *overrides, wait=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(root / "tiny")
    job_id = read_json(run.state)["job_id"]
    wait_for(lambda: (run.checkpoints / "checkpoint-10" / "ftlib_complete.json").exists(),
             what="the first checkpoint")
    if how == "usr2":   # preemption / time limit: Slurm's --signal=USR2 reaches the job
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    else:               # an admin's requeue or preemption: SIGTERM, then SIGKILL, then a restart
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(lambda: run.manifest.exists() and sacct_state(job_id) == "COMPLETED", timeout=900,
             what="the requeued job to complete")

    log = Path(read_json(run.state)["log"]).read_text()
    assert "resuming from" in log, log[-2000:]
    if how == "usr2":   # the job leaves a marker and exits; the batch script (host side) requeues it
        assert "stop requested (signal SIGUSR2)" in log and "the batch script requeues the job" in log
        assert f"ftlib: requeueing job {job_id}, as the job asked" in log
    else:   # Slurm's SIGTERM, KillWait before SIGKILL: a checkpoint at the step's end, no self-requeue
        assert "stop requested (signal SIGTERM)" in log and "Slurm is ending the job (SIGTERM)" in log
        assert "ftlib: requeueing job" not in log
    assert not list((run.root / "slurm").glob("requeue-*"))    # the marker is consumed
    prov = read_json(run.provenance)
    assert [s["slurm_restart_count"] for s in prov["starts"]] == [0, 1]
    assert read_json(run.state)["step"] == 150

    expected = _local_reference(tiny_config, tmp_path, overrides)
    got = load_file(run.adapter / "adapter_model.safetensors")
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs from the uninterrupted run"
    run_id = (run.root / "wandb_run_id").read_text().strip()
    offline = list((run.root / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)


def test_requeues_past_the_limit_fail_with_a_clear_message(tmp_path, hf_cache):
    root = tmp_path / "runs"
    command = submit_command(hf_cache, root, "training.max_steps=100000", "slurm.max_preemptions=0")
    waiting = subprocess.Popen(command, cwd=REPO, env=subprocess_env(hf_cache), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    run = RunDir(root / "tiny")
    wait_for(lambda: (read_json(run.state) or {}).get("status") == "running", what="the job to run")
    job_id = read_json(run.state)["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    out, err = waiting.communicate(timeout=300)
    log = Path(read_json(run.state)["log"]).read_text()
    assert sacct_state(job_id) == "FAILED"
    assert "more than slurm.max_preemptions=0" in log
    # `submit --wait` exits 1 once Slurm calls the job ended, and says its failure once.
    assert waiting.returncode == 1, out + err
    said = [line for line in err.splitlines() if f"job {job_id}" in line]
    assert len(said) == 1 and "failed:" in said[0] and "slurm.max_preemptions=0" in said[0], err


def test_scancel_saves_a_checkpoint_and_stays_cancelled(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = submit(hf_cache, root, "training.max_steps=100000", "training.save_steps=100000",
                  "training.eval_strategy=no", wait=False)
    assert proc.returncode == 0, proc.stderr
    run = RunDir(root / "tiny")
    job_id = read_json(run.state)["job_id"]
    wait_for(lambda: (read_json(run.state) or {}).get("step", 0) >= 5, what="training to start")
    subprocess.run(["scancel", job_id], check=True)
    wait_for(lambda: sacct_state(job_id) == "CANCELLED", timeout=120, what="the job to be cancelled")
    wait_for(lambda: (read_json(run.state) or {}).get("status") == "interrupted", timeout=60,
             what="the job to record its checkpoint")
    state = read_json(run.state)
    step = state["step"]
    assert 5 <= step < 100000
    assert (run.checkpoints / f"checkpoint-{step}" / "ftlib_complete.json").exists()
    time.sleep(5)   # a self-requeue (submitit's) would have brought the job back by now
    assert sacct_state(job_id) == "CANCELLED"
    assert len(read_json(run.provenance)["starts"]) == 1
    assert "Slurm is ending the job (SIGTERM)" in Path(state["log"]).read_text()


def test_sweep_of_3_is_one_array_with_3_run_dirs(tmp_path, hf_cache):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"defaults: [{TINY_CONFIG}]\nname: sw\n"
                      "sweep:\n  training.learning_rate: [1.0e-2, 5.0e-3, 2.0e-3]\n")
    root = tmp_path / "runs"
    proc = submit(hf_cache, root, "training.max_steps=10", "training.eval_strategy=no", config=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_ids = {read_json(RunDir(root / f"sw-{i}").state)["job_id"] for i in range(3)}
    assert len({j.split("_")[0] for j in job_ids}) == 1 and len(job_ids) == 3    # one array, 3 elements
    rates = []
    for i in range(3):
        run = RunDir(root / f"sw-{i}")
        assert verify_manifest(run) == []
        rates.append(__import__("yaml").safe_load(run.config.read_text())["training"]["learning_rate"])
    assert rates == [1e-2, 5e-3, 2e-3]
    for job in job_ids:
        assert sacct_state(job) == "COMPLETED"


def test_cancel_shows_cancelled_and_writes_no_manifest(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = submit(hf_cache, root, "training.max_steps=100000", wait=False)
    assert proc.returncode == 0, proc.stderr
    run = RunDir(root / "tiny")
    wait_for(lambda: (read_json(run.state) or {}).get("status") == "running", what="the job to run")
    cancel = subprocess.run([sys.executable, "jobs/status.py", "--root", str(root), "cancel", "tiny"],
                            cwd=REPO, capture_output=True, text=True)
    assert cancel.returncode == 0 and "cancelled Slurm job" in cancel.stdout
    job_id = read_json(run.state)["job_id"]
    wait_for(lambda: sacct_state(job_id).startswith("CANCELLED"), what="CANCELLED in sacct")
    status = subprocess.run([sys.executable, "jobs/status.py", "--root", str(root)], cwd=REPO,
                            capture_output=True, text=True).stdout
    assert "CANCELLED" in status
    time.sleep(2)
    assert not run.manifest.exists()


def test_bad_config_exits_2_and_submits_nothing(tmp_path, hf_cache):
    # A unique job name: other tests' jobs may reach sacct at any moment, this one must never.
    name = f"badcfg-{uuid.uuid4().hex[:8]}"
    proc = submit(hf_cache, tmp_path / "runs", f"name={name}", "lora.rr=4")
    assert proc.returncode == 2 and "lora.rr" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    time.sleep(2)   # what slurmctld accepted reaches slurmdbd within its commit interval
    names = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName", "-S", "now-1hours"],
                           capture_output=True, text=True, check=True).stdout.split()
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout.split()
    assert name not in names and name not in queued
    assert not (tmp_path / "runs").exists()


def test_offline_node_fails_at_once_naming_the_missing_model_and_prefetch(tmp_path, hf_cache):
    proc = submit(hf_cache, tmp_path / "runs", "model.name=some-org/not-in-cache", "storage.offline=true",
                  "--local", wait=False)
    assert proc.returncode == 2
    assert "some-org/not-in-cache" in proc.stderr and "jobs/prefetch.py" in proc.stderr
