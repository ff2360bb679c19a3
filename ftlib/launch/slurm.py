"""Slurm: RunConfig -> JobPlan (sbatch parameters, container command) -> submitit -> sbatch.

One Slurm task per GPU (per process on CPU-only partitions). The job function is
launch.job.TrainJob. A config with a `sweep` (a grid of overrides) or `tasks` (one adapter per
task on the same base) becomes one Slurm array with one run directory per element.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, validate
from ..storage import RunDir, atomic_write_json, read_json

_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def parse_time_minutes(value: str | int, source: str = "slurm.time") -> int:
    """Slurm time formats (MM, HH:MM:SS, D-HH:MM:SS, MM:SS) -> whole minutes (rounded up)."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    match = _TIME.match(text)
    if not match:
        raise ConfigError(f"{source}: {value!r} is not a Slurm time; use HH:MM:SS, D-HH:MM:SS or minutes")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if match.group(2) is None:  # MM:SS
        hours, minutes, seconds = 0, int(match.group(3)), int(match.group(4))
    total_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_s // 60))


def _extra_sbatch(lines: list[str]) -> dict[str, Any]:
    """'#SBATCH --mail-type=END' / '--mail-type=END' / '--exclusive' -> submitit additional_parameters."""
    extra: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        if not text.startswith("--"):
            raise ConfigError(f"slurm.extra_sbatch: {line!r} must look like '--option=value'")
        key, _, value = text[2:].partition("=")
        extra[key] = value if value else True
    return extra


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


def expand_array(cfg: RunConfig) -> list[RunConfig]:
    """The runs of a sweep (grid of overrides) or of a task set; [cfg] otherwise."""
    if not cfg.sweep and not cfg.tasks:
        return [cfg]
    if cfg.sweep and cfg.tasks:
        raise ConfigError(f"{cfg.source}: sweep and tasks are both set; an array is one or the other")
    base = cfg.to_dict()
    elements: list[tuple[str, dict[str, Any]]] = []
    if cfg.sweep:
        keys = list(cfg.sweep)
        for key, values in cfg.sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{cfg.source}: sweep.{key}: expected a non-empty list of values")
        for i, combo in enumerate(itertools.product(*(cfg.sweep[k] for k in keys))):
            elements.append((f"{cfg.name}-{i}", dict(zip(keys, combo))))
    else:
        for task, overrides in cfg.tasks.items():
            elements.append((f"{cfg.name}-{task}", dict(overrides or {})))
    runs = []
    for name, overrides in elements:
        data = _apply_dotted(base, overrides, cfg.source)
        data.pop("sweep", None)
        data.pop("tasks", None)
        data["name"] = name
        data.setdefault("tracking", {})["group"] = cfg.tracking.group or cfg.name
        training = data.setdefault("training", {})
        if not training.get("overwrite_output_dir"):
            training.pop("overwrite_output_dir", None)
        runs.append(validate(data, source=cfg.source))
    return runs


def _apply_dotted(base: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    import copy
    data = copy.deepcopy(base)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = str(dotted).split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: sweep/tasks key {dotted!r} does not name a config value")
        node[leaf] = value
    return data


REQUEUE_MARKER_PREFIX = "requeue-"   # + the Slurm job id, in the plan folder (a run's slurm/)


def requeue_marker(folder: Path, job_id: str) -> Path:
    """The file a job leaves to ask its batch script for a requeue (see requeue_trap)."""
    return Path(folder) / f"{REQUEUE_MARKER_PREFIX}{job_id}"


def requeue_trap(folder: Path) -> list[str]:
    """Setup lines: when the batch script exits and the job left a requeue marker, requeue it.

    The job may run in a container without Slurm's client, config or munge socket, so it never
    runs `scontrol requeue` itself (as submitit's USR2 handler would): after saving a checkpoint
    it leaves the marker and exits; the batch script runs on the host, and its EXIT trap requeues
    the job while the job is still running (the same call submitit makes from inside).
    """
    return [f"FTLIB_REQUEUE_MARKER={_quote(str(folder))}/{REQUEUE_MARKER_PREFIX}$SLURM_JOB_ID",
            "trap 'if [ -e \"$FTLIB_REQUEUE_MARKER\" ]; then rm -f \"$FTLIB_REQUEUE_MARKER\"; "
            "echo \"ftlib: requeueing job $SLURM_JOB_ID, as the job asked\"; "
            "scontrol requeue \"$SLURM_JOB_ID\"; fi' EXIT"]


def array_folder(cfg: RunConfig) -> Path:
    return Path(os.path.expanduser(cfg.storage.root)).resolve() / f"{cfg.name}.array"


def make_plan(cfg: RunConfig) -> JobPlan:
    configs = expand_array(cfg)
    s = cfg.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name or cfg.name, "time": parse_time_minutes(s.time), "nodes": s.nodes,
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
    additional.update(_extra_sbatch(s.extra_sbatch))
    params["additional_parameters"] = additional
    folder = configs[0].run_root / "slurm" if len(configs) == 1 else array_folder(cfg)
    # WANDB_SERVICE points at the wandb-core of whatever process ran sbatch (a notebook, a test):
    # inherited by the job, it makes the job talk to that process, and a requeue finds it gone.
    setup = [*requeue_trap(folder), "unset WANDB_SERVICE",
             f"export HF_HOME={_quote(os.path.expanduser(cfg.storage.hf_cache))}"]
    if cfg.storage.offline:
        setup += ["export HF_HUB_OFFLINE=1", "export HF_DATASETS_OFFLINE=1"]
    params["setup"] = setup + list(s.setup)

    python, container = _python_command(cfg, params)
    return JobPlan(folder=folder, parameters=params, python=python, configs=configs, container=container)


def _quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


def _python_command(cfg: RunConfig, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from .containers import ContainerConfig, build_launch, check_container, image_provenance
    c = ContainerConfig(runtime=cfg.container.runtime, image=cfg.container.image,
                        binds=list(cfg.container.binds), env=list(cfg.container.env))
    try:
        launch = build_launch(c, run_dir=cfg.run_root, storage_root=os.path.expanduser(cfg.storage.root),
                              hf_cache=os.path.expanduser(cfg.storage.hf_cache), gpus=cfg.slurm.gpus_per_node > 0)
        check_container(c, launch)
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None
    if launch.srun_args:
        params["srun_args"] = list(launch.srun_args)
    provenance = image_provenance(c) if c.runtime != "none" else {}
    return launch.python, provenance


def sbatch_script(plan: JobPlan) -> str:
    """The exact script submitit writes for this plan (for --dry-run and golden tests)."""
    from submitit.slurm.slurm import _make_sbatch_string
    params = {k: v for k, v in plan.parameters.items() if k not in ("max_num_timeout",)}
    if plan.is_array:
        params["map_count"] = len(plan.configs)
    command = " ".join([plan.python, "-u -m submitit.core._submit", _quote(str(plan.folder / "%j"))])
    return _make_sbatch_string(command=command, folder=str(plan.folder / "%j"), **params)


def render_plan(cfg: RunConfig) -> str:
    plan = make_plan(cfg)
    lines = [f"# Slurm plan: {len(plan.configs)} run(s)"]
    lines += [f"#   {c.name}: {c.run_root}" for c in plan.configs]
    lines += ["# sbatch script (written by submitit at submission):", sbatch_script(plan)]
    return "\n".join(lines)


def executor_for(plan: JobPlan):
    import submitit
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
    from .job import TrainJob
    from ..recipe import reset_once, write_run_files
    plan = replace(plan, configs=[reset_once(cfg) for cfg in plan.configs])
    for cfg in plan.configs:
        write_run_files(cfg, RunDir(cfg.run_root))
    executor = executor_for(plan)
    if plan.is_array:
        with arrays_keep_python(plan.python), executor.batch():
            jobs = [executor.submit(TrainJob(cfg, plan.folder)) for cfg in plan.configs]
    else:
        jobs = [executor.submit(TrainJob(plan.configs[0], plan.folder))]
    for cfg, job in zip(plan.configs, jobs):
        run = RunDir(cfg.run_root)
        state = read_json(run.state, default={}) or {}
        state.update(status="submitted", job_id=str(job.job_id), submitted=time.time(),
                     log=str(job.paths.stdout), folder=str(plan.folder))
        atomic_write_json(run.state, state)
        if plan.container:
            prov = read_json(run.provenance, default={}) or {}
            atomic_write_json(run.provenance, dict(prov, container=plan.container))
    return jobs


def submit(cfg: RunConfig, *, wait: bool = False) -> int:
    plan = make_plan(cfg)
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
    failed = 0
    for cfg_i, job in zip(plan.configs, jobs):
        try:
            result = job.results()[0]   # one result per task; rank 0's speaks for the run
            print(f"job {job.job_id} ({cfg_i.name}): {result.get('status')}")
        except Exception as exc:  # noqa: BLE001 - report every job, then the exit status
            failed += 1
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            print(f"job {job.job_id} ({cfg_i.name}) failed: {first}", file=sys.stderr)
    return 1 if failed else 0
