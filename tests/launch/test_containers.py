"""Container launch (ftlib/launch/containers.py) and the image recipes (containers/).

(a) golden command lines for apptainer, enroot/pyxis and charliecloud (FTLIB_UPDATE_GOLDEN=1 rewrites);
    pyxis/enroot cannot run on these machines, so for it the golden file is the only test;
(b) the recipes: containers/requirements.txt is the one list of pins (exact, inside pyproject.toml's
    ranges), and containers/build.sh, containers/ftlib.def and containers/Dockerfile install it only
    through containers/install-stack.sh, which installs exactly that list (run against a recording
    stand-in python); ftlib.def's sections, base tag and environment;
(c) real runs: ch-run on a test image made by containers/make-test-image.sh, through the same
    ContainerLaunch.python string submitit runs (by a shell, and by submitit's local executor).
    Apptainer runs for real in tests/integration/test_apptainer_slurm.py (the built image);
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
import tomllib
import uuid
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO, TINY_CONFIG
from ftlib.config import ConfigError, ContainerSection, load_config
from ftlib.launch.containers import (PASSED_ENV, ContainerLaunch, build_launch, check_container,
                                     image_file_kind, image_provenance)

GOLDEN = REPO / "tests" / "golden" / "containers"
CONTAINERS = REPO / "containers"
MAKE_TEST_IMAGE = CONTAINERS / "make-test-image.sh"

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
    cfg = ContainerSection(runtime, IMAGES[runtime], list(USER_BINDS), ["MY_PROJECT_TOKEN"])
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
    cfg = ContainerSection("charliecloud", "/img", ["/data", "/data", "/data/sub"], [])
    launch = build_launch(cfg, run_dir="/elsewhere/run", storage_root="/shared/runs", hf_cache="/shared/runs/hf")
    assert launch.binds == [("/shared/runs", "/shared/runs"), ("/elsewhere/run", "/elsewhere/run"),
                            ("/data", "/data")]


def test_runtime_none_runs_this_interpreter_on_the_host():
    launch = build_launch(ContainerSection("none"), run_dir="/r")
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
    cfg = ContainerSection("apptainer", "/img.sif", **kwargs)
    with pytest.raises(ValueError) as err:
        build_launch(cfg, run_dir="/r", hf_cache="/hf")
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_secret_names_cannot_be_set_by_value():
    with pytest.raises(ValueError, match="WANDB_API_KEY is passed by name only"):
        build_launch(ContainerSection("apptainer", "/img.sif"), run_dir="/r",
                     env_values={"WANDB_API_KEY": "abc"})


# ---------------------------------------------------------------------------------------------
# check_container and image_provenance

@pytest.mark.parametrize("runtime, suggestion", [
    ("apptainr", "apptainer"), ("singularity", "apptainer"), ("pyxis", "enroot"),
    ("charlicloud", "charliecloud"), ("kubernetes", None),
])
def test_unknown_runtime_names_key_valid_ones_and_nearest(runtime, suggestion):
    with pytest.raises(ValueError) as err:
        check_container(ContainerSection(runtime, "/img"))
    message = str(err.value)
    assert message.startswith("container.runtime:") and "\n" not in message
    assert "apptainer, enroot, charliecloud, none" in message
    assert (f"did you mean {suggestion!r}" in message) if suggestion else ("did you mean" not in message)


def test_missing_image_is_a_one_line_error_with_the_fix(tmp_path):
    with pytest.raises(ValueError) as err:
        check_container(ContainerSection("apptainer", str(tmp_path / "nope.sif")))
    assert str(err.value).startswith("container.image:") and "containers/build.sh" in str(err.value)
    (tmp_path / "dir.sqsh").mkdir()
    with pytest.raises(ValueError, match="is not a file"):
        check_container(ContainerSection("enroot", str(tmp_path / "dir.sqsh")))
    check_container(ContainerSection("none"))  # no image needed
    check_container(ContainerSection("apptainer", str(tmp_path / "dir.sqsh")))  # a sandbox directory


def test_runtime_without_image_is_refused_by_the_config_not_twice(tmp_path):
    """check_container does not repeat what config validation checks (runtime without image)."""
    with pytest.raises(ConfigError, match=r"container\.image"):
        load_config(TINY_CONFIG, [f"storage.root={tmp_path}", "container.runtime=apptainer"])
    check_container(ContainerSection("apptainer", None))


def test_image_file_must_be_of_the_runtimes_kind(tmp_path):
    sif, sqsh, text = tmp_path / "a.sif", tmp_path / "a.sqsh", tmp_path / "notes.sif"
    sif.write_bytes(b"#!/usr/bin/env run-singularity\n".ljust(32, b"\0") + b"SIF_MAGIC\x0001" + bytes(64))
    sqsh.write_bytes(b"hsqs" + bytes(60))
    text.write_text("not an image at all, but long enough to have 48 bytes of header")
    assert [image_file_kind(p) for p in (sif, sqsh, text)] == [
        "a SIF image", "a SquashFS image", "not an image file"]
    check_container(ContainerSection("apptainer", str(sif)))
    check_container(ContainerSection("apptainer", str(sqsh)))
    check_container(ContainerSection("enroot", str(sqsh)))
    with pytest.raises(ValueError, match=r"^container\.image: .*notes\.sif' is not an image file, not a \.sif file"):
        check_container(ContainerSection("apptainer", str(text)))
    with pytest.raises(ValueError, match="is a SIF image, not a .sqsh file that enroot runs"):
        check_container(ContainerSection("enroot", str(sif)))


def test_charliecloud_bind_targets_must_exist_in_the_image(tmp_path):
    image = tmp_path / "img"
    (image / "usr").mkdir(parents=True)
    cfg = ContainerSection("charliecloud", str(image), ["/usr"])
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
    record = image_provenance(ContainerSection("apptainer", str(sif)))
    assert record == {"runtime": "apptainer", "image": str(sif), "kind": "file", "size": 16000,
                      "sha256": hashlib.sha256(sif.read_bytes()).hexdigest()}
    (tmp_path / "ftlib.sif.inputs-sha256").write_text("ab" * 32 + "\n")   # containers/build.sh's
    assert image_provenance(ContainerSection("apptainer", str(sif)))["inputs_sha256"] == "ab" * 32

    image = tmp_path / "img"
    (image / "usr" / "bin").mkdir(parents=True)
    (image / "usr" / "bin" / "python3").write_text("#!")
    (image / "bin").symlink_to("usr/bin")
    first = image_provenance(ContainerSection("charliecloud", str(image)))
    assert first["kind"] == "directory" and first["entries"] == 4
    assert image_provenance(ContainerSection("charliecloud", str(image))) == first
    (image / "usr" / "bin" / "python3").write_text("#!changed")
    assert image_provenance(ContainerSection("charliecloud", str(image)))["listing_sha256"] != first["listing_sha256"]
    assert image_provenance(ContainerSection("none")) == {"runtime": "none"}


# ---------------------------------------------------------------------------------------------
# (b) the recipes: one list of pins, one installer, three recipes

REQUIREMENTS = CONTAINERS / "requirements.txt"
REQUIRED_PINS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf",
                 "submitit", "wandb", "gguf", "deepspeed", "safetensors", "tensorboard")
REQUIRED_SECTIONS = ("%arguments", "%files", "%post", "%environment", "%runscript", "%test", "%labels")
REPO_PATHS = ("pyproject.toml", "ftlib", "jobs", "configs")
STACK_FILES = ("containers/requirements.txt", "containers/install-stack.sh", "containers/self-test.py")
CACHE_VARS = ("HF_HOME", "TORCH_EXTENSIONS_DIR", "WANDB_DIR")
_PIP_OPTIONS_WITH_VALUE = {
    "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-t",
    "--target", "--prefix", "--root", "--platform", "--python-version", "--implementation", "--abi",
    "--src", "-C", "--config-settings", "--progress-bar", "--log", "--cache-dir", "--report",
    "--upgrade-strategy", "--trusted-host", "--proxy", "--retries", "--timeout", "--exists-action",
    "--no-binary", "--only-binary", "--global-option", "--root-user-action"}
_LINE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)"
                   r"\s*(#\s*stage:\s*(?P<stage>[a-z]+))?\s*(#.*)?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(text: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """requirements.txt -> (name -> version, name -> stage, problems)."""
    pins, stages, problems = {}, {}, []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.fullmatch(line.strip())
        if not match:
            problems.append(f"line {number}: {line.strip()!r} is not NAME==VERSION [# stage: NAME]")
            continue
        name = canonical(match["name"])
        if name in pins:
            problems.append(f"line {number}: {name} is pinned twice")
        pins[name], stages[name] = match["version"], match["stage"] or ""
    return pins, stages, problems


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def pip_installs(script: str) -> tuple[list[str], list[str]]:
    """What the `pip install` commands of a shell script name: (packages, local paths)."""
    packages, paths = [], []
    for line in logical_lines(script):
        try:
            lexer = shlex.shlex(line.split(" #", 1)[0], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:
            continue  # not shell (a heredoc's python): holds no pip command of its own
        for i, token in enumerate(tokens):
            name = Path(token).name
            if re.fullmatch(r"pip[0-9.]*", name) and tokens[i + 1:i + 2] == ["install"] \
                    and tokens[i - 1:i] != ["-m"]:
                args = tokens[i + 2:]
            elif re.fullmatch(r"python[0-9.]*", name) and tokens[i + 1:i + 4] == ["-m", "pip", "install"]:
                args = tokens[i + 4:]
            else:
                continue
            j = 0
            while j < len(args):
                arg, following = args[j], args[j + 1] if j + 1 < len(args) else ""
                j += 1
                if set(arg) <= set(";&|()"):
                    break                      # the end of this command
                if set(arg) <= set("<>&") or (arg.isdigit() and following[:1] in "<>" and following):
                    j += 1 if set(arg) <= set("<>&") and arg != "&" else 0
                    continue                   # a redirection: `> log`, `2>&1`
                if arg in ("-r", "--requirement"):
                    packages.append(f"-r {following}")
                    j += 1
                elif arg in _PIP_OPTIONS_WITH_VALUE:
                    j += 1
                elif arg.startswith("-"):
                    continue
                elif arg.startswith(("/", "./", "../", "$")) or arg == ".":
                    paths.append(arg)   # a local path or a variable (ftlib itself, the stage pins)
                else:
                    packages.append(arg)
    return packages, paths


def check_base(image: str) -> list[str]:
    if "@sha256:" in image:
        return []
    tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
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


def _stack_checks(what: str, script: str, copied: list[str]) -> list[str]:
    """A recipe installs packages only through install-stack.sh, which it copies with the list."""
    packages, _ = pip_installs(script)
    problems = [f"{what} installs {p!r} itself; every package comes from containers/requirements.txt "
                "through containers/install-stack.sh" for p in packages]
    if "install-stack.sh" not in script:
        problems.append(f"{what} does not run containers/install-stack.sh")
    problems += [f"{what} does not copy {f} into the image" for f in STACK_FILES + REPO_PATHS
                 if f not in copied]
    return problems


def check_def(text: str) -> tuple[list[str], dict]:
    header, sections = parse_def(text)
    problems = [f"section {s} is missing" for s in REQUIRED_SECTIONS if s not in sections]
    if header.get("bootstrap") != "docker":
        problems.append(f"Bootstrap must be docker, not {header.get('bootstrap')!r}")
    base = header.get("from", "")
    problems += check_base(base) if base else ["From: is missing"]
    files = [line.split()[0] for line in sections.get("%files", "").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    problems += _stack_checks("ftlib.def %post", sections.get("%post", ""), files)
    if "requirements.txt" not in sections.get("%post", "") or "APPTAINER_LABELS" not in sections.get("%post", ""):
        problems.append("ftlib.def %post does not label the image with the pins of requirements.txt")
    if "self-test.py" not in sections.get("%test", ""):
        problems.append("ftlib.def %test does not run containers/self-test.py")
    labels = dict(line.strip().split(None, 1) for line in sections.get("%labels", "").splitlines()
                  if line.strip() and not line.strip().startswith("#") and len(line.split()) > 1)
    problems += [f"label {key} repeats a pin (labels come from requirements.txt)" for key in labels
                 if key.startswith("ftlib.pin.")]
    if labels.get("ftlib.base") != base:
        problems.append(f"label ftlib.base {labels.get('ftlib.base')!r} is not the base {base!r}")
    problems += [f"{var} has no default in the image environment" for var in CACHE_VARS
                 if not re.search(rf"\b{var}=", sections.get("%environment", ""))]
    return problems, dict(base=base, labels=labels, files=files, sections=sections)


def check_dockerfile(text: str) -> tuple[list[str], dict]:
    problems, runs, files, bases, env = [], [], [], [], []
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
            runs.append(shlex.join(json.loads(rest)) if rest.startswith("[") else rest)
        elif instruction == "COPY":
            sources = [w for w in shlex.split(rest)[:-1] if not w.startswith("--")]
            files += sources
        elif instruction == "ENV":
            env.append(rest)
    if not bases:
        problems.append("FROM is missing")
    problems += _stack_checks("the Dockerfile", "\n".join(runs), files)
    if not any("self-test.py" in r and "--write-marker" not in r for r in runs):
        problems.append("the Dockerfile does not run containers/self-test.py")
    problems += [f"{var} has no default in the image environment" for var in CACHE_VARS
                 if not re.search(rf"\b{var}=", "\n".join(env))]
    return problems, dict(base=bases[-1] if bases else "", files=files)


def test_requirements_are_exact_pins_inside_pyproject_ranges():
    pins, stages, problems = read_requirements(REQUIREMENTS.read_text())
    assert problems == [], "containers/requirements.txt:\n  " + "\n  ".join(problems)
    assert [n for n in REQUIRED_PINS if n not in pins] == []
    assert stages["torch"] == "torch" and stages["deepspeed"] == "deepspeed" and stages["pip"] == "tools"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["deepspeed"]]
    for req in wanted:
        name = canonical(req.name)
        assert name in pins, f"pyproject.toml needs {req}; containers/requirements.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"containers/requirements.txt pins {name}=={pins[name]}, outside pyproject.toml's {req}"


def test_install_stack_installs_exactly_the_list(tmp_path):
    """install-stack.sh against a stand-in python that records each pip command: every pin of
    requirements.txt, in its stage, and nothing else; torch kept at the installed version."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    f'if [ "$1" = -c ]; then echo 2.13.0+cpu; exit 0; fi\n'
                    f'printf "%s\\n" "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "FTLIB_TORCH"}
    subprocess.run(["bash", str(CONTAINERS / "install-stack.sh"), str(fake), "/src/ftlib"],
                   env=env, check=True, capture_output=True, timeout=60)
    calls = log.read_text().splitlines()
    pins, stages, _ = read_requirements(REQUIREMENTS.read_text())
    named = [[w for w in call.split() if "==" in w] for call in calls]
    expected = [sorted(f"{n}=={v}" for n, v in pins.items() if stages[n] == stage)
                for stage in ("tools", "torch", "", "deepspeed")]
    expected[2] = sorted(expected[2] + ["torch==2.13.0+cpu"])
    expected[3] = sorted(expected[3] + ["torch==2.13.0+cpu"])
    assert [sorted(n) for n in named[:4]] == expected
    assert "--no-build-isolation" in calls[3]
    assert calls[4].endswith("--no-deps --no-build-isolation /src/ftlib") and calls[5] == "-m pip check"
    assert len(calls) == 6

    log.unlink()
    subprocess.run(["bash", str(CONTAINERS / "install-stack.sh"), str(fake)], check=True, capture_output=True,
                   env=dict(env, FTLIB_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"))
    second = log.read_text().splitlines()[1]
    assert second.endswith("torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130")


def test_every_recipe_installs_the_one_list_through_install_stack():
    """build.sh, ftlib.def and the Dockerfile install the same package set: requirements.txt
    through install-stack.sh, and nothing else but ftlib itself (--no-deps)."""
    problems, found = check_def((CONTAINERS / "ftlib.def").read_text())
    assert problems == [], "containers/ftlib.def:\n  " + "\n  ".join(problems)
    problems, docker = check_dockerfile((CONTAINERS / "Dockerfile").read_text())
    assert problems == [], "containers/Dockerfile:\n  " + "\n  ".join(problems)
    assert docker["base"] == found["base"]
    build = (CONTAINERS / "build.sh").read_text()
    packages, paths = pip_installs(build)
    assert packages == [] and paths == ["/opt/ftlib"]
    assert re.search(r"install-stack\.sh /opt/venv/bin/python", build)
    assert "requirements.txt" in build and "self-test.py" in build
    # build.sh takes ftlib.def's runtime sections rather than repeating them
    for section in ("%environment", "%runscript", "%test", "%help", "%labels"):
        assert f'"{section}"' in build, f"build.sh does not take {section} from ftlib.def"


def test_recipe_checker_catches_what_it_checks():
    good = (CONTAINERS / "ftlib.def").read_text()
    assert check_def(good)[0] == []
    bad_tag = good.replace("From: nvidia/cuda:13.0.1-devel-ubuntu24.04", "From: nvidia/cuda:latest")
    assert any("no exact tag" in p for p in check_def(bad_tag)[0])
    extra = good.replace("    rm -rf /opt/ftlib/build", "    pip install --no-cache-dir peft==0.21.2\n    rm -rf /opt/ftlib/build")
    assert any("installs 'peft==0.21.2' itself" in p for p in check_def(extra)[0])
    hidden = good.replace("    rm -rf /opt/ftlib/build", "    python3 -m pip install -r /tmp/more.txt\n    rm -rf /opt/ftlib/build")
    assert any("'-r /tmp/more.txt'" in p for p in check_def(hidden)[0])
    assert "section %test is missing" in check_def(good.replace("%test", "%tst"))[0]
    assert any("does not copy containers/self-test.py" in p
               for p in check_def(good.replace("    containers/self-test.py /opt", "    #"))[0])
    assert any("repeats a pin" in p for p in check_def(good.replace("%labels\n", "%labels\n    ftlib.pin.peft 0.21.2\n"))[0])
    docker = (CONTAINERS / "Dockerfile").read_text()
    assert check_dockerfile(docker)[0] == []
    assert any("installs 'torch'" in p for p in check_dockerfile(docker + "\nRUN pip install torch\n")[0])
    assert any("does not run containers/install-stack.sh" in p for p in check_dockerfile(
        docker.replace("install-stack.sh /opt/venv", "true /opt/venv").replace(
            "containers/requirements.txt containers/install-stack.sh", "containers/requirements.txt"))[0])
    pins_problems = read_requirements("peft>=0.21\ntorch==2.13.0\ntorch==2.13.1\n")[2]
    assert any("'peft>=0.21' is not NAME==VERSION" in p for p in pins_problems)
    assert any("torch is pinned twice" in p for p in pins_problems)


def test_scripts_are_valid_bash():
    for script in ("build.sh", "make-test-image.sh", "install-apptainer.sh", "install-stack.sh",
                   "build-llama-cpp.sh"):
        path = CONTAINERS / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_build_sh_without_apptainer_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if any(Path(d, "apptainer").exists() for d in env["PATH"].split(":")):
        pytest.skip("apptainer is installed here")
    result = subprocess.run([str(CONTAINERS / "build.sh"), str(tmp_path / "x.sif")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 127
    assert "apptainer is not on PATH" in result.stderr and "install-apptainer.sh" in result.stderr
    assert not (tmp_path / "x.sif").exists()


def test_self_test_source_digest_covers_the_source_and_nothing_else(tmp_path):
    """The digest that keys the image and that its marker records (containers/self-test.py)."""
    script = str(CONTAINERS / "self-test.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                                       check=True).stdout.strip()
    files = run("--source-files", str(REPO)).splitlines()
    assert "ftlib/__init__.py" in files and "containers/requirements.txt" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".egg-info" in f]
    copy = tmp_path / "src"
    for rel in files:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((REPO / rel).read_bytes())
    digest = run("--source-sha256", str(copy))
    assert digest == run("--source-sha256", str(REPO))
    (copy / "ftlib" / "__pycache__").mkdir(exist_ok=True)
    (copy / "ftlib" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (copy / "README.md").write_text("not part of the image")
    assert run("--source-sha256", str(copy)) == digest
    (copy / "ftlib" / "__init__.py").write_text((copy / "ftlib" / "__init__.py").read_text() + "\n# changed\n")
    assert run("--source-sha256", str(copy)) != digest


# ---------------------------------------------------------------------------------------------
# (c) real runs

def _passed_by_default(name: str) -> bool:
    return any(re.fullmatch(p.replace("*", "[A-Za-z0-9_]*"), name) for p in PASSED_ENV)


def _job_env(tmp_path, **extra) -> dict[str, str]:
    """The environment a Slurm task would have: the host's, plus variables to pass or not."""
    return {**os.environ, "USER": os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name, **extra}


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
    cfg = ContainerSection("charliecloud", str(ch_test_image), _host_binds(ch_test_image), ["FTLIB_TEST_PASSED"])
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
    cfg = ContainerSection("charliecloud", str(ch_test_image), _host_binds(ch_test_image), ["FTLIB_TEST_PASSED"])
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


def test_a_start_records_the_container_it_runs_in(tmp_path, monkeypatch):
    """provenance.running_container, as a job inside an ftlib image sees it (the real one:
    tests/integration/test_apptainer_slurm.py)."""
    from ftlib.provenance import running_container

    for name in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "CH_RUNNING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FTLIB_HOME", str(tmp_path / "opt-ftlib"))
    assert running_container() is None                       # on the host
    (tmp_path / "opt-ftlib").mkdir()
    (tmp_path / "opt-ftlib" / "image.json").write_text(json.dumps(
        {"builder": "containers/build.sh", "inputs_sha256": "aa", "source_sha256": "bb", "built_at": "t",
         "torch": "2.13.0+cpu"}))
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/ftlib.sif")
    submitted = {"runtime": "apptainer", "image": "/images/ftlib.sif", "sha256": "cc", "inputs_sha256": "aa"}
    assert running_container(submitted) == {
        "runtime": "apptainer", "image": "/images/ftlib.sif", "builder": "containers/build.sh",
        "inputs_sha256": "aa", "source_sha256": "bb", "built_at": "t", "matches_submitted": True}
    assert running_container(dict(submitted, inputs_sha256="other"))["matches_submitted"] is False
    assert running_container(dict(submitted, image="/images/old.sif"))["matches_submitted"] is False
    monkeypatch.delenv("APPTAINER_CONTAINER")
    monkeypatch.setenv("CH_RUNNING", "Weird Al Yankovic")
    assert running_container()["runtime"] == "charliecloud"
