"""jobs/sync.py: offline W&B runs (real ones, written by wandb in offline mode, a resumed run with
two directories) are found, handed to the real `wandb sync` (--dry-run: no server can be reached
here), and recorded as synced only when wandb succeeded; data appended by a running job makes a
synced run unsynced again."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from ftlib.storage import RunDir
from ftlib.sync import SYNC_RECORD, mark_synced, offline_runs, sync_state, unsynced

WRITE_RUNS = """
import sys, wandb
root = sys.argv[1]
for name, sessions in (("resumed", 2), ("single", 1)):
    for session in range(sessions):
        run = wandb.init(mode="offline", dir=f"{root}/{name}", id=f"{name}-id", resume="allow", project="ftlib-test",
                         settings=wandb.Settings(console="off", x_disable_stats=True))
        for step in range(3):
            run.log({"loss": 1.0 / (step + 1 + session)})
        run.finish()
"""


@pytest.fixture(scope="module")
def offline_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb-runs")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-c", WRITE_RUNS, str(root)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("resumed", "single", "no-wandb"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.yaml").write_text(f"name: {name}\n")
    return root


@pytest.fixture
def root(offline_root, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(offline_root, copy, symlinks=True)
    return copy


def sync(root: Path, *args: str, unset: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in dict(os.environ, **env).items() if k not in unset}
    return subprocess.run([sys.executable, "jobs/sync.py", "--root", str(root), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_offline_runs_are_found_oldest_first_and_unsynced(root):
    resumed = RunDir(root / "resumed")
    dirs = offline_runs(resumed)
    assert len(dirs) == 2 and all(d.directory.name.startswith("offline-run-") for d in dirs)
    assert dirs[0].directory.name < dirs[1].directory.name
    assert all(d.wandb_file.name == "run-resumed-id.wandb" and d.size > 0 for d in dirs)
    assert sync_state(resumed) == "unsynced (2 of 2 dirs)"
    assert sync_state(RunDir(root / "single")) == "unsynced (1 of 1 dirs)"
    assert sync_state(RunDir(root / "no-wandb")) == "-"


def test_dry_run_hands_exactly_the_unsynced_dirs_to_wandb_and_marks_nothing(root):
    proc = sync(root, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, count in (("resumed", 2), ("single", 1)):
        for d in offline_runs(RunDir(root / name)):
            assert str(d.directory) in proc.stdout
        assert f"Would sync {count} run(s)" in proc.stdout
    assert "latest-run" not in proc.stdout       # wandb's symlink to the newest dir: not a second copy
    assert not any((root / name / SYNC_RECORD).exists() for name in ("resumed", "single"))


def test_a_failed_sync_marks_nothing_and_exits_1(root, tmp_path):
    # No API key and nowhere to send to: the real wandb sync fails, as it does without a login.
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_BASE_URL": "http://127.0.0.1:9"}
    proc = sync(root, "single", unset=("WANDB_API_KEY", "WANDB_MODE", "WANDB_SILENT"), **env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "No API key configured" in proc.stdout      # wandb's own reason, passed on
    assert "single: wandb sync failed" in proc.stdout and "nothing marked as synced" in proc.stdout
    assert not (root / "single" / SYNC_RECORD).exists()
    assert sync_state(RunDir(root / "single")) == "unsynced (1 of 1 dirs)"


def test_what_a_running_job_appends_after_a_sync_is_unsynced_again(root):
    run = RunDir(root / "resumed")
    mark_synced(run, unsynced(run))                # as sync_run does after wandb succeeded
    assert sync_state(run) == "synced" and unsynced(run) == []
    newest = offline_runs(run)[-1]
    with open(newest.wandb_file, "ab") as handle:  # the job, still running, writes more
        handle.write(b"\0" * 64)
    assert [d.directory for d in unsynced(run)] == [newest.directory]
    assert sync_state(run) == "unsynced (1 of 2 dirs)"
    proc = sync(root, "--dry-run", "resumed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Would sync 1 run(s)" in proc.stdout and str(newest.directory) in proc.stdout
    # The separator matters: the newer folder's name can extend the older one's (same second: '-1').
    assert str(offline_runs(run)[0].directory) + "/" not in proc.stdout
    assert "--include-synced" in proc.stdout      # wandb's own .synced marker must not skip it


def test_runs_without_offline_data_and_unknown_runs(root):
    proc = sync(root, "no-wandb")
    assert proc.returncode == 0 and "no offline W&B runs to sync" in proc.stdout
    proc = sync(root, "nosuchrun")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: no run named 'nosuchrun' under {root} (runs: no-wandb, resumed, single); pass --root or --config"]
