#!/usr/bin/env python3
"""Prune the checkpoints of finished runs; artifacts, report and the final checkpoint stay.

    python jobs/clean.py --root runs --dry-run         # exactly what would go, and how much space
    python jobs/clean.py --root runs                   # every finished run under runs/
    python jobs/clean.py --config configs/mistral.yaml --all-checkpoints mistral-7b-qlora
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlib.cli import clean_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(clean_main())
