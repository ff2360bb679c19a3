#!/usr/bin/env python3
"""Runs under the storage root with their Slurm state; follow a log; cancel a run.

    python jobs/status.py                      # table of runs under ./runs (or $FTLIB_STORAGE)
    python jobs/status.py --config configs/mistral.yaml
    python jobs/status.py --follow mistral-7b-qlora
    python jobs/status.py cancel mistral-7b-qlora
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlib.cli import status_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(status_main())
