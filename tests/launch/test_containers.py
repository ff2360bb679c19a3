"""Container launch (ftlib/launch/containers.py) and the image recipes (containers/).

(a) golden command lines for apptainer, enroot/pyxis and charliecloud (FTLIB_UPDATE_GOLDEN=1 rewrites);
(b) a checker for containers/ftlib.def and containers/Dockerfile: sections, exact base tag, pins;
(c) real runs: ch-run on a test image made by containers/make-test-image.sh, through the same
    ContainerLaunch.python string submitit runs (by a shell, and by submitit's local executor),
    and the apptainer per-task wrapper against a stand-in `apptainer` that records what it got;
(d) secrets: values of passed variables appear in no command, sbatch script or file.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ftlib.launch.containers import (PASSED_ENV, ContainerConfig, ContainerLaunch, build_launch,
                                     check_container, image_provenance)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "containers"
MAKE_TEST_IMAGE = REPO / "containers" / "make-test-image.sh"

# The layout the golden files describe: a run under the storage root, an HF cache beside it.
RUN_DIR, STORAGE, HF = "/shared/ftlib/runs/demo", "/shared/ftlib/runs", "/shared/hf"
USER_BINDS = ["/datasets", "/scratch/me/cache:/cache"]
IMAGES = {"apptainer": "/images/ftlib.sif", "enroot": "/images/ftlib.sqsh",
          "charliecloud": "/images/ftlib"}
GOLDEN_CASES = {  # golden file stem -> (runtime, gpus)
    "apptainer-gpu": ("apptainer", True), "apptainer-cpu": ("apptainer", False),
    "enroot-gpu": ("enroot", True), "charliecloud-gpu": ("charliecloud", True),
}


def golden_launch(runtime: str, gpus: bool) -> ContainerLaunch:
    cfg = ContainerConfig(runtime, IMAGES[runtime], list(USER_BINDS), ["MY_PROJECT_TOKEN"])
    return build_launch(cfg, run_dir=RUN_DIR, storage_root=STORAGE, hf_cache=HF, gpus=gpus)


# ---------------------------------------------------------------------------------------------
# (a) golden command lines

@pytest.mark.parametrize("stem", sorted(GOLDEN_CASES))
def test_command_lines_match_golden(stem):
    text = golden_launch(*GOLDEN_CASES[stem]).describe()
    path = GOLDEN / f"{stem}.txt"
    if os.environ.get("FTLIB_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with FTLIB_UPDATE_GOLDEN=1 to write it"
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{path.name}", "now"))
        pytest.fail(f"{stem}: command differs from the golden file (FTLIB_UPDATE_GOLDEN=1 "
                    f"rewrites it after review):\n{diff}")


def test_golden_launches_have_the_runtime_flags():
    """Beyond byte equality: the flags the design rests on are there."""
    app = golden_launch("apptainer", True)
    argv = shlex.split(app.python)
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3] == "ftlib-apptainer"
    exec_argv = shlex.split(argv[2].rsplit("; ", 1)[1])
    assert exec_argv[:3] == ["exec", "apptainer", "exec"]
    assert {"--cleanenv", "--contain", "--nv"} <= set(exec_argv)
    assert exec_argv[-3:] == [IMAGES["apptainer"], "python3", "$@"]
    binds = exec_argv[exec_argv.index("--bind", exec_argv.index("/dev/shm")) + 1]
    assert binds.split(",") == ["/shared/ftlib/runs:/shared/ftlib/runs", "/shared/hf:/shared/hf",
                                "/datasets:/datasets", "/scratch/me/cache:/cache"]
    assert "--nv" not in golden_launch("apptainer", False).python

    pyxis = golden_launch("enroot", True)
    assert pyxis.python == "python3"
    flags = dict(arg.split("=", 1) for arg in pyxis.srun_args if "=" in arg)
    assert flags["--container-image"] == IMAGES["enroot"]
    assert "/scratch/me/cache:/cache" in flags["--container-mounts"].split(",")
    assert "MY_PROJECT_TOKEN" in flags["--container-env"].split(",")
    assert "MY_PROJECT_TOKEN" in flags["--export"].split(",")
    assert f"HF_HOME={HF}" in flags["--export"].split(",")

    ch = shlex.split(golden_launch("charliecloud", True).python)
    assert ch[0] == "ch-run" and ch[-3:] == [IMAGES["charliecloud"], "--", "python3"]
    assert "--private-tmp" in ch and f"--cd={RUN_DIR}" in ch
    keep = "|".join(PASSED_ENV + ("MY_PROJECT_TOKEN",))
    assert ch.index(f"--unset-env=!({keep})") < ch.index(f"--set-env=HF_HOME={HF}")


def test_run_dir_outside_storage_is_bound_and_duplicates_dropped():
    cfg = ContainerConfig("charliecloud", "/img", ["/data", "/data", "/data/sub"], [])
    launch = build_launch(cfg, run_dir="/elsewhere/run", storage_root="/shared/runs", hf_cache="/shared/runs/hf")
    assert launch.binds == [("/shared/runs", "/shared/runs"), ("/elsewhere/run", "/elsewhere/run"),
                            ("/data", "/data")]


def test_runtime_none_runs_this_interpreter_on_the_host():
    launch = build_launch(ContainerConfig("none"), run_dir="/r")
    assert shlex.split(launch.python) == [sys.executable]
    assert launch.srun_args == [] and launch.binds == []


@pytest.mark.parametrize("kwargs, key", [
    (dict(binds=["relative/path"]), "container.binds[0]"),
    (dict(binds=["/a:/b:/c"]), "container.binds[0]"),
    (dict(binds=["/ok", "/a,b"]), "container.binds[1]"),
    (dict(env=["WANDB_API_KEY=abc"]), "container.env[0]"),
    (dict(env=["HF_HOME"]), "container.env: HF_HOME is set by ftlib"),
])
def test_bad_binds_and_env_are_config_errors(kwargs, key):
    cfg = ContainerConfig("apptainer", "/img.sif", **kwargs)
    with pytest.raises(ValueError) as err:
        build_launch(cfg, run_dir="/r", hf_cache="/hf")
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_secret_names_cannot_be_set_by_value():
    with pytest.raises(ValueError, match="WANDB_API_KEY is passed by name only"):
        build_launch(ContainerConfig("apptainer", "/img.sif"), run_dir="/r",
                     env_values={"WANDB_API_KEY": "abc"})


# ---------------------------------------------------------------------------------------------
# check_container and image_provenance

@pytest.mark.parametrize("runtime, suggestion", [
    ("apptainr", "apptainer"), ("singularity", "apptainer"), ("pyxis", "enroot"),
    ("charlicloud", "charliecloud"), ("kubernetes", None),
])
def test_unknown_runtime_names_key_valid_ones_and_nearest(runtime, suggestion):
    with pytest.raises(ValueError) as err:
        check_container(ContainerConfig(runtime, "/img"))
    message = str(err.value)
    assert message.startswith("container.runtime:") and "\n" not in message
    assert "apptainer, enroot, charliecloud, none" in message
    assert (f"did you mean {suggestion!r}" in message) if suggestion else ("did you mean" not in message)


def test_missing_image_is_a_one_line_error_with_the_fix(tmp_path):
    with pytest.raises(ValueError) as err:
        check_container(ContainerConfig("apptainer", str(tmp_path / "nope.sif")))
    assert str(err.value).startswith("container.image:") and "containers/build.sh" in str(err.value)
    with pytest.raises(ValueError, match=r"^container\.image: not set"):
        check_container(ContainerConfig("charliecloud", None))
    (tmp_path / "dir.sqsh").mkdir()
    with pytest.raises(ValueError, match="is not a file"):
        check_container(ContainerConfig("enroot", str(tmp_path / "dir.sqsh")))
    check_container(ContainerConfig("none"))  # no image needed


def test_charliecloud_bind_targets_must_exist_in_the_image(tmp_path):
    image = tmp_path / "img"
    (image / "usr").mkdir(parents=True)
    cfg = ContainerConfig("charliecloud", str(image), ["/usr"])
    launch = build_launch(cfg, run_dir="/shared/runs/demo", storage_root="/shared/runs", hf_cache="/tmp/hf")
    with pytest.raises(ValueError) as err:
        check_container(cfg, launch)
    assert str(err.value).startswith("container.image: bind target /shared/runs does not exist")
    assert f"mkdir -p {image}/shared/runs" in str(err.value)
    (image / "shared" / "runs").mkdir(parents=True)
    check_container(cfg, launch)  # /tmp/hf lies on ch-run's private /tmp: no target needed


def test_image_provenance_file_and_directory(tmp_path):
    sif = tmp_path / "ftlib.sif"
    sif.write_bytes(b"not really a SIF" * 1000)
    record = image_provenance(ContainerConfig("apptainer", str(sif)))
    assert record == {"runtime": "apptainer", "image": str(sif), "kind": "file", "size": 16000,
                      "sha256": hashlib.sha256(sif.read_bytes()).hexdigest()}

    image = tmp_path / "img"
    (image / "usr" / "bin").mkdir(parents=True)
    (image / "usr" / "bin" / "python3").write_text("#!")
    (image / "bin").symlink_to("usr/bin")
    first = image_provenance(ContainerConfig("charliecloud", str(image)))
    assert first["kind"] == "directory" and first["entries"] == 4
    assert image_provenance(ContainerConfig("charliecloud", str(image))) == first
    (image / "usr" / "bin" / "python3").write_text("#!changed")
    assert image_provenance(ContainerConfig("charliecloud", str(image)))["listing_sha256"] != first["listing_sha256"]
    assert image_provenance(ContainerConfig("none")) == {"runtime": "none"}


# ---------------------------------------------------------------------------------------------
# (b) the recipe checker: containers/ftlib.def and containers/Dockerfile

REQUIRED_SECTIONS = ("%files", "%post", "%environment", "%runscript", "%test", "%labels")
REQUIRED_PINS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf",
                 "submitit", "wandb", "gguf", "deepspeed", "safetensors", "tensorboard")
REPO_PATHS = ("pyproject.toml", "ftlib", "jobs", "configs")
CACHE_VARS = ("HF_HOME", "TORCH_EXTENSIONS_DIR", "WANDB_DIR")
_PIP_OPTIONS_WITH_VALUE = {
    "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-t",
    "--target", "--prefix", "--root", "--platform", "--python-version", "--implementation", "--abi",
    "--src", "-C", "--config-settings", "--progress-bar", "--log", "--cache-dir", "--report",
    "--upgrade-strategy", "--trusted-host", "--proxy", "--retries", "--timeout", "--exists-action",
    "--no-binary", "--only-binary", "--global-option", "--root-user-action"}
_PINNED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]*\])?==[A-Za-z0-9.+!_-]+")


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def pip_pins(script: str) -> tuple[dict[str, str], list[str]]:
    """Every package named by a `pip install` in a shell script: name -> version, and problems."""
    pins: dict[str, str] = {}
    problems: list[str] = []
    for line in logical_lines(script):
        try:
            lexer = shlex.shlex(line.split(" #", 1)[0], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:
            continue  # not shell (a heredoc's python): holds no pip command of its own
        commands, current = [], []
        for token in tokens:
            if token and set(token) <= set(";&|()"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
        for argv in commands:
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                argv = argv[1:]  # VAR=value prefixes
            if len(argv) >= 3 and re.fullmatch(r"python[0-9.]*", Path(argv[0]).name) and argv[1:3] == ["-m", "pip"]:
                argv = ["pip"] + argv[3:]
            if len(argv) < 2 or not re.fullmatch(r"pip[0-9.]*", Path(argv[0]).name) or argv[1] != "install":
                continue
            args = iter(argv[2:])
            for arg in args:
                if arg in ("-r", "--requirement") or arg.startswith("--requirement="):
                    problems.append(f"`{line.strip()}`: a requirements file hides its pins; name packages with ==")
                    next(args, None)
                elif arg in _PIP_OPTIONS_WITH_VALUE:
                    next(args, None)
                elif arg.startswith("-"):
                    continue
                elif arg.startswith(("/", "./", "../")) or arg == ".":
                    continue  # a local path (ftlib itself)
                elif _PINNED.fullmatch(arg):
                    name, version = arg.split("==")
                    pins[re.sub(r"\[.*\]", "", name).lower()] = version
                else:
                    problems.append(f"pip package {arg!r} is not pinned with == (in `{line.strip()}`)")
    return pins, problems


def check_base(image: str) -> list[str]:
    name, _, tag = image.partition("@")[0].rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    if "@sha256:" in image:
        return []
    if not tag or tag == "latest" or not re.search(r"\d+\.\d+\.\d+", tag):
        return [f"base image {image!r} has no exact tag (need e.g. name:13.0.1-... or @sha256:...; never latest)"]
    return []


def parse_def(text: str) -> tuple[dict[str, str], dict[str, str]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^(%[a-z]+)\b", line)
        if match:
            current = match.group(1)
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line)
        elif re.match(r"^\s*[A-Za-z]+:", line) and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip().lower()] = value.strip()
    return header, {k: "\n".join(v) for k, v in sections.items()}


def check_def(text: str) -> tuple[list[str], dict]:
    header, sections = parse_def(text)
    problems = [f"section {s} is missing" for s in REQUIRED_SECTIONS if s not in sections]
    if header.get("bootstrap") != "docker":
        problems.append(f"Bootstrap must be docker, not {header.get('bootstrap')!r}")
    base = header.get("from", "")
    problems += check_base(base) if base else ["From: is missing"]
    pins, pin_problems = pip_pins(sections.get("%post", ""))
    problems += pin_problems
    labels = dict(line.strip().split(None, 1) for line in sections.get("%labels", "").splitlines()
                  if line.strip() and not line.strip().startswith("#") and len(line.split()) > 1)
    files = [line.split()[0] for line in sections.get("%files", "").splitlines() if line.strip()]
    environment = sections.get("%environment", "")
    return problems + _common_checks(pins, labels, base, files, environment), dict(
        base=base, pins=pins, labels=labels, files=files)


def check_dockerfile(text: str) -> tuple[list[str], dict]:
    problems, pins, labels, files, bases, env = [], {}, {}, [], [], []
    for line in logical_lines(text):
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        instruction, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        if instruction == "FROM":
            image = [w for w in rest.split() if not w.startswith("--")][0]
            bases.append(image)
            problems += check_base(image)
        elif instruction == "RUN":
            if rest.startswith("["):
                rest = shlex.join(json.loads(rest))
            found, pin_problems = pip_pins(rest)
            pins.update(found)
            problems += pin_problems
        elif instruction == "LABEL":
            labels.update(token.split("=", 1) for token in shlex.split(rest))
        elif instruction == "COPY":
            files += [w for w in shlex.split(rest)[:-1] if not w.startswith("--")]
        elif instruction == "ENV":
            env.append(rest)
    if not bases:
        problems.append("FROM is missing")
    base = bases[-1] if bases else ""
    return problems + _common_checks(pins, labels, base, files, "\n".join(env)), dict(
        base=base, pins=pins, labels=labels, files=files)


def _common_checks(pins, labels, base, files, environment) -> list[str]:
    problems = [f"{name} is not installed with a pinned version" for name in REQUIRED_PINS if name not in pins]
    for name, version in pins.items():
        if labels.get(f"ftlib.pin.{name}") != version:
            problems.append(f"label ftlib.pin.{name} is {labels.get(f'ftlib.pin.{name}')!r}, pin is {version!r}")
    problems += [f"label {key} names no pinned package" for key in labels
                 if key.startswith("ftlib.pin.") and key[len("ftlib.pin."):] not in pins]
    if labels.get("ftlib.base") != base:
        problems.append(f"label ftlib.base {labels.get('ftlib.base')!r} is not the base {base!r}")
    problems += [f"the repository's {p} is not copied into the image" for p in REPO_PATHS if p not in files]
    problems += [f"{var} has no default in the image environment" for var in CACHE_VARS
                 if not re.search(rf"\b{var}=", environment)]
    return problems


def test_ftlib_def_passes_the_checker():
    problems, found = check_def((REPO / "containers" / "ftlib.def").read_text())
    assert problems == [], "containers/ftlib.def:\n  " + "\n  ".join(problems)
    assert found["pins"]["torch"] == "2.13.0" and found["pins"]["transformers"] == "5.23.0"


def test_dockerfile_passes_the_checker_and_matches_the_def():
    problems, docker = check_dockerfile((REPO / "containers" / "Dockerfile").read_text())
    assert problems == [], "containers/Dockerfile:\n  " + "\n  ".join(problems)
    _, apptainer = check_def((REPO / "containers" / "ftlib.def").read_text())
    assert docker["base"] == apptainer["base"]
    assert docker["pins"] == apptainer["pins"], "the Dockerfile and ftlib.def pin different packages"


def test_recipe_checker_catches_what_it_checks():
    good = (REPO / "containers" / "ftlib.def").read_text()
    bad_tag = good.replace("From: nvidia/cuda:13.0.1-devel-ubuntu24.04", "From: nvidia/cuda:latest")
    assert any("no exact tag" in p for p in check_def(bad_tag)[0])
    unpinned = good.replace("peft==0.21.2", "'peft>=0.21'")
    assert any("'peft>=0.21' is not pinned" in p for p in check_def(unpinned)[0])
    assert any("'peft' is not pinned" in p for p in check_def(good.replace("peft==0.21.2", "peft"))[0])
    no_test = good.replace("%test", "%tst")
    assert "section %test is missing" in check_def(no_test)[0]
    torch_floats = good.replace("pip install --no-cache-dir torch==2.13.0",
                                "python3 -m pip install --no-cache-dir torch")
    assert any("'torch' is not pinned" in p for p in check_def(torch_floats)[0])
    drift = good.replace("ftlib.pin.wandb 0.31.0", "ftlib.pin.wandb 0.30.0")
    assert any("ftlib.pin.wandb" in p for p in check_def(drift)[0])
    docker = (REPO / "containers" / "Dockerfile").read_text()
    assert any("is not pinned" in p for p in check_dockerfile(
        docker.replace("RUN pip install --no-cache-dir torch==2.13.0", "RUN pip install torch"))[0])
    assert any("requirements file" in p for p in check_dockerfile(
        docker + "\nRUN pip install -r requirements.txt\n")[0])


def test_scripts_are_valid_bash():
    for script in ("build.sh", "make-test-image.sh"):
        path = REPO / "containers" / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_build_sh_without_apptainer_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if any(Path(d, "apptainer").exists() for d in env["PATH"].split(":")):
        pytest.skip("apptainer is installed here")
    result = subprocess.run([str(REPO / "containers" / "build.sh"), str(tmp_path / "x.sif")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 127
    assert "apptainer is not on PATH" in result.stderr and "Dockerfile" in result.stderr
    assert not (tmp_path / "x.sif").exists()


# ---------------------------------------------------------------------------------------------
# (c) real runs

def _passed_by_default(name: str) -> bool:
    return any(re.fullmatch(p.replace("*", "[A-Za-z0-9_]*"), name) for p in PASSED_ENV)


def _job_env(tmp_path, **extra) -> dict[str, str]:
    """The environment a Slurm task would have: the host's, plus variables to pass or not."""
    return {**os.environ, "USER": os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name, **extra}


def test_apptainer_wrapper_passes_names_only_through_apptainerenv(tmp_path):
    """Runs the per-task sh wrapper for real, against a stand-in `apptainer` that records
    its argv and environment (apptainer itself cannot run on this machine)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apptainer").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nenv -0 > {tmp_path}/env\n')
    (fake_bin / "apptainer").chmod(0o755)
    tricky = 'v"a\'l $(touch /tmp/pwned-ftlib) `id`\nsecond line ' + uuid.uuid4().hex
    cfg = ContainerConfig("apptainer", "/images/ftlib.sif", [], ["FTLIB_TEST_PASSED"])
    launch = build_launch(cfg, run_dir=str(tmp_path / "run"), gpus=True)
    env = _job_env(tmp_path, PATH=f"{fake_bin}:{os.environ['PATH']}", FTLIB_TEST_PASSED=tricky,
                   FTLIB_TEST_NOT_PASSED="nope", SLURM_PROCID="3", SUBMITIT_EXECUTOR="slurm",
                   WANDB_API_KEY="k-" + uuid.uuid4().hex, APPTAINER_BIND="/etc",
                   APPTAINERENV_SNEAKY="1", SINGULARITYENV_SNEAKY="1")
    env.pop("HF_TOKEN", None)
    command = f"{launch.python} -u -m submitit.core._submit /folder"
    subprocess.run(command, shell=True, env=env, check=True, timeout=30)

    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[-6:] == ["/images/ftlib.sif", "python3", "-u", "-m", "submitit.core._submit", "/folder"]
    seen = dict(item.split("=", 1) for item in (tmp_path / "env").read_text().split("\0") if "=" in item)
    forwarded = {k[len("APPTAINERENV_"):]: v for k, v in seen.items() if k.startswith("APPTAINERENV_")}
    assert forwarded == {"FTLIB_TEST_PASSED": tricky, "SLURM_PROCID": "3",
                         "SUBMITIT_EXECUTOR": "slurm", "WANDB_API_KEY": env["WANDB_API_KEY"],
                         **{k: v for k, v in env.items() if _passed_by_default(k)}}
    assert not [k for k in seen if k.startswith(("APPTAINER_", "SINGULARITY"))]
    assert not Path("/tmp/pwned-ftlib").exists()
    assert tricky not in "\n".join(argv) and env["WANDB_API_KEY"] not in "\n".join(argv)


@pytest.fixture(scope="module")
def ch_test_image(tmp_path_factory) -> Path:
    """A Charliecloud test image of this machine's python (containers/make-test-image.sh)."""
    image = tmp_path_factory.mktemp("ch-image") / "img"
    result = subprocess.run([str(MAKE_TEST_IMAGE), str(image)], capture_output=True, text=True,
                            env={**os.environ, "FTLIB_TEST_PYTHON": sys.executable}, timeout=300)
    if result.returncode == 3:
        pytest.skip(f"ch-run is not installed and could not be: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return image


def _host_binds(image: Path) -> list[str]:
    return (image / "ch" / "host-binds").read_text().split()


def test_charliecloud_run_sees_only_what_ftlib_binds_and_passes(ch_test_image, tmp_path):
    run_dir, storage, hf = tmp_path / "runs" / "demo", tmp_path / "storage", tmp_path / "hf"
    unbound = tmp_path / "unbound"
    for d in (run_dir, storage, hf, unbound):
        d.mkdir(parents=True)
    (unbound / "secret.txt").write_text("host only")
    cfg = ContainerConfig("charliecloud", str(ch_test_image), _host_binds(ch_test_image), ["FTLIB_TEST_PASSED"])
    launch = build_launch(cfg, run_dir=run_dir, storage_root=storage, hf_cache=hf)
    check_container(cfg, launch)
    assert image_provenance(cfg)["kind"] == "directory"
    snippet = (
        "import json, os, sys\n"
        f"open({str(run_dir / 'from-container.txt')!r}, 'w').write('written inside ' + str(os.getpid()))\n"
        f"print(json.dumps({{'env': dict(os.environ), 'cwd': os.getcwd(), 'prefix': sys.prefix,\n"
        f"  'unbound': os.path.exists({str(unbound)!r}), 'unbound_parent': os.listdir({str(tmp_path)!r}),\n"
        f"  'tmp': os.listdir('/tmp')}}))\n")
    env = _job_env(tmp_path, FTLIB_TEST_PASSED="passed-by-name", FTLIB_TEST_NOT_PASSED="must-not-arrive",
                   WANDB_API_KEY="wandb-" + uuid.uuid4().hex)
    env.pop("HF_TOKEN", None)
    result = subprocess.run(f"{launch.python} -c {shlex.quote(snippet)}", shell=True, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    inside = json.loads(result.stdout)

    assert (run_dir / "from-container.txt").read_text().startswith("written inside ")
    assert inside["unbound"] is False
    assert sorted(inside["unbound_parent"]) == ["hf", "runs", "storage"]  # only the bound ones
    # Private /tmp: it holds only the bind targets that lie under /tmp (this test's folders, and the
    # python environment when the checkout itself is under /tmp).
    targets = [Path(b.split(":")[-1]) for b in [str(tmp_path), *_host_binds(ch_test_image)]]
    assert sorted(inside["tmp"]) == sorted({t.parts[2] for t in targets if t.parts[1:2] == ("tmp",)})
    assert inside["cwd"] == str(run_dir)
    assert inside["prefix"] == sys.prefix          # the venv runs inside
    got = inside["env"]
    assert got["FTLIB_TEST_PASSED"] == "passed-by-name"
    assert "FTLIB_TEST_NOT_PASSED" not in got
    assert got["WANDB_API_KEY"] == env["WANDB_API_KEY"]
    assert got["HF_HOME"] == str(hf) and got["WANDB_DIR"] == str(run_dir)
    allowed = {"PATH", "HOME", "HF_HOME", "WANDB_DIR", "TORCH_EXTENSIONS_DIR", "CH_RUNNING", "LC_CTYPE",
               "FTLIB_TEST_PASSED", "WANDB_API_KEY"}
    unexpected = sorted(k for k in got if k not in allowed and not _passed_by_default(k))
    assert unexpected == [], f"host variables leaked into the container: {unexpected}"


def _inside_job(path: str) -> dict:
    """Runs inside the container, started by submitit (pickled by value)."""
    import os
    import sys
    with open(path, "w") as handle:
        handle.write("from a submitit job")
    return {"executor": os.environ.get("SUBMITIT_EXECUTOR"), "passed": os.environ.get("FTLIB_TEST_PASSED"),
            "not_passed": os.environ.get("FTLIB_TEST_NOT_PASSED"), "ch": os.environ.get("CH_RUNNING"),
            "prefix": sys.prefix}


def test_submitit_runs_the_job_function_inside_the_container(ch_test_image, tmp_path, monkeypatch):
    """The same ContainerLaunch.python through submitit's own executor (local: no Slurm needed)."""
    import cloudpickle
    import submitit

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = ContainerConfig("charliecloud", str(ch_test_image), _host_binds(ch_test_image), ["FTLIB_TEST_PASSED"])
    launch = build_launch(cfg, run_dir=run_dir)
    monkeypatch.setenv("USER", os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name)
    monkeypatch.setenv("FTLIB_TEST_PASSED", "yes")
    monkeypatch.setenv("FTLIB_TEST_NOT_PASSED", "no")
    executor = submitit.LocalExecutor(folder=run_dir / "slurm", python=launch.python)
    executor.update_parameters(timeout_min=2)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the image has no copy of this test module
    try:
        job = executor.submit(_inside_job, str(run_dir / "job-output.txt"))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    result = job.result()
    assert result == {"executor": "local", "passed": "yes", "not_passed": None,
                      "ch": "Weird Al Yankovic", "prefix": sys.prefix}
    assert (run_dir / "job-output.txt").read_text() == "from a submitit job"


# ---------------------------------------------------------------------------------------------
# (d) secrets

def test_secret_values_appear_in_no_command_and_no_file(tmp_path, monkeypatch):
    import submitit.slurm.slurm as submitit_slurm

    secrets = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in ("WANDB_API_KEY", "HF_TOKEN", "MY_PROJECT_TOKEN")}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    texts = []
    for stem, (runtime, gpus) in GOLDEN_CASES.items():
        launch = golden_launch(runtime, gpus)
        assert {"WANDB_API_KEY", "HF_TOKEN", "MY_PROJECT_TOKEN"} <= set(launch.env_names)
        sbatch = submitit_slurm._make_sbatch_string(
            command=f"{launch.python} -u -m submitit.core._submit {tmp_path}", folder=tmp_path,
            srun_args=launch.srun_args, gpus_per_node=1 if gpus else None)
        (tmp_path / f"{stem}.sbatch").write_text(sbatch)
        texts += [launch.describe(), repr(launch), sbatch]
    texts += [p.read_text() for p in GOLDEN.glob("*.txt")]
    texts += [p.read_text() for p in tmp_path.iterdir()]
    for name, value in secrets.items():
        leaks = [t[:80] for t in texts if value in t]
        assert leaks == [], f"the value of {name} leaked into: {leaks}"
    # names are there, so the value can flow at run time
    assert all("MY_PROJECT_TOKEN" in t for t in texts[:3])
    assert set(PASSED_ENV) >= {"WANDB_API_KEY", "HF_TOKEN"}
