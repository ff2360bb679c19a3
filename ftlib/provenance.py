"""Provenance: what produced a run, recorded in provenance.json and extended on every (re)start."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .storage import RunDir, atomic_write_json, read_json

PACKAGES = ("ftlib", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
            "deepspeed", "submitit", "omegaconf", "wandb", "gguf")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the ftlib checkout in use (None outside a git checkout)."""
    path = path or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def record_start(run: RunDir, *, data_fingerprint: str | None = None,
                 container: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add this start (host, Slurm job id, restart count) to provenance.json."""
    prov = read_json(run.provenance, default={}) or {}
    prov.setdefault("git", git_state())
    prov["packages"] = package_versions()
    if data_fingerprint:
        prov["data_fingerprint"] = data_fingerprint
    if container:
        prov["container"] = container
    starts = prov.setdefault("starts", [])
    starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                   "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
                   "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
                   "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)})
    atomic_write_json(run.provenance, prov)
    return prov
