"""Prefetch: put a config's hub model and hub datasets into the shared Hugging Face cache
(storage.hf_cache), so that jobs on compute nodes without internet (storage.offline: true) find
them there, and submission can check that they are complete (model.check_model_available).

One code path, two sources. From the Hub (a login node with internet), or with `--from DIR`
from a directory of repository copies (DIR/ORG/NAME for a model, DIR/datasets/ORG/NAME for a
dataset: git clones or downloads carried onto a cluster whose login node is offline too). DIR is
served read-only on 127.0.0.1, for the prefetch only, with the three Hub routes snapshot_download
uses (repo info, tree listing, file resolve), so in both cases huggingface_hub's own download code
writes the cache: blobs, snapshots, refs and the tree listing that makes a missing file detectable.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from .config import ConfigError, RunConfig
from .hub_cache import HubRepo, hub_endpoint, hub_unreachable, snapshot_problem
from .model import hub_cache_dir, hub_repos

SKIPPED_DIRS = {".git", ".cache"}   # a clone's git data; a local_dir download's metadata
LFS_POINTER = b"version https://git-lfs.github.com/spec/"   # a clone made without git-lfs has these


def prefetch(cfg: RunConfig, source: Path | None = None, log=print) -> list[str]:
    """Fetch every hub repository the run needs; returns their ids (local paths need nothing)."""
    repos = hub_repos(cfg)
    if not repos:
        log(f"model {cfg.model.name} and data are local: nothing to fetch")
        return []
    if source is None:
        reason = hub_unreachable()
        if reason:
            raise ConfigError(f"prefetch needs the Hub, which this machine cannot reach ({reason}); "
                              "run it on a login node with internet, or pass --from DIR with copies of "
                              f"{', '.join(r.repo_id for r in repos)}")
    copies = scan_copies(cfg, repos, source) if source else {}
    with serve_repositories(copies) if source else contextlib.nullcontext(None) as endpoint:
        for repo in repos:
            path = download(repo, hub_cache_dir(cfg), endpoint, cfg.where(repo.key), source)
            log(f"{repo.key}: {repo.repo_id} -> {path}")
    for repo in repos:   # read back as the job will: offline, from the cache only
        problem = snapshot_problem(repo, hub_cache_dir(cfg))
        if problem:
            raise ConfigError(f"{cfg.where(repo.key)}: {repo.key}: {repo.repo_id} {problem} after prefetch")
    return [r.repo_id for r in repos]


def download(repo: HubRepo, cache_dir: Path, endpoint: str | None, config: str, source: Path | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"--from {source}" if source else (endpoint or hub_endpoint())
    offline_flag = constants.HF_HUB_OFFLINE
    try:
        if endpoint:
            # huggingface_hub blocks every request under HF_HUB_OFFLINE=1 (often exported on
            # clusters); a --from copy is served on the loopback interface, not the network.
            constants.HF_HUB_OFFLINE = False
        # HF_TOKEN, for gated models, is read from the environment by huggingface_hub itself.
        return snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                 cache_dir=cache_dir, endpoint=endpoint)
    except GatedRepoError:
        raise ConfigError(f"{config}: {repo.key}: {repo.repo_id} is gated on the Hub: accept its licence "
                          "on its page and export HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{config}: {repo.key}: {repo.repo_id} not found at {where}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{config}: {repo.key}: revision {repo.revision} of {repo.repo_id} not found "
                          f"at {where}") from None
    finally:
        constants.HF_HUB_OFFLINE = offline_flag


# ---------------------------------------------------------------------------- --from DIR
def repository_dir(source: Path, repo: HubRepo) -> Path:
    return source / ("datasets" if repo.repo_type == "dataset" else "") / repo.repo_id


def git_blob_id(path: Path, size: int, chunk: int = 1 << 20) -> str:
    """The git object id of a file, as the Hub reports it for files not stored in LFS (read in
    chunks: weight shards are gigabytes)."""
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class Repository:
    """A directory served as one Hub repository at one commit: the commit id is a hash of the
    file names and contents, so the same copy is the same snapshot and a changed copy a new one."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, tuple[Path, int, str]] = {}     # repo path -> (file, size, blob id)
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not SKIPPED_DIRS.intersection(rel.parts[:-1]):
                size = path.stat().st_size
                if size < 1024 and path.read_bytes().startswith(LFS_POINTER):
                    raise ConfigError(f"--from: {path} is a git-lfs pointer, not the file; run "
                                      f"`git lfs pull` in {root}")
                self.files[rel.as_posix()] = (path, size, git_blob_id(path, size))
        listing = "".join(f"{name}\0{blob}\n" for name, (_, _, blob) in self.files.items())
        self.commit = hashlib.sha1(listing.encode()).hexdigest()

    def info(self, repo_id: str) -> dict:
        return {"id": repo_id, "sha": self.commit, "private": False,
                "siblings": [{"rfilename": name} for name in self.files]}

    def tree(self) -> list[dict]:
        return [{"type": "file", "path": name, "size": size, "oid": blob}
                for name, (_, size, blob) in self.files.items()]


def _split_route(path: str) -> tuple[str, str, str, str, str] | None:
    """(kind, repo_type, repo_id, revision, rest) of a Hub route, or None.

    /api/models/ORG/NAME/revision/REV, /api/datasets/ORG/NAME/tree/REV[/PATH],
    /ORG/NAME/resolve/REV/FILE, /datasets/ORG/NAME/resolve/REV/FILE (a repo id may lack ORG/)."""
    parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
    if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
        repo_type, parts = parts[1][:-1], parts[2:]
        kinds = ("revision", "tree")
    else:
        repo_type = "model"
        if parts[:1] == ["datasets"]:
            repo_type, parts = "dataset", parts[1:]
        kinds = ("resolve",)
    for i in (1, 2):   # NAME or ORG/NAME, then the route's kind
        if len(parts) > i + 1 and parts[i] in kinds:
            return parts[i], repo_type, "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:])
    return None


def _handler(copies: dict[tuple[str, str], Repository]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:   # no access log on the user's terminal
            pass

        def _error(self, code: int, error_code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            route = _split_route(self.path)
            if route is None:
                return self._error(404, "EntryNotFound", f"no such route: {self.path}")
            kind, repo_type, repo_id, revision, rest = route
            repo = copies.get((repo_type, repo_id))
            if repo is None:
                return self._error(404, "RepoNotFound", f"{repo_id}: not among the copies served")
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", f"{repo_id}: only main ({repo.commit}) is served")
            if kind == "revision":
                return self._json(repo.info(repo_id))
            if kind == "tree":
                return self._json([f for f in repo.tree() if f["path"].startswith(rest)])
            if rest not in repo.files:
                return self._error(404, "EntryNotFound", f"{repo_id}: no file {rest}")
            path, size, blob = repo.files[rest]
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{blob}"')
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if self.command == "GET":
                with open(path, "rb") as handle:
                    shutil.copyfileobj(handle, self.wfile, 1 << 20)
    return Handler


def scan_copies(cfg: RunConfig, repos: list[HubRepo], source: Path) -> dict[tuple[str, str], Repository]:
    """The copies under `source` of the repositories the run needs, read (and hashed) before
    anything is served; a missing copy, a revision other than main or a git-lfs pointer in place
    of a file is refused here, in one line."""
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ConfigError(f"--from {source}: no such directory (it should hold ORG/NAME/ copies of "
                          "the repositories, datasets under datasets/ORG/NAME/)")
    copies = {}
    for repo in repos:
        root = repository_dir(source, repo)
        if not root.is_dir():
            raise ConfigError(f"{cfg.where(repo.key)}: {repo.key}: {repo.repo_id} not found at --from {source} "
                              f"(expected {root}/)")
        if repo.revision not in (None, "main"):
            raise ConfigError(f"{cfg.where(repo.key)}: {repo.key}: --from serves one copy of each repository as its "
                              f"main branch; revision {repo.revision} needs the Hub")
        copies[(repo.repo_type, repo.repo_id)] = Repository(root)
    return copies


@contextlib.contextmanager
def serve_repositories(copies: dict[tuple[str, str], Repository]) -> Iterator[str]:
    """Serve the copies on 127.0.0.1 (a free port) for the block; yields the endpoint URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(copies))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="ftlib-prefetch-source")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
