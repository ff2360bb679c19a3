"""Status of the runs under a storage root: one row per run directory, from its files plus sacct.

Everything comes from files the jobs write atomically (state.json, provenance.json,
manifest.json) and from Slurm accounting, so it works for running, requeued, failed and finished
jobs, local or on Slurm. A directory that looks like a run but is broken (no config.yaml, an
unreadable state, artifacts missing from their manifest) is listed too, saying what is wrong.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .storage import RunDir, read_json, verify_manifest
from .sync import sync_state

# Files and folders of which any one makes a directory look like a run.
RUN_MARKS = ("config.yaml", "state.json", "provenance.json", "manifest.json", "checkpoints", "artifacts")
# Slurm states after which a job will not run again by itself.
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
# Run states (state.json) after which a local run is over.
FINAL = ("completed", "failed")


@dataclass
class RunStatus:
    name: str
    status: str                       # the run's own state: submitted, running, completed, failed ...
    slurm_state: str                  # sacct's state of its newest job, LOCAL, or -
    job_id: str
    step: int | None
    max_steps: int | None
    loss: float | None
    requeues: int
    artifacts: str                    # complete | partial | damaged | -
    wandb: str
    wandb_sync: str                   # - | synced | unsynced (N of M dirs): offline W&B data not yet uploaded
    log: str
    report: str | None
    error: str | None = None          # the failure's one-line summary
    problems: list[str] = field(default_factory=list)   # what is wrong with the directory

    @property
    def step_text(self) -> str:
        if self.step is None:
            return "-"
        return f"{self.step}/{self.max_steps if self.max_steps is not None else '?'}"


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


def looks_like_run(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any((path / m).exists() for m in RUN_MARKS)


def find_runs(root: Path) -> list[RunDir]:
    """Every directory under root that looks like a run, broken ones included, by name."""
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir() if looks_like_run(p)), key=lambda r: r.name)


def _read(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        return read_json(path, default={}) or {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        problems.append(f"{path.name} unreadable ({type(exc).__name__})")
        return {}


def _artifacts(run: RunDir, problems: list[str]) -> str:
    """complete | damaged | partial | -; cheap (sizes, not hashes: status runs often, on big files)."""
    if run.manifest.exists():
        bad = verify_manifest(run, deep=False)
        if bad:
            problems.append(f"artifacts damaged: {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; "
                            f"python jobs/export.py {run.root} re-makes exports")
            return "damaged"
        return "complete"
    if run.artifacts.exists() and any(run.artifacts.iterdir()):
        return "partial"
    return "-"


def run_status(run: RunDir, states: dict[str, str]) -> RunStatus:
    problems: list[str] = []
    if not run.config.exists():
        problems.append("no config.yaml (not started by ftlib, or its start was cut short)")
    state = _read(run.state, problems)
    prov = _read(run.provenance, problems)
    job_id = str(state.get("job_id") or "")
    slurm = states.get(job_id, "") or ("LOCAL" if not job_id else "?")
    status = str(state.get("status") or ("-" if not problems else "broken"))
    loss = state.get("loss", state.get("train_loss"))
    restarts = max([s.get("slurm_restart_count", 0) for s in prov.get("starts", [])] or [0])
    artifacts = _artifacts(run, problems)
    run_id = (run.root / "wandb_run_id").read_text().strip() if (run.root / "wandb_run_id").exists() else "-"
    log = state.get("log") or (str(run.log) if run.log.exists() else "-")
    report = run.root / "report.md"
    return RunStatus(run.name, status, slurm, job_id or "-", state.get("step"), state.get("max_steps"),
                     loss if isinstance(loss, (int, float)) else None, restarts, artifacts, run_id,
                     sync_state(run), log,
                     str(report) if report.exists() else None, state.get("error"), problems)


def table(root: Path) -> list[RunStatus]:
    runs = find_runs(root)
    job_ids = [str(_read(r.state, []).get("job_id") or "") for r in runs]
    states = sacct_states(job_ids)
    return [run_status(r, states) for r in runs]


def format_table(rows: list[RunStatus]) -> str:
    header = ["RUN", "STATUS", "SLURM", "JOB", "STEP", "LOSS", "REQUEUES", "ARTIFACTS", "W&B RUN", "W&B SYNC", "LOG"]
    cells = [[r.name, r.status.upper(), r.slurm_state, r.job_id, r.step_text,
              f"{r.loss:.4f}" if r.loss is not None else "-", str(r.requeues), r.artifacts, r.wandb, r.wandb_sync,
              r.log] for r in rows]
    widths = [max(len(str(c[i])) for c in [header] + cells) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + cells]
    for r in rows:   # what went wrong, under the table: a failure's summary, a broken directory
        if r.error:
            lines.append(f"{r.name}: failed: {r.error} (log: {r.log})")
        for problem in r.problems:
            lines.append(f"{r.name}: {problem}")
    return "\n".join(lines)


def describe(rows: list[RunStatus]) -> str:
    """JSON for scripts and dashboards: one object per run."""
    return json.dumps([dict(asdict(r), step_of_max=r.step_text) for r in rows], indent=2)


def _job_over(run: RunDir) -> bool:
    """The run will write no more: its state is final (local) or its Slurm job has ended."""
    state = _read(run.state, [])
    job_id = str(state.get("job_id") or "")
    if not job_id:
        return state.get("status") in FINAL
    return sacct_states([job_id]).get(job_id, "") in ENDED


def follow(run: RunDir, poll_s: float = 1.0, out=sys.stdout, timeout_s: float | None = None) -> None:
    """Print the job's log as it grows, until the job has ended (Slurm state, or the run's final
    state for a local run), then the lines written after that."""
    position = 0
    deadline = None if timeout_s is None else time.time() + timeout_s

    def drain() -> None:
        nonlocal position
        log = Path(_read(run.state, []).get("log") or run.log)
        if not log.exists():
            return
        with open(log, encoding="utf-8", errors="replace") as handle:
            handle.seek(position)
            chunk = handle.read()
            position = handle.tell()
        if chunk:
            out.write(chunk)
            out.flush()

    while True:
        drain()
        if _job_over(run) or (deadline is not None and time.time() > deadline):
            time.sleep(poll_s)   # the last lines of a job that just ended may still be on their way
            drain()
            return
        time.sleep(poll_s)


def cancel(run: RunDir) -> str:
    state = read_json(run.state, default={}) or {}
    job_id = state.get("job_id")
    if not job_id:
        raise ValueError(f"run {run.name} has no Slurm job id in {run.state}: nothing to cancel")
    subprocess.run(["scancel", str(job_id)], check=True, timeout=30)
    return str(job_id)
