"""Leases, the one lock mechanism of ftlib, made to hold on shared filesystems; and the modes of
what ftlib creates there (a lease must be readable by the teammates it keeps out, and no file or
folder ftlib makes is ever group- or world-writable, whatever the umask).

Run directories and caches live on NFS or Lustre, where `flock` may silently do nothing (NFS
mounted without lock support, Lustre without `-o flock`): two jobs both "get" the lock. A lease
needs only what every shared filesystem does atomically:

* taking it is one `link()` of a complete temporary file onto the lease name: the link fails with
  EEXIST when the name exists, also over NFS (where O_EXCL was not atomic before NFSv3), and the
  file is never seen half-written (filesystems without hard links fall back to O_CREAT|O_EXCL);
* the file says who holds it (host, pid and its start time, Slurm job id, what it does, a token);
* a heartbeat thread refreshes its mtime every HEARTBEAT_S seconds while it is held;
* a lease is stale when its holder is dead: on this host (same pid namespace), when the pid is
  gone, a zombie, or reused (another start time); from anywhere, when it names an earlier start
  of our own Slurm job (a lower SLURM_RESTART_COUNT: a requeued job never runs twice at once) or
  when its heartbeat is older than STALE_AFTER_S, measured against the filesystem's own clock (a
  probe file's mtime), not this node's;
* a stale lease is removed under a short-lived second lock (`NAME.break`, a mkdir, atomic
  everywhere) after reading it again, so two processes that both find it stale cannot remove a
  fresh lease that a third took in between.

Its two uses: file_lock (a build of a token cache or a tiny model: waits, takes over a dead
holder's) and run_lease (a run directory: one job or export at a time, refused at once).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

NEVER_WRITABLE = 0o022   # group and world write: masked whatever the umask
HEARTBEAT_S = float(os.environ.get("FTLIB_LEASE_HEARTBEAT_S", "10"))
STALE_AFTER_S = float(os.environ.get("FTLIB_LEASE_STALE_S", "90"))   # 9 missed heartbeats
BREAK_STALE_S = 30.0   # a breaker that died between mkdir and rmdir


# ---------------------------------------------------------------------------- modes
def current_umask() -> int:
    """The umask, read without changing it (os.umask would, for every thread, for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def shared_mode(is_dir: bool, executable: bool = False) -> int:
    """What a file or folder of results gets: the user's umask, never group/world-writable."""
    return (0o777 if is_dir or executable else 0o666) & ~current_umask() & ~NEVER_WRITABLE


def never_writable_by_others() -> None:
    """Add group and world write to this process's umask (its other bits stay the user's): what
    libraries write into a run as it trains (W&B's and TensorBoard's files, the Trainer's) gets the
    modes ftlib's own files get. Under umask 000 W&B's files were world-writable."""
    os.umask(current_umask() | NEVER_WRITABLE)


def share(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the shared modes."""
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            os.chmod(item, shared_mode(item.is_dir(), bool(item.stat().st_mode & 0o100)))


def make_dirs(path: str | os.PathLike) -> Path:
    """mkdir -p with the shared folder mode (umask 000 must not make a world-writable folder)."""
    target = Path(path)
    missing, folder = [], target
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, shared_mode(True))
    return target


def privacy_problem(info: os.stat_result, *, forbidden: int, owner_fix: str, mode_fix: str) -> str | None:
    """Why a file or folder that speaks or runs as this user (a token, job pickles) is not private
    to them: another owner, or `forbidden` mode bits; None when it is private."""
    if info.st_uid != os.getuid():
        return f"belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); {owner_fix}"
    if info.st_mode & forbidden:
        access = "readable or writable" if forbidden & 0o044 else "writable"
        return f"is {access} by group or others (mode {stat.S_IMODE(info.st_mode):04o}); run: {mode_fix}"
    return None


# ---------------------------------------------------------------------------- leases
class LeaseHeld(Exception):
    """Someone alive holds the lease; the message names the holder."""

    def __init__(self, message: str, holder: "Holder | None" = None) -> None:
        super().__init__(message)
        self.holder = holder


def _pid_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


def slurm_job() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID", "")


def slurm_restart() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str | None        # the pid's start time: a reused pid is not the holder
    pid_ns: str              # pids mean something only within one pid namespace
    job: str                 # Slurm job id, "" outside Slurm
    restart: int             # SLURM_RESTART_COUNT: which start of that job
    what: str                # "training", "export", "build" ...
    token: str
    since: float

    @classmethod
    def me(cls, what: str) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _pid_start(os.getpid()), _pid_namespace(), slurm_job(),
                   slurm_restart(), what, uuid.uuid4().hex, time.time())

    def describe(self) -> str:
        if self.pid < 0:
            return "a holder that has not finished writing its lease file (or wrote an unreadable one)"
        job = f"Slurm job {self.job}" if self.job else "not a Slurm job"
        return (f"host {self.host} pid {self.pid} ({job}, {self.what}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))})")


def _unknown(since: float) -> Holder:
    return Holder("?", -1, None, "", "", 0, "unknown", "", since)


def read_holder(path: Path) -> Holder | None:
    """The holder named in a lease file; None when there is none or it is not readable (yet)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _fs_now(directory: Path) -> float:
    """The filesystem's clock: the mtime of a file created now (NFS servers set it)."""
    probe = directory / f".clock.{uuid.uuid4().hex}.probe"
    try:
        probe.touch()
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def stale_reason(path: Path, holder: Holder | None, mtime: float) -> str | None:
    """Why the lease at `path` (held by `holder`, heartbeat at `mtime`) is dead; None if it may be alive."""
    me = Holder.me("")
    if holder is not None and holder.job and holder.job == me.job and holder.restart < me.restart:
        return (f"it was taken by start {holder.restart} of this Slurm job ({holder.job}), which died; "
                f"this is start {me.restart}")
    if holder is not None and holder.host == me.host and holder.pid_ns == me.pid_ns:
        start = _pid_start(holder.pid)
        if start is None and not _pid_exists(holder.pid):
            return f"pid {holder.pid} is no longer running on {holder.host}"
        if _is_zombie(holder.pid):
            return f"pid {holder.pid} on {holder.host} has exited"
        if holder.start and start and start != holder.start:
            return f"pid {holder.pid} on {holder.host} is another process now (the holder exited)"
        return None
    age = _fs_now(path.parent) - mtime
    if age > STALE_AFTER_S:
        who = holder.describe() if holder else "an unreadable holder"
        return f"its heartbeat is {age:.0f} s old (more than {STALE_AFTER_S:.0f} s): {who} is gone"
    return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return False


class Lease:
    """An exclusive lease on `path` between processes and nodes that share a filesystem."""

    def __init__(self, path: str | os.PathLike, what: str, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.what = what
        self.log = log or (lambda line: print(f"ftlib: {line}", file=sys.stderr, flush=True))
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking and giving back
    def _create(self, holder: Holder) -> bool:
        """Make the lease file ours in one atomic step; False if someone holds it."""
        data = json.dumps(asdict(holder)).encode()
        tmp = self.path.with_name(f".{self.path.name}.{holder.token}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, shared_mode(False))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:   # no hard links here (some FUSE and object-store mounts)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            return self._create_exclusive(data)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, shared_mode(False))
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _break_if_stale(self) -> Holder | None:
        """Remove the lease if its holder is dead; return the live holder otherwise (None: retry now)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        holder = read_holder(self.path)
        if holder is None and time.time() - mtime < 2 * HEARTBEAT_S:
            # Being written by the O_EXCL fallback (or an old, empty flock file): give it a moment.
            return _unknown(mtime)
        reason = stale_reason(self.path, holder, mtime)
        if reason is None:
            return holder or _unknown(mtime)
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            breaker.mkdir(mode=0o700)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if _fs_now(self.path.parent) - breaker.stat().st_mtime > BREAK_STALE_S:
                    breaker.rmdir()
            return holder or _unknown(mtime)
        try:
            again = read_holder(self.path)
            if again == holder:    # still the one we judged dead, not a lease taken since
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self.log(f"recovered the stale lease {self.path}: {reason}")
        finally:
            breaker.rmdir()
        return None

    def try_acquire(self) -> Holder | None:
        """Take the lease; None on success, else the live holder."""
        make_dirs(self.path.parent)
        for _ in range(5):
            me = Holder.me(self.what)
            if self._create(me):
                self.holder = me
                self._start_heartbeat()
                return None
            other = self._break_if_stale()
            if other is not None:
                return other
        return read_holder(self.path) or _unknown(time.time())

    def acquire(self, *, wait: bool, describe: Callable[[Holder], str] | None = None) -> "Lease":
        """Take the lease, waiting while a live holder has it (wait=True) or raising LeaseHeld."""
        delay, said = 0.05, False
        while True:
            other = self.try_acquire()
            if other is None:
                return self
            message = describe(other) if describe else f"{self.path} is held by {other.describe()}"
            if not wait:
                raise LeaseHeld(message, other)
            if not said:
                self.log(f"waiting: {message}")
                said = True
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holder is not None and read_holder(self.path) == self.holder:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.holder = None

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if read_holder(self.path) != self.holder:
                self.log(f"lost the lease {self.path}: another process judged it stale and took it")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


def live_holder(path: str | os.PathLike) -> Holder | None:
    """Who holds the lease at `path` now; None when it is free or its holder is dead (read only)."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = read_holder(path)
    return None if stale_reason(path, holder, mtime) else (holder or _unknown(mtime))


@contextlib.contextmanager
def held(path: str | os.PathLike, what: str, *, wait: bool, log: Callable[[str], None] | None = None,
         describe: Callable[[Holder], str] | None = None) -> Iterator[Lease]:
    """`with held(path, "build", wait=True):` -- the lease for the block."""
    lease = Lease(path, what, log).acquire(wait=wait, describe=describe)
    try:
        yield lease
    finally:
        lease.release()


# ---------------------------------------------------------------------------- the two uses
def file_lock(path: str | os.PathLike):
    """An exclusive lock between processes (ranks, array tasks, nodes) sharing a filesystem: waits
    while a live holder builds, takes over a dead one's (a lease: see the module docstring)."""
    make_dirs(Path(path).parent)
    return held(path, "build", wait=True)


def run_lease(run, what: str, log: Callable[[str], None] | None = None):
    """The run directory (a storage.RunDir) for one job at a time; LeaseHeld (naming the holder) if it is taken."""
    make_dirs(run.root)
    return held(run.lease, what, wait=False, log=log, describe=lambda h: (
        f"run {run.name} ({run.root}) is in use by {h.describe()}; wait for it to end, cancel it, or "
        "choose another name=..."))
