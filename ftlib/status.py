"""Status of the runs under a storage root: one table from the run directories plus sacct.

Everything comes from files the jobs write atomically (state.json, provenance.json,
manifest.json) and from Slurm accounting, so it works for running, requeued and finished jobs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .storage import RunDir, read_json


@dataclass
class RunStatus:
    name: str
    slurm_state: str
    job_id: str
    step: str
    loss: str
    requeues: int
    artifacts: str
    log: str
    wandb: str


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state (COMPLETED, RUNNING, CANCELLED ...), from Slurm accounting."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.split()[0] if state.strip() else ""
    return states


def find_runs(root: Path) -> list[RunDir]:
    return sorted((RunDir(p) for p in root.iterdir() if p.is_dir() and (p / "config.yaml").exists()),
                  key=lambda r: r.name) if root.is_dir() else []


def run_status(run: RunDir, states: dict[str, str]) -> RunStatus:
    state = read_json(run.state, default={}) or {}
    prov = read_json(run.provenance, default={}) or {}
    job_id = str(state.get("job_id") or "")
    slurm = states.get(job_id, "") or ("LOCAL" if not job_id else "?")
    step = f"{state.get('step', 0)}/{state.get('max_steps', '?')}" if state else "-"
    loss = state.get("loss", state.get("train_loss"))
    restarts = max([s.get("slurm_restart_count", 0) for s in prov.get("starts", [])] or [0])
    artifacts = "complete" if run.is_complete() else ("partial" if run.artifacts.exists() and
                                                        any(run.artifacts.iterdir()) else "-")
    run_id = (run.root / "wandb_run_id").read_text().strip() if (run.root / "wandb_run_id").exists() else "-"
    log = state.get("log") or (str(run.log) if run.log.exists() else "-")
    return RunStatus(run.name, slurm, job_id or "-", step, f"{loss:.4f}" if isinstance(loss, float) else "-",
                     restarts, artifacts, log, run_id)


def table(root: Path) -> list[RunStatus]:
    runs = find_runs(root)
    job_ids = [str((read_json(r.state, default={}) or {}).get("job_id") or "") for r in runs]
    states = sacct_states(job_ids)
    return [run_status(r, states) for r in runs]


def format_table(rows: list[RunStatus]) -> str:
    header = ["RUN", "SLURM", "JOB", "STEP", "LOSS", "REQUEUES", "ARTIFACTS", "W&B RUN", "LOG"]
    cells = [[r.name, r.slurm_state, r.job_id, r.step, r.loss, str(r.requeues), r.artifacts, r.wandb, r.log]
             for r in rows]
    widths = [max(len(str(c[i])) for c in [header] + cells) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + cells]
    return "\n".join(lines)


def follow(run: RunDir, poll_s: float = 1.0, out=sys.stdout) -> None:
    """Print the job's log as it grows, until the run is complete or its job has ended."""
    log = Path((read_json(run.state, default={}) or {}).get("log") or run.log)
    position = 0
    while True:
        if log.exists():
            with open(log, encoding="utf-8", errors="replace") as handle:
                handle.seek(position)
                chunk = handle.read()
                position = handle.tell()
            if chunk:
                out.write(chunk)
                out.flush()
        state = read_json(run.state, default={}) or {}
        ended = sacct_states([str(state.get("job_id") or "")]).get(str(state.get("job_id")), "")
        if run.is_complete() or ended in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                          "NODE_FAIL"):
            return
        time.sleep(poll_s)


def cancel(run: RunDir) -> str:
    state = read_json(run.state, default={}) or {}
    job_id = state.get("job_id")
    if not job_id:
        raise ValueError(f"run {run.name} has no Slurm job id in {run.state}: nothing to cancel")
    subprocess.run(["scancel", str(job_id)], check=True, timeout=30)
    return str(job_id)


def describe(rows: list[RunStatus]) -> str:
    return json.dumps([vars(r) for r in rows], indent=2)
