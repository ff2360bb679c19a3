"""The first commands a newcomer types (issue 13): quiet, live, honest about failure, and the
`ftlib` command equal to jobs/*.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env
from ftlib.storage import RunDir, atomic_write_json, atomic_write_text, read_json

QUICK = ["training.max_steps=4", "training.logging_steps=2", "training.eval_strategy=no", "training.save_steps=4",
         "export.merged=false", "export.report=false"]


def _submit(command: list[str], root: Path, hf_cache: Path, *extra: str, env: dict | None = None):
    return subprocess.run([*command, str(TINY_CONFIG), "--local", f"storage.root={root}",
                           f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}", *QUICK, *extra],
                          cwd=REPO, env=subprocess_env(hf_cache, **(env or {})), capture_output=True, text=True,
                          timeout=600)


def _ftlib_command() -> list[str]:
    script = Path(sys.executable).parent / "ftlib"   # pip install -e . puts the console script here
    assert script.is_file(), f"{script} missing: run `pip install -e .` (setup.sh does)"
    return [str(script), "submit"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, hf_cache):
    """The same tiny run through jobs/submit.py and through the ftlib command."""
    base = tmp_path_factory.mktemp("cli")
    jobs = _submit([sys.executable, "jobs/submit.py"], base / "jobs", hf_cache)
    console = _submit(_ftlib_command(), base / "console", hf_cache)
    return base, jobs, console


def test_the_ftlib_command_equals_jobs_submit(two_runs):
    base, jobs, console = two_runs
    assert jobs.returncode == 0 and console.returncode == 0, jobs.stderr[-2000:] + console.stderr[-2000:]
    first = load_file(RunDir(base / "jobs" / "tiny").adapter / "adapter_model.safetensors")
    second = load_file(RunDir(base / "console" / "tiny").adapter / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def test_one_line_per_logging_step_and_no_library_chatter(two_runs):
    _, jobs, _ = two_runs
    out, err = jobs.stdout, jobs.stderr
    steps = [line for line in out.splitlines() if line.startswith("step ") and "| loss " in line]
    assert [line.split(" |")[0] for line in steps] == ["step 2/4", "step 4/4"], out
    assert "{'loss'" not in out and "'train_runtime'" not in out      # the Trainer's raw dicts
    assert "training: 4 steps" in out and "training done: 4 steps" in out
    for noise in ("FutureWarning", "Setting accelerator to CPU", "wandb: Tracking run", "Writing model shards"):
        assert noise not in out + err, noise


def test_periodic_progress_lines_in_a_log_file(tmp_path, hf_cache):
    # FTLIB_PROGRESS_S=0: a non-terminal gets a progress line after every step (at step 4 before
    # that step's loss line).
    proc = _submit([sys.executable, "jobs/submit.py"], tmp_path / "runs", hf_cache, "training.logging_steps=4",
                   "tracking.backends=[none]", env={"FTLIB_PROGRESS_S": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    periodic = [line for line in proc.stdout.splitlines() if line.startswith("step ") and "ETA" in line
                and "loss" not in line]
    assert [line.split(" |")[0] for line in periodic] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert "\r" not in proc.stdout


def test_a_live_status_line_on_a_terminal():
    import io

    from ftlib.progress import progress_callback
    from transformers import TrainerState

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, lines = Tty(), []
    progress = progress_callback(RunDir(Path("/nonexistent")), lines.append, out=out)
    state = TrainerState(max_steps=3, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    for step in (1, 2):
        state.global_step = step
        progress.on_step_end(None, state, None)
    assert out.getvalue().count("\r\033[K") >= 3 and "step 2/3" in out.getvalue()
    assert lines == ["training: 3 steps"]     # live lines are not log lines


def test_a_failed_local_run_is_failed_with_its_traceback_in_train_log(tmp_path, hf_cache):
    from ftlib.tiny import ensure_builtin

    model = tmp_path / "broken-model"
    shutil.copytree(ensure_builtin("tiny-llama", hf_cache), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])   # a truncated download
    root = tmp_path / "runs"
    proc = _submit([sys.executable, "jobs/submit.py"], root, hf_cache, f"model.name={model}",
                   "tracking.backends=[none]")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run tiny failed: ") and "train.log" in last, proc.stderr[-2000:]
    run = RunDir(root / "tiny")
    assert "Traceback (most recent call last)" in run.log.read_text()
    assert "Traceback" not in proc.stderr     # the terminal gets one line; the log has the rest
    status = subprocess.run([sys.executable, "jobs/status.py", "--root", str(root), "--json"], cwd=REPO,
                            env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=120)
    (row,) = json.loads(status.stdout)
    assert row["status"] == "failed" and row["error"] and row["log"] == str(run.log)
    table = subprocess.run([sys.executable, "jobs/status.py", "--root", str(root)], cwd=REPO,
                           env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=120).stdout
    assert "FAILED" in table and f"tiny: failed: {row['error']}" in table


def test_status_lists_broken_run_directories(tmp_path):
    from ftlib.status import table

    (tmp_path / "no-config").mkdir()
    atomic_write_json(tmp_path / "no-config" / "state.json", {"status": "running", "step": 3})
    (tmp_path / "bad-state").mkdir()
    atomic_write_text(tmp_path / "bad-state" / "config.yaml", "name: bad-state\n")
    (tmp_path / "bad-state" / "state.json").write_text("{not json")
    (tmp_path / "unrelated").mkdir()            # no run files at all: not a run
    rows = {r.name: r for r in table(tmp_path)}
    assert set(rows) == {"no-config", "bad-state"}
    assert any("no config.yaml" in p for p in rows["no-config"].problems)
    assert any("state.json unreadable" in p for p in rows["bad-state"].problems)


def test_status_json_shape(tmp_path):
    from ftlib.status import describe, table

    run = RunDir(tmp_path / "r1").create()
    atomic_write_text(run.config, "name: r1\n")
    atomic_write_json(run.state, {"status": "running", "step": 7, "max_steps": 20, "loss": 1.5, "job_id": ""})
    (row,) = json.loads(describe(table(tmp_path)))
    assert {"name", "status", "slurm_state", "job_id", "step", "max_steps", "step_of_max", "loss", "requeues",
            "wandb", "wandb_sync", "artifacts", "report", "log", "error", "problems"} <= set(row)
    assert (row["name"], row["status"], row["step_of_max"], row["loss"]) == ("r1", "running", "7/20", 1.5)


def test_status_json_for_finished_requeued_and_cancelled_runs(tmp_path, monkeypatch):
    from ftlib import status

    def run_dir(name: str, state: dict, starts: int = 1) -> RunDir:
        run = RunDir(tmp_path / name).create()
        atomic_write_text(run.config, f"name: {name}\n")
        atomic_write_json(run.state, state)
        atomic_write_json(run.provenance, {"starts": [{"slurm_restart_count": i} for i in range(starts)]})
        return run

    done = run_dir("finished", {"status": "completed", "step": 60, "max_steps": 60, "train_loss": 0.5, "job_id": "11"})
    (done.adapter).mkdir(parents=True)
    (done.adapter / "adapter_model.safetensors").write_bytes(b"x" * 10)
    atomic_write_json(done.manifest, {"run": "finished", "files": [
        {"path": "artifacts/adapter/adapter_model.safetensors", "size": 10, "sha256": "0" * 64}]})
    atomic_write_text(done.root / "report.md", "# report\n")
    run_dir("requeued", {"status": "running", "step": 30, "max_steps": 60, "loss": 1.25, "job_id": "12"}, starts=3)
    run_dir("cancelled", {"status": "interrupted", "step": 5, "max_steps": 60, "job_id": "13"})
    monkeypatch.setattr(status, "sacct_states", lambda ids: {"11": "COMPLETED", "12": "RUNNING", "13": "CANCELLED"})
    rows = {r["name"]: r for r in json.loads(status.describe(status.table(tmp_path)))}
    assert (rows["finished"]["status"], rows["finished"]["slurm_state"], rows["finished"]["artifacts"]) == \
        ("completed", "COMPLETED", "complete")
    assert rows["finished"]["report"] == str(done.root / "report.md") and rows["finished"]["loss"] == 0.5
    assert (rows["requeued"]["requeues"], rows["requeued"]["step_of_max"]) == (2, "30/60")
    assert (rows["cancelled"]["slurm_state"], rows["cancelled"]["status"]) == ("CANCELLED", "interrupted")
    assert all(r["job_id"] for r in rows.values())


def test_follow_waits_for_the_end_of_the_run_not_the_manifest(tmp_path):
    from ftlib.status import follow

    run = RunDir(tmp_path / "r").create()
    atomic_write_json(run.state, {"status": "running"})
    run.log.write_text("step 1/2\n")

    def finish():
        time.sleep(0.5)
        with open(run.log, "a") as handle:
            handle.write("export: manifest -> x\n")
        atomic_write_json(run.manifest, {"files": []})
        time.sleep(0.5)
        with open(run.log, "a") as handle:
            handle.write("report: report.md\nrun completed\n")
        atomic_write_json(run.state, {"status": "completed"})

    import io
    out = io.StringIO()
    writer = threading.Thread(target=finish)
    writer.start()
    follow(run, poll_s=0.1, out=out, timeout_s=30)
    writer.join()
    assert out.getvalue().endswith("report: report.md\nrun completed\n")


def test_submitting_a_finished_run_queues_nothing(tmp_path, capsys, hf_cache):
    from ftlib.cli import submit_main

    root = tmp_path / "runs"
    run = RunDir(root / "tiny").create()
    atomic_write_json(run.manifest, {"run": "tiny", "files": []})
    # Slurm submission: refused before any sbatch (no slurm/ folder, state untouched).
    assert submit_main([str(TINY_CONFIG), f"storage.root={root}", f"storage.hf_cache={hf_cache}",
                        f"data.train={SAMPLE_DATA}"]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "training.overwrite_output_dir=true" in out
    assert not (run.root / "slurm").exists() and read_json(run.state) is None


def test_an_override_error_names_the_command_line(capsys):
    from ftlib.cli import submit_main

    assert submit_main([str(TINY_CONFIG), "data.train=/nonexistent.jsonl", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the command line: data.train: file not found") and err.count("\n") == 1


def test_help_lists_the_sections_and_examples():
    out = subprocess.run([sys.executable, "jobs/submit.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120).stdout
    for section in ("model", "quantization", "lora", "training", "data", "export", "slurm", "container",
                    "tracking", "storage", "distributed", "sweep"):
        assert f"\n  {section}" in out, section
    assert "examples:" in out and "configs/tiny.yaml --local" in out
    top = subprocess.run([sys.executable, "-m", "ftlib", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert top.returncode == 0 and "submit" in top.stdout and "status" in top.stdout
