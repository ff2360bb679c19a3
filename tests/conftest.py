"""Shared fixtures: no network, W&B offline, one tiny builtin model per test session."""
from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
SAMPLE_DATA = REPO / "configs" / "data" / "alpaca_sample.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """A shared HF cache for the session: builtin tiny models are built once into it."""
    path = tmp_path_factory.mktemp("hf-cache")
    os.environ["FTLIB_HF_CACHE"] = str(path)
    return path


@pytest.fixture
def tiny_config(tmp_path, hf_cache):
    """load_config(configs/tiny.yaml) with storage under tmp_path, plus overrides."""
    from ftlib.config import load_config

    def make(*overrides: str, root: Path | None = None):
        base = [f"storage.root={root or tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
                f"data.train={SAMPLE_DATA}"]
        return load_config(TINY_CONFIG, base + list(overrides))

    return make


def subprocess_env(hf_cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, FTLIB_HF_CACHE=str(hf_cache), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def wait_for(predicate, timeout=180, poll=0.2, what="condition"):
    """Poll predicate() until it is true; fail naming `what` after timeout seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------- the local Slurm cluster
NO_SLURM = "no local Slurm cluster: run `bash slurm/start-cluster.sh` first"


@functools.lru_cache(maxsize=1)
def slurm_cluster_up() -> bool:
    """sbatch exists and the node answers (idle, mixed or allocated); asked once per session."""
    if not shutil.which("sbatch"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.strip("*~") in ("idle", "mixed", "allocated") for s in out.stdout.split())


def sacct_state(job_id: str) -> str:
    """The job's state in Slurm's accounting ("" before it reaches slurmdbd)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True,
                         text=True).stdout.split()
    return out[0] if out else ""


# ---------------------------------------------------------------------------- in-process training
def stop_at(stop, step: int):
    """A callback that asks `stop` (a ftlib StopRequest) for a stop while step `step` + 1 runs, as
    a preemption signal would. Built on call: transformers is imported only by tests that train."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                stop.set("test preemption")

    return StopAt()


def closed_port_url() -> str:
    """A loopback URL on which nothing listens: an endpoint that refuses at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"
