#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on the lent GPU machine, which has no network.
#
#   bash benchmarks/make_gpu_kit.sh            # -> .gpukit/*.whl (ignored by git), size checked
#
# That machine (python 3.12, manylinux x86_64) has torch 2.11+cu130, transformers 5.17, peft,
# accelerate 1.15, safetensors, tokenizers, triton, pyarrow, pandas, xxhash and pytest, but not
# bitsandbytes, datasets (+ dill, multiprocess) or omegaconf. They travel as wheels in .gpukit/,
# named in the device call's `carry` (README.md, "GPU check"), and are installed there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpukit/*.whl
# (PYTHONPATH=/tmp/site:. then puts them before the machine's own packages).
# transformers and peft travel too, at the versions ftlib pins and is tested with here (5.23,
# 0.21: ftlib uses transformers 5.23's training.activation_checkpointing, which 5.17 may lack);
# KIT_DEVICE_TRANSFORMERS=1 leaves them out, to run on the machine's own.
# bitsandbytes' wheel holds a native library per CUDA/ROCm/XPU version (43 MB); only those for
# CPU and CUDA 13.x are kept (torch there is cu130; bitsandbytes picks the library by
# torch.version.cuda), which makes it a few MB; KIT_FULL_BNB=1 keeps them all.
# fsspec travels too (datasets pins fsspec<=2026.9.0; the version there has not been read), and
# liger-kernel (Triton kernels, pure Python), so the check can measure it. pyarrow (datasets wants
# >=24; the machine has one of unknown version) does not fit: its wheel alone is 55 MB.
# Not needed there, and not fetched: wandb, deepspeed, submitit, gguf (the check tracks nothing).
#
# The versions are the ones installed here (what the tests ran with), else the defaults below.
# antlr4-python3-runtime 4.9.3 (sdist only on PyPI) is built with `pip wheel` only when the
# omegaconf wheel asks for it: omegaconf 2.4 vendors its own antlr4 (Requires-Dist: PyYAML).
# Fails when the working tree that travels (tracked and untracked-not-ignored files) plus the
# kit exceeds 60 MiB (the device tool's limit is 64 MiB).
set -euo pipefail

cd "$(dirname "$0")/.."
KIT=${KIT:-.gpukit}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LIMIT=$((60 * 1024 * 1024))

version_here() {   # the version installed in this environment, else the default
    "$PY" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    print(sys.argv[2])
EOF
}

WANT=(
    "bitsandbytes==$(version_here bitsandbytes 0.50.2)"
    "datasets==$(version_here datasets 5.2.0)"
    "dill==$(version_here dill 0.4.1)"
    "multiprocess==$(version_here multiprocess 0.70.19)"
    "omegaconf==$(version_here omegaconf 2.4.0)"
    "fsspec==$(version_here fsspec 2026.9.0)"
    "liger-kernel==${LIGER_VERSION:-0.8.5}"
)
if [ -z "${KIT_DEVICE_TRANSFORMERS:-}" ]; then
    WANT+=("transformers==$(version_here transformers 5.23.0)" "peft==$(version_here peft 0.21.2)")
fi

rm -rf "$KIT"
mkdir -p "$KIT"
PLATFORMS=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
echo "make_gpu_kit: downloading ${WANT[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$KIT" "${WANT[@]}"

# antlr4-python3-runtime: only if omegaconf's wheel requires it (sdist only: build the wheel).
ANTLR=$("$PY" - "$KIT" <<'EOF'
import re, sys, zipfile
from pathlib import Path
for whl in Path(sys.argv[1]).glob("omegaconf-*.whl"):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            m = re.match(r"Requires-Dist:\s*antlr4-python3-runtime\s*\(?([^;)]*)", line)
            if m and "extra ==" not in line:
                print(m.group(1).strip() or "==4.9.3")
EOF
)
if [ -n "$ANTLR" ]; then
    echo "make_gpu_kit: omegaconf requires antlr4-python3-runtime$ANTLR: building its wheel"
    "$PY" -m pip wheel -q --no-deps -w "$KIT" "antlr4-python3-runtime==4.9.3"
else
    echo "make_gpu_kit: omegaconf vendors antlr4 (no antlr4-python3-runtime requirement): not built"
fi

if [ -z "${KIT_FULL_BNB:-}" ]; then
    "$PY" - "$KIT" "${KIT_BNB_KEEP:-cpu,cuda130,cuda132}" <<'EOF'
import os, re, sys, zipfile
from pathlib import Path
keep = set(sys.argv[2].split(","))
for whl in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(whl) as src:
        drop = {n for n in src.namelist()
                if (m := re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+)\.so", n)) and m.group(1) not in keep}
        slim = whl.with_name(whl.name + ".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in drop:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):   # the dropped files leave RECORD too
                    data = "".join(line + "\n" for line in data.decode().splitlines()
                                   if line.split(",")[0] not in drop).encode()
                dst.writestr(info, data)
    os.replace(slim, whl)
    print(f"make_gpu_kit: {whl.name}: kept the {', '.join(sorted(keep))} libraries, dropped {len(drop)}")
EOF
fi

# One version of each distribution, or pip refuses the whole install there.
"$PY" - "$KIT" <<'EOF'
import sys
from collections import Counter
from pathlib import Path
names = Counter(p.name.split("-")[0].lower().replace("_", "-") for p in Path(sys.argv[1]).glob("*.whl"))
dup = [n for n, c in names.items() if c > 1]
if dup:
    sys.exit(f"make_gpu_kit: more than one wheel of {dup}")
EOF

sum_sizes() { awk '$2 == "total" { s += $1 } END { print s + 0 }'; }
# (files deleted but not yet staged make du complain: they do not travel, so they count 0)
TREE=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null || true) | sum_sizes)
KIT_BYTES=$(find "$KIT" -type f -print0 | xargs -0 du -cb | sum_sizes)
ALL=$((TREE + KIT_BYTES))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "make_gpu_kit: $(ls "$KIT" | wc -l) wheels in $KIT:"
ls -l "$KIT" | awk 'NR > 1 { printf "  %10d  %s\n", $5, $9 }'
echo "make_gpu_kit: tree $(mib "$TREE") + kit $(mib "$KIT_BYTES") = $(mib "$ALL") (limit $(mib "$LIMIT"))"
if [ "$ALL" -gt "$LIMIT" ]; then
    echo "make_gpu_kit: FAILED: the tree plus the kit exceed 60 MiB; the device call would be refused" >&2
    exit 1
fi
