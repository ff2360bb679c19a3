"""What ftlib prints: plain lines, to the terminal and to the run's log file.

Slurm logs are files, not terminals: progress bars there become carriage-return soup, so the
libraries' bars are turned off and ftlib logs one plain line per event instead.
"""
from __future__ import annotations

from pathlib import Path


def quiet_progress_bars() -> None:
    """Turn off datasets' and transformers' progress bars (imported lazily: they pull in torch)."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class RunLog:
    """Prints a line and appends it to the run's log file (pass path=None on ranks other than 0)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
