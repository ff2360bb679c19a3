"""The local one-node Slurm cluster (slurm/start-cluster.sh) does what ftlib relies on.

Plain sbatch jobs show up in accounting, requeue runs a job again, a signal reaches a job step,
and submitit gets results back from one- and two-task jobs. Each test works in its own tmp folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm

READY_STATES = ("idle", "mixed", "allocated", "completing", "planned")   # sinfo %T; "*" = not responding
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def run(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout


def wait_until(predicate, timeout: float, what: str, poll: float = 0.25):
    """Call predicate() until it returns something truthy, and return that; fail after timeout s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


@pytest.fixture(scope="module")
def partition() -> str:
    """The cluster's default partition; skips the module when there is no working cluster."""
    if not shutil.which("sbatch"):
        pytest.skip("sbatch is not on PATH: start the local cluster with `bash slurm/start-cluster.sh`")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer in 15 s: the Slurm cluster is not up (bash slurm/start-cluster.sh)")
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not any(state in READY_STATES for _, state in rows):
        pytest.skip(f"the Slurm cluster is not up (sinfo: {proc.stdout.strip() or proc.stderr.strip()}); "
                    "run `bash slurm/start-cluster.sh`")
    default = [name.rstrip("*") for name, _ in rows if name.endswith("*")]
    return os.environ.get("FTLIB_SLURM_PARTITION") or (default or [rows[0][0]])[0]


@pytest.fixture
def sbatch(partition, tmp_path):
    """sbatch(*args) -> job id; jobs still in the queue when the test ends are cancelled."""
    job_ids: list[str] = []

    def submit(*args: str) -> str:
        out = run("sbatch", "--parsable", f"--partition={partition}", f"--chdir={tmp_path}", "--time=5", *args)
        job_ids.append(out.strip().split(";")[0])
        return job_ids[-1]

    yield submit
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True)


def accounting(job_id: str, duplicates: bool = False) -> list[tuple[str, str]]:
    """(State, ExitCode) of the job's allocation from sacct; with duplicates, every requeued run too."""
    args = ["sacct", "-X", "-n", "-P", "-o", "State,ExitCode", "-j", job_id] + (["-D"] if duplicates else [])
    return [tuple(line.split("|")) for line in run(*args).splitlines() if line]


def wait_finished(job_id: str, timeout: float = 60) -> tuple[str, str]:
    def finished():
        rows = accounting(job_id)
        return rows and rows[-1][0].split()[0] in TERMINAL_STATES and rows[-1]
    return wait_until(finished, timeout, f"job {job_id} to finish in sacct")


def test_sbatch_job_completes_in_accounting(sbatch, tmp_path):
    job_id = sbatch("--job-name=ftlib-hi", "--output=hi.out", "--wrap", "echo hi")
    assert wait_finished(job_id) == ("COMPLETED", "0:0")
    assert (tmp_path / "hi.out").read_text() == "hi\n"


def test_requeued_job_runs_again(sbatch, tmp_path):
    # First run: record the start and sleep until requeued; second run: record it and finish.
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n"
                      'echo "start ${SLURM_RESTART_COUNT:-0}" >> starts.txt\n'
                      '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || sleep 120\n')
    starts = tmp_path / "starts.txt"
    job_id = sbatch("--job-name=ftlib-requeue", "--requeue", "--open-mode=append", "--output=job.out", str(script))
    wait_until(lambda: starts.exists(), 30, "the first run to start")
    run("scontrol", "requeue", job_id)
    assert wait_finished(job_id, timeout=60) == ("COMPLETED", "0:0")
    assert starts.read_text().splitlines() == ["start 0", "start 1"]
    assert "Restarts=1" in run("scontrol", "show", "job", job_id)
    assert [state for state, _ in accounting(job_id, duplicates=True)] == ["REQUEUED", "COMPLETED"]


def test_signal_reaches_job_step(sbatch, tmp_path):
    # What submitit relies on for preemption: `--signal=USR2@N` delivers USR2 to the job steps
    # (srun) before the time limit. scancel --signal delivers it the same way, without the wait.
    step = tmp_path / "step.sh"
    step.write_text("#!/bin/bash\n"
                    "trap 'echo \"USR2 in step $SLURM_STEP_ID\" > got-signal.txt; kill %1; exit 0' USR2\n"
                    "sleep 120 &\n"
                    "echo ready > ready.txt\n"
                    "wait\n"
                    "echo 'no signal' > got-signal.txt\n")
    step.chmod(0o755)
    job_id = sbatch("--job-name=ftlib-signal", "--signal=USR2@30", "--output=signal.out", "--wrap", f"srun {step}")
    wait_until(lambda: (tmp_path / "ready.txt").exists(), 30, "the job step to set its trap")
    run("scancel", "--signal=USR2", job_id)
    assert wait_finished(job_id) == ("COMPLETED", "0:0")
    assert (tmp_path / "got-signal.txt").read_text() == "USR2 in step 0\n"


def test_submitit_returns_results(partition, tmp_path):
    submitit = pytest.importorskip("submitit")

    def answer():
        return 42

    def whoami():
        import os
        return os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"]

    executor = submitit.AutoExecutor(folder=tmp_path / "one", cluster="slurm")
    executor.update_parameters(timeout_min=2, slurm_partition=partition, name="ftlib-submitit")
    job = executor.submit(answer)

    executor2 = submitit.AutoExecutor(folder=tmp_path / "two", cluster="slurm")
    executor2.update_parameters(timeout_min=2, slurm_partition=partition, name="ftlib-submitit-2",
                                tasks_per_node=2, cpus_per_task=1)
    job2 = executor2.submit(whoami)
    try:
        wait_until(lambda: job.done() and job2.done(), 90, "the submitit jobs", poll=0.5)
        assert job.result() == 42
        assert sorted(job2.results()) == [("0", "2"), ("1", "2")]
        assert wait_finished(job.job_id) == ("COMPLETED", "0:0")
        assert wait_finished(job2.job_id) == ("COMPLETED", "0:0")
    except BaseException:
        job.cancel(check=False)
        job2.cancel(check=False)
        raise
