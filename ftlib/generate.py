"""Generate from one base model with several LoRA adapters, switching adapters per prompt.

    python jobs/generate.py --base builtin:tiny-llama \\
        --adapter sentiment=runs/sentiment --adapter summary=runs/summary/artifacts/adapter \\
        --prompts prompts.jsonl --out generations.jsonl

The base is loaded once; the first adapter comes with `PeftModel.from_pretrained`, the others
with `load_adapter`, and `set_adapter` picks the one each prompt names. A prompts file is JSONL,
one object a line:

    {"adapter": "sentiment", "messages": [{"role": "user", "content": "..."}]}
    {"adapter": "summary", "prompt": "raw text, tokenized as it is"}
    {"messages": [...]}                      # no "adapter": every adapter answers it
    {"adapter": "base", "prompt": "..."}     # "base": the base model with adapters disabled

Messages are rendered with the adapter's own tokenizer chat template (add_generation_prompt).
Decoding is greedy unless a temperature is given; it stops at the tokenizer's eos and at the chat
template's end-of-turn token (templates.END_OF_TURN). Every input problem (a missing directory, an
unknown adapter name, a malformed row) is found before the model loads and is reported as one line
naming the file and row (exit status 2).

The generation primitives (`generate_text`, `stop_token_ids`, `render_prompt`) live in
inference.py, shared with the run report; the command line is parsed in cli.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, load_config, validate
from .console import quiet_progress_bars
from .data import DataError
from .inference import GenerationSettings, generate_text, place_on_gpu, render_prompt, stop_token_ids
from .model import load_base_model, resolve_model_path
from .storage import RunDir, atomic_write_text
from .templates import NAMED_TEMPLATES

BASE = "base"   # the reserved adapter name: the base model with every adapter disabled
EMPTY = "(empty)"   # how the table shows a generation with no text


# ---------------------------------------------------------------------------- adapters
@dataclass
class Adapter:
    name: str
    path: Path                          # the adapter directory (adapter_config.json)
    run_config: RunConfig | None = None  # when given as a run directory
    tokenizer: Any = field(default=None, repr=False)
    stop_ids: list[int] = field(default_factory=list)


def adapter_dir(spec: str) -> tuple[Path, RunConfig | None]:
    """A run directory (its artifacts/adapter) or an adapter directory."""
    path = Path(spec).expanduser()
    run = RunDir(path)
    if run.config.is_file() or run.artifacts.is_dir():
        if not (run.adapter / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {spec}: run directory has no adapter at {run.adapter} "
                              "(not finished, or a full fine-tune without adapter)")
        cfg = load_config(run.config) if run.config.is_file() else None
        return run.adapter.resolve(), cfg
    if (path / "adapter_config.json").is_file():
        return path.resolve(), None
    if not path.exists():
        raise ConfigError(f"--adapter {spec}: no such directory")
    raise ConfigError(f"--adapter {spec}: neither an adapter directory (adapter_config.json) nor a run "
                      "directory (artifacts/adapter)")


def parse_adapters(values: list[str]) -> list[Adapter]:
    if not values:
        raise ConfigError("--adapter NAME=PATH is required (a run directory or an adapter directory)")
    adapters: list[Adapter] = []
    for value in values:
        name, sep, spec = value.partition("=")
        name = name.strip()
        if not sep or not name or not spec:
            raise ConfigError(f"--adapter {value}: expected NAME=PATH, e.g. sentiment=runs/sentiment")
        if name == BASE:
            raise ConfigError(f"--adapter {value}: the name '{BASE}' is reserved for the base model")
        if any(a.name == name for a in adapters):
            raise ConfigError(f"--adapter {value}: the name '{name}' is given twice")
        path, cfg = adapter_dir(spec)
        adapters.append(Adapter(name, path, cfg))
    return adapters


def base_config(base: str | None, adapters: list[Adapter], hf_cache: str | None, load_in_4bit: bool
                ) -> RunConfig:
    """A RunConfig for ftlib.model's loaders: the first adapter run's config (its storage, dtype,
    quantization) with model.name set to the base, or a minimal one."""
    cfg = next((a.run_config for a in adapters if a.run_config is not None), None)
    if base is None:
        if cfg is not None:
            base = cfg.model.name
        else:
            adapter_config = json.loads((adapters[0].path / "adapter_config.json").read_text())
            base = adapter_config.get("base_model_name_or_path")
            if not base:
                raise ConfigError(f"--base is required: {adapters[0].path}/adapter_config.json names no base")
    if cfg is None:
        storage: dict[str, Any] = {}
        if hf_cache or os.environ.get("FTLIB_HF_CACHE"):
            storage["hf_cache"] = hf_cache or os.environ["FTLIB_HF_CACHE"]
        cfg = validate({"name": "generate", "model": {"name": base, "method": "lora"},
                        "data": {"train": "-"}, "storage": storage}, source="--base")
    model = dataclasses.replace(cfg.model, name=base)
    storage_section = dataclasses.replace(cfg.storage, hf_cache=hf_cache) if hf_cache else cfg.storage
    quantization = dict(cfg.quantization)
    if load_in_4bit and not quantization.get("load_in_4bit"):
        quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    return dataclasses.replace(cfg, model=model, storage=storage_section, quantization=quantization,
                               source="--base")


def load_adapter_tokenizer(adapter: Adapter, base_path: str):
    """The tokenizer saved with the adapter (the one it was trained with), else the base's."""
    from transformers import AutoTokenizer
    path = adapter.path if (adapter.path / "tokenizer_config.json").is_file() else Path(base_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    configured = adapter.run_config.data.chat_template if adapter.run_config else None
    if configured in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[configured]
    return tokenizer, configured


# ---------------------------------------------------------------------------- prompts
@dataclass
class PromptRow:
    row: int                               # line number in the prompts file
    adapter: str | None                    # None: every adapter
    messages: list[dict] | None = None
    prompt: str | None = None
    id: Any = None                         # the row's own "id", copied to its outputs

    @property
    def shown(self) -> str:
        """What a reader recognizes the prompt by: raw text, or the last user message."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages or [] if m.get("role") == "user"]
        return users[-1] if users else (self.messages or [{}])[-1].get("content", "")


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            return f"message {i}: role must be system, user or assistant"
        if not isinstance(message.get("content"), str):
            return f"message {i}: content is not text"
    return None


def read_prompts(path: str | os.PathLike, adapter_names: list[str]) -> list[PromptRow]:
    """Every row checked before any model loads; the first problem is a DataError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: file not found")
    known = [*adapter_names, BASE]
    rows: list[PromptRow] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue

            def bad(reason: str) -> DataError:
                return DataError(f"{path}: row {number}: {reason}")

            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise bad("not valid UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise bad(f"not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise bad("not a JSON object")
            unknown_keys = sorted(set(record) - {"adapter", "messages", "prompt", "id"})
            if unknown_keys:
                raise bad(f"unknown key(s) {', '.join(unknown_keys)}; a row has adapter and "
                          "messages or prompt")
            adapter = record.get("adapter")
            if adapter is not None and not isinstance(adapter, str):
                raise bad("'adapter' must be a name (text)")
            if adapter is not None and adapter not in known:
                raise bad(f"unknown adapter '{adapter}'; loaded: {', '.join(known)}")
            has_messages, has_prompt = "messages" in record, "prompt" in record
            if has_messages == has_prompt:
                raise bad("needs exactly one of 'messages' (a chat) or 'prompt' (raw text)")
            if has_messages:
                problem = _check_messages(record["messages"])
                if problem:
                    raise bad(problem)
                messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
                rows.append(PromptRow(number, adapter, messages=messages, id=record.get("id")))
            else:
                if not isinstance(record["prompt"], str) or not record["prompt"]:
                    raise bad("'prompt' must be non-empty text")
                rows.append(PromptRow(number, adapter, prompt=record["prompt"], id=record.get("id")))
    if not rows:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    return rows


# ---------------------------------------------------------------------------- the run
def load_switchable(cfg: RunConfig, base_path: str, adapters: list[Adapter], *, quantized: bool):
    """The base loaded once with every adapter attached by name."""
    from peft import PeftModel

    base = load_base_model(cfg, base_path, quantized=quantized)
    base = place_on_gpu(base) if not quantized else base
    first, *rest = adapters
    model = PeftModel.from_pretrained(base, str(first.path), adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(str(adapter.path), adapter_name=adapter.name)
    return model.eval()


def prompt_messages(row: PromptRow, tokenizer, raw: bool) -> list[dict] | None:
    """The chat a row stands for: its messages, or its prompt as one user turn rendered with the
    adapter's chat template (as training rendered its data), unless --raw or there is no template."""
    if row.messages is not None:
        return row.messages
    if raw or not getattr(tokenizer, "chat_template", None):
        return None
    return [{"role": "user", "content": row.prompt}]


def generate_all(model, adapters: list[Adapter], rows: list[PromptRow], settings: GenerationSettings,
                 log=print, raw: bool = False) -> list[dict[str, Any]]:
    import contextlib
    by_name = {a.name: a for a in adapters}
    results = []
    active = None
    for row in rows:
        for name in ([row.adapter] if row.adapter else [a.name for a in adapters]):
            # The base renders with the first adapter's tokenizer (they share the base vocabulary).
            adapter = by_name.get(name, adapters[0])
            if name != BASE and name != active:
                model.set_adapter(name, inference_mode=True)
                active = name
            messages = prompt_messages(row, adapter.tokenizer, raw)
            text, special = render_prompt(adapter.tokenizer, messages=messages, prompt=row.prompt)
            context = model.disable_adapter() if name == BASE else contextlib.nullcontext()
            with context:
                out = generate_text(model, adapter.tokenizer, text, add_special_tokens=special,
                                    settings=settings, stop_ids=adapter.stop_ids)
            result = {"row": row.row, "adapter": name, "prompt": row.prompt if row.prompt is not None else text}
            if row.id is not None:
                result["id"] = row.id
            if row.messages is not None:
                result["messages"] = row.messages
            result["rendered"] = "chat template" if messages is not None else "raw"
            result.update(out)
            results.append(result)
    return results


def format_table(results: list[dict[str, Any]], rows: list[PromptRow], width: int | None = None) -> str:
    """Prompts down, adapters across: each prompt once, with every adapter's output beside it."""
    width = width or shutil.get_terminal_size((160, 24)).columns
    shown = {row.row: row.shown for row in rows}
    columns: list[str] = []
    for r in results:
        if r["adapter"] not in columns:
            columns.append(r["adapter"])
    groups: dict[str, dict[str, Any]] = {}
    for r in results:
        key = json.dumps(r.get("messages") or r["prompt"])
        group = groups.setdefault(key, {"prompt": shown[r["row"]], "rows": [], "outputs": {}})
        group["rows"].append(r["row"])
        group["outputs"][r["adapter"]] = r["output"] if r["output"].strip() else EMPTY
    headers = ["row", "prompt", *columns]
    row_w = max(3, max(len(",".join(map(str, sorted(set(g["rows"]))))) for g in groups.values()))
    cell_w = max(12, (width - row_w - 3 * len(headers)) // (len(headers) - 1))
    widths = [row_w] + [cell_w] * (len(headers) - 1)

    def line(cells: list[list[str]]) -> list[str]:
        height = max(len(c) for c in cells)
        return [" | ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip()
                for i in range(height)]

    def wrap(text: str, w: int) -> list[str]:
        out = []
        for part in (text or "").replace("\r", "").split("\n"):
            out += textwrap.wrap(part, w, replace_whitespace=False, drop_whitespace=True) or [""]
        return out or [""]

    out = line([[h] for h in headers])
    out.append("-+-".join("-" * w for w in widths))
    for group in groups.values():
        cells = [[",".join(map(str, sorted(set(group["rows"]))))], wrap(group["prompt"], cell_w)]
        cells += [wrap(group["outputs"].get(c, "-"), cell_w) for c in columns]
        out += line(cells)
        out.append("")
    empty = [r for r in results if not r["output"].strip()]
    if empty:
        raw = any(r.get("rendered") == "raw" for r in empty)
        out.append(f"note: {len(empty)} generation(s) empty: the model stopped at once"
                   + ("; raw text reaches a chat-trained adapter without its chat template: drop --raw"
                      if raw else "; try --max-new-tokens or sampling (--temperature)"))
    return "\n".join(out).rstrip() + "\n"


def settings_from_args(args) -> GenerationSettings:
    """Decoding settings from the command line's options, refusing combinations that mean nothing."""
    sampling = args.temperature is not None and args.temperature > 0
    if args.greedy and args.temperature is not None:
        raise ConfigError("--greedy and --temperature exclude each other")
    if not sampling and (args.top_p is not None or args.seed is not None):
        raise ConfigError("--top-p and --seed need --temperature T (T > 0); decoding is greedy otherwise")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    return GenerationSettings(max_new_tokens=args.max_new_tokens, greedy=not sampling,
                              temperature=args.temperature if sampling else 1.0,
                              top_p=args.top_p if args.top_p is not None else 1.0,
                              seed=args.seed if args.seed is not None else 0)


def generate(args) -> int:
    """The tool: load the base once, generate every prompt with its adapter(s), print and write."""
    settings = settings_from_args(args)
    adapters = parse_adapters(args.adapter)
    if not args.prompts and not args.prompt:
        raise ConfigError("give prompts: --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    rows = read_prompts(args.prompts, [a.name for a in adapters]) if args.prompts else []
    last = max((r.row for r in rows), default=0)   # command-line prompts are numbered after the file's rows
    rows += [PromptRow(last + i, None, prompt=text) for i, text in enumerate(args.prompt or [], start=1)]
    cfg = base_config(args.base, adapters, args.hf_cache, args.load_in_4bit)
    if cfg.storage.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    for adapter in adapters:
        trained_on = adapter.run_config.model.name if adapter.run_config else None
        if trained_on and trained_on != cfg.model.name:
            print(f"note: adapter {adapter.name} was trained on {trained_on}, generating on {cfg.model.name}",
                  file=sys.stderr)
    base_path = resolve_model_path(cfg)
    for adapter in adapters:
        adapter.tokenizer, configured = load_adapter_tokenizer(adapter, base_path)
        adapter.stop_ids = stop_token_ids(adapter.tokenizer, configured)
    by_name = {a.name: a for a in adapters}
    for row in rows:
        if row.messages is None:
            continue
        for name in [row.adapter] if row.adapter else list(by_name):
            tokenizer = by_name.get(name, adapters[0]).tokenizer
            if not tokenizer.chat_template:
                raise DataError(f"{args.prompts}: row {row.row}: adapter {name}'s tokenizer has no chat "
                                "template to render 'messages'; give the text as 'prompt'")
    quiet_progress_bars()
    model = load_switchable(cfg, base_path, adapters, quantized=args.load_in_4bit)
    results = generate_all(model, adapters, rows, settings, raw=args.raw)
    if args.out:
        atomic_write_text(Path(args.out).expanduser(),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    if not args.quiet:
        print(f"# {cfg.model.name} + {', '.join(a.name for a in adapters)}; {settings.describe()}")
        print(format_table(results, rows), end="")
    if args.out:
        print(f"wrote {len(results)} generations to {args.out}")
    return 0
