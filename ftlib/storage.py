"""Run directory on shared storage: layout, atomic writes, state, checkpoints and the manifest.

Every file another process may read (a status command on the login node, a requeued job, an
export re-run) is written under a temporary name in the same directory, fsynced, then renamed:
a crash leaves the old state or the new one, never a torn file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
COMPLETE_MARKER = "ftlib_complete.json"   # in checkpoint-N/, written after the Trainer saved it


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort on file systems that refuse it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds.

    Directory artifacts (an adapter, a merged model) appear under their real name complete or
    not at all; a previous complete version stays until the new one is ready.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock between processes (ranks, array tasks) that share a file system."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunDir:
    """The layout of one run on shared storage (see DESIGN.md, 'Run directory')."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def state(self) -> Path:
        """Small JSON that the job updates and status.py reads: step, loss, requeues, job ids."""
        return self.root / "state.json"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def adapter(self) -> Path:
        return self.artifacts / "adapter"

    @property
    def merged(self) -> Path:
        return self.artifacts / "merged"

    @property
    def gguf(self) -> Path:
        return self.artifacts / "gguf"

    @property
    def modelfile(self) -> Path:
        return self.artifacts / "Modelfile"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def log(self) -> Path:
        """Log of local-mode runs; Slurm runs log under slurm/ (submitit's files)."""
        return self.root / "train.log"

    def is_complete(self) -> bool:
        return self.manifest.exists()

    def create(self) -> "RunDir":
        for path in (self.root, self.checkpoints, self.artifacts):
            path.mkdir(parents=True, exist_ok=True)
        return self


def update_state(run: RunDir, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into state.json (the small file that status.py and requeued jobs read).

    Only one process writes a run's state at a time (rank 0 of its one job), so read-merge-write
    under an atomic rename is enough: a reader sees the old state or the new one."""
    state = read_json(run.state, default={}) or {}
    state.update(fields)
    atomic_write_json(run.state, state)
    return state


def reset_run(run: RunDir) -> None:
    """training.overwrite_output_dir: forget checkpoints, artifacts and W&B id; start afresh."""
    for path in (run.checkpoints, run.artifacts, run.wandb, run.tensorboard):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run.manifest, run.state, run.root / "wandb_run_id"):
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int:
    """The step of a Trainer checkpoint directory (checkpoint-N), or -1."""
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def mark_checkpoint_complete(path: Path, step: int) -> None:
    """Make checkpoint-N eligible for resume; called once every rank has written its part."""
    atomic_write_json(path / COMPLETE_MARKER, {"step": step, "time": time.time()})


def checkpoints_newest_first(run: RunDir) -> list[Path]:
    if not run.checkpoints.is_dir():
        return []
    return sorted((p for p in run.checkpoints.glob("checkpoint-*") if p.is_dir()),
                  key=checkpoint_step, reverse=True)


def newest_complete_checkpoint(run: RunDir) -> Path | None:
    """Only checkpoints that carry ftlib's marker, written after the Trainer finished saving them."""
    for path in checkpoints_newest_first(run):
        if (path / COMPLETE_MARKER).exists():
            return path
    return None


# ---------------------------------------------------------------------------- manifest
def file_entries(root: Path, under: Path) -> list[dict[str, Any]]:
    """Size and sha256 of every file below `under`, paths relative to `root`, sorted."""
    entries = []
    for path in sorted(p for p in under.rglob("*") if p.is_file()):
        if any(part.startswith(".") and part.endswith(".tmp") for part in path.relative_to(root).parts):
            continue
        entries.append({"path": str(path.relative_to(root)), "size": path.stat().st_size,
                        "sha256": sha256_file(path)})
    return entries


def write_manifest(run: RunDir, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """List every artifact file with its size and sha256; written last, its presence means complete."""
    manifest = {"run": run.name, "files": file_entries(run.root, run.artifacts)}
    manifest.update(extra or {})
    atomic_write_json(run.manifest, manifest)
    return manifest


def verify_manifest(run: RunDir) -> list[str]:
    """Problems with a manifest: files listed but missing, or whose size or sha256 differ."""
    manifest = read_json(run.manifest)
    if manifest is None:
        return [f"{run.manifest} is missing"]
    problems = []
    for entry in manifest["files"]:
        path = run.root / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: size or sha256 differs from the manifest")
    return problems
