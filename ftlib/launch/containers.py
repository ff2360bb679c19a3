"""Container launch: from the `container` config section to the command that submitit runs.

submitit starts every Slurm task as `<python> -u -m submitit.core._submit <folder>` (under srun).
ftlib makes `<python>` start the container, so the job function runs inside the image:

    launch = build_launch(cfg.container, run_dir=run.root, storage_root=cfg.storage.root,
                          hf_cache=cfg.storage.hf_cache, gpus=True)
    check_container(cfg.container, launch)             # config errors, before anything is submitted
    executor = submitit.AutoExecutor(folder, slurm_python=launch.python)
    executor.update_parameters(slurm_srun_args=launch.srun_args)   # non-empty for enroot/pyxis only
    provenance["container"] = image_provenance(cfg.container)

Only what ftlib names reaches the job.

Binds: the run directory, the storage root and the HF cache, each at the same path inside as
outside (submitit's pickles and the resolved config name host paths), then `container.binds`
("src" or "src:dst", absolute paths). A bind already covered by a bound parent is dropped.

Environment, by name: ftlib's own (`PASSED_ENV`: SLURM_*, SUBMITIT_*, MASTER_ADDR/PORT, the HF
offline switches, CUDA_VISIBLE_DEVICES, WANDB_API_KEY, HF_TOKEN) and `container.env`. A value
travels only from process environment to process environment; it never appears in a command line
(argv is world-readable in /proc), in the sbatch script, or in any file ftlib writes. Non-secret settings are set by value
(`env_values`: HF_HOME, WANDB_DIR, TORCH_EXTENSIONS_DIR, all paths), and must not name a secret.

What each runtime supports, and what ftlib uses:

- apptainer: `--env NAME` without a value is invalid, and `--cleanenv` drops every host variable
  (SLURM_* included; only TERM and the proxy variables survive). The one by-name channel is
  APPTAINERENV_<NAME> in apptainer's own environment. Slurm sets SLURM_PROCID etc. per task, after
  the sbatch script has run, so `python` is a small per-task `sh -c` wrapper: it unsets
  APPTAINER*/SINGULARITY* variables (APPTAINER_BIND would add binds, APPTAINERENV_* would add
  variables), exports APPTAINERENV_<NAME> for each passed name present, then execs `apptainer exec --cleanenv
  --contain` (empty /tmp and $HOME, minimal /dev; the site's `bind path` entries from
  apptainer.conf still apply). With GPUs: `--nv`, and `--bind /dev/shm`, because --contain gives
  each task a private /dev/shm and NCCL's shared-memory transport between the per-GPU tasks of a
  node needs the host's.
  Apptainer expands `$`, backquotes and backslashes in every APPTAINERENV_/--env value inside the
  container, as in a double-quoted shell string (`$(cmd)` runs!). So the wrapper sets
  APPTAINERENV_<NAME> to the value with those three characters backslash-escaped (sed, only
  for a value that has one; the value is read by an eval of `v="$NAME"`, never parsed as code),
  and the --env values are escaped the same way: the job sees each value byte for byte.
- enroot/pyxis: pyxis passes the task's whole environment, and the image's ENV wins over it
  unless the name is in `--container-env`. `srun --export=NAMES,NAME=VALUE` makes Slurm propagate
  only those (plus SLURM_*, which Slurm always sets), and `--container-env=NAMES` lets them override
  the image's defaults. PATH is exported for srun itself but not forced over the image's PATH.
  `python` is plain `python3`; the flags go to `srun_args`. Home is not mounted.
- charliecloud (ch-run 0.31): the host environment passes through by default;
  `--unset-env='!(NAMES)'` (fnmatch extglob) removes everything else, in order before the
  `--set-env`s. `--private-tmp` hides the host's /tmp, $HOME is not bound unless --home. ch-run
  needs $USER set in its own environment; bind targets must exist in the image or lie on the
  private /tmp (ch-run creates them there). If the image has /ch/environment (ch-image and
  ch-convert write the Dockerfile's ENV there) it is applied with `--set-env`. GPUs need the host
  driver injected into the image once (`ch-fromhost --nvidia IMAGE`); ch-run has no flag for it.
- none: the job runs on the host with this interpreter (submitit's default).

Tested for real on CPU: apptainer (tests/integration/test_apptainer_slurm.py: the image that
containers/build.sh builds, through the local Slurm cluster, with this exact command line) and
ch-run (tests/launch/test_containers.py, tests/integration/test_container_slurm.py). pyxis/enroot
cannot run on the development machines: its flags are pinned by golden files only.

Requeue needs no Slurm inside the image: on USR2 the job leaves a marker and exits, and the batch
script, which runs on the host, requeues it (slurm.requeue_trap; tested with ch-run).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ftlib.storage import sha256_file

if TYPE_CHECKING:   # the `container` config section: runtime, image, binds, env
    from ftlib.config import ContainerSection

RUNTIMES = ("apptainer", "enroot", "charliecloud", "none")

# Passed by name to every containerized job, before `container.env`: Slurm's and submitit's,
# what ftlib's sbatch setup exports (the rendezvous, the offline switches), the GPU binding and the
# two secrets ftlib uses.
PASSED_ENV = ("SLURM_*", "SUBMITIT_*", "MASTER_ADDR", "MASTER_PORT", "HF_HUB_OFFLINE",
              "HF_DATASETS_OFFLINE", "CUDA_VISIBLE_DEVICES", "WANDB_API_KEY", "HF_TOKEN")

# What `srun --export` cannot express as a pattern: Slurm always sets SLURM_* in a task, and the
# submitit variables that matter under srun are these.
_SRUN_EXPANDS = {"SLURM_*": (), "SUBMITIT_*": ("SUBMITIT_EXECUTOR", "SUBMITIT_PREEMPT_SIGNAL")}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Names other tools use for a runtime: a hint, never an alias.
_RUNTIME_HINTS = {"singularity": "apptainer", "pyxis": "enroot", "docker": "enroot",
                  "podman": "enroot", "ch-run": "charliecloud", "": "none", "host": "none"}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ContainerLaunch:
    """How submitit starts one task of a job inside the container.

    python: the executor's python command, `AutoExecutor(folder, slurm_python=python)`.
    srun_args: extra srun flags, `update_parameters(slurm_srun_args=srun_args)` (enroot/pyxis).
    binds: (host, container) pairs; env_names: passed by name; env_values: set by value.
    """

    runtime: str
    python: str
    srun_args: list[str]
    binds: list[tuple[str, str]]
    env_names: list[str]
    env_values: dict[str, str]

    def describe(self) -> str:
        """A stable, human-readable rendering (dry runs, golden tests); holds no secret value."""
        lines = [f"runtime: {self.runtime}", "python:", f"  {self.python}", "python argv:"]
        # a `sh -c` script (apptainer) is shown one statement per line
        lines += ["  " + ";\n    ".join(re.split(r"; (?=for |exec )", arg))
                  for arg in shlex.split(self.python)]
        lines += ["srun_args:"] + [f"  {arg}" for arg in self.srun_args]
        lines += ["binds:"] + [f"  {src} -> {dst}" for src, dst in self.binds]
        lines += ["env by name:"] + [f"  {name}" for name in self.env_names]
        lines += ["env by value:"] + [f"  {k}={v}" for k, v in self.env_values.items()]
        return "\n".join(lines) + "\n"


def check_container(cfg: ContainerSection, launch: ContainerLaunch | None = None) -> None:
    """Raise ValueError (one line: the key, the problem, the fix) if `cfg` cannot be launched.

    What the config cannot check: the image file exists and is of the runtime's kind, the binds
    and names are well-formed. (A runtime without an image is a config error already: config
    validation asks for container.image.) With `launch` (from build_launch), a Charliecloud
    directory image is also checked for the bind targets, which ch-run cannot create in a
    read-only image (except under its private /tmp).
    """
    runtime = cfg.runtime
    if runtime not in RUNTIMES:
        hint = _RUNTIME_HINTS.get(str(runtime).lower()) or next(
            iter(difflib.get_close_matches(str(runtime).lower(), RUNTIMES, n=1, cutoff=0.5)), None)
        did_you_mean = f"; did you mean {hint!r}?" if hint else ""
        raise ValueError(f"container.runtime: unknown runtime {runtime!r}{did_you_mean} "
                         f"Valid runtimes are: {', '.join(RUNTIMES)}.")
    _parse_binds(cfg.binds)
    _check_names(cfg.env)
    if runtime == "none" or not cfg.image:
        return
    image = Path(cfg.image).expanduser()
    if not image.exists():
        raise ValueError(f"container.image: {str(image)!r} does not exist; build it with "
                         f"{_IMAGE_HOWTO[runtime]} or point container.image at {_IMAGE_KIND[runtime]}.")
    if runtime == "enroot" and not image.is_file():
        raise ValueError(f"container.image: {str(image)!r} is not a file; enroot/pyxis needs "
                         f"{_IMAGE_KIND[runtime]} (build it with {_IMAGE_HOWTO[runtime]}).")
    if image.is_file():
        kind = image_file_kind(image)
        if kind not in _FILE_KINDS[runtime]:
            raise ValueError(f"container.image: {str(image)!r} is {kind}, not {_IMAGE_KIND[runtime]} "
                             f"that {runtime} runs; build it with {_IMAGE_HOWTO[runtime]}.")
    if runtime == "charliecloud" and image.is_dir() and launch is not None:
        for _, dst in launch.binds:
            target = image / dst.lstrip("/")
            if not (dst == "/tmp" or dst.startswith("/tmp/") or target.exists()):
                raise ValueError(f"container.image: bind target {dst} does not exist in the image "
                                 f"{str(image)!r} and ch-run cannot create it in a read-only image; "
                                 f"create it with: mkdir -p {shlex.quote(str(target))}")


_IMAGE_KIND = {"apptainer": "a .sif file", "enroot": "a .sqsh file",
               "charliecloud": "an image directory"}
# What each runtime runs from a file (apptainer also runs a sandbox directory, charliecloud a
# directory): by the file's first bytes, see image_file_kind.
_FILE_KINDS = {"apptainer": ("a SIF image", "a SquashFS image"), "enroot": ("a SquashFS image",),
               "charliecloud": ("a SquashFS image",)}


def image_file_kind(path: Path) -> str:
    """'a SIF image', 'a SquashFS image' or 'not an image file' (SIF: "SIF_MAGIC" at byte 32,
    after the launch line; SquashFS: "hsqs" at byte 0)."""
    with open(path, "rb") as handle:
        head = handle.read(48)
    if head[32:41] == b"SIF_MAGIC":
        return "a SIF image"
    if head[:4] == b"hsqs":
        return "a SquashFS image"
    return "not an image file"
_IMAGE_HOWTO = {
    "apptainer": "containers/build.sh IMAGE.sif",
    "enroot": "`enroot import -o IMAGE.sqsh dockerd://ftlib` after `docker build -f containers/Dockerfile -t ftlib .`",
    "charliecloud": "`ch-image build -f containers/Dockerfile -t ftlib . && ch-convert ftlib IMAGE_DIR`",
}


def build_launch(cfg: ContainerSection, *, run_dir: str | os.PathLike,
                 storage_root: str | os.PathLike | None = None,
                 hf_cache: str | os.PathLike | None = None, gpus: bool = False,
                 python: str | None = None,
                 env_values: Mapping[str, str] | None = None) -> ContainerLaunch:
    """Build the launch for `cfg`. Reads no environment value and needs no image on this machine.

    run_dir, storage_root, hf_cache: bound at the same path inside; HF_HOME=hf_cache,
      WANDB_DIR=run_dir (W&B writes run_dir/wandb) and TORCH_EXTENSIONS_DIR=run_dir/torch_extensions
      (per run: a killed DeepSpeed build leaves a lock that would hang the next run sharing it).
    gpus: expose the node's GPUs (apptainer --nv; pyxis and Slurm do it themselves).
    python: the interpreter inside the image (default "python3"; sys.executable for runtime none).
    env_values: more non-secret variables set by value; they override the defaults above.
    Raises ValueError for a config that cannot be expressed (see check_container for the image).
    """
    if cfg.runtime not in RUNTIMES:
        check_container(cfg)  # raises with the nearest valid runtime
    run_dir = os.path.abspath(run_dir)
    values = {"HF_HOME": os.path.abspath(hf_cache)} if hf_cache is not None else {}
    values.update(WANDB_DIR=run_dir, TORCH_EXTENSIONS_DIR=os.path.join(run_dir, "torch_extensions"))
    values.update(env_values or {})
    names = _unique(list(PASSED_ENV) + _check_names(cfg.env))
    _check_values(values, names, cfg.runtime)
    own = [os.path.abspath(p) for p in (storage_root, run_dir, hf_cache) if p is not None]
    for path in own:
        if "," in path or ":" in path:
            raise ValueError(f"storage: the path {path!r} has a ',' or ':', which bind lists "
                             "cannot carry; use a path without them.")
    binds = _drop_covered([(p, p) for p in own] + _parse_binds(cfg.binds))

    if cfg.runtime == "none":
        return ContainerLaunch("none", python or shlex.quote(sys.executable), [], [], [], {})
    python = python or "python3"
    image = str(cfg.image or "")
    if cfg.runtime == "apptainer":
        command = _apptainer(image, binds, names, values, run_dir, gpus, python)
        return ContainerLaunch("apptainer", command, [], binds, names, values)
    if cfg.runtime == "charliecloud":
        command = _charliecloud(image, binds, names, values, run_dir, python)
        return ContainerLaunch("charliecloud", command, [], binds, names, values)
    srun_args = _pyxis(image, binds, names, values, run_dir)
    return ContainerLaunch("enroot", python, srun_args, binds, names, values)


def _apptainer(image, binds, names, values, run_dir, gpus, python) -> str:
    flags = ["--cleanenv", "--contain"]
    if gpus:
        flags += ["--nv", "--bind", "/dev/shm"]
    flags += ["--bind", ",".join(f"{src}:{dst}" for src, dst in binds)] if binds else []
    for name, value in values.items():
        flags += ["--env", f"{name}={_apptainer_escape(value)}"]
    flags += ["--pwd", run_dir]
    exec_line = shlex.join(["exec", "apptainer", "exec", *flags, image, python]) + ' "$@"'
    # awk lists the names (ENVIRON copes with any value); eval sees only `"$NAME"`, never a value;
    # the sed escapes what apptainer would expand (a trailing x keeps trailing newlines).
    script = "; ".join([
        f'for n in $({_awk_names("(APPTAINER|SINGULARITY)[A-Za-z0-9_]*")}); do unset "$n"; done',
        f"for n in $({_awk_names(_names_regex(names))}); do "
        r'eval "v=\"\$$n\""; case $v in *[\\\$\`]*) v=$(printf %sx "$v" | sed "s/[\\\\\$\`]/\\\\&/g"); '
        r'v=${v%x};; esac; export "APPTAINERENV_$n=$v"; done',
        exec_line,
    ])
    return shlex.join(["/bin/sh", "-c", script, "ftlib-apptainer"])


def _apptainer_escape(value: str) -> str:
    """What apptainer expands back into `value` (see the module docstring)."""
    return re.sub(r"([\\$`])", r"\\\1", str(value))


def _awk_names(regex: str) -> str:
    return f'awk "BEGIN {{ for (k in ENVIRON) if (k ~ /^{regex}\\$/) print k }}"'


def _names_regex(names: Iterable[str]) -> str:
    return "(" + "|".join(n.replace("*", "[A-Za-z0-9_]*") for n in names) + ")"


def _charliecloud(image, binds, names, values, run_dir, python) -> str:
    args = ["ch-run", "--private-tmp", f"--unset-env=!({'|'.join(names)})",
            f"--set-env=PATH={DEFAULT_PATH}"]
    if (Path(image) / "ch" / "environment").is_file():
        args.append("--set-env")  # the image's ENV (expanded against the PATH just set)
    args += ["--env-no-expand", "--set-env=HOME=/tmp"]
    args += [f"--set-env={name}={value}" for name, value in values.items()]
    args += [f"--bind={src}:{dst}" for src, dst in binds]
    args += [f"--cd={run_dir}", image, "--", python]
    return shlex.join(args)


def _pyxis(image, binds, names, values, run_dir) -> list[str]:
    passed = [n for name in names for n in _SRUN_EXPANDS.get(name, (name,))]
    container_env = _unique(passed + list(values))
    export = ["PATH"] + passed + [f"{name}={value}" for name, value in values.items()]
    args = [f"--container-image={image}"]
    if binds:
        args.append("--container-mounts=" + ",".join(f"{src}:{dst}" for src, dst in binds))
    args += [f"--container-workdir={run_dir}", "--no-container-mount-home",
             "--container-env=" + ",".join(container_env), "--export=" + ",".join(export)]
    return args


def _parse_binds(binds: Iterable[str]) -> list[tuple[str, str]]:
    pairs = []
    for i, bind in enumerate(binds or []):
        parts = str(bind).split(":")
        if len(parts) > 2 or not all(parts) or "," in bind:
            raise ValueError(f"container.binds[{i}]: {bind!r} is not 'src' or 'src:dst' "
                             "(one colon at most, no commas); write e.g. '/datasets' or '/scratch/me:/data'.")
        src, dst = parts if len(parts) == 2 else (parts[0], parts[0])
        if not (os.path.isabs(src) and os.path.isabs(dst)):
            raise ValueError(f"container.binds[{i}]: {bind!r} has a relative path; "
                             "use absolute paths on both sides.")
        pairs.append((os.path.normpath(src), os.path.normpath(dst)))
    return pairs


def _drop_covered(binds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop duplicates, and same-path binds that a same-path bind of a parent already provides."""
    kept: list[tuple[str, str]] = []
    for src, dst in binds:
        covered = any(s == d and src == dst and (src == s or src.startswith(s.rstrip("/") + "/"))
                      for s, d in binds if (s, d) != (src, dst)) or (src, dst) in kept
        if not covered:
            kept.append((src, dst))
    return kept


def _check_names(names: Iterable[str]) -> list[str]:
    names = list(names or [])
    for i, name in enumerate(names):
        if not _NAME.fullmatch(str(name)):
            raise ValueError(f"container.env[{i}]: {name!r} is not a variable name; container.env "
                             "lists NAMES whose values pass through (never NAME=value).")
    return names


def _check_values(values: Mapping[str, str], names: list[str], runtime: str) -> None:
    for name, value in values.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"env_values: {name!r} is not a variable name.")
        if any(re.fullmatch(p.replace("*", ".*"), name) for p in PASSED_ENV):
            raise ValueError(f"env_values: {name} is passed by name only (it may hold a secret); "
                             "never set it by value.")
        if name in names:
            raise ValueError(f"container.env: {name} is set by ftlib ({name}={value}); "
                             f"remove {name} from container.env.")
        if "\n" in str(value) or (runtime == "enroot" and "," in str(value)):
            raise ValueError(f"env_values: the value of {name} has a newline or (enroot) a comma.")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def image_provenance(cfg: ContainerSection) -> dict[str, Any]:
    """What the run directory records about the image: path, kind and a digest.

    A file (.sif, .sqsh): its sha256 (reads the whole file: ~20-40 s for a 10 GB image), and the
    hash of what it was built from when containers/build.sh left it beside the image
    (IMAGE.inputs-sha256; the job records the same one from inside, see ftlib.provenance).
    A directory image: sha256 of its listing (relative path, type, mode, size, mtime, link
    target of every entry, sorted), not of file contents; a rebuilt or changed image differs.
    """
    record: dict[str, Any] = {"runtime": cfg.runtime}
    if cfg.runtime == "none" or not cfg.image:
        return record
    image = Path(cfg.image).expanduser().absolute()
    record["image"] = str(image)
    if image.is_file():
        record.update(kind="file", size=image.stat().st_size, sha256=sha256_file(image))
        inputs = image.with_name(image.name + ".inputs-sha256")
        if inputs.is_file():
            record["inputs_sha256"] = inputs.read_text().strip()
    elif image.is_dir():
        entries, digest = _listing_digest(image)
        record.update(kind="directory", entries=entries, listing_sha256=digest)
    else:
        record["kind"] = "missing"
    return record


def _listing_digest(root: Path) -> tuple[int, str]:
    digest, count = hashlib.sha256(), 0
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            kind = ("l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode)
                    else "f" if stat.S_ISREG(st.st_mode) else "o")
            size = st.st_size if kind == "f" else 0
            target = os.readlink(path) if kind == "l" else ""
            rel = os.path.relpath(path, root)
            digest.update(f"{kind}\t{stat.S_IMODE(st.st_mode):o}\t{size}\t{int(st.st_mtime)}"
                          f"\t{rel}\t{target}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return count, digest.hexdigest()
