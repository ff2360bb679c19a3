"""Run directory on shared storage: layout, atomic writes, room, checkpoints and the manifest.

Every file another process may read (status on the login node, a requeued job, an export re-run)
is written under a temporary name in its directory, fsynced, then renamed: a crash leaves the old
state or the new one, never a torn file. A write that fails for lack of room raises DiskFull: one
line naming the path, the free and the needed bytes. Results follow the user's umask (files 0o666,
folders 0o777 less it; not mkstemp's 0600), never group/world-writable (locks.shared_mode).

Locks: one mechanism, the lease of ftlib/locks.py (a hard-linked file naming its holder, with a
heartbeat), never flock: on NFS without lock support and Lustre without -o flock, flock succeeds
for everyone and locks nothing, while link() and mkdir() are atomic there. A run directory has
one lease (`.run.lease`), held by the job training it (rank 0, the whole recipe) or by
jobs/export.py; a second one fails at once naming the holder. Build locks (token cache, builtin
models) wait instead, and take over the lease of a holder that died.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .locks import LeaseHeld, make_dirs, share, shared_mode  # noqa: F401 (LeaseHeld: for callers)

MANIFEST = "manifest.json"
COMPLETE_MARKER = "ftlib_complete.json"   # in checkpoint-N/, written after the Trainer saved it


# ---------------------------------------------------------------------------- room
class DiskFull(OSError):
    """A write failed for lack of space (ENOSPC, EDQUOT); the message is the one line to show."""

    def __init__(self, path: Path, free: int, needed: int | None, message: str | None = None) -> None:
        self.path, self.free, self.needed = Path(path), free, needed
        need = f"about {human(needed)} is needed" if needed else "more is needed"
        self.message = message or (f"disk full writing {path}: {human(free)} free on its filesystem, {need}; "
                                   "free space there or set storage.root to a larger filesystem")
        super().__init__(self.message)
        self.errno = errno.ENOSPC

    def __reduce__(self):   # pickled into submitit's result file: keep the message
        return (type(self), (self.path, self.free, self.needed, self.message))


def human(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes this user may still write on the filesystem of `path` (or of its nearest parent)."""
    path = Path(os.path.expanduser(path)).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.statvfs(path).f_bavail * os.statvfs(path).f_frsize


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def as_disk_full(exc: BaseException, path: Path, needed: int | None) -> DiskFull | None:
    """`exc` as DiskFull when it came from a full filesystem, else None. Libraries wrap ENOSPC (torch:
    'unexpected pos'), so a failed write on a filesystem left with (almost) no room counts too."""
    if isinstance(exc, DiskFull):
        return exc
    text = str(exc)
    definite = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        s in text for s in ("No space left", "os error 28", "Disk quota exceeded", "os error 122"))
    io_like = isinstance(exc, (OSError, RuntimeError)) or type(exc).__module__.startswith("safetensors")
    free = free_bytes(path)
    if definite or (io_like and free < max(needed or 0, 1 << 16)):
        return DiskFull(path, free, needed)
    return None


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike, needed: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Turn a write into `path` that failed for lack of room into DiskFull (one line, the room)."""
    try:
        yield
    except Exception as exc:
        full = as_disk_full(exc, Path(path), needed() if callable(needed) else needed)
        if full is None or full is exc:
            raise
        raise full from exc


# ---------------------------------------------------------------------------- atomic writes
def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort on file systems that refuse it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, private: bool = False) -> Path:
    path = Path(path)
    make_dirs(path.parent)
    with disk_full_guard(path, len(data)):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                os.fchmod(handle.fileno(), 0o600 if private else shared_mode(False))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, private: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), private=private)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()


def settle_interrupted(final: Path, log: Callable[[str], None] = lambda _: None) -> None:
    """An interrupted write of `final`: its temp files/staging folders `.NAME.*.tmp` go; `.NAME.old`
    is put back if the kill fell between staging_dir's renames. Caller holds `final`'s lock/lease."""
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        _remove(tmp)
        log(f"cleanup: removed {tmp}, left by an interrupted write")
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        os.replace(old, final)
        log(f"cleanup: restored {final} from {old.name} (interrupted replace)")
    _remove(old)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds: an
    adapter or merged model appears complete or not at all, the previous version stays until then.
    The caller holds the lock or lease for `final` (a killed earlier writer's staging goes here)."""
    final = Path(final)
    make_dirs(final.parent)
    settle_interrupted(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        with disk_full_guard(final, lambda: expected_bytes or (tree_bytes(final) or None)):
            yield tmp
            for child in tmp.rglob("*"):
                if child.is_file():
                    with open(child, "rb") as handle:
                        os.fsync(handle.fileno())
        share(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")   # settle_interrupted removed any earlier one
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

    name = property(lambda self: self.root.name)
    config = property(lambda self: self.root / "config.yaml")
    provenance = property(lambda self: self.root / "provenance.json")
    state = property(lambda self: self.root / "state.json", doc="step, loss, requeues, job ids (status.py)")
    lease = property(lambda self: self.root / ".run.lease", doc="who trains or exports the run now")
    slurm = property(lambda self: self.root / "slurm")
    checkpoints = property(lambda self: self.root / "checkpoints")
    wandb = property(lambda self: self.root / "wandb")
    tensorboard = property(lambda self: self.root / "tensorboard")
    artifacts = property(lambda self: self.root / "artifacts")
    adapter = property(lambda self: self.artifacts / "adapter")
    merged = property(lambda self: self.artifacts / "merged")
    gguf = property(lambda self: self.artifacts / "gguf")
    modelfile = property(lambda self: self.artifacts / "Modelfile")
    manifest = property(lambda self: self.root / MANIFEST)
    log = property(lambda self: self.root / "train.log", doc="local runs; Slurm runs log under slurm/")

    def is_complete(self) -> bool:
        return self.manifest.exists()

    def create(self) -> "RunDir":
        for path in (self.root, self.checkpoints, self.artifacts):
            make_dirs(path)
        return self


def update_state(run: RunDir, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into state.json (read by status.py and requeued jobs). One process writes it
    (rank 0 of the job holding the run's lease): read-merge-write under an atomic rename is enough."""
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


def clean_leftovers(run: RunDir, log: Callable[[str], None] = print) -> None:
    """Remove what killed writers left in the run (see settle_interrupted; checkpoints half
    deleted, a marker's temp file); the caller holds the run's lease."""
    for folder in (d for d in (run.root, run.artifacts, run.gguf) if d.is_dir()):
        for left in folder.glob(".*.tmp"):
            if not left.name.startswith(f".{run.lease.name}."):   # a lease being taken: not ours
                _remove(left)
                log(f"cleanup: removed {left.relative_to(run.root)}, left by an interrupted write")
        for old in folder.glob(".*.old"):
            settle_interrupted(old.with_name(old.name[1:-len(".old")]), log)
    for path in [*run.artifacts.glob(".*.not-written-by-rank-*"), *run.checkpoints.glob(".checkpoint-*.deleting"),
                 *run.checkpoints.glob("checkpoint-*/.*.tmp")]:
        _remove(path)
        log(f"cleanup: removed {path.relative_to(run.root)}, left by an interrupted write or deletion")


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int:
    """The step of a Trainer checkpoint directory (checkpoint-N), or -1."""
    step = path.name.split("-")[-1]
    return int(step) if step.isdigit() else -1


def file_entries(root: Path, under: Path, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Size and sha256 of every file below `under`, paths relative to `root`, sorted."""
    entries = []
    for path in sorted(p for p in under.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if any(part.startswith(".") and part.endswith(".tmp") for part in rel.parts) or path.name in skip:
            continue
        entries.append({"path": str(rel), "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def mark_checkpoint_complete(path: Path, step: int) -> None:
    """Make checkpoint-N eligible for resume (every rank has written its part); the marker records
    each file's size and sha256, so a later bit flip or truncation is caught. Modes: shared."""
    share(path)
    files = file_entries(path, path, skip=(COMPLETE_MARKER,))
    atomic_write_json(path / COMPLETE_MARKER, {"step": step, "time": time.time(), "files": files,
                                               "bytes": sum(f["size"] for f in files)})


def checkpoints_newest_first(run: RunDir) -> list[Path]:
    return sorted((p for p in run.checkpoints.glob("checkpoint-*") if p.is_dir()), key=checkpoint_step, reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint-N must not be resumed from (no marker, a file missing, truncated or changed
    since it was marked), or None when every recorded file is as it was saved."""
    try:
        marker = read_json(path / COMPLETE_MARKER)
    except (ValueError, OSError) as exc:
        return f"its completeness marker is unreadable ({type(exc).__name__})"
    if marker is None:
        return "no completeness marker (the save was interrupted)"
    for entry in marker.get("files", []):    # markers of older ftlib versions list no files
        file = path / entry["path"]
        if not file.is_file():
            return f"{entry['path']} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{entry['path']} is truncated or grown ({file.stat().st_size} bytes, {entry['size']} saved)"
        if sha256_file(file) != entry["sha256"]:
            return f"{entry['path']} differs from what was saved (sha256 mismatch: corrupted)"
    return None


def newest_complete_checkpoint(run: RunDir, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint whose marker and files verify; each one passed over is logged."""
    for path in checkpoints_newest_first(run):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if log is not None:
            log(f"checkpoint: skipping {path.name}: {problem}; trying the previous checkpoint")
    return None


def _delete_checkpoint(path: Path) -> None:
    """Out of the checkpoint-N namespace in one rename, then removed: a kill leaves no half."""
    doomed = path.with_name(f".{path.name}.deleting")
    with contextlib.suppress(FileNotFoundError):
        _remove(doomed)
        os.replace(path, doomed)
        _remove(doomed)


def prune_checkpoints(run: RunDir, keep: int | None, protect: str | None = None) -> list[Path]:
    """save_total_limit, applied only after the newest checkpoint is marked complete: keep the
    `keep` newest complete ones (and `protect`, the best); torn ones go too. Returns the deleted."""
    complete = [p for p in checkpoints_newest_first(run) if (p / COMPLETE_MARKER).exists()]
    if not complete:
        return []
    newest = checkpoint_step(complete[0])
    kept = set(complete[:keep] if keep else complete) | {complete[0]}
    doomed = [p for p in checkpoints_newest_first(run) if p not in kept and checkpoint_step(p) <= newest
              and not (protect and Path(protect).name == p.name)]
    for path in doomed:
        _delete_checkpoint(path)
    return doomed


def discard_checkpoints_after(run: RunDir, step: int, log: Callable[[str], None] = print) -> None:
    """Before resuming at `step`: checkpoints past it failed verification; the Trainer would
    write into their folders again, so they are removed, not mixed with the new save."""
    for path in checkpoints_newest_first(run):
        if checkpoint_step(path) > step:
            log(f"checkpoint: removing {path.name} ({checkpoint_problem(path) or 'after the resume point'})")
            _delete_checkpoint(path)


@contextlib.contextmanager
def checkpoint_disk_full(run: RunDir) -> Iterator[None]:
    """Training: a checkpoint save that ran out of room becomes DiskFull naming the checkpoint and
    the room the last complete one took."""
    try:
        yield
    except Exception as exc:
        saved = [p for p in checkpoints_newest_first(run) if (p / COMPLETE_MARKER).exists()]
        torn = next((p for p in checkpoints_newest_first(run) if p not in saved), run.checkpoints)
        full = as_disk_full(exc, torn, (read_json(saved[0] / COMPLETE_MARKER) or {}).get("bytes") if saved else None)
        if full is None:
            raise
        if torn != run.checkpoints:
            _delete_checkpoint(torn)   # useless, and its room is what the failure handlers need to write
        note = f"; training resumes from {saved[0].name}" if saved else "; no checkpoint is complete yet"
        raise DiskFull(full.path, full.free, full.needed, str(full) + note) from exc


# ---------------------------------------------------------------------------- manifest
def write_manifest(run: RunDir, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """List every artifact file with its size and sha256; written last, its presence means complete."""
    manifest = {"run": run.name, "files": file_entries(run.root, run.artifacts)}
    manifest.update(extra or {})
    atomic_write_json(run.manifest, manifest)
    return manifest


def verify_manifest(run: RunDir, *, deep: bool = True) -> list[str]:
    """Problems with a published run: manifest missing or unreadable, files listed but missing, or
    whose size (deep=False: cheap, for status) or also sha256 (deep=True) differ."""
    try:
        manifest = read_json(run.manifest)
        files = None if manifest is None else list(manifest["files"])
    except (ValueError, KeyError, TypeError, OSError):
        return [f"{run.manifest} is unreadable (damaged)"]
    if files is None:
        return [f"{run.manifest} is missing"]
    return [f"{path}: {problem}" for path, problem in damaged_entries(run, files, deep=deep).items()]


def damaged_entries(run: RunDir, files: list[dict], *, deep: bool = True) -> dict[str, str]:
    """{path relative to the run: what is wrong} for the manifest entries `files` whose file is
    missing, or whose size (deep=False) or also sha256 (deep=True) differ."""
    damaged = {}
    for entry in files:
        path = run.root / entry["path"]
        if not path.is_file():
            damaged[entry["path"]] = "missing"
        elif path.stat().st_size != entry["size"] or (deep and sha256_file(path) != entry["sha256"]):
            damaged[entry["path"]] = "size or sha256 differs from the manifest (damaged)"
    return damaged
