"""The tiny job through the real local Slurm, inside Charliecloud (ch-run, on the test image of
containers/make-test-image.sh); and no secret in any file ftlib wrote. Apptainer runs for real in
test_apptainer_slurm.py (the job image); pyxis/enroot cannot run here (golden files only)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NO_SLURM, REPO, SAMPLE_DATA, TINY_CONFIG, slurm_cluster_up, subprocess_env, wait_for
from ftlib.storage import RunDir, read_json, verify_manifest

pytestmark = pytest.mark.slurm

SECRET_KEY = "wandb-secret-7f3a9c1e55d2"
SECRET_TOKEN = "hf_secret_token_91b2c3d4e5"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    if os.geteuid() != 0 and not shutil.which("ch-run"):
        pytest.skip("ch-run is not installed (apt-get install charliecloud-runtime)")
    out = tmp_path_factory.mktemp("image") / "img"
    env = dict(os.environ, FTLIB_TEST_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "containers" / "make-test-image.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"could not make a Charliecloud test image: {proc.stderr.strip()[-300:]}")
    return out


@pytest.mark.skipif(not slurm_cluster_up(), reason=NO_SLURM)
def test_tiny_job_runs_in_charliecloud_via_slurm_and_leaks_no_secret(image, tmp_path, hf_cache):
    root = tmp_path / "runs"
    outside = tmp_path / "not-bound"
    outside.mkdir()
    (outside / "private.txt").write_text("host only")
    host_binds = [line.strip() for line in (image / "ch" / "host-binds").read_text().splitlines() if line.strip()]
    probe = tmp_path / "probe.py"
    # A data file next to the bound storage proves the job reads through the bind.
    data = root.parent / "train.jsonl"
    data.write_bytes(SAMPLE_DATA.read_bytes())
    # The repo: ftlib is installed editable in the venv (setup.sh); the real image installs it.
    binds = "[" + ",".join(host_binds + [str(data.parent), str(REPO)]) + "]"
    env = subprocess_env(hf_cache, WANDB_API_KEY=SECRET_KEY, HF_TOKEN=SECRET_TOKEN, USER="root")
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--wait", f"storage.root={root}",
         f"storage.hf_cache={hf_cache}", f"data.train={data}", "training.max_steps=10",
         "training.eval_strategy=no", "container.runtime=charliecloud", f"container.image={image}",
         f"container.binds={binds}", "container.env=[WANDB_API_KEY,HF_TOKEN]", "slurm.time=00:10:00"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = RunDir(root / "tiny")
    assert verify_manifest(run) == []
    state = read_json(run.state)
    log = Path(state["log"]).read_text()
    assert "export: manifest" in log
    script = next((run.slurm).rglob("*_submission.sh")).read_text()
    assert "ch-run" in script and str(image) in script

    # Inside the same container, the job sees bound paths, not unbound ones, and gets the secrets
    # by name only.
    from ftlib.config import ContainerSection
    from ftlib.launch.containers import build_launch
    launch = build_launch(ContainerSection(runtime="charliecloud", image=str(image), binds=host_binds,
                                           env=["WANDB_API_KEY", "HF_TOKEN"]),
                          run_dir=run.root, storage_root=root, hf_cache=hf_cache)
    probe.write_text("import os, sys\n"
                     f"print(os.path.exists({str(run.manifest)!r}), os.path.exists({str(outside / 'private.txt')!r}),"
                     " os.environ.get('WANDB_API_KEY'), os.environ.get('NOT_PASSED'))\n")
    shutil.copy(probe, run.root / "probe.py")
    inside = subprocess.run(f"{launch.python} {run.root / 'probe.py'}", shell=True, capture_output=True,
                            text=True, env=dict(env, NOT_PASSED="x"), timeout=120)
    assert inside.stdout.split() == ["True", "False", SECRET_KEY, "None"], inside.stderr

    # No file that ftlib (or the job, or W&B) wrote holds a secret value.
    for path in list(root.rglob("*")) + list(Path(hf_cache).rglob("*")):
        if path.is_file() and path.stat().st_size < 50_000_000:
            content = path.read_bytes()
            assert SECRET_KEY.encode() not in content, path
            assert SECRET_TOKEN.encode() not in content, path


@pytest.mark.skipif(not slurm_cluster_up(), reason=NO_SLURM)
def test_preempted_job_in_charliecloud_is_requeued_by_the_batch_script(image, tmp_path, hf_cache):
    """USR2 inside the container: checkpoint, marker, exit; the host-side batch script requeues."""
    root = tmp_path / "runs"
    host_binds = [line.strip() for line in (image / "ch" / "host-binds").read_text().splitlines() if line.strip()]
    binds = "[" + ",".join(host_binds + [str(SAMPLE_DATA.parent), str(REPO)]) + "]"
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", str(TINY_CONFIG), f"storage.root={root}", f"storage.hf_cache={hf_cache}",
         f"data.train={SAMPLE_DATA}", "training.max_steps=80", "training.save_steps=10",
         "training.eval_strategy=no", "export.merged=false", "container.runtime=charliecloud",
         f"container.image={image}", f"container.binds={binds}", "slurm.time=00:10:00"],
        cwd=REPO, env=subprocess_env(hf_cache, USER="root"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = RunDir(root / "tiny")
    job_id = read_json(run.state)["job_id"]
    wait_for((run.checkpoints / "checkpoint-10" / "ftlib_complete.json").exists, timeout=300,
             what="the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(run.manifest.exists, timeout=300, poll=1, what="the requeued job to finish")
    log = Path(read_json(run.state)["log"]).read_text()
    assert "the batch script requeues the job" in log and f"ftlib: requeueing job {job_id}, as the job asked" in log
    assert "resuming from" in log
    assert [s["slurm_restart_count"] for s in read_json(run.provenance)["starts"]] == [0, 1]
    assert read_json(run.state)["step"] == 80
