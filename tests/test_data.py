"""Data: formats, loss masking, packing without cross-sample attention, cache, bad rows."""
from __future__ import annotations

import json

import pytest
import torch

from ftlib.config import DataSection
from ftlib.data import IGNORE_INDEX, Collator, DataError, pack, pack_plan, prepare_data, tokenize_sample, to_sample
from ftlib.templates import CHATML


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ftlib.tiny import BUILTIN_MODELS, build_model
    return build_model(tmp_path_factory.mktemp("tiny"), **BUILTIN_MODELS["tiny-llama"])


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = CHATML
    return tok


def decode_trained(tokenizer, tokens):
    return tokenizer.decode([t for t, label in zip(tokens["input_ids"], tokens["labels"]) if label != IGNORE_INDEX])


def test_alpaca_loss_only_on_the_response(tokenizer):
    data = DataSection(train="x.jsonl", format="alpaca", max_length=256)
    sample = to_sample({"instruction": "Reverse the word.", "input": "apple", "output": "elppa"}, data)
    assert sample["messages"][0] == {"role": "user", "content": "Reverse the word.\n\napple"}
    tokens = tokenize_sample(tokenizer, sample, data)
    assert decode_trained(tokenizer, tokens) == "elppa<|im_end|>\n"
    prompt_len = len(tokenizer(tokenizer.apply_chat_template(sample["messages"][:1], tokenize=False,
                                                             add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in tokens["labels"][:prompt_len])
    no_input = to_sample({"instruction": "What is the opposite of cold?", "output": "hot"}, data)
    assert no_input["messages"][0]["content"] == "What is the opposite of cold?"


def test_train_on_inputs_trains_every_token(tokenizer):
    data = DataSection(train="x.jsonl", format="alpaca", train_on_inputs=True)
    tokens = tokenize_sample(tokenizer, to_sample({"instruction": "Hi", "output": "there"}, data), data)
    assert tokens["labels"] == tokens["input_ids"]


def test_chat_masks_every_assistant_turn_and_nothing_else(tokenizer):
    data = DataSection(train="x.jsonl", format="chat", system_prompt="Be brief.")
    sample = to_sample({"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
                                     {"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]},
                       data)
    assert sample["messages"][0] == {"role": "system", "content": "Be brief."}
    tokens = tokenize_sample(tokenizer, sample, data)
    assert decode_trained(tokenizer, tokens) == "uno<|im_end|>\ndos<|im_end|>\n"


def test_completion_trains_text_and_eos(tokenizer):
    data = DataSection(train="x.jsonl", format="completion")
    tokens = tokenize_sample(tokenizer, to_sample({"text": "the quick dog"}, data), data)
    assert decode_trained(tokenizer, tokens) == "the quick dog</s>"


def test_truncation_to_max_length(tokenizer):
    data = DataSection(train="x.jsonl", format="completion", max_length=5)
    tokens = tokenize_sample(tokenizer, {"text": "apple river stone cloud green quick light dark"}, data)
    assert len(tokens["input_ids"]) == 5 and tokens["full_length"] > 5


def test_packing_has_no_attention_across_samples(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    data = DataSection(train="x.jsonl", format="alpaca", max_length=512)
    samples = [tokenize_sample(tokenizer, to_sample(row, data), data) for row in (
        {"instruction": "Reverse the word.", "input": "apple", "output": "elppa"},
        {"instruction": "Add the two numbers.", "input": "3 and 4", "output": "The sum is 7."},
        {"instruction": "Spell the word with dashes.", "input": "cat", "output": "c-a-t"})]
    rows = pack(samples, max_length=512)
    assert len(rows) == 1
    row = rows[0]
    batch = Collator(tokenizer.pad_token_id)([row])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        offset = 0
        for sample in samples:
            n = len(sample["input_ids"])
            alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[offset:offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n
    # The first token of each packed sample is never a target predicted from the previous sample.
    starts = [0, len(samples[0]["input_ids"]), len(samples[0]["input_ids"]) + len(samples[1]["input_ids"])]
    assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    # And a packed row without position_ids WOULD leak: the check above is not vacuous.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits[0]
    n0 = len(samples[0]["input_ids"])
    assert not torch.allclose(leaky[n0:n0 + 3], packed[n0:n0 + 3], atol=1e-4)


def test_packing_respects_max_length(tokenizer):
    samples = [{"input_ids": [k] * n, "labels": [k] * n} for k, n in enumerate((5, 6, 7, 3, 9))]
    rows = pack(samples, max_length=12)
    # Best fit, longest first: 9 | 7 | 6, then 5 joins 7 (room 5), 3 joins 9 (room 3).
    # Rows hold their samples in data order and come in the order of their first sample.
    assert [sorted(set(r["input_ids"]), key=r["input_ids"].index) for r in rows] == [[0, 2], [1], [3, 4]]
    assert [len(r["input_ids"]) for r in rows] == [12, 6, 12]
    assert rows[0]["position_ids"] == list(range(5)) + list(range(7))
    assert rows[0]["labels"] == [IGNORE_INDEX] + [0] * 4 + [IGNORE_INDEX] + [2] * 6


def test_packing_fills_rows_better_than_data_order():
    # In data order: [7] [6 5] [6] = 3 rows; best fit decreasing: [7 5] [6 6] = 2 rows.
    assert pack_plan([7, 6, 5, 6], 12) == [[0, 2], [1, 3]]
    lengths = [(i * 7919) % 500 + 1 for i in range(2000)]
    plan = pack_plan(lengths, 512)
    assert sorted(i for row in plan for i in row) == list(range(2000))       # each sample once
    assert all(sum(lengths[i] for i in row) <= 512 for row in plan)
    assert len(plan) < 1.02 * sum(lengths) / 512                             # rows ~full


def _write_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_reported_by_number_and_skipped(tokenizer, tmp_path):
    good = json.dumps({"instruction": "Reverse the word.", "input": "dog", "output": "god"}).encode()
    path = _write_jsonl(tmp_path / "d.jsonl", [
        good,
        json.dumps({"instruction": "No output here"}).encode(),                     # row 2
        json.dumps({"instruction": "Empty", "output": "   "}).encode(),              # row 3
        b'{"instruction": "bad bytes \xff\xfe", "output": "x"}',                      # row 4
        b'{"instruction": "truncated json", ',                                        # row 5
        good,
    ])
    logs: list[str] = []
    # 4 of 6 rows are bad: above the default data.max_bad_fraction (0.1), so it is raised here.
    data = DataSection(train=str(path), format="alpaca", bad_rows="skip", max_bad_fraction=0.9)
    prepared = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=logs.append)
    assert [b.row for b in prepared.bad_rows] == [2, 3, 4, 5]
    assert "UTF-8" in prepared.bad_rows[2].reason and "JSON" in prepared.bad_rows[3].reason
    assert "'output'" in prepared.bad_rows[0].reason
    assert prepared.stats["train_samples"] == 2
    assert any("6 rows: 2 used, 4 dropped (" in line and "missing field 1 (row 2)" in line for line in logs)

    fatal = DataSection(train=str(path), format="alpaca", bad_rows="fail")
    with pytest.raises(DataError, match=r"row 2: missing or empty field 'output'.*4 bad row"):
        prepare_data(fatal, tokenizer, seed=1, cache_root=tmp_path / "cache2", log=logs.append)


def test_bad_rows_fatal_policy_exits_2_from_the_cli(tmp_path, capsys, hf_cache):
    from conftest import TINY_CONFIG
    from ftlib.cli import submit_main
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps({"instruction": "x", "output": "y"}).encode(),
                                               json.dumps({"instruction": "x"}).encode()])
    code = submit_main([str(TINY_CONFIG), "--local", f"data.train={path}", "data.bad_rows=fail",
                        f"storage.root={tmp_path}/runs", f"storage.hf_cache={hf_cache}"])
    err = capsys.readouterr().err
    assert code == 2 and "row 2" in err and "data.bad_rows=skip" in err
    assert not list((tmp_path / "runs").glob("*/manifest.json"))


def test_tokenized_cache_is_reused_and_keyed_by_settings(tokenizer, tmp_path):
    from ftlib.tiny import write_sample_dataset
    path = write_sample_dataset(tmp_path / "d.jsonl", n=20)
    data = DataSection(train=str(path), format="alpaca", packing=True, max_length=64)
    first = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=lambda _: None)
    second = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=lambda _: None)
    assert not first.from_cache and second.from_cache
    assert first.train["input_ids"] == second.train["input_ids"]
    other = DataSection(train=str(path), format="alpaca", packing=False, max_length=64)
    third = prepare_data(other, tokenizer, seed=1, cache_root=tmp_path / "cache", log=lambda _: None)
    assert not third.from_cache and len(third.train) == 20 and len(first.train) < 20


def test_other_file_formats_load_through_datasets(tokenizer, tmp_path):
    import pandas as pd
    rows = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ("cat", "dog", "owl")]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.csv", "d.json"):
        data = DataSection(train=str(tmp_path / name), format="alpaca")
        prepared = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / f"c-{name}", log=lambda _: None)
        assert prepared.stats["train_samples"] == 3, name
        assert decode_trained(tokenizer, prepared.train[0]).startswith("tac")
