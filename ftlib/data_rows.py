"""Rows: what makes a record a training sample or a bad row (to_sample, by format: alpaca, chat,
completion), the kinds of bad row, and the account of a data file's rows: how many were read,
which were dropped and why (by kind, with row numbers), which were truncated, how many were
used; the one report line that says so, and the stop rule (data.bad_rows, data.max_bad_fraction).

The counts add up: rows read = used + dropped + beyond data.max_samples, and "truncated" counts
only rows that were used (a row dropped as bad is not also counted as truncated). data.py fills
the account while it turns rows into samples; the account is saved in the token cache's
stats.json so that a run reusing the cache reports (and applies the stop rule to) the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import DataSection

SHOWN_ROWS = 8   # row numbers listed per category in the report line


class DataError(ValueError):
    """Bad data that the policy says is fatal; one line naming the file and row."""


# The kinds of bad row, as the report groups them.
NOT_UTF8 = "not valid UTF-8"
NOT_JSON = "not valid JSON"
NOT_OBJECT = "not a JSON object"
MISSING_FIELD = "missing field"
EMPTY_RESPONSE = "empty response"
BAD_ROLE = "bad role or content"
NO_ASSISTANT = "no assistant turn"
ASSISTANT_FIRST = "assistant speaks first"
TEMPLATE_ERROR = "chat template error"
NO_LOSS = "no response tokens within data.max_length"


class RowError(ValueError):
    """A row that cannot become a training sample; `category` groups it in the report."""

    def __init__(self, category: str, detail: str | None = None):
        super().__init__(detail or category)
        self.category = category


@dataclass
class BadRow:
    row: int            # 1-based: the line of a JSONL file, the record of other formats
    reason: str
    category: str = ""  # one of the kinds above


# ---------------------------------------------------------------------------- formats
def _text(record: dict, key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) else None


def to_sample(record: Any, data: DataSection) -> dict[str, Any]:
    """A conversation {'messages': [...]} or {'text': ...}; raises RowError (a ValueError) with
    the reason and its kind (the kinds above)."""
    if not isinstance(record, dict):
        raise RowError(NOT_OBJECT, f"not a JSON object (a {type(record).__name__})")
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    if data.format == "alpaca":
        instruction, output = _text(record, "instruction"), _text(record, "output")
        if not instruction or not instruction.strip():
            raise RowError(MISSING_FIELD, "missing or empty field 'instruction'")
        if output is None:
            raise RowError(MISSING_FIELD, "missing or empty field 'output'")
        if not output.strip():
            raise RowError(EMPTY_RESPONSE, "empty field 'output'")
        extra = record.get("input")
        if extra is None or (isinstance(extra, float) and extra != extra):  # CSV/Parquet empty cell
            extra = ""
        if not isinstance(extra, str):
            raise RowError(BAD_ROLE, "field 'input' is not text")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": system + [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": output}]}
    if data.format == "chat":
        messages = record.get("messages", record.get("conversations"))
        if not isinstance(messages, list) or not messages:
            raise RowError(MISSING_FIELD, "missing or empty field 'messages'")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                role = message.get("role") if isinstance(message, dict) else message
                raise RowError(BAD_ROLE, f"message {i}: role {role!r} is not system, user or assistant")
            if not isinstance(message.get("content"), str):
                raise RowError(BAD_ROLE, f"message {i}: content is not text")
        turns = [m for m in messages if m["role"] != "system"]
        if not any(m["role"] == "assistant" for m in turns):
            raise RowError(NO_ASSISTANT, "no assistant message")
        if turns[0]["role"] == "assistant":
            # Nothing precedes the answer: no prompt to condition on (and templates cannot render one).
            raise RowError(ASSISTANT_FIRST, "the first turn is the assistant's; a conversation starts "
                                                  "with the user")
        empty = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            raise RowError(EMPTY_RESPONSE, f"message {empty[0]}: empty assistant message")
        if system and messages[0]["role"] != "system":
            messages = system + messages
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    text = _text(record, "text")
    if text is None:
        raise RowError(MISSING_FIELD, "missing field 'text'")
    if not text.strip():
        raise RowError(EMPTY_RESPONSE, "empty field 'text'")
    return {"text": text}


# ---------------------------------------------------------------------------- the account
@dataclass
class RowAccount:
    """One data file's rows (data.train, or data.eval)."""

    spec: str
    rows: int = 0                                          # records read (blank lines are not rows)
    bad: list[BadRow] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)     # row numbers of used rows cut to max_length
    beyond_max_samples: int = 0

    @property
    def used(self) -> int:
        return self.rows - len(self.bad) - self.beyond_max_samples

    def count_truncated(self, used: list[dict], max_length: int) -> None:
        """Truncated rows among those used (samples with 'row' and 'full_length'): a row dropped
        as bad, or beyond data.max_samples, is not also counted as truncated."""
        self.truncated = sorted(s["row"] for s in used if s["full_length"] > max_length)

    def by_category(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for bad in sorted(self.bad, key=lambda b: b.row):
            out.setdefault(bad.category or bad.reason, []).append(bad.row)
        return out

    def dropped_summary(self) -> str:
        """'not valid JSON 2 (rows 4, 9), missing field 1 (row 2)', largest category first."""
        groups = sorted(self.by_category().items(), key=lambda item: (-len(item[1]), item[1][0]))
        return ", ".join(f"{kind} {len(rows)} ({_rows(rows)})" for kind, rows in groups)

    def check(self, policy: str, max_bad_fraction: float) -> None:
        """Stop (DataError) when the policy says so; before any sample is cached or trained on."""
        self.bad.sort(key=lambda b: b.row)
        if self.bad and policy == "fail":
            first = self.bad[0]
            raise DataError(f"{self.spec}: row {first.row}: {first.reason} ({len(self.bad)} bad row(s) in all: "
                            f"{self.dropped_summary()}; fix them or set data.bad_rows=skip)")
        if self.rows == 0:
            raise DataError(f"{self.spec}: no rows: the file is empty; point the config at the data")
        if len(self.bad) == self.rows:
            raise DataError(f"{self.spec}: no usable rows: all {self.rows} are bad: {self.dropped_summary()}")
        share = len(self.bad) / self.rows
        if share > max_bad_fraction:
            raise DataError(f"{self.spec}: {len(self.bad)} of {self.rows} rows are bad ({share:.0%}), more than "
                            f"data.max_bad_fraction={max_bad_fraction:g}: {self.dropped_summary()}; fix the rows "
                            "or raise data.max_bad_fraction")

    def line(self, max_length: int, held_out: int | None = None) -> str:
        """The report: 'data: F: 130 rows: 120 used (108 train, 12 held out), 10 dropped (...); ...'."""
        used = f"{self.used} used"
        if held_out is not None:
            used += f" ({self.used - held_out} train, {held_out} held out)"
        parts = [f"data: {self.spec}: {self.rows} rows: {used}"]
        if self.bad:
            parts.append(f"{len(self.bad)} dropped ({self.dropped_summary()})")
        else:
            parts.append("0 dropped")
        if self.beyond_max_samples:
            parts.append(f"{self.beyond_max_samples} beyond data.max_samples")
        text = ", ".join(parts)
        if self.truncated:
            text += f"; {len(self.truncated)} truncated to {max_length} tokens ({_rows(self.truncated)})"
        else:
            text += "; 0 truncated"
        return text

    def to_stats(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}rows_read": self.rows, f"{prefix}bad_rows": [vars(b) for b in self.bad],
                f"{prefix}dropped": {k: len(v) for k, v in self.by_category().items()},
                f"{prefix}truncated": len(self.truncated), f"{prefix}truncated_rows": list(self.truncated),
                f"{prefix}beyond_max_samples": self.beyond_max_samples}

    @classmethod
    def from_stats(cls, spec: str, stats: dict[str, Any], prefix: str = "") -> "RowAccount":
        return cls(spec, rows=stats.get(f"{prefix}rows_read", 0),
                   bad=[BadRow(**b) for b in stats.get(f"{prefix}bad_rows", [])],
                   truncated=list(stats.get(f"{prefix}truncated_rows", [])),
                   beyond_max_samples=stats.get(f"{prefix}beyond_max_samples", 0))


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOWN_ROWS])
    more = f" and {len(numbers) - SHOWN_ROWS} more" if len(numbers) > SHOWN_ROWS else ""
    return ("row " if len(numbers) == 1 else "rows ") + shown + more
