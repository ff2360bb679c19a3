"""One process of a `--local --nproc N` run (started by torchrun; see launch/multiproc.py)."""
from __future__ import annotations

import sys

from .local import run_local
from .multiproc import load_handoff


def main() -> int:
    result = run_local(load_handoff(sys.argv[1]))
    return 0 if result.status in ("completed", "already-complete") else 1


if __name__ == "__main__":
    sys.exit(main())
