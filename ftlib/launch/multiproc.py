"""Local multi-process mode (`--local --nproc N`): torchrun starts N workers on this machine, each
running the same recipe (torch.distributed: NCCL on GPUs, gloo on CPU). For debugging sharded
runs before spending queue time."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import RunConfig, validate
from ..storage import atomic_write_text


def run_local_multiprocess(cfg: RunConfig) -> int:
    """Write the resolved config where the workers read it and run torchrun; its exit status."""
    cfg.run_root.mkdir(parents=True, exist_ok=True)
    resolved = Path(tempfile.mkdtemp(prefix=".launch-", dir=cfg.run_root)) / "config.yaml"
    atomic_write_text(resolved, cfg.to_yaml())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.distributed.nproc}", "-m", "ftlib.launch.worker", str(resolved),
               cfg.source]
    print(f"local: {cfg.distributed.nproc} processes: {' '.join(command)}", flush=True)
    return subprocess.call(command)


def load_resolved(path: str, source: str) -> RunConfig:
    from omegaconf import OmegaConf
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return validate(data, source=source)
