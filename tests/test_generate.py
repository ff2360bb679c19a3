"""jobs/generate.py: one base, two tiny adapters switched per prompt; bad input exits 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CONFIG, subprocess_env
from ftlib.storage import RunDir

MAX_NEW = 12
PROMPTS = [
    {"adapter": "reverse", "messages": [{"role": "user", "content": "Reverse the word.\n\napple"}]},
    {"adapter": "sum", "messages": [{"role": "user", "content": "Reverse the word.\n\napple"}]},
    {"adapter": "sum", "messages": [{"role": "user", "content": "Add the two numbers.\n\n3 and 4"}]},
    {"adapter": "reverse", "messages": [{"role": "user", "content": "Add the two numbers.\n\n3 and 4"}]},
    {"adapter": "sum", "prompt": "The sum is"},
    {"adapter": "reverse", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Spell the word with dashes.\n\nriver"}]},
]


def _train(root: Path, hf_cache: Path, name: str, rows: list[dict], seed: int) -> RunDir:
    from ftlib.config import load_config
    from ftlib.recipe import run_recipe

    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(TINY_CONFIG, [f"storage.root={root / 'runs'}", f"storage.hf_cache={hf_cache}",
                                    f"data.train={data}", f"name={name}", "training.max_steps=10",
                                    "tracking.backends=[none]", "data.validation_split=0",
                                    "training.eval_strategy=no", f"training.seed={seed}",
                                    "export.merged=false"])
    result = run_recipe(cfg, log=lambda _: None)
    assert result.status == "completed"
    return RunDir(result.run_dir)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, hf_cache):
    """Two tiny QLoRA adapters on different data and seeds (10 steps each)."""
    from ftlib.tiny import sample_alpaca_rows

    root = tmp_path_factory.mktemp("adapters")
    rows = sample_alpaca_rows(200)
    reverse = [r for r in rows if r["instruction"].startswith(("Reverse", "Spell"))]
    sums = [r for r in rows if r["instruction"].startswith("Add")]
    return root, _train(root, hf_cache, "reverse", reverse, seed=1), _train(root, hf_cache, "sum", sums, seed=2)


def _alone(adapter_dir: Path, row: dict, base_path: str, raw: bool = False) -> str:
    """The reference: a fresh base with only this adapter, greedy, HF generate directly. A "prompt"
    goes through the chat template as one user turn (the tool's default), or as text with raw."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if "prompt" in row and not raw:
        row = {"messages": [{"role": "user", "content": row["prompt"]}]}
    if "messages" in row:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tokenizer(row["prompt"], return_tensors="pt")
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if new and new[-1] in stops:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_switching_adapters_matches_each_adapter_alone(two_adapters, hf_cache):
    root, reverse, summed = two_adapters
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = root / "out.jsonl"
    # One run dir, one adapter dir: both spellings of --adapter.
    proc = subprocess.run(
        [sys.executable, "jobs/generate.py", "--base", "builtin:tiny-llama",
         "--adapter", f"reverse={reverse.root}", "--adapter", f"sum={summed.adapter}",
         "--prompts", str(prompts), "--max-new-tokens", str(MAX_NEW), "--out", str(out)],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["adapter"]) for r in results] == [(i + 1, p["adapter"]) for i, p in enumerate(PROMPTS)]
    # The side-by-side table: both adapters are columns, the shared prompt appears once.
    header = next(line for line in proc.stdout.splitlines() if line.startswith("row"))
    assert "reverse" in header and "sum" in header
    assert proc.stdout.count("Reverse the word.") == 1

    from ftlib.tiny import ensure_builtin
    base_path = str(ensure_builtin("tiny-llama", hf_cache))
    dirs = {"reverse": reverse.adapter, "sum": summed.adapter}
    for row, result in zip(PROMPTS, results):
        assert result["output"] == _alone(dirs[row["adapter"]], row, base_path), result
    # The switch is real: on the same prompt (rows 1/2 and 3/4) the two adapters answer differently.
    assert results[0]["output"] != results[1]["output"] or results[2]["output"] != results[3]["output"]


def test_sampling_is_reproducible_with_a_seed(two_adapters, hf_cache):
    from ftlib.cli import generate_main

    root, reverse, summed = two_adapters
    prompts = root / "one.jsonl"
    prompts.write_text(json.dumps({"prompt": "The opposite of happy is"}) + "\n")
    outputs = []
    for i in range(2):
        out = root / f"sampled{i}.jsonl"
        assert generate_main(["--adapter", f"reverse={reverse.root}", "--adapter", f"sum={summed.root}",
                              "--prompts", str(prompts), "--temperature", "1.5", "--top-p", "0.95",
                              "--seed", "3", "--max-new-tokens", "8", "--out", str(out), "--quiet"]) == 0
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    # A row without "adapter" goes to every adapter; the same seed gives the same samples.
    assert [r["adapter"] for r in outputs[0]] == ["reverse", "sum"]
    assert outputs[0] == outputs[1]


GOOD = {"adapter": "a", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("lines, row, message", [
    ([GOOD, {"adapter": "summary", "prompt": "x"}], 2, "unknown adapter 'summary'"),
    (['{"adapter": "a", "prompt": "x"', GOOD], 1, "not valid JSON"),
    ([GOOD, "", GOOD, {"adapter": "b"}], 4, "exactly one of 'messages'"),
    ([{"adapter": "a", "messages": [{"role": "robot", "content": "hi"}]}], 1, "role must be"),
    ([{"adapter": "a", "prompt": "x", "temperature": 2}], 1, "unknown key(s) temperature"),
    (["[1, 2]"], 1, "not a JSON object"),
])
def test_bad_prompt_rows_name_the_row_and_exit_2(tmp_path, capsys, lines, row, message):
    from ftlib.cli import generate_main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    assert generate_main(["--adapter", f"a={adapter}", "--adapter", f"b={adapter}",
                          "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {prompts}: row {row}: ") and message in err and "\n" not in err


def test_bad_arguments_exit_2(tmp_path, capsys):
    from ftlib.cli import generate_main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n")
    cases = [
        (["--adapter", f"reverse={tmp_path / 'nope'}", "--prompts", str(prompts)], "no such directory"),
        (["--adapter", f"reverse={tmp_path}", "--prompts", str(prompts)], "neither an adapter directory"),
        (["--adapter", f"reverse={adapter}", "--prompts", str(tmp_path / "missing.jsonl")], "file not found"),
        (["--adapter", f"base={adapter}", "--prompts", str(prompts)], "reserved"),
        (["--adapter", str(adapter), "--prompts", str(prompts)], "expected NAME=PATH"),
        (["--adapter", f"reverse={adapter}", "--prompts", str(prompts), "--seed", "1"], "need --temperature"),
    ]
    for argv, message in cases:
        assert generate_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cli_exit_status_is_2_for_an_unknown_adapter(tmp_path, hf_cache):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"adapter": "sentiment", "prompt": "hi"}) + "\n")
    proc = subprocess.run([sys.executable, "jobs/generate.py", "--adapter", f"summary={adapter}",
                           "--prompts", str(prompts)], cwd=REPO, env=subprocess_env(hf_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"{prompts}: row 1: unknown adapter 'sentiment'" in proc.stderr


def test_prompt_flag_uses_the_chat_template_unless_raw(two_adapters, hf_cache):
    from ftlib.cli import generate_main
    from ftlib.tiny import ensure_builtin

    root, _, summed = two_adapters
    base_path = str(ensure_builtin("tiny-llama", hf_cache))
    text = "Add the two numbers.\n\n3 and 4"
    for raw in (False, True):
        out = root / f"flag-{raw}.jsonl"
        argv = ["--adapter", f"sum={summed.root}", "--prompt", text, "--max-new-tokens", str(MAX_NEW),
                "--out", str(out), "--quiet"] + (["--raw"] if raw else [])
        assert generate_main(argv) == 0
        (result,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert result["rendered"] == ("raw" if raw else "chat template")
        assert result["output"] == _alone(summed.adapter, {"prompt": text}, base_path, raw=raw)


def test_an_empty_generation_is_flagged_in_the_table():
    from ftlib.generate import EMPTY, PromptRow, format_table

    rows = [PromptRow(1, None, prompt="hello")]
    results = [{"row": 1, "adapter": "a", "prompt": "hello", "output": "", "rendered": "raw"},
               {"row": 1, "adapter": "b", "prompt": "hello", "output": "world", "rendered": "raw"}]
    table = format_table(results, rows, width=100)
    assert EMPTY in table and "world" in table
    assert "note: 1 generation(s) empty" in table and "drop --raw" in table


def test_no_prompt_at_all_is_one_line(tmp_path, capsys):
    from ftlib.cli import generate_main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert generate_main(["--adapter", f"a={adapter}"]) == 2
    err = capsys.readouterr().err
    assert "--prompt TEXT" in err and err.count("\n") == 1
