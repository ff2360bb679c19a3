"""The tiny job through the real local Slurm cluster, inside the real Apptainer image.

The image is ftlib's job image as containers/build.sh builds it (Debian 12, the pinned stack, ftlib,
llama-quantize), built once per test session into FTLIB_IMAGE_CACHE (default /var/tmp/ftlib-images)
and keyed by its inputs (IMAGE.inputs-sha256): an unchanged tree reuses it in seconds, a change of
ftlib's source rebuilds the image layer (~2-3 min), a change of the pins the stack too (~7 min).
The command line is ftlib's own (launch.containers.build_launch), unchanged for this machine.

Apptainer itself comes from containers/install-apptainer.sh here (clusters have their own). Where
apptainer or the image is unavailable these tests fail under CI (CI=true) and skip with the reason
elsewhere. pyxis/enroot cannot run on these machines: their command line is tested against golden
files only (tests/launch/test_containers.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import NO_SLURM, REPO, SAMPLE_DATA, TINY_CONFIG, slurm_cluster_up, subprocess_env, wait_for
from ftlib.storage import RunDir, read_json, verify_manifest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SECRET_KEY = "wandb-canary-" + uuid.uuid4().hex
SECRET_TOKEN = "hf_canary_" + uuid.uuid4().hex
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DEFAULT_PREFIX = Path("/opt/ftlib-apptainer")   # containers/install-apptainer.sh's default


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Apptainer tests must run in CI)")
    pytest.skip(reason)


@dataclass(frozen=True)
class Image:
    path: Path
    apptainer: str

    @property
    def inputs_sha256(self) -> str:
        return Path(f"{self.path}.inputs-sha256").read_text().strip()

    @property
    def marker(self) -> dict:
        """The image's /opt/ftlib/image.json (containers/self-test.py --write-marker)."""
        out = self.run("exec", "--cleanenv", "--contain", str(self.path), "cat", "/opt/ftlib/image.json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def env(self, hf_cache: Path, **extra: str) -> dict[str, str]:
        """The submitting environment: apptainer on PATH (Slurm passes it on to the job)."""
        path = os.path.dirname(self.apptainer) + os.pathsep + os.environ.get("PATH", "")
        return subprocess_env(hf_cache, PATH=path, **extra)

    def run(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([self.apptainer, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def image() -> Image:
    apptainer = shutil.which("apptainer") or (
        str(DEFAULT_PREFIX / "bin" / "apptainer") if (DEFAULT_PREFIX / "bin" / "apptainer").exists() else None)
    if not apptainer:
        unavailable("apptainer is not installed: run `bash containers/install-apptainer.sh` "
                    "(development and CI machines; clusters provide their own)")
    if os.geteuid() != 0:
        unavailable("containers/build.sh builds the image as root (debootstrap, chroot)")
    if not slurm_cluster_up():
        unavailable(NO_SLURM)
    cache = Path(os.environ.get("FTLIB_IMAGE_CACHE", "/var/tmp/ftlib-images"))
    out = cache / "ftlib-test.sif"
    env = dict(os.environ, PATH=os.path.dirname(apptainer) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", str(REPO / "containers" / "build.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0:
        unavailable(f"containers/build.sh {out} failed (exit {proc.returncode}): {proc.stderr[-2500:]}")
    assert proc.stdout.splitlines()[-2:] == [f"image: {out}", f"sha256: {_sha256(out)}"], proc.stdout
    return Image(out, apptainer)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_image_self_test_passes_and_labels_carry_the_pins(image):
    test = image.run("test", "--cleanenv", "--contain", str(image.path))
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-2000:]
    assert "self-test: ok" in test.stdout and "llama-quantize runs" in test.stdout
    inspect = image.run("inspect", "--json", "--labels", str(image.path))
    labels = json.loads(inspect.stdout)["data"]["attributes"]["labels"]
    pins = {}
    for line in (REPO / "containers" / "requirements.txt").read_text().splitlines():
        if line.split("#", 1)[0].strip():
            name, version = line.split("#", 1)[0].strip().split("==")
            pins[f"ftlib.pin.{name}"] = version
    assert {k: v for k, v in labels.items() if k.startswith("ftlib.pin.")} == pins
    marker = image.marker
    assert labels["ftlib.inputs-sha256"] == image.inputs_sha256 == marker["inputs_sha256"]
    assert labels["ftlib.source-sha256"] == marker["source_sha256"]
    assert marker["builder"] == "containers/build.sh"
    # the image's own interpreter, with the pinned torch, and this tree's ftlib
    probe = image.run("exec", "--cleanenv", "--contain", str(image.path), "python3", "-c",
                      "import sys, torch, ftlib; print(sys.prefix, torch.__version__, ftlib.__file__)")
    prefix, torch_version, ftlib_file = probe.stdout.split()
    assert prefix == "/opt/venv" and torch_version.split("+")[0] == pins["ftlib.pin.torch"]
    assert ftlib_file.startswith("/opt/venv/lib/")


def test_tiny_job_runs_in_the_image_via_slurm_resumes_after_usr2_and_leaks_no_secret(image, tmp_path, hf_cache):
    root = tmp_path / "runs"
    data = tmp_path / "data"      # outside the storage root: reaches the job through container.binds
    data.mkdir()
    (data / "train.jsonl").write_bytes(SAMPLE_DATA.read_bytes())
    env = image.env(hf_cache, WANDB_API_KEY=SECRET_KEY, HF_TOKEN=SECRET_TOKEN)
    proc = subprocess.run(
        [sys.executable, "jobs/submit.py", str(TINY_CONFIG), f"storage.root={root}", f"storage.hf_cache={hf_cache}",
         f"data.train={data / 'train.jsonl'}", "training.max_steps=50", "training.save_steps=10",
         "training.logging_steps=10", "training.eval_strategy=no", "export.merged=false",
         "export.report=false", "slurm.time=00:15:00",
         "container.runtime=apptainer", f"container.image={image.path}", f"container.binds=[{data}]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = RunDir(root / "tiny")
    job_id = read_json(run.state)["job_id"]
    wait_for((run.checkpoints / "checkpoint-10" / "ftlib_complete.json").exists, timeout=420, poll=0.2,
             what="the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(run.manifest.exists, timeout=600, poll=1, what="the requeued job to finish")

    assert verify_manifest(run) == []
    state = read_json(run.state)
    log = Path(state["log"]).read_text()
    assert "export: manifest" in log and state["step"] == 50
    assert "the batch script requeues the job" in log and f"ftlib: requeueing job {job_id}, as the job asked" in log
    assert "resuming from" in log
    script = next(run.slurm.rglob("*_submission.sh")).read_text()
    assert "apptainer exec --cleanenv --contain" in script and str(image.path) in script

    # Both starts ran inside the image the submission named: apptainer's own record of the file it
    # runs from, and the image's marker, which carries the hashes of what it was built from.
    prov = read_json(run.provenance)
    assert prov["container"]["image"] == str(image.path)
    assert prov["container"]["sha256"] == _sha256(image.path)
    assert prov["container"]["inputs_sha256"] == image.inputs_sha256
    starts = prov["starts"]
    assert [s["slurm_restart_count"] for s in starts] == [0, 1]
    marker = image.marker
    for start in starts:
        assert start["container"] == {
            "runtime": "apptainer", "image": str(image.path), "builder": "containers/build.sh",
            "inputs_sha256": image.inputs_sha256, "source_sha256": marker["source_sha256"],
            "built_at": marker["built_at"], "matches_submitted": True}
    assert prov["packages"]["ftlib"] and "commit" in prov["git"]   # no git in the image: None

    # No file written under the run directory (the submitit folder included), the bound data
    # directory or the HF cache holds a secret value.
    for path in [*root.rglob("*"), *data.rglob("*"), *Path(hf_cache).rglob("*")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            content = path.read_bytes()
            assert SECRET_KEY.encode() not in content, path
            assert SECRET_TOKEN.encode() not in content, path


PROBE = r"""
import hashlib, json, os, sys
out, unbound, tmp_marker = sys.argv[1:4]
digest = lambda name: hashlib.sha256(os.environ[name].encode()).hexdigest() if name in os.environ else None
for path in (unbound, tmp_marker):          # paths the job may write, but that are not bound
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write("written inside the container")
json.dump({"env": sorted(os.environ), "passed": digest("FTLIB_TEST_PASSED"), "key": digest("WANDB_API_KEY"),
           "token": digest("HF_TOKEN"), "procid": os.environ.get("SLURM_PROCID"),
           "container": os.environ.get("APPTAINER_CONTAINER"), "prefix": sys.prefix, "cwd": os.getcwd(),
           "home": os.path.expanduser("~"), "etc_mnt": os.path.exists("/mnt/hostetc/hostname"),
           "unbound_exists_inside": os.path.exists(unbound)}, open(out, "w"))
"""


# What a job's environment may hold beyond what ftlib passes: apptainer's own variables, the
# image's %environment (containers/ftlib.def) and what a shell and python set.
RUNTIME_ENV = {"PATH", "HOME", "LANG", "LC_CTYPE", "LD_LIBRARY_PATH", "PS1", "PROMPT_COMMAND", "PWD",
               "SHLVL", "_", "TERM", "VIRTUAL_ENV", "FTLIB_HOME", "PYTHONUNBUFFERED", "FTLIB_STORAGE"}


def test_job_sees_only_bound_paths_and_variables_passed_by_name(image, tmp_path, hf_cache, monkeypatch):
    """A job through Slurm with ftlib's apptainer command line: a file it writes to a path that
    is not bound stays inside; only the variables ftlib names arrive, with their exact values."""
    import re

    import submitit
    from submitit.helpers import CommandFunction

    from ftlib.config import load_config
    from ftlib.launch.containers import PASSED_ENV, build_launch

    cfg = load_config(TINY_CONFIG, [f"storage.root={tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
                                    "container.runtime=apptainer", f"container.image={image.path}",
                                    "container.env=[WANDB_API_KEY,HF_TOKEN,FTLIB_TEST_PASSED]"])
    launch = build_launch(cfg.container, run_dir=cfg.run_root, storage_root=cfg.storage.root,
                          hf_cache=cfg.storage.hf_cache, gpus=False)
    run_dir = Path(cfg.run_root)
    run_dir.mkdir(parents=True)
    unbound = tmp_path / "not-bound" / "written-by-job.txt"
    tmp_marker = f"/tmp/ftlib-probe-{uuid.uuid4().hex}/written-by-job.txt"
    # apptainer expands $, ` and \ in what it is given (the launcher escapes them): byte for byte
    tricky = 'v"a\'l $(touch /tmp/pwned-ftlib) `id` $HOME \\$x ${X:-d} end\\\nsecond line\n' + uuid.uuid4().hex
    # submitit's sbatch passes this process's environment on to the job
    for name, value in image.env(hf_cache, WANDB_API_KEY=SECRET_KEY, HF_TOKEN=SECRET_TOKEN,
                                 FTLIB_TEST_PASSED=tricky, FTLIB_TEST_NOT_PASSED="must-not-arrive",
                                 APPTAINER_BIND="/etc:/mnt/hostetc", APPTAINERENV_SNEAKY="1",
                                 SINGULARITYENV_SNEAKY="1").items():
        monkeypatch.setenv(name, value)
    executor = submitit.SlurmExecutor(folder=str(run_dir / "slurm" / "%j"), python=launch.python)
    executor.update_parameters(time=10, cpus_per_task=1)
    job = executor.submit(CommandFunction(["python3", "-c", PROBE, str(run_dir / "inside.json"),
                                           str(unbound), tmp_marker]))
    job.result()
    inside = json.loads((run_dir / "inside.json").read_text())

    sha = lambda value: hashlib.sha256(value.encode()).hexdigest()  # noqa: E731
    assert inside["container"] == str(image.path) and inside["prefix"] == "/opt/venv"
    assert inside["cwd"] == str(run_dir) and inside["procid"] == "0"
    assert inside["unbound_exists_inside"] is True                # written inside ...
    assert not unbound.exists() and not unbound.parent.exists()   # ... and not visible outside
    assert not Path(tmp_marker).exists() and not Path("/tmp/pwned-ftlib").exists()
    assert inside["passed"] == sha(tricky)
    assert inside["key"] == sha(SECRET_KEY) and inside["token"] == sha(SECRET_TOKEN)
    assert inside["etc_mnt"] is False                             # the host's APPTAINER_BIND was dropped
    passed = [re.compile(p.replace("*", "[A-Za-z0-9_]*")) for p in PASSED_ENV]
    allowed = RUNTIME_ENV | set(launch.env_names) | set(launch.env_values)
    unexpected = [n for n in inside["env"] if n not in allowed and not n.startswith(("APPTAINER_", "SINGULARITY_"))
                  and not any(p.fullmatch(n) for p in passed)]
    assert unexpected == [], f"host variables reached the job: {unexpected}"
    assert "FTLIB_TEST_NOT_PASSED" not in inside["env"] and "SNEAKY" not in inside["env"]
    for path in run_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for secret in (SECRET_KEY, SECRET_TOKEN, tricky):
                assert secret.encode() not in content, path
