"""Provenance: what produced a run, recorded in provenance.json and extended on every (re)start.

Each start also records the container it ran in, as seen from inside (`running_container`):
apptainer names the image file it runs from (APPTAINER_CONTAINER), and an image built by
containers/build.sh or containers/ftlib.def carries a marker (IMAGE_MARKER) with the hashes of
what it was built from. The submission recorded the image's path, sha256 and inputs hash from
outside (launch.containers.image_provenance, provenance.json "container"); a start whose image
and inputs hash are those says so ("matches_submitted": true).
"""
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


def image_marker_path() -> Path:
    """Where an ftlib image keeps its marker (containers/self-test.py --write-marker writes it)."""
    return Path(os.environ.get("FTLIB_HOME") or "/opt/ftlib") / "image.json"


def running_container(submitted: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The container this process runs in, detected from inside; None on the host.

    submitted: provenance.json's "container" (what the submission saw from outside); when given,
    the record says whether this is that image (same path and, when both are known, the same
    inputs hash)."""
    env = os.environ
    image = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    if image:
        record: dict[str, Any] = {"runtime": "apptainer", "image": image}
    elif env.get("CH_RUNNING"):
        record = {"runtime": "charliecloud"}
    else:
        record = {}
    marker = image_marker_path()
    if marker.is_file():
        record.setdefault("runtime", "unknown")
        info = read_json(marker, default={}) or {}
        record.update({k: info[k] for k in ("builder", "inputs_sha256", "source_sha256", "built_at")
                       if info.get(k)})
    if not record:
        return None
    if submitted and submitted.get("image") and record.get("image"):
        same = os.path.realpath(submitted["image"]) == os.path.realpath(record["image"])
        if submitted.get("inputs_sha256") and record.get("inputs_sha256"):
            same = same and submitted["inputs_sha256"] == record["inputs_sha256"]
        record["matches_submitted"] = same
    return record


def record_start(run: RunDir, *, data_fingerprint: str | None = None,
                 container: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add this start (host, Slurm job id, restart count, the container it runs in) to
    provenance.json. container: replaces the submission's record of the image."""
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
                   "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
                   "container": running_container(prov.get("container"))})
    atomic_write_json(run.provenance, prov)
    return prov
