#!/usr/bin/env python
"""Where packed rows lose per position (issue 11 item 5): one training step of ftlib's own model
(builtin tiny-llama-256, 4-bit, LoRA, gradient checkpointing, one thread) on batches of the
half-padded draw, in variants that differ in one thing each, timed per position fed.

    python benchmarks/profile_packing.py [--model builtin:tiny-llama-256] [--steps 6] [--threads 1]

  padded-N     the guide recipe's batch: N examples padded to 512, attention_mask (N = 2, 4, 8)
  packed-N     ftlib's batch: N rows of bin-packed examples (ftlib.data.pack + Collator),
               position_ids restarting per example and no attention_mask, so transformers builds
               the block-diagonal mask itself (N = 2, 4)
  causal-4     the packed-4 tokens with position_ids 0..n-1 (one causal sequence per row, no
               mask): the block-diagonal mask's own cost, by difference
  mask-4       the packed-4 rows with the block-diagonal mask given as a 4D boolean attention_mask

Times are CPU seconds of this process (one thread: less disturbed by other processes on a shared
machine than wall time) per optimizer step, and per position fed.

Also `--cprofile FILE` profiles the whole ftlib arm of bench_training (Trainer, collator,
callbacks) in this process and prints the top functions by cumulative time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def batches(cfg, tokenizer, max_length: int):
    import torch

    from bench_data import make_rows
    from ftlib.data import IGNORE_INDEX, Collator, pack, to_sample, tokenize_sample

    samples = [tokenize_sample(tokenizer, to_sample(r, cfg.data), cfg.data)
               for r in make_rows(96, seed=0, draw="half-padded")]
    pad = tokenizer.pad_token_id
    out = {}
    for n in (8, 4, 2):
        ids = [s["input_ids"] + [pad] * (max_length - len(s["input_ids"])) for s in samples[:n]]
        mask = [[1] * len(s["input_ids"]) + [0] * (max_length - len(s["input_ids"])) for s in samples[:n]]
        labels = [[t if m else IGNORE_INDEX for t, m in zip(row, mrow)] for row, mrow in zip(ids, mask)]
        out[f"padded-{n}"] = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                              "labels": torch.tensor(labels)}
    rows = pack(samples[:24], max_length)
    out["packed-2"] = Collator(pad)(rows[:2])
    packed = out["packed-4"] = Collator(pad)(rows[:4])
    width = packed["input_ids"].shape[1]
    out["causal-4"] = {"input_ids": packed["input_ids"], "labels": packed["labels"],
                            "position_ids": torch.arange(width).expand_as(packed["input_ids"]).contiguous()}
    pos = packed["position_ids"]
    doc = (pos == 0).cumsum(-1)                                     # which sample each position is in
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    block = (doc[:, :, None] == doc[:, None, :]) & causal           # (b, q, k)
    out["mask-4"] = {"input_ids": packed["input_ids"], "labels": packed["labels"], "position_ids": pos,
                          "attention_mask": block[:, None]}
    return out


def time_steps(model, optimizer, batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-llama-256")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--cprofile", help="profile the ftlib arm of bench_training --short into this file")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.cprofile:
        return profile_arm(args)

    from ftlib.config import load_config
    from ftlib.model import build_training_model, load_tokenizer, resolve_model_path

    cfg = load_config(REPO / "configs/tiny.yaml", [f"model.name={args.model}", f"data.max_length={args.max_length}",
                                                  "tracking.backends=[none]"])
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    model = build_training_model(cfg, path, log=lambda m: None)
    model.train()
    from arms import checkpointing_on
    from gpu_speed import set_checkpointing
    checkpointing = checkpointing_on(cfg.training)
    set_checkpointing(model, checkpointing)      # as the Trainer does (ftlib leaves it to the Trainer)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    variants = batches(cfg, tokenizer, args.max_length)
    print(f"{args.model}, {args.threads} thread(s), gradient checkpointing {checkpointing}, {args.steps} timed "
          f"steps each after 1 warm-up, twice, torch {torch.__version__}")
    print(f"{'variant':10} {'rows x width':>12} {'real':>6} {'cpu s/step':>10} {'us/position':>12} "
          f"{'us/real token':>14}")
    order = ["padded-8", "padded-4", "padded-2", "packed-4", "packed-2", "causal-4", "mask-4"]
    results = {}
    for rnd in range(2):                 # two rounds, alternating: drift of a shared machine evens out
        for name in (order if rnd == 0 else list(reversed(order))):
            batch = variants[name]
            time_steps(model, optimizer, batch, 1)
            results.setdefault(name, []).extend(time_steps(model, optimizer, batch, args.steps))
    for name in order:
        batch = variants[name]
        b, w = batch["input_ids"].shape
        if name.startswith("padded"):
            real = int(batch["attention_mask"].sum())
        else:
            real = int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        step = statistics.median(results[name])
        print(f"{name:10} {f'{b} x {w}':>12} {real:>6} {step:10.3f} {1e6 * step / (b * w):12.1f} "
              f"{1e6 * step / real:14.1f}")
    return 0


def profile_arm(args) -> int:
    """cProfile of bench_training's ftlib arm (--short plan, this process)."""
    import cProfile
    import json
    import pstats
    import shutil
    import subprocess
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ftlib-profile-"))
    try:
        # The plan only (bench_training's parent), then the arm in this process under the profiler.
        subprocess.run([sys.executable, str(HERE / "bench_training.py"), "--model", args.model, "--draw", "half-padded",
                        "--steps", "20", "--batch", "8", "--repeats", "1", "--work-dir", str(work), "--heldout", "4"],
                       capture_output=True)
        from arms import run_ftlib
        plan = json.loads((work / "plan.json").read_text())
        heldout = json.loads(Path(plan["heldout_file"]).read_text())
        plan["ftlib_overrides"] = plan["ftlib_overrides"] + ["training.overwrite_output_dir=true"]
        profiler = cProfile.Profile()
        profiler.enable()
        out = run_ftlib(plan, heldout, repeat=7)
        profiler.disable()
        profiler.dump_stats(args.cprofile)
        print(f"ftlib arm: {out['train_seconds']:.2f} s training, {out['positions']} positions")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
