"""One process of a `--local --nproc N` run (started by torchrun; see launch/multiproc.py)."""
from __future__ import annotations

import sys

from .local import RunFailed, run_local
from .multiproc import load_handoff


def main() -> int:
    try:
        result = run_local(load_handoff(sys.argv[1]))
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0 if result.status in ("completed", "already-complete") else 1


if __name__ == "__main__":
    sys.exit(main())
