#!/usr/bin/env python3
"""Submit a fine-tuning run to Slurm, or run it here with --local.

    python jobs/submit.py configs/mistral.yaml slurm.partition=gpu
    python jobs/submit.py configs/tiny.yaml --local
    python jobs/submit.py configs/mistral.yaml --dry-run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # usable without `pip install -e .`

from ftlib.cli import submit_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(submit_main())
