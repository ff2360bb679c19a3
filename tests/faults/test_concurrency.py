"""Concurrency: two submissions of one run at once, array tasks sharing a model and a token cache,
and the lease (ftlib/locks.py) on a filesystem where flock does nothing.

Every process here disables fcntl.flock/lockf (what NFS without lock support does: they succeed and
lock nothing), so the exclusion proven is the lease's own: a hard-linked lease file that names its
holder, a heartbeat, and recovery of a dead holder's lease."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env, wait_for
from ftlib import locks
from ftlib.locks import Holder, Lease, LeaseHeld, live_holder
from ftlib.locks import file_lock
from ftlib.storage import RunDir, read_json, verify_manifest

NO_FLOCK = "import fcntl; fcntl.flock = fcntl.lockf = lambda *a, **k: None\n"


def python(code: str, *args, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NO_FLOCK + textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            env=env or dict(os.environ, PYTHONUNBUFFERED="1"), **popen)


def write_holder(path: Path, **fields) -> Holder:
    holder = Holder(**dict(asdict(Holder.me("training")), **fields))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    return holder


# ---------------------------------------------------------------------------- two submissions
def test_two_submissions_of_one_run_one_trains_the_other_names_it_and_a_killed_holder_is_recovered(tmp_path, hf_cache):
    root = tmp_path / "runs"
    run = RunDir(root / "tiny")
    args = [sys.executable, "jobs/submit.py", str(TINY_CONFIG), f"storage.root={root}", f"storage.hf_cache={hf_cache}",
            f"data.train={SAMPLE_DATA}", "training.save_steps=5", "training.eval_strategy=no", "export.report=false",
            "export.merged=false", "tracking.backends=[none]", "--local"]
    outs = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(2)]
    procs = [subprocess.Popen(args + ["training.max_steps=400"], cwd=REPO, env=subprocess_env(hf_cache), stdout=o,
                              stderr=e) for o, e in outs]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), timeout=600, what="one submission to give up")
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        assert winner.poll() is None, "both ended: the second did not wait for or refuse the first"
        err = (tmp_path / f"err{loser}").read_text()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert procs[loser].returncode == 2 and len(lines) == 1, err[-3000:]
        holder = f"host {socket.gethostname()} pid {winner.pid} (not a Slurm job, "
        assert lines[0].startswith(f"error: run tiny ({run.root}) is in use by {holder}"), lines[0]
        assert lines[0].endswith("wait for it to end, cancel it, or choose another name=...")
        assert "step " not in (tmp_path / f"out{loser}").read_text()          # it never trained
        assert "in use by" not in (read_json(run.state) or {}).get("error", "")   # nor marked the winner's run

        wait_for(lambda: (run.checkpoints / "checkpoint-5" / "ftlib_complete.json").exists(), timeout=600,
                 what="the winner's first checkpoint")
        winner.kill()               # SIGKILL: its lease stays behind, naming a dead process
        winner.wait()
        assert json.loads(run.lease.read_text())["pid"] == winner.pid
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rerun = subprocess.run(args + ["training.max_steps=5"], cwd=REPO, env=subprocess_env(hf_cache),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"recovered the stale lease {run.lease}: pid {winner.pid} is no longer running on " in rerun.stderr
    assert "resuming from" in rerun.stdout
    assert verify_manifest(run) == [] and not run.lease.exists()


# ---------------------------------------------------------------------------- build locks
BUILDER = """
import json, sys
from pathlib import Path
from ftlib import data, model, tiny
from ftlib.config import load_config

built = []
real = tiny.build_model
tiny.build_model = lambda *a, **k: (built.append(1), real(*a, **k))[1]
path = tiny.ensure_builtin("builtin:tiny-llama", sys.argv[1])
cfg = load_config(sys.argv[3], [f"storage.hf_cache={sys.argv[4]}", f"data.train={sys.argv[5]}"])
tokenizer = model.load_tokenizer(cfg, model.resolve_model_path(cfg))
logs = []
prepared = data.prepare_data(cfg.data, tokenizer, seed=42, cache_root=Path(sys.argv[2]), log=logs.append)
print(json.dumps({"built_model": bool(built), "model": str(path), "data_from_cache": prepared.from_cache,
                  "rows": len(prepared.train), "logs": logs}))
"""


def test_array_tasks_build_a_model_and_a_token_cache_once_the_others_wait_and_reuse(tmp_path, hf_cache, tiny_config):
    from ftlib import data, model

    cfg = tiny_config()
    tokenizer = model.load_tokenizer(cfg, model.resolve_model_path(cfg))
    key = data.cache_key(cfg.data, tokenizer, 42)
    models, cache = tmp_path / "models", tmp_path / "data-cache"
    model_lock = Lease(models / "ftlib-builtin" / ".tiny-llama.lock", "test").acquire(wait=False)
    data_lock = Lease(cache / f".{key}.lock", "test").acquire(wait=False)
    errs = [tmp_path / f"err{i}" for i in range(3)]
    procs = [python(BUILDER, models, cache, TINY_CONFIG, hf_cache, SAMPLE_DATA, stdout=subprocess.PIPE,
                    stderr=open(errs[i], "w"), text=True) for i in range(3)]
    try:
        def waiting(lock: Path) -> bool:
            return all(f"ftlib: waiting: {lock} is held by host" in e.read_text() for e in errs)
        wait_for(lambda: waiting(model_lock.path), timeout=600, what="three tasks waiting for the model lock")
        model_lock.release()        # all three race for it now: one builds, two wait for it
        wait_for(lambda: waiting(data_lock.path), timeout=600, what="three tasks waiting for the token cache lock")
        data_lock.release()
        results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        model_lock.release()
        data_lock.release()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [e.read_text()[-2000:] for e in errs]
    assert sorted(r["built_model"] for r in results) == [False, False, True]
    assert sorted(r["data_from_cache"] for r in results) == [False, True, True]
    assert len({r["rows"] for r in results}) == 1 and len({r["model"] for r in results}) == 1
    assert sum(any("reusing tokenized cache" in line for line in r["logs"]) for r in results) == 2
    assert not list(cache.glob(".*.tmp")) and not list((models / "ftlib-builtin").glob(".*.tmp"))


# ---------------------------------------------------------------------------- the lease itself
COUNTER = """
import os, sys
from pathlib import Path
from ftlib.locks import file_lock

lock, counter, inside, violations = (Path(a) for a in sys.argv[1:5])
for _ in range(int(sys.argv[5])):
    with file_lock(lock):
        try:
            os.close(os.open(inside, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            with open(violations, "a") as handle:
                handle.write(f"{os.getpid()}\\n")
        value = int(counter.read_text() or 0)
        counter.write_text(str(value + 1))
        os.unlink(inside)
"""


def test_the_lease_excludes_when_flock_does_nothing(tmp_path):
    counter, violations = tmp_path / "counter", tmp_path / "violations"
    counter.write_text("0")
    procs = [python(COUNTER, tmp_path / ".lock", counter, tmp_path / "inside", violations, 25) for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    assert not violations.exists(), f"two processes were inside at once: {violations.read_text()}"
    assert counter.read_text() == "100"
    assert not (tmp_path / ".lock").exists()


def test_a_live_holder_on_another_node_is_named_and_a_silent_one_is_recovered(tmp_path):
    path = tmp_path / ".run.lease"
    write_holder(path, host="gpu-node-17", pid=4242, job="9001", restart=0)
    with pytest.raises(LeaseHeld) as held:
        Lease(path, "export").acquire(wait=False)
    assert "gpu-node-17 pid 4242 (Slurm job 9001, training, since " in str(held.value)
    assert live_holder(path).host == "gpu-node-17"
    old = time.time() - locks.STALE_AFTER_S - 60      # its heartbeat stopped (the node died)
    os.utime(path, (old, old))
    lines: list[str] = []
    lease = Lease(path, "export", log=lines.append).acquire(wait=False)
    assert lines and lines[0].startswith(f"recovered the stale lease {path}: its heartbeat is ")
    assert "gpu-node-17 pid 4242" in lines[0]
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lease.release()
    assert not path.exists()


def test_dead_exited_and_reused_pids_on_this_host_are_stale(tmp_path):
    path = tmp_path / ".lease"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_holder(path, pid=int(done.stdout))
    lines: list[str] = []
    Lease(path, "t", log=lines.append).acquire(wait=False).release()
    assert lines == [f"recovered the stale lease {path}: pid {int(done.stdout)} is no longer running on "
                     f"{socket.gethostname()}"]
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(zombie.pid, signal.SIGKILL)          # not reaped yet: a zombie keeps its pid
    wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
             timeout=60, what="a zombie")
    write_holder(path, pid=zombie.pid, start=locks._pid_start(zombie.pid))
    assert live_holder(path) is None
    zombie.wait()
    write_holder(path, pid=os.getpid(), start="1")    # this pid, but not the process that took the lease
    assert live_holder(path) is None
    write_holder(path)                                 # this very process: alive
    assert live_holder(path) is not None


def test_an_earlier_start_of_the_same_slurm_job_is_stale_another_task_of_this_start_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31337")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    path = tmp_path / ".lease"
    write_holder(path, host="node-a", pid=77, job="31337", restart=2)     # a task of this start, elsewhere
    assert live_holder(path) is not None
    write_holder(path, host="node-a", pid=77, job="31337", restart=1)     # the start before the requeue
    assert live_holder(path) is None
    lines: list[str] = []
    Lease(path, "t", log=lines.append).acquire(wait=False).release()
    assert "taken by start 1 of this Slurm job (31337), which died; this is start 2" in lines[0]


def test_the_heartbeat_keeps_a_held_lease_fresh(tmp_path):
    path = tmp_path / ".lease"
    env = dict(os.environ, FTLIB_LEASE_HEARTBEAT_S="0.2", PYTHONUNBUFFERED="1")
    holder = python("""
        import sys, time
        from ftlib.locks import Lease
        Lease(sys.argv[1], "training").acquire(wait=False)
        print("held", flush=True)
        time.sleep(120)
    """, path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        first = path.stat().st_mtime
        wait_for(lambda: path.stat().st_mtime > first, timeout=60, what="the heartbeat to refresh the lease")
        assert live_holder(path).pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    with file_lock(path):     # a build lock: takes over the dead holder's lease without waiting for its heartbeat
        assert json.loads(path.read_text())["pid"] == os.getpid()
