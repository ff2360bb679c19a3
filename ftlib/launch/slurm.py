"""Slurm: the runs of a plan -> JobPlan (sbatch parameters, container command) -> submitit -> sbatch.

One Slurm task per GPU (per process on CPU-only partitions). The job function is
launch.job.TrainJob. Several runs (a sweep or a task set, plan.expand_runs) become one Slurm
array, one run directory per element. The config arrives validated (ftlib.validation): nothing
here refuses a value.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from ..config import ConfigError, RunConfig, extra_sbatch_options, slurm_time_minutes
from ..config.secrets import shell_lines as token_file_lines
from ..plan import array_folder, expand_runs, prepare_runs
from ..locks import privacy_problem
from ..provenance import git_state
from ..storage import RunDir, atomic_write_json, read_json, update_state
from .containers import build_launch, image_provenance
from .job import TrainJob
from .requeue import requeue_trap

@dataclass
class JobPlan:
    """Everything needed to submit: where, how (python command inside the container), with what."""

    folder: Path                      # submitit folder: sbatch scripts, pickles, logs
    parameters: dict[str, Any]        # SlurmExecutor.update_parameters(...)
    python: str                       # the executor's python command (container launcher)
    configs: list[RunConfig] = field(default_factory=list)   # one per job / array element
    container: dict[str, Any] = field(default_factory=dict)

    @property
    def is_array(self) -> bool:
        return len(self.configs) > 1


def tasks_per_node(cfg: RunConfig) -> int:
    return cfg.slurm.gpus_per_node if cfg.slurm.gpus_per_node > 0 else cfg.distributed.nproc


def make_plan(cfg: RunConfig, configs: list[RunConfig] | None = None) -> JobPlan:
    """The plan for the runs of `cfg`: `configs` from plan.expand_runs (computed when not given)."""
    configs = configs if configs is not None else expand_runs(cfg)
    s = cfg.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name or cfg.name, "time": slurm_time_minutes(s.time), "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(cfg), "cpus_per_task": s.cpus_per_task,
        "signal_delay_s": s.signal_delay_s, "max_num_timeout": s.max_requeues,
        "stderr_to_stdout": True, "array_parallelism": s.array_parallelism,
    }
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = f"{s.gpu_type}:{s.gpus_per_node}" if s.gpu_type else s.gpus_per_node
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if s.exclusive:
        params["exclusive"] = True
    additional = {"requeue": True}   # preemption requeues instead of cancelling
    additional.update(extra_sbatch_options(s.extra_sbatch))
    params["additional_parameters"] = additional
    folder = configs[0].run_root / "slurm" if len(configs) == 1 else array_folder(cfg)
    # WANDB_SERVICE points at the wandb-core of whatever process ran sbatch (a notebook, a test):
    # inherited by the job, it makes the job talk to that process, and a requeue finds it gone.
    # HF_HOME absolute: the job's working directory is wherever sbatch ran, so a relative cache
    # (./.cache/huggingface) would be a different, empty cache for every submit directory.
    setup = [*requeue_trap(folder), "unset WANDB_SERVICE", f"export HF_HOME={_quote(hf_home(cfg))}"]
    # Tokens named by WANDB_API_KEY_FILE / HF_TOKEN_FILE are read on the node: the script holds paths only.
    setup += token_file_lines()
    if cfg.storage.offline:
        setup += ["export HF_HUB_OFFLINE=1", "export HF_DATASETS_OFFLINE=1"]
    params["setup"] = setup + list(s.setup)

    python, container = _python_command(cfg, params)
    return JobPlan(folder=folder, parameters=params, python=python, configs=configs, container=container)


def _quote(text: str) -> str:
    return shlex.quote(text)


def hf_home(cfg: RunConfig) -> str:
    """storage.hf_cache as an absolute path (relative to the directory of the submission)."""
    return os.path.abspath(os.path.expanduser(cfg.storage.hf_cache))


# ---------------------------------------------------------------------------- the submitit folder
def check_private_folder(folder: Path) -> None:
    """Refuse a submitit folder that another user could write: its pickles run as this user (the
    job unpickles them, and `--wait` unpickles the results). A missing folder is fine (made 0700)."""
    try:
        info = folder.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{folder}: the submitit folder is not a directory (a link or a file); remove it")
    problem = privacy_problem(info, forbidden=0o022, owner_fix="remove it or use another storage.root",
                              mode_fix=f"chmod 700 {_quote(str(folder))}")
    if problem:
        raise ConfigError(f"{folder}: the submitit folder (job pickles that run as you) {problem}")


def private_folder(folder: Path) -> Path:
    """The submitit folder, created 0700 (whatever the umask) or checked when it exists."""
    check_private_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    check_private_folder(folder)   # it may have appeared in between, made by someone else
    os.chmod(folder, 0o700)        # ours: mkdir's mode is filtered by the umask, an older one may be 0755
    return folder


def container_launch(cfg: RunConfig):
    """How a task of this run starts inside its container (checked by ftlib.validation first)."""
    return build_launch(cfg.container, run_dir=cfg.run_root, storage_root=os.path.expanduser(cfg.storage.root),
                        hf_cache=hf_home(cfg), gpus=cfg.slurm.gpus_per_node > 0)


def _python_command(cfg: RunConfig, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    launch = container_launch(cfg)
    srun_args = list(launch.srun_args)
    if cfg.slurm.nodes * params["ntasks_per_node"] > 1:
        # A task that ends (the hung-rank watchdog, a crash) must end the step: without this, srun
        # waits for a stopped peer until the time limit.
        srun_args.append("--kill-on-bad-exit=1")
    if srun_args:
        params["srun_args"] = srun_args
    provenance = image_provenance(cfg.container) if cfg.container.runtime != "none" else {}
    return launch.python, provenance


def sbatch_script(plan: JobPlan) -> str:
    """The exact script submitit writes for this plan (for --dry-run and golden tests)."""
    from submitit.slurm.slurm import _make_sbatch_string
    params = {k: v for k, v in plan.parameters.items() if k not in ("max_num_timeout",)}
    if plan.is_array:
        params["map_count"] = len(plan.configs)
    command = " ".join([plan.python, "-u -m submitit.core._submit", _quote(str(plan.folder / "%j"))])
    return _make_sbatch_string(command=command, folder=str(plan.folder / "%j"), **params)


def render_plan(cfg: RunConfig, runs: list[RunConfig] | None = None) -> str:
    plan = make_plan(cfg, runs)
    check_private_folder(plan.folder)   # --dry-run refuses what the submission would refuse
    lines = [f"# Slurm plan: {len(plan.configs)} run(s)"]
    lines += [f"#   {c.name}: {c.run_root}" for c in plan.configs]
    lines += ["# sbatch script (written by submitit at submission):", sbatch_script(plan)]
    return "\n".join(lines)


def executor_for(plan: JobPlan):
    executor = submitit.SlurmExecutor(folder=str(plan.folder / "%j"), python=plan.python,
                                      max_num_timeout=plan.parameters["max_num_timeout"])
    executor.update_parameters(**{k: v for k, v in plan.parameters.items() if k != "max_num_timeout"})
    return executor


@contextlib.contextmanager
def arrays_keep_python(python: str):
    """submitit 1.5.4 submits an array through a fresh `SlurmExecutor(folder, max_num_timeout)`
    that drops the `python` argument, so array elements would run outside the container. While
    submitting, that name builds executors that keep ftlib's python command."""
    import submitit.slurm.slurm as submitit_slurm
    original = submitit_slurm.SlurmExecutor

    class KeepPython(original):  # type: ignore[misc, valid-type]
        def __init__(self, folder, max_num_timeout=3, max_pickle_size_gb=1.0, python_cmd=None):
            super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb,
                             python=python_cmd or python)

    submitit_slurm.SlurmExecutor = KeepPython
    try:
        yield
    finally:
        submitit_slurm.SlurmExecutor = original


def submit_plan(plan: JobPlan) -> list:
    """Write each run's config.yaml and submit; returns submitit jobs (one per run)."""
    plan.configs = prepare_runs(plan.configs)
    private_folder(plan.folder)   # after a fresh start's reset, which may remove the run directory
    executor = executor_for(plan)
    if plan.is_array:
        with arrays_keep_python(plan.python), executor.batch():
            jobs = [executor.submit(TrainJob(cfg, plan.folder)) for cfg in plan.configs]
    else:
        jobs = [executor.submit(TrainJob(plan.configs[0], plan.folder))]
    for cfg, job in zip(plan.configs, jobs):
        run = RunDir(cfg.run_root)
        update_state(run, status="submitted", job_id=str(job.job_id), submitted=time.time(),
                     log=str(job.paths.stdout), folder=str(plan.folder))
        # The source's git state is read here, on the submitting host: an image holds no .git.
        prov = read_json(run.provenance, default={}) or {}
        prov.setdefault("git", git_state())
        if plan.container:
            prov["container"] = plan.container
        atomic_write_json(run.provenance, prov)
    return jobs


def submit(cfg: RunConfig, runs: list[RunConfig] | None = None, *, wait: bool = False) -> int:
    plan = make_plan(cfg, runs)
    check_private_folder(plan.folder)   # before any run file is written: a refusal leaves nothing behind
    jobs = submit_plan(plan)
    for cfg_i, job in zip(plan.configs, jobs):
        print(f"submitted Slurm job {job.job_id}: run {cfg_i.name}")
        print(f"  run directory: {cfg_i.run_root}")
        print(f"  log:           {job.paths.stdout}")
        if "wandb" in cfg_i.tracking.backends:
            print(f"  W&B:           project {cfg_i.tracking.project}, run id in {cfg_i.run_root}/wandb_run_id "
                  f"({cfg_i.tracking.mode})")
        print(f"  follow:        python jobs/status.py --root {cfg_i.run_root.parent} --follow {cfg_i.name}")
    sys.stdout.flush()
    if not wait:
        return 0
    failed = set()
    for cfg_i, job in zip(plan.configs, jobs):
        check_private_folder(plan.folder)   # results are pickles too: not from a folder others could write
        try:
            result = job.results()[0]   # one result per task; rank 0's speaks for the run
            print(f"job {job.job_id} ({cfg_i.name}): {result.get('status')}")
        except Exception as exc:  # noqa: BLE001 - report every job, then the exit status
            failed.add(job.job_id)
            print(f"job {job.job_id} ({cfg_i.name}) failed: {_failure_reason(cfg_i, exc)}; log: {job.paths.stdout}",
                  file=sys.stderr)
    for job in jobs:   # a failure already said is not said again by its Slurm state
        if not _wait_for_slurm_end(job, quiet=job.job_id in failed):
            failed.add(job.job_id)
    return 1 if failed else 0


def _failure_reason(cfg: RunConfig, exc: Exception) -> str:
    """What the run recorded in state.json as it failed; else submitit's last line (which is often
    only the log's path: a job killed before it could record anything)."""
    state = read_json(RunDir(cfg.run_root).state) or {}
    if state.get("status") == "failed" and state.get("error"):   # not an older failure's, left behind
        return str(state["error"]).strip().splitlines()[0]
    text = str(exc).strip()
    return text.splitlines()[-1].strip() if text else type(exc).__name__


def _wait_for_slurm_end(job, timeout: float = 300.0, quiet: bool = False) -> bool:
    """Wait until Slurm itself calls the job ended, and say whether it COMPLETED. The result pickle
    exists a moment before: the batch script, the epilog and the accounting still run, and a
    user's `submit --wait && next-step` must find the job over (sacct, not squeue: squeue forgets
    an ended job)."""
    deadline = time.monotonic() + timeout
    while not job.watcher.is_done(job.job_id, mode="force"):
        if time.monotonic() > deadline:
            print(f"job {job.job_id}: Slurm still calls it {job.state} after {timeout:.0f} s; "
                  f"see `sacct -j {job.job_id}`", file=sys.stderr)
            return False
        time.sleep(1.0)
    state = job.state
    if state.upper() != "COMPLETED" and not quiet:
        print(f"job {job.job_id}: Slurm state {state}", file=sys.stderr)
    return state.upper() == "COMPLETED"
