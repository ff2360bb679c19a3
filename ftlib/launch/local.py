"""Local mode: run the job in this process (one GPU or CPU), logging to the run directory."""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import RunConfig
from ..recipe import RunResult, is_main_process, run_recipe


class RunLog:
    """Prints a line and appends it to the run's log file (main process only writes the file)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def run_local(cfg: RunConfig) -> RunResult:
    log = RunLog(cfg.run_root / "train.log" if is_main_process() else None)
    log(f"run directory: {cfg.run_root}")
    result = run_recipe(cfg, log=log)
    sys.stdout.flush()
    return result
