#!/usr/bin/env python3
"""Download a config's model, tokenizer and hub datasets into the shared HF cache (login node).

    HF_TOKEN=... python jobs/prefetch.py configs/llama3.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlib.cli import prefetch_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(prefetch_main())
