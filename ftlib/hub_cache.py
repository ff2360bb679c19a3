"""The shared Hugging Face hub cache on machines that may have no network.

Two questions, each answered in well under a second and without any retry:
- can this process reach the Hub? (`hub_unreachable`: HF_HUB_OFFLINE, else one HEAD request to
  the endpoint with a short timeout, asked once per process). huggingface_hub itself retries a
  dead network for about a minute before failing (issue 13: 67 s and a 92-line traceback);
- is a repository complete in the cache? (`snapshot_problem`: huggingface_hub's own
  `snapshot_download(local_files_only=True)`, which checks the snapshot against the tree listing
  it cached when it downloaded, plus the files a model cannot load without).

The layout is huggingface_hub's: <cache>/models--ORG--NAME/{refs/main, snapshots/<commit>/, blobs/,
trees/<commit>.json}, datasets--ORG--NAME likewise. jobs/prefetch.py writes it (prefetch.py).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 2.0
# Without one of these a snapshot holds no model weights (a tree listing would say which; this is
# for snapshots written without one, e.g. by an older huggingface_hub or by copying files in).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_probe_lock = threading.Lock()
_probed: dict[str, str | None] = {}


@dataclass(frozen=True)
class HubRepo:
    """A repository a run needs from the Hub, and the config key that names it."""

    repo_id: str
    repo_type: str          # "model" or "dataset"
    revision: str | None
    key: str                # model.name, data.train, data.eval

    @property
    def folder(self) -> str:
        """The repository's directory name in the cache (huggingface_hub's repo_folder_name)."""
        return f"{self.repo_type}s--" + self.repo_id.replace("/", "--")


# ---------------------------------------------------------------------------- the network
def _offline_flag() -> bool:
    # Read at call time (huggingface_hub reads it once, at import): recipe.py sets it for
    # storage.offline after the CLI has imported huggingface_hub.
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _probe(endpoint: str, timeout: float) -> str | None:
    """None when the endpoint answers HTTP at all (any status: it is reachable), else why not."""
    import urllib.error
    import urllib.request

    result: list[str | None] = ["no answer"]

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            result[0] = None
        except urllib.error.HTTPError:
            result[0] = None          # a 4xx/5xx is an answer: the network works
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            result[0] = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason

    # The socket timeout does not bound a DNS lookup; the thread's join does.
    thread = threading.Thread(target=ask, daemon=True, name="ftlib-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    return f"no answer within {timeout:g} s" if thread.is_alive() else result[0]


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why this process cannot reach the Hub (a short reason), or None when it can.

    HF_HUB_OFFLINE=1 answers at once; otherwise one HEAD request to HF_ENDPOINT, remembered for
    the rest of the process, so a dead network costs at most ~2 s once instead of a minute of
    retries in every library call."""
    if _offline_flag():
        return "HF_HUB_OFFLINE=1 is set"
    endpoint = hub_endpoint()
    with _probe_lock:
        if endpoint not in _probed:
            reason = _probe(endpoint, timeout)
            _probed[endpoint] = f"{endpoint} unreachable ({reason})" if reason else None
        return _probed[endpoint]


def forget_probe() -> None:
    """Ask the network again on the next call (tests; a long-lived process whose network changed)."""
    with _probe_lock:
        _probed.clear()


# ---------------------------------------------------------------------------- the cache
def env_hub_cache() -> Path:
    """The hub cache huggingface_hub uses in this environment (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


class CacheMiss(LookupError):
    """A repository that is absent or incomplete in the cache; the message says what is missing."""


def cached_snapshot(repo: HubRepo, cache_dir: Path) -> Path:
    """The complete local snapshot of `repo`, read without any network; CacheMiss otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    storage = Path(cache_dir) / repo.folder
    if not storage.is_dir():
        raise CacheMiss(f"not in the HF cache {cache_dir} (no {repo.folder}/)")
    try:
        path = Path(snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                      cache_dir=cache_dir, local_files_only=True))
        missing = _missing_files(repo, path)
    except IncompleteSnapshotError as exc:   # the tree listing says which files are missing
        path = Path(getattr(exc, "snapshot_path", "") or storage / "snapshots" / "?")
        missing = _listed_missing(storage, path) or _missing_files(repo, path) or ["some files"]
    except (LocalEntryNotFoundError, OSError, ValueError):
        revision = repo.revision or "main"
        raise CacheMiss(f"has no snapshot for revision {revision} in the HF cache {cache_dir} "
                        f"({repo.folder}/refs/{revision} or its snapshot is missing)") from None
    if missing:
        raise CacheMiss(f"incomplete in the HF cache {cache_dir} (missing {_sample(missing)} "
                        f"in snapshot {path.name})")
    return path


def _sample(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _listed_missing(storage: Path, snapshot: Path) -> list[str]:
    """Files of the cached tree listing that the snapshot lacks ([] when there is no listing)."""
    try:
        listed = json.loads((storage / "trees" / f"{snapshot.name}.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []   # huggingface_hub also keeps listings in memory: the file may be gone, not the answer
    return sorted(name for name in listed if not (snapshot / name).is_file())


def _missing_files(repo: HubRepo, snapshot: Path) -> list[str]:
    """What a snapshot lacks without a tree listing to say so: files whose blob is gone (a
    snapshot holds symlinks into blobs/) and, for a model, config.json and its weights."""
    if not snapshot.is_dir():
        return []
    missing = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                     if p.is_symlink() and not p.exists())
    if repo.repo_type != "model" or missing:
        return missing
    if not (snapshot / "config.json").is_file():
        return ["config.json"]
    for index in WEIGHT_INDEXES:
        if (snapshot / index).is_file():
            try:
                shards = sorted(set(json.loads((snapshot / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError, TypeError):
                return [f"a readable {index}"]
            return [s for s in shards if not (snapshot / s).is_file()]
    if any((snapshot / name).is_file() for name in WEIGHT_FILES) or any(snapshot.glob("*.safetensors")):
        return []
    return ["the model weights (model.safetensors or pytorch_model.bin)"]


def snapshot_problem(repo: HubRepo, cache_dir: Path) -> str | None:
    """What is wrong with `repo` in the cache, or None when a job can load it from there."""
    try:
        cached_snapshot(repo, cache_dir)
    except CacheMiss as exc:
        return str(exc)
    return None


def hub_dataset_source(spec: str, revision: str | None = None, cache_dir: Path | None = None) -> str:
    """What to hand datasets.load_dataset for the hub dataset `spec`: the id itself when the Hub
    can be reached, else the directory of its cached snapshot (datasets, offline, would only look
    for a copy it prepared itself, never at the hub cache that prefetch fills)."""
    if hub_unreachable() is None:
        return spec
    repo = HubRepo(spec, "dataset", revision, "data")
    try:
        return str(cached_snapshot(repo, Path(cache_dir) if cache_dir else env_hub_cache()))
    except CacheMiss as exc:
        raise ConfigError(f"dataset {spec} {exc}; this node is offline ({hub_unreachable()}): fetch it "
                          "on a machine with internet with `python jobs/prefetch.py CONFIG`") from None
