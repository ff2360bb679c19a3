#!/usr/bin/env python3
"""Upload offline W&B runs (finished or running) from a machine with internet: wandb sync of each
run's wandb/offline-run-* directories, remembered so that status shows what is unsynced.

    WANDB_API_KEY=... python jobs/sync.py --root runs
    python jobs/sync.py --config configs/mistral.yaml --dry-run
    python jobs/sync.py --root runs tiny
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlib.cli import sync_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sync_main())
