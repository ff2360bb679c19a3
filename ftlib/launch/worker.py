"""One process of a `--local --nproc N` run (started by torchrun; see launch/multiproc.py)."""
from __future__ import annotations

import sys

from .local import run_local
from .multiproc import load_resolved


def main() -> int:
    cfg = load_resolved(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1])
    result = run_local(cfg)
    return 0 if result.status in ("completed", "already-complete") else 1


if __name__ == "__main__":
    sys.exit(main())
