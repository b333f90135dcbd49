"""JSONL loading: the three record forms, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftserve.train.formats import DataError, Example, PreferencePair, load_jsonl, write_jsonl


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_alpaca_record_becomes_a_user_turn_with_the_input_appended(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [{"instruction": "Sum", "input": "2 and 3", "output": "5"}])
    [item] = load_jsonl(path)
    assert isinstance(item, Example)
    assert item.prompt == (("user", "Sum\n\n2 and 3"),)
    assert item.completion == "5"


def test_chat_record_keeps_system_and_user_turns(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    [item] = load_jsonl(_write(tmp_path / "c.jsonl", [{"messages": messages, "group": "g1"}]))
    assert item.prompt == (("system", "Be terse."), ("user", "Hi"))
    assert (item.completion, item.group) == ("Hello", "g1")


def test_preference_record_with_string_prompt(tmp_path: Path) -> None:
    [item] = load_jsonl(_write(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}]))
    assert isinstance(item, PreferencePair)
    assert (item.prompt, item.chosen, item.rejected) == ((("user", "Q?"),), "yes", "no")


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"instruction": "x"}), "output"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}), "last"),
        (json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}), "rejected equals chosen"),
        (json.dumps({"text": "free text"}), "alpaca record: instruction"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    good: dict = {"instruction": "a", "output": "b"}
    if "prompt" in bad_line:
        good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    if "messages" in bad_line:
        good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _write(tmp_path / "bad.jsonl", [good, "", bad_line])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{reason}"):
        load_jsonl(path)


def test_missing_and_empty_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        load_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    items = [Example((("user", "u"),), "a", "g"), Example((("system", "s"), ("user", "v")), "b")]
    write_jsonl(tmp_path / "rt.jsonl", items)
    assert load_jsonl(tmp_path / "rt.jsonl") == items
