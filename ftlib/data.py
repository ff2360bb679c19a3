"""Data: read rows, turn them into conversations or text, render, tokenize, mask, pack, cache.

Every format becomes either a conversation (alpaca, chat) rendered with the tokenizer's chat
template, or plain text (completion). Loss falls only on assistant turns unless
`data.train_on_inputs`. The assistant spans are found by rendering prefixes of the conversation
(templates are prefix-consistent, see templates.py), and the whole string is tokenized once with
offsets, so the tokens are exactly those the model sees at inference.

Packing puts samples into rows of at most max_length tokens (best-fit decreasing, pack_plan), with
position_ids restarting at each sample; transformers builds a block-diagonal causal mask from such
position_ids when no attention_mask is passed, so no token attends across a sample boundary.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import data_rows as kinds
from .config import ConfigError, DataSection
# Rows -> samples and their account live in data_rows.py; callers use them through this module.
from .data_rows import BadRow, DataError, RowAccount, RowError, to_sample  # noqa: F401
from .hub_cache import hub_dataset_source
from .locks import file_lock
from .storage import atomic_write_json, read_json, staging_dir

IGNORE_INDEX = -100
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CACHE_VERSION = 4  # bump when the tokenized layout or stats.json changes, so old caches are not reused


@dataclass
class PreparedData:
    train: Any                              # datasets.Dataset of input_ids/labels(/position_ids)
    eval: Any | None
    bad_rows: list[BadRow] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    from_cache: bool = False


# ---------------------------------------------------------------------------- reading rows
def is_local_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in DATA_FILE_TYPES


def check_data_paths(data: DataSection, source) -> None:
    """Fail before any work starts when a named data file does not exist. `source` names where
    the values came from: a string, or RunConfig.where (the file or the command line, per key)."""
    for key in ("train", "eval"):
        spec = getattr(data, key)
        where = source(f"data.{key}") if callable(source) else source
        if spec and is_local_file(spec) and not Path(spec).expanduser().is_file():
            raise ConfigError(f"{where}: data.{key}: file not found: {spec}; check the path "
                              "(relative paths are relative to the directory you run from)")
        if spec and is_local_file(spec) and Path(spec).expanduser().stat().st_size == 0:
            raise ConfigError(f"{where}: data.{key}: {spec} is empty (0 bytes); point data.{key} at the data")


def read_rows(spec: str, data: DataSection,
              hf_cache: Path | None = None) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """(row number, record) pairs and the rows that could not even be parsed. A hub dataset is
    read through `hf_cache` (the run's storage.hf_cache) when given, whatever HF_HOME says: the
    submit-time check looked there, and a --local run must read what it checked."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".jsonl":
        # Read line by line so that one undecodable or malformed line is reported by its number
        # instead of failing the whole file, as a bulk loader does.
        rows, bad = [], []
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    rows.append((number, json.loads(raw.decode("utf-8"))))
                except UnicodeDecodeError as exc:
                    bad.append(BadRow(number, f"not valid UTF-8 text (byte {exc.start})", kinds.NOT_UTF8))
                except json.JSONDecodeError as exc:
                    bad.append(BadRow(number, f"not valid JSON ({exc.msg}, column {exc.colno})", kinds.NOT_JSON))
        return rows, bad
    import datasets
    if is_local_file(spec):
        ds = datasets.load_dataset(DATA_FILE_TYPES[path.suffix.lower()], data_files=str(path), split="train")
    elif path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:  # a hub dataset id; offline nodes read it from the shared cache (jobs/prefetch.py)
        # Offline, datasets looks only at copies it prepared itself; hub_dataset_source points it
        # at the snapshot that jobs/prefetch.py put in the shared HF cache.
        cache = {"cache_dir": str(hf_cache / "datasets")} if hf_cache else {}
        ds = datasets.load_dataset(hub_dataset_source(spec, cache_dir=hf_cache / "hub" if hf_cache else None),
                                   data.subset, split=data.split, **cache)
    return [(i + 1, record) for i, record in enumerate(ds)], []


# ---------------------------------------------------------------------------- rendering, tokens
def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:   # the template's own refusal (jinja2's raise_exception, ...): this row's
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RowError(kinds.TEMPLATE_ERROR, f"the chat template cannot render it: {first}") from None


def render_conversation(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns (with their
    end-of-turn tokens), found by rendering prefixes. A row the template refuses is a RowError."""
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prompt):
            raise ConfigError("data.chat_template: the chat template is not prefix-consistent, so "
                              "assistant turns cannot be located; set data.chat_template to chatml, "
                              "llama3 or mistral")
        spans.append((len(prompt), len(upto)))
    return full, spans


def tokenize_sample(tokenizer, sample: dict, data: DataSection) -> dict[str, list[int]]:
    if "messages" in sample:
        text, spans = render_conversation(tokenizer, sample["messages"])
    else:
        bos = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token else ""
        text = bos + sample["text"] + (tokenizer.eos_token or "")
        spans = [(0, len(text))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if data.train_on_inputs:
        labels = list(ids)
    else:
        labels = [tok if any(start < end_s and end > start_s for start_s, end_s in spans) else IGNORE_INDEX
                  for tok, (start, end) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids[: data.max_length], "labels": labels[: data.max_length],
            "full_length": len(ids)}


def pack_plan(lengths: list[int], max_length: int) -> list[list[int]]:
    """Which samples go into which row: best-fit decreasing bin packing.

    Longest sample first, each into the row with the least room that still holds it (a new row
    when none does); on alpaca-like data this needs ~20% fewer rows than packing in data order,
    so ~20% fewer tokens of padding are computed. Rows list sample indices in data order and come
    in the order of their first sample: deterministic for a given data order (resume stays exact).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []          # (free tokens, row), sorted: bisect finds the best fit
    for i in order:
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - lengths[i] > 0:
            bisect.insort(room, (free - lengths[i], row))
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def pack(samples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Samples (each at most max_length tokens) packed into rows of at most max_length tokens.

    position_ids restart at 0 for each sample (block-diagonal attention, see module docstring),
    and the first label of each sample is ignored: it would be predicted from the previous
    sample's last token.
    """
    rows: list[dict[str, list[int]]] = []
    for members in pack_plan([len(s["input_ids"]) for s in samples], max_length):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            sample = samples[i]
            row["input_ids"] += sample["input_ids"]
            row["labels"] += [IGNORE_INDEX] + sample["labels"][1:]
            row["position_ids"] += list(range(len(sample["input_ids"])))
        rows.append(row)
    return rows


class Collator:
    """Pads a batch to its longest row. Packed rows carry position_ids and no attention_mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "labels": []}
        packed = "position_ids" in rows[0]
        if packed:
            batch["position_ids"] = []
        else:
            batch["attention_mask"] = []
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            if packed:  # padding forms its own "sample", so real tokens never attend to it
                batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------------------- whole pipeline
def _fingerprint_source(spec: str, data: DataSection) -> str:
    path = Path(spec).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"file:{digest.hexdigest()}"
    return f"hub:{spec}:{data.subset}:{data.split}"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                        tokenizer.pad_token, getattr(tokenizer, "add_bos_token", None)])
    return hashlib.sha256((state + extra).encode()).hexdigest()


def cache_key(data: DataSection, tokenizer, seed: int) -> str:
    settings = {k: getattr(data, k) for k in ("format", "chat_template", "system_prompt", "max_length",
                                             "packing", "train_on_inputs", "validation_split", "bad_rows",
                                             "max_samples")}
    parts = [f"v{CACHE_VERSION}", _fingerprint_source(data.train, data),
             _fingerprint_source(data.eval, data) if data.eval else "-", tokenizer_fingerprint(tokenizer),
             json.dumps(settings, sort_keys=True), str(seed)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def tokenized_rows(rows: Iterable[tuple[int, Any]], data: DataSection, tokenizer,
                   bad: list[BadRow] | None = None) -> Iterator[tuple[int, dict, dict]]:
    """(row number, sample, tokens) for each row that makes a sample; a row that does not, in
    to_sample or when rendered, goes with the reason to `bad` (when given). Lazy: a caller may
    stop early."""
    for number, record in rows:
        try:
            sample = to_sample(record, data)
            tokens = tokenize_sample(tokenizer, sample, data)
        except RowError as exc:
            if bad is not None:
                bad.append(BadRow(number, str(exc), exc.category))
            continue
        yield number, sample, tokens


def _samples(spec: str, data: DataSection, tokenizer, hf_cache: Path | None) -> tuple[list[dict], RowAccount]:
    """The usable samples of a file (each with its row number) and the account of its rows."""
    rows, unreadable = read_rows(spec, data, hf_cache)
    account = RowAccount(spec, rows=len(rows) + len(unreadable), bad=list(unreadable))
    out = []
    for number, _, tokens in tokenized_rows(rows, data, tokenizer, account.bad):
        if all(label == IGNORE_INDEX for label in tokens["labels"]):
            account.bad.append(BadRow(number, f"no response tokens left within data.max_length={data.max_length} "
                                              f"(the row has {tokens['full_length']} tokens)", kinds.NO_LOSS))
            continue
        out.append(dict(tokens, row=number))
    account.check(data.bad_rows, data.max_bad_fraction)
    return out, account


def hold_out(samples: list, validation_split: float, seed: int) -> tuple[list, list]:
    """(train, held out): the one train/validation split, used by training and by the report.

    `samples` are the usable rows in file order (after max_samples); a shuffle with the training
    seed picks round(n * validation_split) of them (at least one), kept in file order."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(round(len(samples) * validation_split)))])
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def _to_dataset(samples: Iterable[dict], packed: bool, max_length: int):
    import datasets
    samples = list(samples)
    rows = pack(samples, max_length) if packed else [
        {"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
    return datasets.Dataset.from_list(rows)


def data_cache_root(data: DataSection, storage_root: str) -> Path:
    """Where tokenized data is cached: data.cache_dir, else <storage.root>/.cache/data (shared by runs)."""
    import os
    if data.cache_dir:
        return Path(os.path.expanduser(data.cache_dir))
    return Path(os.path.expanduser(storage_root)).resolve() / ".cache" / "data"


def prepare_data(data: DataSection, tokenizer, *, seed: int, cache_root: Path, log=print,
                 hf_cache: Path | None = None) -> PreparedData:
    """Tokenized train/eval datasets, from the cache when the same data, tokenizer and settings
    were prepared before (by any run sharing the storage root). hf_cache: see read_rows."""
    key = cache_key(data, tokenizer, seed)
    cache = Path(cache_root) / key
    # Ranks of one job and tasks of an array prepare the same data: one builds, the others reuse.
    with file_lock(Path(cache_root) / f".{key}.lock"):
        return _prepare_locked(data, tokenizer, seed, cache, log, hf_cache)


def _prepare_locked(data: DataSection, tokenizer, seed: int, cache: Path, log,
                    hf_cache: Path | None) -> PreparedData:
    import datasets

    if (cache / "stats.json").exists():
        stats = read_json(cache / "stats.json")
        accounts = [RowAccount.from_stats(data.train, stats)]
        if data.eval:
            accounts.append(RowAccount.from_stats(data.eval, stats, prefix="eval_"))
        for account in accounts:   # data.max_bad_fraction is not in the cache key: apply it again
            account.check(data.bad_rows, data.max_bad_fraction)
            log(account.line(data.max_length, stats.get("held_out")))
        log(f"data: reusing tokenized cache {cache}")
        eval_ds = datasets.load_from_disk(str(cache / "eval")) if (cache / "eval").exists() else None
        return PreparedData(datasets.load_from_disk(str(cache / "train")), eval_ds, accounts[0].bad, stats,
                            cache, True)

    train, account = _samples(data.train, data, tokenizer, hf_cache)
    if data.max_samples and len(train) > data.max_samples:
        account.beyond_max_samples = len(train) - data.max_samples
        train = train[: data.max_samples]
    account.count_truncated(train, data.max_length)
    eval_samples: list[dict] = []
    eval_account, held_out = None, None
    if data.eval:
        eval_samples, eval_account = _samples(data.eval, data, tokenizer, hf_cache)
        eval_account.count_truncated(eval_samples, data.max_length)
    elif data.validation_split > 0:
        train, eval_samples = hold_out(train, data.validation_split, seed)
        held_out = len(eval_samples)
    if not train:
        raise DataError(f"{data.train}: no training rows left: {account.used} usable row(s), all held out by "
                        f"data.validation_split={data.validation_split}; add rows or lower it")
    lengths = [len(s["input_ids"]) for s in train]
    stats = {"train_samples": len(train), "eval_samples": len(eval_samples), "held_out": held_out,
             "train_tokens": sum(lengths), "train_loss_tokens": sum(
                 sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in train),
             "lengths": lengths, "packed": data.packing, **account.to_stats()}
    if eval_account is not None:
        stats.update(eval_account.to_stats(prefix="eval_"))
    train_ds = _to_dataset(train, data.packing, data.max_length)
    eval_ds = _to_dataset(eval_samples, data.packing, data.max_length) if eval_samples else None
    stats["train_rows"] = len(train_ds)
    with staging_dir(cache) as tmp:
        train_ds.save_to_disk(str(tmp / "train"))
        if eval_ds is not None:
            eval_ds.save_to_disk(str(tmp / "eval"))
        atomic_write_json(tmp / "stats.json", stats)
    for each in filter(None, [account, eval_account]):
        log(each.line(data.max_length, held_out if each is account else None))
    log(f"data: {len(train)} train / {len(eval_samples)} eval samples, {len(train_ds)} rows"
        f"{' (packed)' if data.packing else ''}; cached at {cache}")
    # Reload from the cache: the datasets are then memory-mapped, like on a cache hit.
    eval_loaded = datasets.load_from_disk(str(cache / "eval")) if eval_ds is not None else None
    return PreparedData(datasets.load_from_disk(str(cache / "train")), eval_loaded, account.bad, stats, cache,
                        False)
