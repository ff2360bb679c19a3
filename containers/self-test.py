"""The job image's self-test, and the digest of what an image is built from (stdlib only).

    python3 self-test.py                     the self-test: run inside the image (apptainer's %test,
                                             `apptainer test IMAGE.sif`, the Dockerfile's last RUN)
    python3 self-test.py --source-sha256 DIR print the digest of the ftlib source tree at DIR
    python3 self-test.py --source-files DIR  list its files (relative to DIR), one a line
    python3 self-test.py --write-marker BUILDER [KEY=VALUE ...]
                                             write the image marker (MARKER) for an image whose
                                             /opt/ftlib holds the source; KEY=VALUE pairs are added

The marker says which source the image holds: a job records it in provenance.json
(ftlib/provenance.py reads MARKER inside a container). The self-test checks that

- every pin in requirements.txt (beside this file) is installed at that version (torch: the
  version the marker records when the image was built with FTLIB_TORCH);
- the stack and ftlib import, ftlib from the image itself (not from a bound host checkout);
- llama.cpp's llama-quantize is on PATH and knows the K-quants;
- the marker's source digest is that of the source tree in the image.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FTLIB_HOME = Path(os.environ.get("FTLIB_HOME", "/opt/ftlib"))
MARKER = FTLIB_HOME / "image.json"   # ftlib/provenance.py IMAGE_MARKER names the same path

# The ftlib source an image holds, relative to the repository root (and to /opt/ftlib inside).
SOURCE_PATHS = ("pyproject.toml", "ftlib", "jobs", "configs", "containers/requirements.txt",
                "containers/install-stack.sh", "containers/self-test.py")
_SKIP = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info)(/|$)|\.py[co]$")

IMPORTS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf",
           "submitit", "wandb", "gguf", "deepspeed", "safetensors", "tensorboard", "matplotlib",
           "sentencepiece", "ftlib")


def source_files(root: Path) -> list[str]:
    """The files of SOURCE_PATHS under root, relative, sorted."""
    found = []
    for rel in SOURCE_PATHS:
        path = root / rel
        if path.is_file():
            found.append(rel)
        elif path.is_dir():
            for top, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not _SKIP.search(d + "/")]
                for name in files:
                    item = os.path.relpath(os.path.join(top, name), root)
                    if not _SKIP.search(item):
                        found.append(item)
        else:
            raise SystemExit(f"self-test: {path} is missing (the image copies {rel})")
    return sorted(found)


def source_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for rel in source_files(root):
        content = (root / rel).read_bytes()
        digest.update(f"{rel}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_marker(builder: str, extra: list[str]) -> None:
    marker = {"builder": builder, "source_sha256": source_sha256(FTLIB_HOME),
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from importlib import metadata
        marker["torch"] = metadata.version("torch")
    except Exception:  # noqa: BLE001 - the marker is written before torch in some recipes
        pass
    marker.update(item.split("=", 1) for item in extra)
    MARKER.parent.mkdir(parents=True, exist_ok=True)
    MARKER.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    print(f"self-test: wrote {MARKER}: {marker}")


def self_test() -> int:
    import importlib
    from importlib import metadata

    problems = []
    marker = json.loads(MARKER.read_text()) if MARKER.is_file() else None
    if marker is None:
        problems.append(f"the image marker {MARKER} is missing")
    elif marker.get("source_sha256") != source_sha256(FTLIB_HOME):
        problems.append(f"{MARKER} names source {marker.get('source_sha256')}, but {FTLIB_HOME} "
                        f"holds {source_sha256(FTLIB_HOME)}")

    pins = read_pins(HERE / "requirements.txt")
    have = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    if marker and marker.get("torch_requirement"):   # built with FTLIB_TORCH
        pins["torch"] = marker.get("torch", pins["torch"])
    for name, version in pins.items():
        got = have.get(name)
        if got is None or got.split("+")[0] != version.split("+")[0]:
            problems.append(f"{name}=={version} is pinned, installed: {got}")
    print(f"self-test: {len(pins)} pins checked against the installed packages ({len(have)} installed)")

    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - report every failing import
            problems.append(f"import {module} failed: {type(exc).__name__}: {exc}")
    if "ftlib" in sys.modules:
        where = Path(sys.modules["ftlib"].__file__).resolve()
        if not str(where).startswith(sys.prefix):
            problems.append(f"ftlib is imported from {where}, not from the image's {sys.prefix}")
        print(f"self-test: ftlib from {where}")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        print(f"self-test: torch {torch.__version__}, CUDA build {torch.version.cuda}, "
              f"CUDA available: {torch.cuda.is_available()}")

    try:
        usage = subprocess.run(["llama-quantize", "--help"], capture_output=True, text=True, timeout=60)
        if "Q4_K_M" not in usage.stdout + usage.stderr:
            problems.append("llama-quantize --help does not list Q4_K_M")
        else:
            print("self-test: llama-quantize runs")
    except OSError as exc:
        problems.append(f"llama-quantize does not run: {exc}")

    for problem in problems:
        print(f"self-test: FAILED: {problem}", file=sys.stderr)
    if not problems:
        print(f"self-test: ok (image marker: {marker})")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--source-sha256"] and len(argv) == 2:
        print(source_sha256(Path(argv[1])))
        return 0
    if argv[:1] == ["--source-files"] and len(argv) == 2:
        print("\n".join(source_files(Path(argv[1]))))
        return 0
    if argv[:1] == ["--write-marker"] and len(argv) >= 2:
        write_marker(argv[1], argv[2:])
        return 0
    if not argv:
        return self_test()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
