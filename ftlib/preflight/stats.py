"""Token-length statistics of training data: percentiles, truncation, and the padding each
batching strategy wastes (data_statistics), from a list of sample lengths."""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..data import pack_plan
from .shape import PreflightError


def _nearest_rank(sorted_values: Sequence[int], p: float) -> int:
    """The p-th percentile by nearest rank: the smallest value with at least p% at or below it
    (always an actual sample length)."""
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def _padding_fraction(lengths: Sequence[int], micro_batch: int) -> float:
    """Each batch of micro_batch consecutive samples is padded to its longest member."""
    real = sum(lengths)
    padded = sum(max(lengths[j:j + micro_batch]) * len(lengths[j:j + micro_batch])
                 for j in range(0, len(lengths), micro_batch))
    return 1 - real / padded if padded else 0.0


def data_statistics(lengths: Sequence[int], max_length: int, micro_batch: int) -> dict[str, Any]:
    """Token-length statistics and the padding each batching strategy wastes.

    Lengths longer than max_length are truncated to it before any padding or packing figure.
    Padding fractions are padding tokens / all tokens processed:
      padding_to_max_length: every sample padded to max_length;
      padding_dynamic_unsorted: batches of micro_batch in the given order, each padded to its
        longest sample (DataCollatorWithPadding);
      padding_dynamic_sorted: the same after sorting by length (group_by_length's best case);
      padding_packed: samples packed as ftlib packs them (data.pack_plan, best-fit decreasing)
        into rows of max_length, each row padded to max_length (no sample split across rows)."""
    if not lengths:
        raise PreflightError("data_statistics needs at least one length")
    if max_length < 1 or micro_batch < 1:
        raise PreflightError("max_length and micro_batch must be >= 1")
    raw = [int(n) for n in lengths]
    srt = sorted(raw)
    cut = [min(n, max_length) for n in raw]
    real = sum(cut)
    n = len(raw)
    rows = pack_plan(cut, max_length)
    truncated = [x for x in raw if x > max_length]
    return {
        "n_samples": n,
        "min": srt[0],
        "mean": sum(raw) / n,
        "p50": _nearest_rank(srt, 50),
        "p90": _nearest_rank(srt, 90),
        "p99": _nearest_rank(srt, 99),
        "max": srt[-1],
        "n_truncated": len(truncated),
        "truncated_fraction": len(truncated) / n,
        "tokens_lost_to_truncation": sum(x - max_length for x in truncated),
        "real_tokens": real,
        "padding_to_max_length": 1 - real / (n * max_length),
        "padding_dynamic_unsorted": _padding_fraction(cut, micro_batch),
        "padding_dynamic_sorted": _padding_fraction(sorted(cut), micro_batch),
        "padding_packed": 1 - real / (len(rows) * max_length),
        "packed_rows": len(rows),
        "micro_batches_unpacked": math.ceil(n / micro_batch),
        "micro_batches_packed": math.ceil(len(rows) / micro_batch),
    }
