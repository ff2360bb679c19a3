"""Secrets and payloads: canary tokens never land in a file, a pickle, a log or Slurm's records;
a token may come from a private file read when the run starts; submitit's folder (pickles that
run as the user) is private or refused; no weight load can run code from a pickle."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import NO_SLURM, REPO, SAMPLE_DATA, TINY_CONFIG, slurm_cluster_up, subprocess_env
from ftlib.cli import submit_main
from ftlib.config import ConfigError, load_config
from ftlib.config.secrets import export_from_files, shell_lines, token_files
from ftlib.launch.slurm import make_plan, private_folder, sbatch_script

NOBODY = 65534


def canary(label: str) -> str:
    return f"{label}{uuid.uuid4().hex}"   # unique per test: a hit cannot come from another test


def token_file(path: Path, value: str, mode: int = 0o600) -> Path:
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- token files
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_token_file_others_can_read_or_write_is_refused_naming_the_chmod(tmp_path, mode):
    path = token_file(tmp_path / "hf.token", canary("hf_"), mode)
    with pytest.raises(ConfigError) as caught:
        token_files({"HF_TOKEN_FILE": str(path)})
    assert str(caught.value) == (f"HF_TOKEN_FILE={path}: the token file is readable or writable by group or others "
                                 f"(mode {mode:04o}); run: chmod 600 {path}")


def test_a_token_file_of_another_user_or_missing_is_refused(tmp_path):
    path = token_file(tmp_path / "w.token", canary("w"))
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}, not to you"):
        token_files({"WANDB_API_KEY_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot read the token file"):
        token_files({"WANDB_API_KEY_FILE": str(tmp_path / "absent")})


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_token_file_is_read_into_the_environment(tmp_path, mode):
    value = canary("hf_")
    env = {"HF_TOKEN_FILE": str(token_file(tmp_path / "t", value, mode)), "HF_TOKEN": "stale"}
    assert export_from_files(env) == ["HF_TOKEN"]
    assert env["HF_TOKEN"] == value          # the named file wins over a value already there


def test_local_reads_the_token_file_when_the_run_starts(tmp_path, hf_cache, monkeypatch):
    from ftlib.validation import check_run
    value = canary("wandb")
    monkeypatch.setenv("WANDB_API_KEY_FILE", str(token_file(tmp_path / "w", value)))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", f"storage.hf_cache={hf_cache}",
                                    f"storage.root={tmp_path / 'runs'}"])
    check_run(cfg, slurm=True, dry_run=True)
    assert "WANDB_API_KEY" not in os.environ           # a submission only checks the file ...
    check_run(cfg, slurm=False)
    assert os.environ["WANDB_API_KEY"] == value        # ... --local (this process is the run) reads it


def _run_token_lines(lines: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    script = "\n".join(lines + ['printf %s "$HF_TOKEN" | sha256sum > "$OUT/hf"',
                                'printf %s "$WANDB_API_KEY" | sha256sum > "$OUT/wandb"'])
    env = {"PATH": os.environ["PATH"], "OUT": str(tmp_path)}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_the_batch_script_names_the_token_files_and_reads_them_on_the_node(tmp_path, monkeypatch):
    hf, wandb = canary("hf_"), canary("wk")
    hf_path = token_file(tmp_path / "hf.token", hf)
    wandb_path = token_file(tmp_path / "wandb.token", wandb)
    monkeypatch.setenv("HF_TOKEN_FILE", str(hf_path))
    monkeypatch.setenv("WANDB_API_KEY_FILE", str(wandb_path))
    cfg = load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", f"storage.root={tmp_path / 'runs'}"])
    script = sbatch_script(make_plan(cfg))
    assert hf not in script and wandb not in script
    assert f"ftlib_token HF_TOKEN {hf_path}" in script and f"ftlib_token WANDB_API_KEY {wandb_path}" in script

    lines = shell_lines()
    proc = _run_token_lines(lines, tmp_path)                  # as the job's batch script runs them
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf").read_text().split()[0] == sha(hf)
    assert (tmp_path / "wandb").read_text().split()[0] == sha(wandb)
    # The file changed after submission: the job refuses it instead of running with it.
    os.chmod(hf_path, 0o644)
    proc = _run_token_lines(lines, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ftlib: {hf_path} (named by HF_TOKEN_FILE) must be a file only you can read; " \
                                  f"run: chmod 600 {hf_path}"


# ---------------------------------------------------------------------------- the submitit folder
def _submit_args(tmp_path, hf_cache, *extra):
    return [str(TINY_CONFIG), f"storage.root={tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
            f"data.train={SAMPLE_DATA}", f"slurm.job_name=ftlib-unsafe-{uuid.uuid4().hex[:8]}", *extra]


def test_the_submitit_folder_is_made_private_whatever_the_umask(tmp_path):
    old = os.umask(0o002)   # a common cluster umask: group-writable by default
    try:
        folder = private_folder(tmp_path / "run" / "slurm")
    finally:
        os.umask(old)
    assert (folder.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777])
def test_a_submitit_folder_others_can_write_is_refused_before_anything_is_written(tmp_path, hf_cache, capsys, mode):
    folder = tmp_path / "runs" / "tiny" / "slurm"
    folder.mkdir(parents=True)
    os.chmod(folder, mode)
    for flags in (["--dry-run"], []):
        assert submit_main(_submit_args(tmp_path, hf_cache) + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {folder}: the submitit folder (job pickles that run as you) is writable by group or "
                       f"others (mode {mode:04o}); run: chmod 700 {folder}")
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["slurm"]   # no config, no state
    assert not list(folder.iterdir())


def test_a_submitit_folder_of_another_user_is_refused(tmp_path, hf_cache, capsys):
    folder = tmp_path / "runs" / "tiny" / "slurm"
    folder.mkdir(parents=True, mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    assert submit_main(_submit_args(tmp_path, hf_cache)) == 2
    err = capsys.readouterr().err
    assert f"belongs to uid {NOBODY}, not to you" in err and str(folder) in err
    assert not list(folder.iterdir())


# ---------------------------------------------------------------------------- no code from pickles
class Payload:
    """Unpickling this runs a command: what a hostile pytorch_model.bin carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weight_files_that_are_pickles_never_run_code(tmp_path, hf_cache):
    """A model or adapter directory whose weights are a hostile pickle (no safetensors) does not
    get to run it: every load goes through weights_only unpickling, which refuses it."""
    import torch

    from ftlib.model import load_base_model, merge_adapter
    from ftlib.tiny import ensure_builtin
    cfg = load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", f"storage.hf_cache={hf_cache}"])
    model_dir = tmp_path / "model"
    shutil.copytree(ensure_builtin("tiny-llama", hf_cache), model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception) as caught:
        load_base_model(cfg, str(model_dir), quantized=False)
    assert not marker.exists(), "loading the model ran the pickle's code"
    assert "weights_only" in str(caught.value) or "Unpickl" in type(caught.value).__name__ + str(caught.value)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                 '"target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}')
    torch.save({"base_model.model.x": Payload(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(Exception):
        merge_adapter(cfg, str(ensure_builtin("tiny-llama", hf_cache)), adapter)
    assert not marker.exists(), "loading the adapter ran the pickle's code"
    # The payload is real: plain unpickling runs it.
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_ftlib_never_unpickles_weights_or_from_a_shared_path():
    """Grep the package: torch.load only with weights_only=True, never weights_only=False or
    use_safetensors=False, and pickle.load only in the --nproc handoff, which checks its folder."""
    offenders = []
    for path in sorted((REPO / "ftlib").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
            if "weights_only=True" not in match.group("args"):
                offenders.append(f"{path.name}: torch.load without weights_only=True")
        for bad in ("weights_only=False", "use_safetensors=False", "pickle.loads("):
            if bad in text:
                offenders.append(f"{path.name}: {bad}")
        if "pickle.load(" in text and path.name != "multiproc.py":
            offenders.append(f"{path.name}: pickle.load")
    assert not offenders, offenders
    handoff = (REPO / "ftlib" / "launch" / "multiproc.py").read_text()
    assert "not private to this user; refusing to unpickle" in handoff
    # The libraries' own loaders default to weights_only unpickling.
    import inspect

    from peft.utils.save_and_load import torch_load
    from transformers import PreTrainedModel
    assert inspect.signature(PreTrainedModel.from_pretrained).parameters["weights_only"].default is True
    assert inspect.signature(torch_load).parameters["weights_only"].default is True


# ---------------------------------------------------------------------------- a real job with canaries
def _slurm_records(job_id: str) -> str:
    fields = subprocess.run(["sacct", "--helpformat"], capture_output=True, text=True, check=True).stdout.split()
    outputs = [subprocess.run(cmd, capture_output=True, text=True) for cmd in (
        ["scontrol", "show", "job", "-dd", job_id], ["scontrol", "write", "batch_script", job_id, "-"],
        ["sacct", "-j", job_id, "-P", "--format=" + ",".join(fields)], ["sacct", "-j", job_id, "--long", "-P"])]
    for out in outputs[:1] + outputs[2:]:
        assert out.returncode == 0 and job_id in out.stdout, out.stderr
    assert "#SBATCH" in outputs[1].stdout, outputs[1].stderr      # the batch script as slurmctld stored it
    return "\n".join(o.stdout + o.stderr for o in outputs)


@pytest.mark.slurm
def test_canary_tokens_reach_the_job_and_nothing_else(tmp_path, hf_cache):
    """WANDB_API_KEY from the environment, HF_TOKEN from a 0600 file (HF_TOKEN_FILE): the job sees
    both; neither is in the sbatch script, submitit's pickles, the logs, training_args.bin, the
    W&B files (the .wandb file, its logs, wandb-core's log), `scontrol show job`, the stored batch
    script or sacct."""
    if not slurm_cluster_up():
        pytest.skip(NO_SLURM)
    import torch

    from ftlib.storage import RunDir, read_json
    wandb_key, hf_token = canary("wandbkey"), canary("hf_")
    hf_file = token_file(tmp_path / "hf.token", hf_token)
    seen = tmp_path / "seen"
    seen.mkdir()
    config = tmp_path / "canary.yaml"
    config.write_text(f"defaults: [{TINY_CONFIG}]\n"
                      "slurm:\n  setup:\n"
                      f"    - 'printf %s \"$HF_TOKEN\" | sha256sum > {seen}/hf'\n"
                      f"    - 'printf %s \"$WANDB_API_KEY\" | sha256sum > {seen}/wandb'\n")
    root = tmp_path / "runs"
    env = subprocess_env(hf_cache, WANDB_API_KEY=wandb_key, HF_TOKEN_FILE=str(hf_file))
    env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", str(config), f"storage.root={root}", f"storage.hf_cache={hf_cache}",
         f"data.train={SAMPLE_DATA}", "slurm.time=00:15:00", "training.max_steps=4", "training.save_steps=2",
         "training.logging_steps=1", "training.eval_strategy=no", "export.merged=false", "export.report=false",
         "--wait"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = RunDir(root / "tiny")
    job_id = read_json(run.state)["job_id"]

    # The job had both tokens (their hashes, written by the batch script before srun).
    assert (seen / "hf").read_text().split()[0] == sha(hf_token)
    assert (seen / "wandb").read_text().split()[0] == sha(wandb_key)
    # submitit's folder is private although the umask would have made it group-writable.
    assert (run.root / "slurm").stat().st_mode & 0o777 == 0o700

    files = [p for p in run.root.rglob("*") if p.is_file()]
    names = [p.name for p in files]
    # The places a token could leak to exist (the search below is not vacuous).
    assert any(n.endswith(".pkl") for n in names) and any(n.endswith(".sh") for n in names)
    assert any(n.endswith("_log.out") for n in names)
    assert names.count("training_args.bin") >= 2 and any(n.endswith(".wandb") for n in names)
    # Offline, W&B keeps the run's config in the .wandb file (files/config.yaml is made when synced).
    assert all(b"per_device_train_batch_size" in p.read_bytes() for p in files if p.name.endswith(".wandb"))
    leaks = [f"{p.relative_to(run.root)}: {label}" for p in files for label, value in
             (("WANDB_API_KEY", wandb_key), ("HF_TOKEN", hf_token)) if value.encode() in p.read_bytes()]
    assert not leaks, leaks
    for args_file in run.root.rglob("training_args.bin"):   # unpickled here, in the test only
        args = torch.load(args_file, weights_only=False)
        dump = repr(vars(args)) + repr(args.to_dict())
        assert wandb_key not in dump and hf_token not in dump
    records = _slurm_records(job_id)
    assert wandb_key not in records and hf_token not in records
    assert wandb_key not in proc.stdout + proc.stderr and hf_token not in proc.stdout + proc.stderr
