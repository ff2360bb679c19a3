"""What ftlib prints: plain lines, to the terminal and to the run's log file.

Slurm logs are files, not terminals: progress bars there become carriage-return soup, so the
libraries' bars are turned off and ftlib logs one plain line per event instead.
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path

from .locks import shared_mode
from .storage import RunDir, update_state


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
        self.to_file(line)

    def to_file(self, line: str) -> None:
        """The log file only (a traceback belongs in the log; the terminal gets one line)."""
        if self.path is not None:
            # Created with ftlib's shared mode (the umask, never group/world-writable): teammates read logs.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, shared_mode(False))
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def record_failure(run: RunDir, exc: BaseException, write, log_path: Path | str | None = None) -> str:
    """A run that died: the full traceback through `write` (into its log), state FAILED with a
    one-line summary (and the log's path, when given) for `jobs/status.py`. Returns the summary."""
    summary = one_line(exc)
    for line in traceback.format_exception(type(exc), exc, exc.__traceback__):
        for part in line.rstrip("\n").splitlines():
            write(part)
    if run.root.is_dir():
        fields = {"status": "failed", "error": summary}
        if log_path is not None:
            fields["log"] = str(log_path)
        update_state(run, **fields)
    return summary
