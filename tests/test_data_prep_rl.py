"""data_prep for OpenAI's reinforcement fine-tuning (RFT) format: every rule with its line and code, detection,
the validate CLI's --method reinforcement, the checked reader train/grpo.py uses, and RFT files made from chat JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.reinforcement import check_reinforcement_example, from_chat, item_of
from data_prep.reinforcement import main as convert_main
from data_prep.validate import checked_examples, detect_method, validate_file
from tunekit.errors import UserError


def rft(i: int = 0, **fields) -> dict:
    return {"messages": [{"role": "developer", "content": "Reply {\"category\": ...}."},
                         {"role": "user", "content": f"question {i}?"}], "category": "card_arrival", **fields}


def sft(i: int = 0) -> dict:
    return {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": "{\"category\": \"card_arrival\"}"}]}


def pair() -> dict:
    return {"input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "yes"}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}]}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def msgs(*messages: dict) -> dict:
    return {"messages": list(messages), "category": "x"}


USER = {"role": "user", "content": "q"}
RULES = {
    "not an object": ("[1, 2]", {"data_type"}),
    "no messages": ({"category": "x"}, {"missing_messages_list"}),
    "empty messages": (msgs(), {"missing_messages_list"}),
    "a DPO line": (pair(), {"format_mismatch"}),
    "ends with the answer": (msgs(USER, {"role": "assistant", "content": "a"}), {"ends_with_assistant"}),
    "ends with a tool result": (msgs(USER, {"role": "tool", "content": "t", "tool_call_id": "1"}),
                                {"last_message_not_user"}),
    "message checks: role": (msgs({"role": "robot", "content": "q"}, USER), {"unrecognized_role"}),
    "message checks: keys": (msgs({"role": "user"}), {"message_missing_key", "missing_content"}),
    "message checks: extra key": (msgs({"role": "user", "content": "q", "x": 1}), {"message_unrecognized_key"}),
    "tools not a list": (rft(tools={"type": "function"}), {"invalid_tools"}),
    "tool without a function": (rft(tools=[{"type": "function"}]), {"invalid_tools"}),
    "tool name": (rft(tools=[{"type": "function", "function": {"name": "has space"}}]), {"invalid_tools"}),
    "tool parameters": (rft(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
                        {"invalid_tools"}),
}


def test_each_rule_is_reported_with_its_line_and_code(tmp_path):
    good = [rft(i) for i in range(10)]
    f = write(tmp_path / "r.jsonl", good + [bad for bad, _ in RULES.values()] + ['{"messages": ['])
    n, problems = validate_file(f, method="reinforcement")
    assert n == 10 + len(RULES)  # the line that is not JSON is no example
    by_line = {}
    for p in problems:
        by_line.setdefault(p.line, set()).add(p.code)
    expected = {11 + i: codes for i, (_, codes) in enumerate(RULES.values())}
    expected[11 + len(RULES)] = {"invalid_json"}
    assert by_line == expected, {k: (by_line.get(k), v) for k, v in expected.items() if by_line.get(k) != v}
    assert all(str(p).startswith(f"{f}:{p.line}: {p.code}: ") for p in problems)
    mismatch = next(p for p in problems if p.code == "format_mismatch")
    assert "DPO (preference) format" in mismatch.message and "--method dpo" in mismatch.message
    answer = next(p for p in problems if p.code == "ends_with_assistant")
    assert "--method supervised" in answer.message


def test_a_good_file_passes_and_what_is_allowed(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_card-status_2", "parameters": {"type": "object"}}}]
    lines = [rft(i) for i in range(8)] + [
        rft(8, tools=tools),
        # multi-turn prompts, system or developer, no item fields at all (a grader may read only the sample)
        {"messages": [{"role": "system", "content": "s"}, USER, {"role": "assistant", "content": "a"}, USER]},
    ]
    n, problems = validate_file(write(tmp_path / "ok.jsonl", lines), method="reinforcement")
    assert (n, problems) == (10, [])
    assert check_reinforcement_example(rft(parallel_tool_calls=True)) == []  # not reserved: an item field
    assert item_of(rft(tools=tools, reference_answer="r")) == {"category": "card_arrival", "reference_answer": "r"}


def test_too_few_examples_and_too_many_tokens(tmp_path):
    n, problems = validate_file(write(tmp_path / "few.jsonl", [rft(i) for i in range(3)]), method="reinforcement")
    assert n == 3 and [p.code for p in problems] == ["too_few_examples"]
    long = rft(99)
    long["messages"][-1]["content"] = "card " * 70_000
    n, problems = validate_file(write(tmp_path / "long.jsonl", [rft(i) for i in range(10)] + [long]),
                                method="reinforcement")
    assert [(p.line, p.code) for p in problems] == [(11, "too_many_tokens")] and "(prompt)" in problems[0].message


def test_detect_method_and_the_other_methods_on_rft_lines(tmp_path):
    r = write(tmp_path / "r.jsonl", [rft(i) for i in range(10)])
    assert detect_method(r) == "reinforcement"
    assert detect_method(write(tmp_path / "s.jsonl", [sft()])) == "supervised"
    assert detect_method(write(tmp_path / "d.jsonl", [pair()])) == "dpo"
    # checked as DPO, an RFT line is one format_mismatch naming --method reinforcement
    _, problems = validate_file(r, method="dpo")
    assert {p.code for p in problems} == {"format_mismatch"} and len(problems) == 10
    assert "--method reinforcement" in problems[0].message
    # checked as supervised, it keeps the supervised rule's own code (a chat example without its answer)
    _, problems = validate_file(r, method="supervised")
    assert "example_missing_assistant_message" in {p.code for p in problems}
    with pytest.raises(UserError, match="use auto, supervised, dpo or reinforcement"):
        validate_file(r, method="ppo")


def test_validate_cli(tmp_path, capsys):
    f = write(tmp_path / "r.jsonl", [rft(i) for i in range(12)])
    assert main(["validate", str(f)]) == 0  # auto: detected from the first line
    captured = capsys.readouterr()
    assert captured.out == "" and f"{f}: 12 examples (reinforcement format), 0 problem(s): valid" in captured.err
    bad = write(tmp_path / "b.jsonl", [rft(i) for i in range(10)] + [sft()])
    assert main(["validate", "--method", "reinforcement", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{bad}:11: ends_with_assistant: ")


def test_checked_examples_is_one_error_naming_the_key(tmp_path):
    good = write(tmp_path / "g.jsonl", [rft(i) for i in range(12)])
    assert len(checked_examples(good, "train_file", "reinforcement")) == 12
    bad = write(tmp_path / "b.jsonl", [rft(0), sft(), pair()])
    with pytest.raises(UserError) as e:
        checked_examples(bad, "train_file", "reinforcement")
    msg = str(e.value)
    assert msg.startswith(f"train_file: {bad} is not valid reinforcement (RFT) JSONL: {bad}:2: ends_with_assistant")
    assert f"{bad}:3: format_mismatch" in msg and msg.endswith(f"run `tunekit validate --method reinforcement {bad}`")
    with pytest.raises(UserError, match="make it with `python -m data_prep.reinforcement"):
        checked_examples(tmp_path / "missing.jsonl", "train_file", "reinforcement")


def test_rft_files_from_chat_jsonl(tmp_path, capsys):
    assert from_chat(sft(3)) == {"messages": sft(3)["messages"][:2], "reference_answer": "{\"category\": \"card_arrival\"}",
                                 "category": "card_arrival"}
    plain = {"messages": [USER, {"role": "assistant", "content": "not json"}]}
    assert from_chat(plain) == {"messages": [USER], "reference_answer": "not json"}
    src = tmp_path / "chat"
    src.mkdir()
    write(src / "train.jsonl", [sft(i) for i in range(12)])
    write(src / "valid.jsonl", [sft(i) for i in range(10)])
    assert convert_main([str(src / "train.jsonl"), str(src / "valid.jsonl"), "--out", str(tmp_path / "rl")]) == 0
    assert f"{src / 'train.jsonl'}: 12 examples -> {tmp_path / 'rl/train.jsonl'}" in capsys.readouterr().out
    for name, n in (("train.jsonl", 12), ("valid.jsonl", 10)):
        assert validate_file(tmp_path / "rl" / name, method="auto") == (n, []), name
    # the input must be valid chat JSONL; a problem is one line naming it
    write(src / "bad.jsonl", [sft(0), rft(1)])
    assert convert_main([str(src / "bad.jsonl"), "--out", str(tmp_path / "rl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src / 'bad.jsonl'}:2: example_missing_assistant_message" in err[0]
    assert not (tmp_path / "rl/bad.jsonl").exists()
