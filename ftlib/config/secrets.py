"""Tokens (WANDB_API_KEY, HF_TOKEN) in the environment, or in a private file named by
WANDB_API_KEY_FILE / HF_TOKEN_FILE and read when the run starts.

A token's value never enters a config, a command line, a batch script or a pickle: the config
refuses keys that would hold one (schema.REFUSED), the batch script names only the file and
reads it on the compute node (`shell_lines`), and --local reads it into this process's
environment (`export_from_files`). A token file must be a regular file of this user that
nobody else can read or write (0600 or 0400): the check runs at submission and again in the job.
"""
from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from ..locks import privacy_problem
from .schema import ConfigError

# NAME_FILE -> NAME: the variable that names a file, and the variable the file's content becomes.
TOKEN_FILES = {"WANDB_API_KEY_FILE": "WANDB_API_KEY", "HF_TOKEN_FILE": "HF_TOKEN"}


def token_files(environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """{NAME_FILE: absolute path} for the token-file variables set in `environ`; each checked."""
    environ = os.environ if environ is None else environ
    found = {}
    for variable in TOKEN_FILES:
        if environ.get(variable):
            found[variable] = check_token_file(variable, environ[variable])
    return found


def check_token_file(variable: str, value: str) -> Path:
    path = Path(os.path.expanduser(value)).absolute()
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{variable}={value}: cannot read the token file ({exc.strerror}); "
                          "check the path") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{variable}={value}: not a regular file; point it at the file holding the token")
    problem = privacy_problem(info, forbidden=0o077, owner_fix="use a file of your own",
                              mode_fix=f"chmod 600 {shlex.quote(str(path))}")
    if problem:
        raise ConfigError(f"{variable}={value}: the token file {problem}")
    return path


def export_from_files(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Read each named token file into its variable (--local: this process is the run).

    Returns the variables set. The file's value wins over a value already in the environment:
    naming a file is the more deliberate choice."""
    environ = os.environ if environ is None else environ
    done = []
    for variable, path in token_files(environ).items():
        environ[TOKEN_FILES[variable]] = path.read_text().strip()
        done.append(TOKEN_FILES[variable])
    return done


def shell_lines(environ: Mapping[str, str] | None = None) -> list[str]:
    """Batch-script lines that read each named token file on the compute node, at run time.

    The script holds the file's path only. The job re-checks the file (it may have changed since
    submission, and compute nodes may map users differently) and stops with exit status 2 and the
    chmod to run, instead of starting with a token others can read."""
    files = token_files(environ)
    if not files:
        return []
    lines = ['ftlib_token() {  # NAME FILE: export NAME from FILE when only this user can read it',
             '  if [ ! -f "$2" ] || [ "$(stat -Lc %u "$2")" != "$(id -u)" ] '
             '|| [ $(( 0$(stat -Lc %a "$2") & 077 )) -ne 0 ]; then',
             '    echo "ftlib: $2 (named by ${1}_FILE) must be a file only you can read; run: chmod 600 $2" >&2',
             '    exit 2',
             '  fi',
             '  export "$1=$(cat "$2")"',
             '}']
    lines += [f"ftlib_token {TOKEN_FILES[variable]} {shlex.quote(str(path))}" for variable, path in files.items()]
    return lines
