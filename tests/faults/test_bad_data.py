"""Bad data: every kind of bad row is dropped and reported by category with its row numbers, the
counts add up to the rows trained, truncation is counted (only among rows used), and the run
stops when more than data.max_bad_fraction of the rows is bad or nothing is left."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SAMPLE_DATA, TINY_CONFIG
from ftlib import data_rows as kinds
from ftlib.cli import submit_main
from ftlib.config import DataSection
from ftlib.data import DataError, prepare_data
from ftlib.templates import CHATML

LONG = " ".join(["apple river stone cloud green"] * 30)   # far more than max_length=48 tokens


@pytest.fixture(scope="module")
def tokenizer(hf_cache):
    from transformers import AutoTokenizer

    from ftlib.tiny import ensure_builtin
    tok = AutoTokenizer.from_pretrained(ensure_builtin("tiny-llama", hf_cache))
    # ChatML that refuses a message containing FORBIDDEN, as real templates refuse odd rows
    # (roles that do not alternate, a system turn in the middle) with raise_exception.
    tok.chat_template = ("{% for message in messages %}{% if 'FORBIDDEN' in message['content'] %}"
                         "{{ raise_exception('this template refuses FORBIDDEN') }}{% endif %}{% endfor %}" + CHATML)
    return tok


def jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
                     + b"\n")
    return path


def alpaca(word: str) -> dict:
    return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def quiet(_line: str) -> None:
    pass


def test_every_kind_of_bad_alpaca_row_is_reported_by_category_and_row(tokenizer, tmp_path):
    path = jsonl(tmp_path / "alpaca.jsonl", [
        alpaca("apple"),                                                  # 1
        alpaca("river"),                                                  # 2
        b'{"instruction": "truncated json", ',                            # 3
        b'{"instruction": "bad bytes \xff\xfe", "output": "x"}',           # 4
        b"[1, 2, 3]",                                                     # 5
        {"instruction": "No output here"},                                # 6
        {"instruction": "Empty", "output": "   "},                        # 7
        {"instruction": "Say it all.", "output": LONG},                   # 8 overlong answer: truncated, kept
        {"instruction": LONG, "output": "ok"},                            # 9 overlong prompt: no answer left
        alpaca("stone"),                                                  # 10
        b"",                                                              # 11 a blank line is no row
        alpaca("cloud"),                                                  # 12
    ])
    lines: list[str] = []
    data = DataSection(train=str(path), format="alpaca", chat_template="chatml", max_length=48, max_bad_fraction=1.0)
    prepared = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=lines.append)
    by_row = {b.row: b.category for b in prepared.bad_rows}
    assert by_row == {3: kinds.NOT_JSON, 4: kinds.NOT_UTF8, 5: kinds.NOT_OBJECT, 6: kinds.MISSING_FIELD,
                      7: kinds.EMPTY_RESPONSE, 9: kinds.NO_LOSS}
    stats = prepared.stats
    # The counts add up to the rows trained on: 11 rows read = 5 used + 6 dropped.
    assert stats["rows_read"] == 11 and stats["train_samples"] == 5 and sum(stats["dropped"].values()) == 6
    assert stats["rows_read"] == stats["train_samples"] + stats["eval_samples"] + sum(stats["dropped"].values())
    # Row 9 was cut too, but it is dropped, so it is not also "truncated" (issue item 11).
    assert stats["truncated"] == 1 and stats["truncated_rows"] == [8]
    report = next(line for line in lines if line.startswith(f"data: {path}: "))
    assert report == (f"data: {path}: 11 rows: 5 used, 6 dropped (not valid JSON 1 (row 3), not valid UTF-8 1 "
                      "(row 4), not a JSON object 1 (row 5), missing field 1 (row 6), empty response 1 (row 7), "
                      "no response tokens within data.max_length 1 (row 9)); 1 truncated to 48 tokens (row 8)")
    # The cache keeps the account: a run that reuses it reports the same rows.
    again: list[str] = []
    reused = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=again.append)
    assert reused.from_cache and report in again and len(reused.train) == 5
    assert json.loads((prepared.cache_dir / "stats.json").read_text())["dropped"] == stats["dropped"]


def test_bad_chat_rows_are_dropped_per_row_including_the_templates_refusals(tokenizer, tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", [
        chat(("user", "one"), ("assistant", "uno")),                          # 1
        chat(("assistant", "hello, how can I help?"), ("user", "hi")),        # 2 issue item 5: a traceback before
        chat(("user", "x"), ("robot", "beep")),                               # 3
        chat(("user", "x"), ("assistant", "  ")),                             # 4
        chat(("system", "be brief"), ("user", "anyone?")),                    # 5
        chat(("user", "FORBIDDEN word"), ("assistant", "no")),                # 6 the template raises
        {"conversations": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]},  # 7
    ])
    data = DataSection(train=str(path), format="chat", chat_template="tokenizer", max_length=64, max_bad_fraction=1.0)
    prepared = prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=quiet)
    by_row = {b.row: b for b in prepared.bad_rows}
    assert {row: b.category for row, b in by_row.items()} == {
        2: kinds.ASSISTANT_FIRST, 3: kinds.BAD_ROLE, 4: kinds.EMPTY_RESPONSE, 5: kinds.NO_ASSISTANT,
        6: kinds.TEMPLATE_ERROR}
    assert "this template refuses FORBIDDEN" in by_row[6].reason
    assert "'robot'" in by_row[3].reason
    assert prepared.stats["train_samples"] == 2


def test_more_bad_rows_than_max_bad_fraction_stop_before_anything_is_cached(tokenizer, tmp_path):
    rows = [alpaca(w) for w in ("apple", "river", "stone", "cloud", "green", "quick", "light")]
    path = jsonl(tmp_path / "d.jsonl", rows[:3] + [b"{oops", {"instruction": "x"}, b"[]"] + rows[3:])   # 3 of 10 bad
    cache = tmp_path / "cache"
    strict = DataSection(train=str(path), format="alpaca", chat_template="chatml")   # default max_bad_fraction 0.1
    with pytest.raises(DataError) as caught:
        prepare_data(strict, tokenizer, seed=1, cache_root=cache, log=quiet)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"{path}: 3 of 10 rows are bad (30%), more than data.max_bad_fraction=0.1: not valid JSON 1 "
                       "(row 4), missing field 1 (row 5), not a JSON object 1 (row 6); fix the rows or raise "
                       "data.max_bad_fraction")
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]   # no cache entry: nothing half-made
    # At the limit it goes on (30% is not more than 0.3) ...
    lenient = DataSection(train=str(path), format="alpaca", chat_template="chatml", max_bad_fraction=0.3)
    assert prepare_data(lenient, tokenizer, seed=1, cache_root=cache, log=quiet).stats["train_samples"] == 7
    # ... and a stricter limit later stops even on the cache, which does not depend on the limit.
    with pytest.raises(DataError, match=r"3 of 10 rows are bad \(30%\), more than data.max_bad_fraction=0.2"):
        prepare_data(DataSection(train=str(path), format="alpaca", chat_template="chatml", max_bad_fraction=0.2),
                     tokenizer, seed=1, cache_root=cache, log=quiet)


def test_a_file_of_only_bad_rows_or_no_rows_stops_with_the_reason(tokenizer, tmp_path):
    bad = jsonl(tmp_path / "bad.jsonl", [b"{", {"instruction": "x"}, {"instruction": "y", "output": ""}])
    data = DataSection(train=str(bad), format="alpaca", chat_template="chatml", max_bad_fraction=1.0)
    with pytest.raises(DataError, match=r"no usable rows: all 3 are bad: .*not valid JSON 1 \(row 1\)"):
        prepare_data(data, tokenizer, seed=1, cache_root=tmp_path / "cache", log=quiet)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no rows: the file is empty"):
        prepare_data(DataSection(train=str(blank), format="alpaca"), tokenizer, seed=1, cache_root=tmp_path / "c2",
                     log=quiet)
    fatal = DataSection(train=str(bad), format="alpaca", chat_template="chatml", bad_rows="fail")
    with pytest.raises(DataError, match=r"row 1: not valid JSON .*3 bad row\(s\) in all.*data.bad_rows=skip"):
        prepare_data(fatal, tokenizer, seed=1, cache_root=tmp_path / "c3", log=quiet)


def test_max_samples_and_the_held_out_split_are_in_the_account(tokenizer, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [alpaca(w) for w in "abcdefghijkl"] + [b"{"])   # 12 good, 1 bad
    data = DataSection(train=str(path), format="alpaca", chat_template="chatml", max_samples=10,
                       validation_split=0.2, max_bad_fraction=0.5)
    lines: list[str] = []
    stats = prepare_data(data, tokenizer, seed=3, cache_root=tmp_path / "cache", log=lines.append).stats
    assert (stats["rows_read"], stats["beyond_max_samples"], stats["train_samples"], stats["eval_samples"]) == \
        (13, 2, 8, 2)
    assert stats["rows_read"] == stats["train_samples"] + stats["eval_samples"] + 1 + stats["beyond_max_samples"]
    assert (f"data: {path}: 13 rows: 10 used (8 train, 2 held out), 1 dropped (not valid JSON 1 (row 13)), "
            "2 beyond data.max_samples; 0 truncated") in lines


def test_dry_run_reports_statistics_despite_a_row_the_template_cannot_render(tmp_path, hf_cache, capsys):
    """Issue item 5: an assistant-first chat row made --dry-run say the tokenizer was 'not loadable'."""
    path = jsonl(tmp_path / "chat.jsonl", [chat(("user", f"say {w}"), ("assistant", w)) for w in "abcdefghijklmn"]
                 + [chat(("assistant", "I speak first"), ("user", "ok"))])
    code = submit_main([str(TINY_CONFIG), "--dry-run", f"data.train={path}", "data.format=chat",
                        f"storage.root={tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "not loadable" not in out
    assert "statistics skipped" not in out
    assert "data: 14 samples, tokens" in out and "statistics of the first 14 of 15 rows" in out


def test_local_run_reports_its_drops_and_stops_above_the_limit(tmp_path, hf_cache, capsys):
    """End to end through the CLI: a few bad rows are reported in train.log and training goes on;
    too many stop the run with one line and exit status 2 before any checkpoint."""
    good = SAMPLE_DATA.read_bytes().rstrip(b"\n").split(b"\n")
    bad = [b"{broken", json.dumps({"instruction": "no output"}).encode(), b"\xff\xfe", json.dumps([1]).encode()]
    few = jsonl(tmp_path / "few.jsonl", good + bad)                            # 4 bad of len(good) + 4
    common = [str(TINY_CONFIG), "--local", f"storage.hf_cache={hf_cache}", "training.max_steps=2",
              "training.eval_strategy=no", "training.save_steps=1000", "data.validation_split=0",
              "export.merged=false", "export.report=false", "tracking.backends=[none]"]
    assert submit_main([*common, f"data.train={few}", f"storage.root={tmp_path / 'ok'}"]) == 0, \
        capsys.readouterr().err[-3000:]
    capsys.readouterr()
    log = (tmp_path / "ok" / "tiny" / "train.log").read_text()
    n = len(good) + len(bad)
    first_bad = len(good) + 1
    assert (f"data: {few}: {n} rows: {len(good)} used, 4 dropped (not valid JSON 1 (row {first_bad}), missing field 1 "
            f"(row {first_bad + 1}), not valid UTF-8 1 (row {first_bad + 2}), not a JSON object 1 "
            f"(row {first_bad + 3}))") in log

    many = jsonl(tmp_path / "many.jsonl", good[:20] + bad * 2)               # 8 of 28 bad: 29%
    code = submit_main([*common, f"data.train={many}", f"storage.root={tmp_path / 'stop'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{many}: 8 of 28 rows are bad (29%), more than data.max_bad_fraction=0.1" in err
    run = tmp_path / "stop" / "tiny"
    assert not list(run.glob("checkpoints/checkpoint-*")) and not (run / "manifest.json").exists()


def test_an_empty_data_file_is_refused_before_any_work(tmp_path, hf_cache, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for mode in (["--dry-run"], ["--local"]):
        code = submit_main([str(TINY_CONFIG), *mode, f"data.train={empty}", f"storage.root={tmp_path / 'runs'}",
                            f"storage.hf_cache={hf_cache}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == f"error: the command line: data.train: {empty} is empty (0 bytes); point " \
                                    "data.train at the data"
    assert not (tmp_path / "runs").exists()
