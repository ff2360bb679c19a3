"""Local multi-process mode (`--local --nproc N`): torchrun starts N workers on this machine, each
running the same recipe (torch.distributed: NCCL on GPUs, gloo on CPU). For debugging sharded
runs before spending queue time.

The workers receive the launcher's validated RunConfig as it is (pickled into a private 0700
directory of the run), the way submitit hands it to Slurm tasks: it is not re-parsed.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import RunConfig
from ..storage import atomic_write_bytes


def run_local_multiprocess(cfg: RunConfig) -> int:
    """Hand the config to the workers and run torchrun; its exit status."""
    cfg.run_root.mkdir(parents=True, exist_ok=True)
    handoff = Path(tempfile.mkdtemp(prefix=".launch-", dir=cfg.run_root)) / "config.pkl"
    atomic_write_bytes(handoff, pickle.dumps(cfg), private=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.distributed.nproc}", "-m", "ftlib.launch.worker", str(handoff)]
    print(f"local: {cfg.distributed.nproc} processes: {' '.join(command)}", flush=True)
    return subprocess.call(command)


def load_handoff(path: str) -> RunConfig:
    """The launcher's config; only from a directory that the launcher made private to this user."""
    folder = Path(path).parent
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or Path(path).stat().st_uid != os.getuid():
        raise PermissionError(f"{folder}: not private to this user; refusing to unpickle from it")
    with open(path, "rb") as handle:
        return pickle.load(handle)
