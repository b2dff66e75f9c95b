"""data_prep for OpenAI's DPO (preference) format: every rule, detection, validate/stats/build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from data_prep.__main__ import main
from data_prep.build import BuildConfig, build
from data_prep.preference import check_preference_example
from data_prep.validate import detect_method, validate_file
from tunekit.config import load_config
from tunekit.errors import UserError


def pair(i: int = 0, prompt: str | None = None, chosen: str = "yes", rejected: str = "no") -> dict:
    return {"input": {"messages": [{"role": "system", "content": "Answer yes or no."},
                                   {"role": "user", "content": prompt or f"question {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def sft(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def changed(**edits) -> dict:
    """A good pair with top-level keys replaced (None: removed) and ``input__KEY`` edits inside input."""
    ex = pair()
    for key, value in edits.items():
        target, key = (ex["input"], key[7:]) if key.startswith("input__") else (ex, key)
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    return ex


def out(**message) -> list[dict]:
    return [{"role": "assistant", "content": "yes", **message}]


# ---------------------------------------------------------------- every rule, with its line

RULES = {
    "not an object": ("[1, 2]", {"data_type"}),
    "no input": (changed(input=None), {"missing_input"}),
    "input not an object": (changed(input="hi"), {"missing_messages_list"}),
    "empty input.messages": (changed(input__messages=[]), {"missing_messages_list"}),
    "message checks: role": (changed(input__messages=[{"role": "robot", "content": "q"}]), {"unrecognized_role"}),
    "message checks: keys": (changed(input__messages=[{"role": "user"}]), {"message_missing_key", "missing_content"}),
    "message checks: extra key": (changed(input__messages=[{"role": "user", "content": "q", "x": 1}]),
                                  {"message_unrecognized_key"}),
    "message checks: weight": (changed(input__messages=[{"role": "user", "content": "q", "weight": 1}]),
                               {"weight_not_assistant"}),
    "input ends with assistant": (changed(input__messages=[{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]),
                                  {"input_ends_with_assistant"}),
    "tools not a list": (changed(input__tools={"type": "function"}), {"invalid_tools"}),
    "parallel_tool_calls not a bool": (changed(input__parallel_tool_calls="yes"), {"invalid_parallel_tool_calls"}),
    "unknown input key": (changed(input__temperature=0.5), {"unrecognized_key"}),
    "unknown top-level key": (changed(metadata={"id": 1}), {"unrecognized_key"}),
    "no preferred": (changed(preferred_output=None), {"missing_preferred_output"}),
    "no non-preferred": (changed(non_preferred_output=None), {"missing_non_preferred_output"}),
    "preferred not a list": (changed(preferred_output={"role": "assistant", "content": "yes"}),
                             {"invalid_preferred_output"}),
    "two preferred": (changed(preferred_output=out() + out()), {"invalid_preferred_output"}),
    "empty non-preferred": (changed(non_preferred_output=[]), {"invalid_non_preferred_output"}),
    "output role": (changed(preferred_output=out(role="user")), {"output_not_assistant"}),
    "output without text": (changed(non_preferred_output=out(content="")), {"missing_content"}),
    "output weight": (changed(preferred_output=out(weight=1)), {"weight_in_output"}),
    "output extra key": (changed(preferred_output=out(score=3)), {"message_unrecognized_key"}),
    "identical outputs": (changed(non_preferred_output=out()), {"identical_outputs"}),
    "too many tokens": (pair(prompt="w " * 70_000), {"too_many_tokens"}),
    "supervised line": (sft(), {"format_mismatch"}),
    "not JSON": ('{"input": ', {"invalid_json"}),
}


@pytest.mark.parametrize("case", sorted(RULES))
def test_each_rule_reports_its_code_on_its_line(case, tmp_path):
    line, codes = RULES[case]
    f = write(tmp_path / "p.jsonl", [pair(i) for i in range(10)] + [line])
    n, problems = validate_file(f, method="dpo")
    assert {(p.line, p.code) for p in problems} == {(11, c) for c in codes}, problems
    assert all(str(p).startswith(f"{f}:11: ") for p in problems)
    assert n == 11 - (case == "not JSON")


def test_good_pairs_and_tool_calls_without_content_pass(tmp_path):
    tool = changed(input__tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                   input__parallel_tool_calls=False,
                   preferred_output=[{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                                            "function": {"name": "f", "arguments": "{}"}}]}])
    assert check_preference_example(tool) == []
    f = write(tmp_path / "p.jsonl", [pair(i) for i in range(10)] + [tool])
    assert validate_file(f, method="dpo") == (11, [])
    assert validate_file(f) == (11, [])     # auto-detected


def test_too_few_pairs_is_a_file_problem(tmp_path):
    _, problems = validate_file(write(tmp_path / "p.jsonl", [pair(i) for i in range(3)]), method="dpo")
    assert [(p.line, p.code) for p in problems] == [(0, "too_few_examples")]


def test_a_supervised_file_checked_as_dpo_is_one_clear_problem_per_line(tmp_path):
    f = write(tmp_path / "s.jsonl", [sft(i) for i in range(12)])
    n, problems = validate_file(f, method="dpo")
    assert n == 12 and [(p.line, p.code) for p in problems] == [(i, "format_mismatch") for i in range(1, 13)]
    assert "supervised format" in problems[0].message and "--method supervised" in problems[0].message
    _, problems = validate_file(write(tmp_path / "d.jsonl", [pair(i) for i in range(12)]), method="supervised")
    assert {p.code for p in problems} == {"format_mismatch"} and len(problems) == 12
    assert "DPO (preference) format" in problems[0].message and "--method dpo" in problems[0].message


# ---------------------------------------------------------------- detect_method and the validate CLI


def test_detect_method_reads_the_first_json_object(tmp_path):
    assert detect_method(write(tmp_path / "d.jsonl", [pair()])) == "dpo"
    assert detect_method(write(tmp_path / "s.jsonl", [sft()])) == "supervised"
    assert detect_method(write(tmp_path / "b.jsonl", ["{oops", "", pair()])) == "dpo"
    assert detect_method(write(tmp_path / "o.jsonl", [{"preferred_output": []}])) == "dpo"
    assert detect_method(write(tmp_path / "x.jsonl", ["[1]"])) == "supervised"
    with pytest.raises(UserError, match="file not found"):
        detect_method(tmp_path / "missing.jsonl")


def test_validate_cli_method_flag(tmp_path, capsys):
    f = write(tmp_path / "d.jsonl", [pair(i) for i in range(12)])
    assert main(["validate", str(f)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"{f}: 12 examples (DPO format), 0 problem(s): valid" in captured.err
    assert main(["validate", str(f), "--method", "supervised"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 12 and "(supervised format), 12 problem(s)" in captured.err
    assert captured.out.splitlines()[0].startswith(f"{f}:1: format_mismatch: this line is in the DPO")


def test_validate_cli_wrong_method_is_one_line_per_example_without_traceback(tmp_path):
    f = write(tmp_path / "s.jsonl", [sft(i) for i in range(10)])
    proc = run_cli("-m", "data_prep", "validate", str(f), "--method", "dpo")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 10 and all("format_mismatch" in line and "--method supervised" in line for line in lines)


# ---------------------------------------------------------------- stats


def cookbook(messages: list[dict]) -> int:
    """The cookbook's count, written out: 3 per message + its strings' tokens, 3 to prime the reply."""
    from data_prep.tokens import encoding_for_model

    enc = encoding_for_model("gpt-4o-mini-2024-07-18")
    return 3 + sum(3 + sum(len(enc.encode(v)) for v in m.values()) for m in messages)


def test_stats_counts_prompt_outputs_and_the_billed_tokens(tmp_path, capsys):
    examples = [pair(i, chosen="Yes, certainly " * (i + 1), rejected="no") for i in range(12)]
    f = write(tmp_path / "d.jsonl", examples)
    prompts = [cookbook(ex["input"]["messages"]) for ex in examples]
    chosen = [cookbook(ex["preferred_output"]) - 3 for ex in examples]   # one more message, no second primer
    rejected = [cookbook(ex["non_preferred_output"]) - 3 for ex in examples]
    assert rejected[0] == 3 + 1 + 1                                    # a message, "assistant", "no"
    assert main(["stats", str(f), "--json", "--no-plot", "--epochs", "2"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["method"] == "dpo" and s["examples"] == 12
    assert s["prompt_tokens"]["total"] == sum(prompts)
    assert s["preferred_tokens"]["total"] == sum(chosen) and s["non_preferred_tokens"]["total"] == sum(rejected)
    assert s["tokens_per_example"]["max"] == max(p + max(c, r) for p, c, r in zip(prompts, chosen, rejected))
    billed = sum(prompts) + sum(chosen) + sum(rejected)
    assert s["billed_tokens_per_epoch"] == billed and s["billed_tokens_total"] == 2 * billed
    assert s["estimated_cost_usd"] == round(billed * 2 * s["price_per_1m_training_tokens"] / 1e6, 4)
    assert main(["stats", str(f), "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "(DPO preference pairs)" in text and "prompt tokens" in text and "non-preferred output" in text
    assert "(prompt + preferred + non-preferred tokens per example, per epoch)" in text


@pytest.mark.slow   # loads transformers (~5 s)
def test_local_tokenizer_renders_prompt_plus_each_answer(tmp_path, tiny_tokenizer_dir):
    from data_prep.stats import compute, load_tokenizer

    long = pair(prompt="where is my card", chosen="yes", rejected="w1 " * 300)
    f = write(tmp_path / "d.jsonl", [pair(i) for i in range(10)] + [long])
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    _, problems = validate_file(f, tokenizer=tok, max_length=64, method="dpo")
    assert [(p.line, p.code) for p in problems] == [(11, "exceeds_max_length")]
    assert "tokens (prompt + longer output) > max_length 64" in problems[0].message
    s = compute(f, tokenizer=str(tiny_tokenizer_dir))
    chosen = pair(0)["input"]["messages"] + pair(0)["preferred_output"]
    rendered = tok(tok.apply_chat_template(chosen, tokenize=False), add_special_tokens=False)["input_ids"]
    assert s["counts"][0] == len(rendered) and s["estimated_cost_usd"] is None


def test_stats_on_a_malformed_dpo_file_is_one_line(tmp_path):
    f = write(tmp_path / "d.jsonl", [pair(), changed(preferred_output=None)])
    proc = run_cli("-m", "data_prep", "stats", str(f), "--no-plot")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"{f}:2: missing_preferred_output" in proc.stderr and "tunekit validate" in proc.stderr


# ---------------------------------------------------------------- build


def accounted(report: dict) -> bool:
    return report["rows_in"] == sum(report["rows_out"].values()) + sum(report["rows_dropped"].values())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_example_config_builds_valid_dpo_files(tmp_path):
    cfg = load_config(BuildConfig, ROOT / "tests/data/dpo_build.yaml", {"out": str(tmp_path)})
    cfg.input = str(ROOT / cfg.input)
    report = build(cfg, progress=False)
    assert report["rows_in"] == 16 and accounted(report)
    assert report["rows_out"] == {"train": 9, "valid": 3}
    assert report["rows_dropped"] == {"empty:question": 1, "empty_chosen": 1, "chosen_equals_rejected": 1,
                                      "duplicate": 1}
    assert set(report["tokens"]) == {"model", "train", "valid", "train_prompt", "train_chosen", "train_rejected"}
    train = read_jsonl(tmp_path / "train.jsonl")
    assert len(train) == 9 and all(check_preference_example(ex) == [] for ex in train)
    assert train[0]["input"]["messages"][0] == {"role": "system", "content": cfg.system}
    n, problems = validate_file(tmp_path / "train.jsonl", method="dpo")
    assert n == 9 and [p.code for p in problems] == ["too_few_examples"]     # a 16-row fixture


@pytest.fixture
def prefs_csv(tmp_path) -> Path:
    """60 pairs over 30 prompts (2 each), labels a/b; HTML to clean; 2 equal pairs, 1 empty rejected."""
    import csv

    rows = [[f"prompt {i // 2} &amp; <b>more</b>", f"good {i}", f"bad {i}", "a" if i < 40 else "b"]
            for i in range(60)]
    rows += [["same prompt", "x", "x", "a"], ["same prompt", "y", "y", "b"], ["p", "fine", " ", "a"]]
    path = tmp_path / "prefs.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows([["prompt", "chosen", "rejected", "label"]] + rows)
    return path


def test_build_flags_make_dpo_pairs_with_cleaning_split_and_accounting(prefs_csv, tmp_path):
    o = tmp_path / "o"
    assert main(["build", "--input", str(prefs_csv), "--out", str(o), "--method", "dpo", "--user", "Q: {{ prompt }}",
                 "--chosen", "{{ chosen }}", "--rejected", "{{ rejected }}", "--valid-fraction", "0.2",
                 "--stratify", "label", "-q"]) == 0
    report = json.loads((o / "report.json").read_text())
    assert report["rows_in"] == 63 and accounted(report)
    assert report["rows_dropped"] == {"chosen_equals_rejected": 2, "empty_rejected": 1}
    assert report["rows_out"] == {"train": 48, "valid": 12}
    train, valid = read_jsonl(o / "train.jsonl"), read_jsonl(o / "valid.jsonl")
    assert {"input": {"messages": [{"role": "user", "content": "Q: prompt 0 & more"}]},
            "preferred_output": [{"role": "assistant", "content": "good 0"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad 0"}]} in train + valid
    prompts = [{json.dumps(ex["input"]) for ex in rows} for rows in (train, valid)]
    assert not prompts[0] & prompts[1]                      # a prompt's pairs stay on one side of the split
    for name in ("train.jsonl", "valid.jsonl"):
        assert validate_file(o / name) == (len(train) if name == "train.jsonl" else 12, [])


def test_build_max_tokens_counts_the_prompt_and_the_longer_answer(tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("prompt,chosen,rejected\nhi,short,also short\nhi there,ok," + "word " * 300 + "\n")
    main(["build", "--input", str(src), "--out", str(tmp_path / "o"), "--method", "dpo", "--user", "{{ prompt }}",
          "--chosen", "{{ chosen }}", "--rejected", "{{ rejected }}", "--max-tokens", "100",
          "--valid-fraction", "0", "-q"])
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["rows_dropped"] == {"over_max_tokens": 1} and report["rows_out"]["train"] == 1


@pytest.mark.parametrize("args, message", [
    (["--method", "dpo", "--user", "{{ p }}", "--chosen", "{{ c }}"], "method dpo: give the user, chosen and rejected"),
    (["--method", "dpo", "--user", "{{ p }}", "--chosen", "{{ c }}", "--rejected", "{{ r }}", "--assistant", "{{ c }}"],
     "assistant: not used with method dpo"),
    (["--user", "{{ p }}", "--assistant", "{{ c }}", "--chosen", "{{ c }}"], "chosen/rejected: only used with method"),
])
def test_dpo_config_mistakes_are_one_line(args, message, tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("p,c,r\na,b,c\n")
    proc = run_cli("-m", "data_prep", "build", "--input", str(src), "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
