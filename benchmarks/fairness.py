"""Fairness of the benchmark: which examples both arms train on, and proof that they did.

- choose_sizes / choose_examples: N examples, the baseline's batch B and ftlib's packed rows per
  step b such that both arms consume the same N examples exactly once in exactly S optimizer steps
  (rows counted with ftlib's own packing plan, ftlib.data.pack_plan).
- make_meter: the TrainerCallback both arms run with. A forward pre-hook recognises every example
  in every batch the model receives (packed rows are split where position_ids is 0, padded rows
  by their attention mask), counts positions, padding and loss tokens; it also times the training
  loop, measures peak memory (CPU: VmHWM reset via /proc/self/clear_refs; GPU:
  torch.cuda.max_memory_allocated) and the held-out loss before and after training.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Any

IGNORE_INDEX = -100


def proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def choose_sizes(lengths: list[int], steps: int, batch: int, max_length: int,
                 max_deviation: float | None = None) -> dict[str, int] | None:
    """N (the first N of `lengths`), baseline batch B and ftlib packed rows per step b such that
    both arms consume the N examples exactly once in exactly `steps` optimizer steps.

    Rows are counted with ftlib's own packing plan (ftlib.data.pack_plan). Picks the N nearest
    steps * batch (ties: a multiple of steps, then the smaller); with max_deviation, only an N
    within that fraction of it (None when there is none). Raises when no N at all works.
    """
    from ftlib.data import pack_plan

    cut = [min(n, max_length) for n in lengths]
    target = steps * batch

    def sizes(n: int) -> dict[str, int] | None:
        b_base = math.ceil(n / steps)
        if math.ceil(n / b_base) != steps:   # cheap test first: packing is the costly part
            return None
        packed = len(pack_plan(cut[:n], max_length))
        if packed < steps:
            return None
        b_pack = math.ceil(packed / steps)
        if math.ceil(n / b_base) != steps or math.ceil(packed / b_pack) != steps:
            return None
        return {"examples": n, "baseline_batch": b_base, "packed_rows": packed, "ftlib_batch": b_pack,
                "steps": steps}

    # Nearest first: the first distance with a valid N decides (a full scan packs O(N) times).
    for distance in range(0, max(target, len(lengths)) + 1):
        if max_deviation is not None and distance > max(steps, max_deviation * target):
            return None
        found = [c for n in sorted({target - distance, target + distance}, key=lambda n: (n % steps != 0, n))
                 if steps <= n <= len(lengths) and (c := sizes(n)) is not None]
        if found:
            return found[0]
    raise ValueError(f"no example count up to {len(lengths)} gives both arms exactly {steps} steps; "
                     "generate more data or change --steps/--batch")


def choose_examples(lengths: list[int], steps: int, batch: int, max_length: int,
                    tries: int = 200) -> tuple[list[int], dict[str, int]]:
    """Which pool examples to train on (indices, in file order) and the sizes of choose_sizes.

    Equal steps and equal examples need N/S and R/S (R: packed rows) both just below integers, which
    the prefixes of one order rarely give near the requested batch. So this also tries seeded
    shuffles of the pool (every prefix of one is an i.i.d. draw of the generator) and keeps the draw
    whose N is nearest steps x batch (the unshuffled pool on ties); draws are told apart only by
    their packed-row count, never by content.
    """
    import random
    target = steps * batch
    best = None
    for attempt in range(tries):
        order = list(range(len(lengths)))
        if attempt:
            random.Random(attempt).shuffle(order)
        sizes = choose_sizes([lengths[i] for i in order], steps, batch, max_length, max_deviation=0.5)
        if sizes is not None and (best is None or abs(sizes["examples"] - target) < best[0]):
            best = (abs(sizes["examples"] - target), order[: sizes["examples"]], dict(sizes, shuffle_seed=attempt))
            if best[0] == 0:
                break
    if best is None:
        sizes = choose_sizes(lengths, steps, batch, max_length)
        return list(range(sizes["examples"])), dict(sizes, shuffle_seed=0)
    return best[1], best[2]


def example_key(ids) -> bytes:
    import numpy as np
    return np.asarray(ids, dtype=np.int64).tobytes()


def heldout_loss(model, heldout: list[dict]) -> float:
    """Mean negative log-likelihood per response token over the held-out examples (labels -100 on
    prompts and padding): ftlib's report code (report.held_out_loss), the same for both arms. Runs
    inside the training callbacks, so the model's train/eval mode is put back afterwards."""
    from ftlib.report import held_out_loss

    was_training = model.training
    try:
        # Length-sorted batches pad least; the padding id is masked out and never a target.
        return held_out_loss(model, sorted(heldout, key=lambda x: len(x["input_ids"])), pad_token_id=0)[0]
    finally:
        model.train(was_training)


def make_meter(plan: dict, heldout: list[dict]):
    """A TrainerCallback that times the training loop, measures peak memory, evaluates the model
    before and after, and records every example the model is fed (forward pre-hook)."""
    import torch
    from transformers import TrainerCallback

    expected: dict[bytes, list[int]] = {}     # key -> [multiplicity, response tokens]
    for ids, resp in zip(plan["example_ids"], plan["example_response_tokens"]):
        entry = expected.setdefault(example_key(ids), [0, resp])
        entry[0] += 1
    pad_id = plan["pad_token_id"]

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.consumed: dict[bytes, int] = {}
            self.counts = {"rows": 0, "positions": 0, "real_tokens": 0, "padding_tokens": 0,
                           "unknown_segments": 0, "loss_tokens": 0, "useful_tokens": 0, "forwards": 0}
            self.result: dict[str, Any] = {}
            self.handle = None

        # -- every training forward: which examples, how many tokens, how much padding
        def _hook(self, module, args, kwargs):
            if not module.training:
                return None
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            labels, mask, positions = kwargs.get("labels"), kwargs.get("attention_mask"), kwargs.get("position_ids")
            ids_cpu = ids.detach().cpu()
            c = self.counts
            c["forwards"] += 1
            c["rows"] += ids_cpu.shape[0]
            c["positions"] += ids_cpu.numel()
            if labels is not None:
                c["loss_tokens"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
            pos_cpu = positions.detach().cpu() if positions is not None else None
            mask_cpu = mask.detach().cpu().bool() if mask is not None else None
            for r in range(ids_cpu.shape[0]):
                row = ids_cpu[r]
                if pos_cpu is not None:       # packed: a sample starts where position_ids is 0
                    starts = (pos_cpu[r] == 0).nonzero().flatten().tolist() + [row.shape[0]]
                    segments = [row[a:b] for a, b in zip(starts[:-1], starts[1:])]
                elif mask_cpu is not None:
                    segments = [row[mask_cpu[r]]]
                else:
                    segments = [row]
                real = 0
                for seg in segments:
                    key = example_key(seg.numpy())
                    if key in expected:
                        self.consumed[key] = self.consumed.get(key, 0) + 1
                        c["useful_tokens"] += expected[key][1]
                        real += seg.shape[0]
                    elif bool((seg == pad_id).all()):
                        pass                  # the collator's padding, its own "sample" when packed
                    else:
                        c["unknown_segments"] += 1
                        real += seg.shape[0]
                c["real_tokens"] += real
                c["padding_tokens"] += row.shape[0] - real
            return None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.train_begin_at = time.perf_counter()
            self.result["heldout_loss_before"] = heldout_loss(model, heldout)
            self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.result["gpu_memory_start"] = torch.cuda.memory_allocated()
            self.result["peak_rss_reset"] = reset_peak_rss()
            # The start is the mark the reset just set (the RSS at that moment), not a second VmRSS
            # read: the kernel's RSS counters are per-CPU estimates, and a later read can exceed the
            # final VmHWM by a few pages (a negative growth, seen in CI).
            self.result["rss_start"] = proc_status("VmHWM") if self.result["peak_rss_reset"] else proc_status("VmRSS")
            self.step_ends: list[float] = []
            self.cpu0 = time.process_time()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.result["gpu_memory_peak"] = torch.cuda.max_memory_allocated()
            self.result["train_seconds"] = time.perf_counter() - self.t0
            self.result["train_cpu_seconds"] = time.process_time() - self.cpu0
            edges = [self.t0] + self.step_ends
            self.result["step_seconds"] = [b - a for a, b in zip(edges[:-1], edges[1:])]
            # The peak is at least the start by definition; the max guards the counter estimates.
            self.result["peak_rss"] = max(proc_status("VmHWM"), self.result["rss_start"])
            self.result["global_step"] = state.global_step
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.result["logged_train_losses"] = losses
            if self.handle is not None:
                self.handle.remove()
            self.result["heldout_loss_after"] = heldout_loss(model, heldout)

        def summary(self) -> dict[str, Any]:
            out = dict(self.result, **self.counts)
            out["examples_consumed"] = sum(self.consumed.values())
            out["distinct_consumed"] = len(self.consumed)
            out["exactly_once"] = (self.consumed == {k: v[0] for k, v in expected.items()})
            out["response_tokens_consumed"] = sum(expected[k][1] * n for k, n in self.consumed.items())
            return out

    return Meter()
