"""A deterministic alpaca-like data set with a realistic, long-tailed length spread.

Real instruction data (Alpaca, Dolly, OpenHermes ...) mixes one-word answers with essays: most
responses are a few dozen tokens, a few are several hundred, and some prompts carry an `input`
paragraph. Padding every example to max_length wastes most of a batch on such data; packing does
not. This module draws rows of that shape from a seeded generator, with no download:

- short tasks (~40%): reverse a word, add two numbers, name an opposite: 2-12 response tokens;
- lists (~20%): 3-20 numbered items, ~5 tokens each;
- open-ended answers (~40%): sentences from a small grammar, length drawn from a log-normal
  (median ~90 words, sigma 0.8, capped at 900 words), so a few exceed max_length=512 and are
  truncated, as in real data;
- ~25% of rows carry an `input` paragraph (log-normal, median ~30 words).

That is the default draw, "long-tailed" (~75% padding when every example is padded to 512 tokens).
The draw "half-padded" shifts the mix to longer answers (75% open-ended, median ~165 words,
sigma 0.5), so padding every example to 512 wastes about half the positions: the regime where
packing gains least and ftlib's cost per position fed matters most (issue 11).

The vocabulary is mostly the words the builtin tiny tokenizer knows (about one token a word), and
the text follows simple patterns, so a tiny model's loss falls within a few dozen steps.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

ADJECTIVES = ("green quick light dark bright quiet loud warm cold fast slow small large happy early "
              "late open north south").split()
NOUNS = "apple river stone cloud cat dog bird fish tree house road bridge garden window paper music".split()
VERBS = "sees finds follows crosses paints hears opens builds".split()
PLACES = "garden house river road bridge window".split()
SEASONS = ("winter", "summer")
OPPOSITES = {"happy": "sad", "small": "large", "open": "closed", "early": "late", "bright": "dim",
             "quiet": "loud", "warm": "cool", "cold": "hot", "fast": "slow", "left": "right",
             "north": "south", "winter": "summer", "light": "dark", "quick": "slow"}
OPEN_ENDED = ("Write a short story about the {adj} {noun}.",
              "Describe a {season} day near the {place}.",
              "Explain why the {noun} is {adj}.",
              "Write a letter to a friend about the {place}.",
              "Summarize the text.")


def _sentence(rng: random.Random) -> str:
    a, b = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
    n, m = rng.choice(NOUNS), rng.choice(NOUNS)
    form = rng.randrange(4)
    if form == 0:
        return f"The {a} {n} {rng.choice(VERBS)} the {b} {m}."
    if form == 1:
        return f"In {rng.choice(SEASONS)} the {n} is {a} and the {m} is {b}."
    if form == 2:
        return f"A {a} {n} near the {rng.choice(PLACES)} {rng.choice(VERBS)} a {m}."
    return f"The {n} and the {m} are {a}."


def _paragraph(rng: random.Random, words: int) -> str:
    sentences: list[str] = []
    count = 0
    while count < words:
        sentence = _sentence(rng)
        sentences.append(sentence)
        count += len(sentence.split())
    # A blank line every few sentences, like real long answers.
    out = []
    for i, sentence in enumerate(sentences):
        out.append(sentence)
        if i % 5 == 4 and i + 1 < len(sentences):
            out.append("\n\n")
        elif i + 1 < len(sentences):
            out.append(" ")
    return "".join(out)


def _lognormal_words(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma))))))


# The mix of each draw: cumulative shares of reverse / add / opposite / list rows (the rest is
# open-ended), and the open-ended answer length in words (log-normal median, sigma).
DRAWS = {
    "long-tailed": {"cumulative": (0.15, 0.28, 0.40, 0.60), "median_words": 90, "sigma": 0.8},
    "half-padded": {"cumulative": (0.05, 0.09, 0.12, 0.25), "median_words": 165, "sigma": 0.5},
}


def make_row(rng: random.Random, draw: str = "long-tailed") -> dict[str, str]:
    mix = DRAWS[draw]
    c1, c2, c3, c4 = mix["cumulative"]
    u = rng.random()
    word = rng.choice(NOUNS + ADJECTIVES)
    if u < c1:
        row = {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    elif u < c2:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        row = {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"The sum is {a + b}."}
    elif u < c3:
        key = rng.choice(sorted(OPPOSITES))
        row = {"instruction": f"What is the opposite of {key}?", "input": "",
               "output": f"The opposite of {key} is {OPPOSITES[key]}."}
    elif u < c4:
        k = rng.randint(3, 20)
        place = rng.choice(PLACES)
        items = [f"{i + 1}. the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}" for i in range(k)]
        row = {"instruction": f"List {k} things you can see near the {place}.", "input": "",
               "output": "\n".join(items)}
    else:
        template = rng.choice(OPEN_ENDED)
        instruction = template.format(adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS),
                                      season=rng.choice(SEASONS), place=rng.choice(PLACES))
        words = _lognormal_words(rng, mix["median_words"], mix["sigma"], 8, 900)
        extra = ""
        if template == "Summarize the text.":
            extra = _paragraph(rng, _lognormal_words(rng, 120, 0.6, 30, 300))
            words = max(8, words // 3)
        row = {"instruction": instruction, "input": extra, "output": _paragraph(rng, words)}
    if not row["input"] and rng.random() < 0.2:  # context paragraphs, as in ~1/4 of Alpaca rows
        row["input"] = _paragraph(rng, _lognormal_words(rng, 30, 0.6, 6, 150))
    return row


def make_rows(n: int, seed: int = 0, draw: str = "long-tailed") -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_row(rng, draw) for _ in range(n)]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def length_summary(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]
    return {"n": len(ordered), "mean": sum(ordered) / len(ordered), "p10": pct(0.10), "p50": pct(0.50),
            "p90": pct(0.90), "p99": pct(0.99), "max": ordered[-1], "min": ordered[0]}


if __name__ == "__main__":  # python benchmarks/bench_data.py OUT.jsonl [N [DRAW]]
    import sys
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    print(write_jsonl(out, make_rows(n, draw=sys.argv[3] if len(sys.argv) > 3 else "long-tailed")))
