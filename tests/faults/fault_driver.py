"""Fault injector for tests/faults/: runs ftlib in forked children and SIGKILLs them at named or
random (seeded) points, then records what it finds on disk. Not a test module: the tests run it
as a subprocess, read its JSON and judge.

One process imports torch/transformers once (seconds of CPU on these machines); every trial is a
fork of it that runs the real recipe or export and dies by a real SIGKILL, so twenty trials cost
what two fresh processes would. OMP_NUM_THREADS=1 (set by the tests) keeps torch from starting
thread pools that a fork would inherit half-initialised.

    python fault_driver.py save-trials  OUT.json ROOT SEED TRIALS [key=value ...]
    python fault_driver.py export-trials OUT.json RUN_DIR SEED TRIALS
    python fault_driver.py cli-steps OUT.json PLAN.json   (steps: the CLI, disk filled at a named point)
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ftlib.callbacks as callbacks_mod  # noqa: E402
import ftlib.export.publish as publish_mod  # noqa: E402
import ftlib.export.reexport as reexport_mod  # noqa: E402
import ftlib.storage as storage  # noqa: E402
from ftlib.config import load_config  # noqa: E402
from ftlib.export.reexport import reexport  # noqa: E402
from ftlib.recipe import run_recipe  # noqa: E402
from ftlib.storage import RunDir  # noqa: E402

# Everything the recipe and the exports import lazily, imported once here, before any fork.
import accelerate  # noqa: E402,F401
import bitsandbytes  # noqa: E402,F401
import datasets  # noqa: E402,F401
import gguf  # noqa: E402,F401
import peft  # noqa: E402,F401
import safetensors.torch  # noqa: E402
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import Trainer, TrainingArguments  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after(delay: float) -> None:
    threading.Timer(delay, die).start()


def train(cfg, callbacks=()) -> int:
    run_recipe(cfg, callbacks=list(callbacks), log=print)
    return 0


def in_child(body, log_path: Path) -> dict:
    """Run body() in a forked child whose output goes to log_path; how it ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = body() or 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {"pid": pid, "exit": os.waitstatus_to_exitcode(status),
            "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL}


def loads(checkpoint: Path, log_path: Path) -> bool:
    """The checkpoint's tensors load (in a child: the parent never runs torch code before a fork)."""
    def body():
        safetensors.torch.load_file(str(checkpoint / "adapter_model.safetensors"))
        torch.load(checkpoint / "optimizer.pt", weights_only=True)
        json.loads((checkpoint / "trainer_state.json").read_text())
        return 0
    return in_child(body, log_path)["exit"] == 0


def leftovers(run: RunDir) -> list[str]:
    found = []
    for folder in (run.root, run.artifacts, run.gguf, run.checkpoints):
        if folder.is_dir():
            found += [str(p.relative_to(run.root)) for p in folder.iterdir()
                      if p.name.endswith((".tmp", ".old", ".deleting")) and not p.name.startswith(".run.lease")]
    return sorted(found)


def observe(run: RunDir) -> dict:
    names = storage.checkpoints_newest_first(run)
    newest = storage.newest_complete_checkpoint(run)
    return {"checkpoints": {p.name: {"marked": (p / storage.COMPLETE_MARKER).exists(),
                                     "problem": storage.checkpoint_problem(p)} for p in names},
            "newest_complete": newest.name if newest else None, "leftovers": leftovers(run),
            "manifest": run.manifest.exists(),
            "manifest_problems": storage.verify_manifest(run) if run.manifest.exists() else []}


# ---------------------------------------------------------------------------- checkpoint saves
def save_trials(out: Path, root: Path, seed: int, trials: int, overrides: list[str]) -> None:
    from transformers import TrainerCallback

    common = ["training.save_steps=1", "training.save_total_limit=1", "training.logging_steps=1",
              "training.eval_strategy=no", "export.merged=false", "export.report=false",
              "tracking.backends=[none]", *overrides]
    cfg = load_config(TINY, [f"storage.root={root / 'trials'}", *common])
    ref_cfg = load_config(TINY, [f"storage.root={root / 'reference'}", *common])
    max_steps = int(cfg.training["max_steps"])
    save_events = root / "save-events.json"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    class SaveEvents(TrainerCallback):   # step end -> after ftlib's marker and rotation
        """Counts the Python and C calls (sys.setprofile events) that one save makes."""

        def __init__(self):
            self.count, self.counts = 0, []

        def _event(self, frame, event, arg):
            self.count += 1

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                self.count = 0
                sys.setprofile(self._event)

        def on_save(self, args, state, control, **kwargs):
            sys.setprofile(None)
            self.counts.append(self.count)
            save_events.write_text(json.dumps(self.counts))

    class KillDuringSave(TrainerCallback):
        """SIGKILL at the `event`-th call made after the optimizer step `step` ends: inside its save.
        Counted in calls, not seconds: a timer thread needs the GIL, which a save holds for most of
        its few milliseconds on a fast machine, so timed kills landed after the save (seen in CI)."""

        def __init__(self, step, event):
            self.step, self.event, self.count = step, event, 0

        def _event(self, frame, event, arg):
            self.count += 1
            if self.count >= self.event:
                die()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step and control.should_save:
                sys.setprofile(self._event)

    report = {"seed": seed, "max_steps": max_steps, "trials": []}
    ref = in_child(lambda: train(ref_cfg, [SaveEvents()]), logs / "reference.log")
    counts = json.loads(save_events.read_text())
    report["reference"] = dict(ref, run_dir=str(ref_cfg.run_root), save_events=counts)
    events = sorted(counts)[len(counts) // 2]   # the calls of a median save, marker and rotation included
    run = RunDir(cfg.run_root)

    def named(point: str, step: int):
        def body():
            if point == "before-marker":          # the save_total_limit gap: saved, not yet marked
                real = callbacks_mod.mark_checkpoint_complete

                def mark(path, s):
                    if s == step:
                        die()
                    real(path, s)
                callbacks_mod.mark_checkpoint_complete = mark
            elif point == "mid-rotation":         # the old checkpoint renamed away, not yet removed
                real_prune, real_remove, rotating = callbacks_mod.prune_checkpoints, storage._remove, []

                def prune(*a, **k):
                    rotating.append(True)
                    return real_prune(*a, **k)

                def remove(path):
                    if rotating and path.name.endswith(".deleting") and path.exists():
                        die()
                    real_remove(path)
                callbacks_mod.prune_checkpoints, storage._remove = prune, remove
            return train(cfg)
        return body

    plan = [("before-marker", 3), ("mid-rotation", None)]
    rng_master = random.Random(seed)
    for i in range(trials):
        plan.append(("random", rng_master.randint(1, 2)))
    for i, (point, arg) in enumerate(plan):
        before = observe(run)
        resume_step = storage.checkpoint_step(Path(before["newest_complete"])) if before["newest_complete"] else 0
        if point == "random":
            step = min(resume_step + arg, max_steps - 1)
            event = random.Random(seed * 1000 + i).randrange(1, events)
            body = (lambda s, e: lambda: train(cfg, [KillDuringSave(s, e)]))(step, event)
            trial = {"point": point, "step": step, "event": event, "events": events}
        else:
            body = named(point, arg)
            trial = {"point": point, "step": arg}
        log = logs / f"trial-{i:02d}.log"
        trial.update(index=i, before=before["newest_complete"], **in_child(body, log))
        trial["log"] = log.read_text()[-20000:]
        trial.update(after=observe(run))
        newest = trial["after"]["newest_complete"]
        trial["newest_loads"] = loads(run.checkpoints / newest, logs / f"load-{i:02d}.log") if newest else None
        report["trials"].append(trial)
        print(f"trial {i} ({point}, seed {seed}): call {trial.get('event', '-')} of {trial.get('events', '-')} "
              f"-> killed={trial['killed']} "
              f"newest complete {newest}", flush=True)
    final = in_child(lambda: train(cfg), logs / "final.log")
    report["final"] = dict(final, log=(logs / "final.log").read_text()[-20000:], after=observe(run),
                           run_dir=str(cfg.run_root))
    report["corruption"] = corruption_trials(root, common, logs)
    out.write_text(json.dumps(report, indent=1))


CORRUPTIONS = {"bit-flip": ("adapter_model.safetensors", lambda p: _flip(p, -9)),
               "truncated": ("optimizer.pt", lambda p: os.truncate(p, p.stat().st_size // 2)),
               "missing": ("scheduler.pt", lambda p: p.unlink())}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def corruption_trials(root: Path, common: list[str], logs: Path) -> list[dict]:
    """Damage the newest complete checkpoint (checkpoint-4; checkpoint-3 is the previous one);
    the next start must skip it, say which file, and resume from checkpoint-3."""
    from transformers import TrainerCallback

    cfg = load_config(TINY, [f"storage.root={root / 'corrupt'}", *common, "training.save_total_limit=2",
                             "training.max_steps=8"])
    run = RunDir(cfg.run_root)

    class StopAt(TrainerCallback):    # a kill right after the save of `step` (both kept complete)
        def __init__(self, step):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                die()

    class KillAtTrainBegin(TrainerCallback):   # the checkpoint is loaded by now: that is what we test
        def on_train_begin(self, args, state, control, **kwargs):
            print(f"train begins at step {state.global_step}", flush=True)
            die()

    results = []
    for i, (kind, (name, damage)) in enumerate(CORRUPTIONS.items()):
        in_child(lambda: train(cfg, [StopAt(4)]), logs / f"corrupt-build-{i}.log")
        before = observe(run)
        damage(run.checkpoints / "checkpoint-4" / name)
        log = logs / f"corrupt-{kind}.log"
        ended = in_child(lambda: train(cfg, [KillAtTrainBegin()]), log)
        results.append(dict(ended, kind=kind, file=name, before=before, log=log.read_text()[-20000:],
                            after=observe(run)))
        print(f"corruption {kind} of checkpoint-4/{name}: exit {ended['exit']}", flush=True)
    return results


# ---------------------------------------------------------------------------- exports
STAGES = {"merged": (publish_mod, "save_merged"), "gguf": (publish_mod, "export_gguf"),
          "modelfile": (publish_mod, "write_modelfile"), "manifest": (reexport_mod, "write_manifest")}


def export_trials(out: Path, run_dir: Path, seed: int, trials: int) -> None:
    run = RunDir(run_dir)
    logs = run_dir.parent / "export-logs"
    logs.mkdir(exist_ok=True)
    timing = logs / "timing.json"

    def timed():
        spent = {}
        for stage, (module, name) in STAGES.items():
            real = getattr(module, name)

            def wrapper(*a, _real=real, _stage=stage, **k):
                t0 = time.time()
                try:
                    return _real(*a, **k)
                finally:
                    spent[_stage] = spent.get(_stage, 0.0) + time.time() - t0
                    timing.write_text(json.dumps(spent))
            setattr(module, name, wrapper)
        reexport(run_dir, gguf="q8_0", ollama=True, force=True)
        return 0

    report = {"seed": seed, "trials": [], "reference": in_child(timed, logs / "reference.log")}
    spent = json.loads(timing.read_text())
    report["reference"].update(stage_s=spent, after=observe(run),
                               sha256={e["path"]: e["sha256"] for e in json.loads(run.manifest.read_text())["files"]})
    names = list(STAGES)
    for i in range(trials):
        stage = names[i % len(names)]
        delay = random.Random(seed * 1000 + i).uniform(0.0, 1.2 * spent[stage])

        def body(stage=stage, delay=delay):
            module, name = STAGES[stage]
            real = getattr(module, name)

            def armed(*a, **k):
                kill_after(delay)
                result = real(*a, **k)
                time.sleep(delay + 1.0)    # the kill lands here if the stage finished first
                return result
            setattr(module, name, armed)
            reexport(run_dir, gguf="q8_0", ollama=True, force=True)
            return 0
        log = logs / f"trial-{i:02d}.log"
        trial = {"index": i, "stage": stage, "delay_s": round(delay, 4), **in_child(body, log)}
        trial["log"] = log.read_text()[-20000:]
        trial["after"] = observe(run)
        report["trials"].append(trial)
        print(f"export trial {i} ({stage}, seed {seed}): delay {delay:.4f}s killed={trial['killed']} "
              f"manifest={trial['after']['manifest']} leftovers={trial['after']['leftovers']}", flush=True)
    out.write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------- the CLI with a disk that fills up
def fill(path: Path, leave: int) -> None:
    """Take all free space on the filesystem of `path` but `leave` bytes."""
    ballast = path / "ballast.bin"
    size = max(storage.free_bytes(path) - leave, 0)
    with open(ballast, "ab") as handle:
        handle.write(b"\0" * size)


def cli_steps(out: Path, plan: list[dict]) -> None:
    """Each step: the real CLI entry (submit_main / export_main) in a child, with hooks that fill
    the disk at a named point; what it returned, printed, and left on disk."""
    from ftlib import cli as cli_mod

    results = []
    for i, step in enumerate(plan):
        mount = Path(step["mount"]) if step.get("mount") else None
        if step.get("unfill") and mount is not None:
            (mount / "ballast.bin").unlink(missing_ok=True)

        def body(step=step, mount=mount):
            if "umask" in step:
                os.umask(step["umask"])
            if step.get("fill_after_marker") is not None:
                real = callbacks_mod.mark_checkpoint_complete

                def mark(path, s):
                    real(path, s)
                    if s == step["fill_after_marker"]:
                        fill(mount, step["leave"])
                callbacks_mod.mark_checkpoint_complete = mark
            if step.get("fill_before_merged"):
                real_merged = publish_mod.save_merged

                def merged(*a, **k):
                    fill(mount, step["leave"])
                    return real_merged(*a, **k)
                publish_mod.save_merged = merged
            main = cli_mod.submit_main if step["command"] == "submit" else cli_mod.export_main
            return main(list(step["args"]))
        stdout, stderr = Path(f"{out}.{i}.out"), Path(f"{out}.{i}.err")
        result = in_child_split(body, stdout, stderr)
        result.update(stdout=stdout.read_text()[-20000:], stderr=stderr.read_text()[-20000:])
        if step.get("run"):
            result["after"] = observe(RunDir(Path(step["run"])))
        for top in step.get("modes", []):     # every file's and folder's mode, right after this step
            top = Path(top)
            result.setdefault("modes", {}).update({str(p.relative_to(top.parent)): p.stat().st_mode & 0o7777
                                                   for p in [top, *top.rglob("*")]})
        if mount is not None:
            result["free"] = storage.free_bytes(mount)
        results.append(result)
        print(f"step {i} ({step['command']}): exit {result['exit']}", flush=True)
    out.write_text(json.dumps(results, indent=1))


def in_child_split(body, stdout: Path, stderr: Path) -> dict:
    """in_child, with stdout and stderr apart (a CLI's error line goes to stderr)."""
    def split():
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        return body()
    stdout.unlink(missing_ok=True)
    return in_child(split, stdout)


if __name__ == "__main__":
    what, out = sys.argv[1], Path(sys.argv[2])
    if what == "save-trials":
        save_trials(out, Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
    elif what == "export-trials":
        export_trials(out, Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif what == "cli-steps":
        cli_steps(out, json.loads(Path(sys.argv[3]).read_text()))
    else:
        raise SystemExit(f"unknown scenario {what}")
