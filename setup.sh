#!/usr/bin/env bash
# Creates .venv with ftlib and its pinned stack. Idempotent; safe to re-run.
#   bash setup.sh            # CPU machines (torch CPU build, ~2 min)
#   FTLIB_TORCH=torch==2.13.0 bash setup.sh   # choose another torch build (e.g. a CUDA one on GPU nodes)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on CPU machines.
python -m pip install -q "${FTLIB_TORCH:-torch==2.13.0}"
python -m pip install -q -e '.[dev]'
# DeepSpeed's ops are JIT-built on first use; skip building them at install time.
DS_BUILD_OPS=0 python -m pip install -q -e '.[deepspeed]'
python -c "import ftlib, torch, transformers, peft, bitsandbytes; print('ftlib ready: torch', torch.__version__, '| transformers', transformers.__version__)"
