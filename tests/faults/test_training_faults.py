"""Training faults, in process and through the real launchers: the loss curve across a resume, a
NaN loss, a hung rank in a 2-process run, and the restart budgets' arithmetic.

Every fault here is placed at a fixed step: the runs are deterministic on CPU, so a failure
replays exactly (the storm in test_preemption_storm.py is the randomised one).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, stop_at, subprocess_env, wait_for
from ftlib.callbacks import NonFiniteLoss, StopRequest
from ftlib.launch.requeue import RequeueLimitExceeded, check_restart_budget, count_restarts
from ftlib.recipe import run_recipe
from ftlib.storage import COMPLETE_MARKER, RunDir, read_json, verify_manifest
from ftlib.tracking import offline_wandb_files, wandb_history_steps

QUICK = ("training.eval_strategy=no", "export.merged=false", "export.report=false")


def _trainer_state(run: RunDir, step: int) -> dict:
    return json.loads((run.checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())


def _losses(history: list[dict]) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


# ---------------------------------------------------------------------------- loss across a resume
LOSS_RUN = ("training.max_steps=8", "training.logging_steps=3", "training.save_steps=100", *QUICK)


@pytest.fixture(scope="module")
def loss_runs(tmp_path_factory, hf_cache):
    """One uninterrupted run, and one stopped at step 4 (between two log lines) and resumed."""
    from ftlib.config import load_config

    def cfg(root):
        return load_config(TINY_CONFIG, [f"storage.root={root}", f"storage.hf_cache={hf_cache}",
                                         f"data.train={SAMPLE_DATA}", *LOSS_RUN])

    base = tmp_path_factory.mktemp("loss")
    straight = run_recipe(cfg(base / "straight"), log=lambda _: None)
    resumed_cfg = cfg(base / "resumed")
    stop = StopRequest()
    first = run_recipe(resumed_cfg, stop=stop, callbacks=[stop_at(stop, 3)], log=lambda _: None)
    lines: list[str] = []
    second = run_recipe(resumed_cfg, log=lines.append)
    return SimpleNamespace(straight=straight, first=first, second=second, lines=lines)


def test_the_logged_loss_after_a_resume_is_the_uninterrupted_runs_bit_for_bit(loss_runs):
    r = loss_runs
    assert r.first.status == "interrupted" and r.first.global_step == 4
    assert r.second.status == "completed" and any("checkpoint-4" in line for line in r.lines)
    expected = _losses(_trainer_state(RunDir(r.straight.run_dir), 8)["log_history"])
    got = _losses(_trainer_state(RunDir(r.second.run_dir), 8)["log_history"])
    assert [s for s, _ in expected] == [3, 6]
    # Step 6 averages steps 4-6, the first of them run before the stop: == on floats, not approx.
    assert got == expected


def test_train_loss_covers_every_start_of_the_run(loss_runs):
    r = loss_runs
    assert r.second.train_loss == r.straight.train_loss
    assert read_json(RunDir(r.second.run_dir).state)["train_loss"] == r.straight.train_loss
    assert read_json(RunDir(r.straight.run_dir).state)["train_loss"] == r.straight.train_loss


def test_a_stopped_and_resumed_run_is_one_wandb_run_with_each_logged_step_once(loss_runs):
    r = loss_runs
    run = RunDir(r.second.run_dir)
    files = offline_wandb_files(run)
    assert len(files) == 2 and r.first.wandb_run_id == r.second.wandb_run_id
    per_start = [wandb_history_steps(f) for f in files]
    # Rows at the Trainer's steps, ascending across the starts: 3 and the stopped start's summary
    # row at 4, then 6 and the end's row at 8 (the steps the resumed start ran).
    assert per_start == [[3, 4], [6, 8]], per_start


# ---------------------------------------------------------------------------- NaN loss
class NanAt(TrainerCallback):
    """Makes the training loss NaN while step `step` + 1 runs; keeps the weights after each step."""

    def __init__(self, step: int):
        self.step, self.active, self.model, self.after = step, False, None, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        model.register_forward_hook(self._poison, prepend=True)   # before ftlib's guard sees it

    def _poison(self, module, inputs, output):
        if self.active and module.training:
            output["loss"] = output["loss"] * float("nan")
        return output

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step == self.step

    def on_step_end(self, args, state, control, **kwargs):
        self.after = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def test_a_nan_loss_stops_before_its_optimizer_step_and_saves_nothing(tiny_config, tmp_path):
    cfg = tiny_config("training.max_steps=10", "training.save_steps=3", "tracking.backends=[none]", *QUICK,
                      root=tmp_path / "runs")
    nan = NanAt(4)
    lines: list[str] = []
    with pytest.raises(NonFiniteLoss) as caught:
        run_recipe(cfg, callbacks=[nan], log=lines.append)
    message = str(caught.value)
    assert message.startswith("training stopped at step 5: the loss is nan;"), message
    assert "no optimizer step and no checkpoint were taken from it (checkpoint-3 is the newest)" in message
    assert "training.learning_rate (now 0.01)" in message
    run = RunDir(cfg.run_root)
    assert sorted(p.name for p in run.checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]
    state = read_json(run.state)
    assert state["status"] == "failed" and state["error"] == f"NonFiniteLoss: {message}"
    # The weights are those after step 4: the NaN gradients of step 5 never reached them.
    for name, param in nan.model.named_parameters():
        if param.requires_grad:
            assert torch.isfinite(param).all() and torch.equal(param.detach(), nan.after[name]), name
    assert not run.manifest.exists()


def test_a_diverging_local_run_exits_non_zero_naming_the_step_and_the_learning_rate(tmp_path, hf_cache):
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--local", f"storage.root={root}",
         f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}", "training.max_steps=6",
         "training.learning_rate=1.0e+30", "training.save_steps=100", "tracking.backends=[none]", *QUICK],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "NonFiniteLoss: training stopped at step " in error[0], proc.stderr[-2000:]
    assert "training.learning_rate (now 1e+30)" in error[0]
    state = read_json(RunDir(root / "tiny").state)
    assert state["status"] == "failed" and state["error"].startswith("NonFiniteLoss: training stopped at step ")
    assert not list(RunDir(root / "tiny").checkpoints.glob("checkpoint-*"))


# ---------------------------------------------------------------------------- a hung rank
HANG_RUN = ("distributed.nproc=2", "distributed.strategy=ddp", "training.max_steps=6", "training.save_steps=2",
            "training.logging_steps=1", "training.ddp_timeout=20", "tracking.backends=[none]", *QUICK)


def _workers(launcher_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun workers below `launcher_pid`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"ftlib.launch.worker" in cmdline and b"LOCAL_RANK" in env and _descends(int(proc.name), launcher_pid):
            found[int(env[b"LOCAL_RANK"])] = int(proc.name)
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def test_a_hung_rank_ends_the_run_by_timeout_and_the_rerun_resumes_from_its_checkpoint(tmp_path, hf_cache):
    root = tmp_path / "runs"
    command = [sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--local", f"storage.root={root}",
               f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}", *HANG_RUN]
    run = RunDir(root / "tiny")
    log = tmp_path / "hang.log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(command, cwd=REPO, env=subprocess_env(hf_cache), stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: (run.checkpoints / "checkpoint-2" / COMPLETE_MARKER).exists() or
                     launcher.poll() is not None, timeout=600, what="the first checkpoint")
            assert launcher.poll() is None, log.read_text()[-3000:]
            workers = _workers(launcher.pid)
            assert sorted(workers) == [0, 1], workers
            os.kill(workers[1], signal.SIGSTOP)   # rank 1 hangs; rank 0 waits in the next collective
            stopped_at = time.monotonic()
            launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
            for pid in _workers(launcher.pid).values():
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert launcher.returncode != 0, text[-3000:]
    # Bound: 0.9 x training.ddp_timeout (18 s) + 1 s poll + torchrun's 30 s SIGTERM-to-SIGKILL grace.
    print(f"hung rank: the run ended {time.monotonic() - stopped_at:.0f} s after SIGSTOP")
    state = read_json(run.state)
    assert state["status"] == "failed", state
    assert state["error"].startswith("hung rank: rank 0: no training step finished for "), state["error"]
    assert "(limit: 90% of training.ddp_timeout=20 s): another rank is hung or gone" in state["error"]
    newest = state["error"].rsplit("resumes from ", 1)[1]
    assert newest.startswith("checkpoint-") and (run.checkpoints / newest / COMPLETE_MARKER).exists()

    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {run.checkpoints / newest}" in rerun.stdout
    assert read_json(run.state)["status"] == "completed" and read_json(run.state)["step"] == 6
    assert verify_manifest(run) == []
    reports = [read_json(run.root / "distributed" / f"rank-{r}.json") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["wrapper"] == "DistributedDataParallel" for r in reports)


# ---------------------------------------------------------------------------- restart budgets
SLURM = SimpleNamespace(time="00:20:00", max_requeues=1, max_preemptions=2)


def _start(state: dict, restart: int, asked: bool = False) -> dict:
    """What job.py records for a start (and, for a USR2, before it exits)."""
    counts = count_restarts(state, "77", restart)
    state = dict(state, restarts=counts.record())
    if asked:
        state["restarts"]["asked_at"] = counts.seen
    return state


def test_time_limit_requeues_and_preemptions_are_counted_apart():
    state = _start({}, 0, asked=True)        # USR2 at the time limit
    state = _start(state, 1)                 # ... requeued by the batch script; then scontrol requeue
    state = _start(state, 2)                 # ... Slurm restarted it; then a node failure
    counts = count_restarts(state, "77", 3)
    assert (counts.time_limit, counts.preemption, counts.total) == (1, 2, 3)
    check_restart_budget("tiny", Path("/ckpt"), counts, SLURM)   # 1 <= 1 and 2 <= 2
    # Every rank computes the same counts, before or after rank 0 recorded this start.
    assert count_restarts(dict(state, restarts=counts.record()), "77", 3) == counts
    # A new submission of the run (another Slurm job id) starts with fresh budgets.
    assert count_restarts(state, "78", 0).total == 0


def test_each_budget_names_itself_and_what_to_raise():
    with pytest.raises(RequeueLimitExceeded) as caught:
        check_restart_budget("tiny", Path("/ckpt"), count_restarts(_start(_start({}, 0, True), 1, True), "77", 2),
                             SLURM)
    assert str(caught.value).startswith("run tiny was requeued 2 times at its time limit (slurm.time=00:20:00), "
                                        "more than slurm.max_requeues=1: raise slurm.time")
    with pytest.raises(RequeueLimitExceeded) as caught:
        check_restart_budget("tiny", Path("/ckpt"), count_restarts({}, "77", 3), SLURM)
    assert "restarted 3 times by Slurm (preemption, scontrol requeue or a node failure), more than " \
           "slurm.max_preemptions=2: raise slurm.max_preemptions (null: no limit)" in str(caught.value)
    unlimited = SimpleNamespace(time="1", max_requeues=0, max_preemptions=None)
    check_restart_budget("tiny", Path("/ckpt"), count_restarts({}, "77", 50), unlimited)
