"""W&B from offline nodes: upload runs' offline W&B data from the login node with `wandb sync`,
and remember what was uploaded, so that status can show which runs have data not yet synced.

An offline job writes <run>/wandb/offline-run-<time>-<id>/run-<id>.wandb (a new directory at each
start: a requeue resumes the same W&B run id in a new directory). A running job keeps appending to
its newest file, so "synced" is recorded per directory as the size its .wandb file had when the
sync began (wandb_synced.json in the run directory): a file that has grown since is unsynced
again, and the next sync sends it again (--include-synced: wandb's own .synced marker would make
it skip the directory).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .storage import RunDir, atomic_write_json, read_json

SYNC_RECORD = "wandb_synced.json"
FAILURE_LINES = 4


@dataclass
class OfflineRun:
    directory: Path         # <run>/wandb/offline-run-...
    wandb_file: Path        # its run-<id>.wandb
    size: int


def offline_runs(run: RunDir) -> list[OfflineRun]:
    """The run's W&B offline directories, oldest first (the order wandb sync wants for a resumed run)."""
    found = []
    for directory in sorted(run.wandb.glob("offline-run-*")) if run.wandb.is_dir() else []:
        files = sorted(directory.glob("run-*.wandb"))
        if directory.is_dir() and not directory.is_symlink() and files:
            found.append(OfflineRun(directory, files[0], files[0].stat().st_size))
    return found


def synced_sizes(run: RunDir) -> dict[str, int]:
    record = read_json(run.root / SYNC_RECORD, default={}) or {}
    return {name: int(size) for name, size in record.get("synced", {}).items()}


def unsynced(run: RunDir) -> list[OfflineRun]:
    """Offline W&B directories of the run with data that no sync has sent yet."""
    done = synced_sizes(run)
    return [o for o in offline_runs(run) if done.get(o.directory.name) != o.size]


def sync_state(run: RunDir) -> str:
    """For status: "-" (no offline W&B data), "synced", or "unsynced (N dirs)"."""
    offline = offline_runs(run)
    if not offline:
        return "-"
    pending = unsynced(run)
    return "synced" if not pending else f"unsynced ({len(pending)} of {len(offline)} dirs)"


def mark_synced(run: RunDir, synced: list[OfflineRun]) -> None:
    """Record the sizes that were sent (measured before the sync began)."""
    done = synced_sizes(run)
    done.update({o.directory.name: o.size for o in synced})
    atomic_write_json(run.root / SYNC_RECORD, {"synced": done})


def wandb_command() -> list[str]:
    """The wandb CLI of this Python environment (the one ftlib's jobs wrote the files with)."""
    beside = Path(sys.executable).with_name("wandb")
    return [str(beside)] if beside.exists() else [shutil.which("wandb") or "wandb"]


def sync_run(run: RunDir, *, dry_run: bool = False, log=print) -> bool:
    """`wandb sync` the run's unsynced offline directories; True when nothing is left to do."""
    pending = unsynced(run)
    if not pending:
        log(f"{run.name}: nothing to sync ({sync_state(run)})")
        return True
    command = wandb_command() + ["sync", "--include-synced"] + (["--dry-run"] if dry_run else [])
    command += [str(o.directory) for o in pending]
    log(f"{run.name}: {' '.join(command)}")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"{run.name}: wandb sync did not run ({type(exc).__name__}: {exc})")
        return False
    output = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    # On failure wandb may print a whole traceback: its last lines say why.
    for line in output if proc.returncode == 0 else output[-FAILURE_LINES:]:
        log(f"  {line}")
    if proc.returncode != 0:
        log(f"{run.name}: wandb sync failed (exit {proc.returncode}); nothing marked as synced")
        return False
    if not dry_run:
        mark_synced(run, pending)
        log(f"{run.name}: synced {len(pending)} offline dir(s)")
    return True


def sync_runs(runs: list[RunDir], *, dry_run: bool = False, log=print) -> int:
    """Sync every run that has offline W&B data; 0 when all succeeded, 1 otherwise."""
    with_data = [r for r in runs if offline_runs(r)]
    if not with_data:
        log("no offline W&B runs to sync")
        return 0
    ok = [sync_run(run, dry_run=dry_run, log=log) for run in with_data]
    return 0 if all(ok) else 1
