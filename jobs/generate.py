#!/usr/bin/env python3
"""Generate from one base model with several LoRA adapters, switching adapters per prompt.

    python jobs/generate.py --base builtin:tiny-llama \
        --adapter sentiment=runs/sentiment --adapter summary=runs/summary/artifacts/adapter \
        --prompts prompts.jsonl [--greedy | --temperature 0.7 --top-p 0.9 --seed 1] \
        [--max-new-tokens 128] [--out generations.jsonl]

prompts.jsonl, one object a line: {"adapter": "sentiment", "messages": [...]} or
{"adapter": "summary", "prompt": "..."}; without "adapter" every adapter answers; "base" is the
base model alone. See ftlib/generate.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftlib.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main())
