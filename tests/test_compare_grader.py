"""serve.compare's ``grader``: each model's answers scored by an OpenAI grader (serve.graders), its mean reward with a
bootstrap CI and deltas, on the fake backend of tests/compare_fakes.py (no server)."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest

from compare_fakes import FakeBackend, FakeCompletions
from conftest import write_jsonl

INTENTS = ["card_arrival", "card_lost", "top_up"]
# the held-out file as `tunekit build` writes it: the reference is the answer's JSON, plus a field of the line
ROWS = [{"messages": [{"role": "user", "content": f"q{i}"},
                      {"role": "assistant", "content": json.dumps({"category": INTENTS[i % 3]})}], "source": f"s{i}"}
        for i in range(12)]
GRADER = {"type": "string_check", "name": "intent", "input": "{{ sample.output_json.category }}",
          "reference": "{{ item.category }}", "operation": "eq"}


class Answers(FakeCompletions):
    """base answers in prose (no JSON: a sample_parse_error, reward 0); finetuned the right intent for all but
    every fourth question (the wrong one); q5 fails for both (a timeout: reward 0)."""

    async def create(self, model, messages, **sampling):
        user = messages[-1]["content"]
        if user == "q5":
            return await super().create(model, [{"role": "user", "content": "q5"}], **sampling)  # in self.fail
        i = int(user[1:])
        self.calls.append((model, user))
        intent = INTENTS[i % 3] if i % 4 else INTENTS[(i + 1) % 3]
        content = f"I think it is {intent}" if model == "base" else json.dumps({"category": intent})
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content),
                                                        finish_reason="stop")],
                               usage=SimpleNamespace(prompt_tokens=7, completion_tokens=2))


def run(tmp_path, monkeypatch, grader, *extra):
    import serve.compare
    import serve.compare.cli

    data = write_jsonl(tmp_path / "heldout.jsonl", ROWS)
    (tmp_path / "grader.json").write_text(json.dumps(grader))
    backend = FakeBackend()
    backend.completions = Answers(fail={"q5"})
    monkeypatch.setattr(serve.compare.cli, "load_backend", lambda *a, **k: backend)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--models", "base,finetuned", "--task", "json",
            "--grader", str(tmp_path / "grader.json"), "--bootstrap", "500", "--seed", "3", *extra]
    return serve.compare.main(argv), backend


def test_mean_reward_with_a_bootstrap_ci_per_model_and_deltas(tmp_path, monkeypatch, capsys):
    from serve.compare import paired_bootstrap

    rc, _ = run(tmp_path, monkeypatch, GRADER)
    assert rc == 0
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    base, tuned = m["models"][:2]
    # finetuned: right on i % 4 != 0 (9 of 12), less q5 (failed): 8 / 12; base never answers in JSON: 0
    rewards = [1.0 if i % 4 and i != 5 else 0.0 for i in range(12)]
    assert (base["grader_reward"], tuned["grader_reward"]) == (0.0, round(8 / 12, 4))
    assert base["grader_errors"] == 11 and tuned["grader_errors"] == 0  # sample_parse_error; q5 is no answer
    _, ci = paired_bootstrap(rewards, [0.0] * 12, 500, 3)
    assert tuned["grader_reward_ci95"] == [round(x, 4) for x in ci] and ci[0] < 8 / 12 < ci[1]
    assert base["grader_reward_ci95"] == [0.0, 0.0] and tuned["grader"] == "string_check 'intent'"
    (delta,) = m["grader_deltas"]
    assert (delta["model"], delta["against"], delta["metric"], delta["delta"]) == ("finetuned", "base", "grader_reward",
                                                                                  round(8 / 12, 4))
    assert delta["ci95"][0] > 0  # the grader's verdict: better beyond noise
    report = (tmp_path / "out/report.md").read_text()
    assert "## Grader: string_check 'intent'" in report
    assert f"| finetuned | 0.667 | [{ci[0]:.3f}, {ci[1]:.3f}] | 0 |" in report
    assert "- finetuned vs base: grader_reward +0.667 [95% CI +" in report
    with open(tmp_path / "out/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["finetuned_reward"]) for r in rows] == rewards and {r["base_reward"] for r in rows} == {"0.0"}
    out = capsys.readouterr().out
    assert f"finetuned: exact_match 0.667, grader reward 0.667 [{ci[0]:.3f}, {ci[1]:.3f}]" in out
    assert "finetuned vs base: grader_reward +0.667" in out


def test_a_python_grader_reads_the_lines_fields(tmp_path, monkeypatch):
    from serve.graders.sandbox import isolation

    if not isolation().complete:
        monkeypatch.setenv("TUNEKIT_PYTHON_GRADERS", "on")  # run with the layers this OS grants
    src = ("import json\ndef grade(sample, item):\n    got = json.loads(sample['output_text'])['category']\n"
           "    return 1.0 if got == item['category'] and item['source'].startswith('s') else 0.5\n")
    rc, _ = run(tmp_path, monkeypatch, {"type": "python", "name": "py", "source": src}, "--limit", "5")
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    # finetuned on q0..q4: q0 wrong (0.5), q1-q3 right, q4 wrong (0.5); base's prose raises: 0 each
    assert rc == 0 and m["models"][1]["grader_reward"] == round((0.5 + 3 + 0.5) / 5, 4)
    assert m["models"][0]["grader_reward"] == 0.0 and m["models"][0]["grader_errors"] == 5


def test_the_item_is_data_prep_reinforcement_s(tmp_path):
    from serve.compare import load_examples

    rows = [ROWS[0], {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain"}],
                      "label": "x"}]
    exs = load_examples(write_jsonl(tmp_path / "h.jsonl", rows))
    assert exs[0].item == {"reference_answer": '{"category": "card_arrival"}', "category": "card_arrival",
                           "source": "s0"}
    assert exs[1].item == {"reference_answer": "plain", "label": "x"}


@pytest.mark.parametrize("grader,message", [
    ({**GRADER, "operation": "regex"}, "grader: {path}: grader.operation: Invalid value for 'grader.operation'"),
    ("not: [json", "grader: {path} is not JSON or YAML"),
])
def test_a_bad_grader_is_one_line_before_any_request(tmp_path, monkeypatch, grader, message):
    from tunekit.errors import UserError

    with pytest.raises(UserError) as err:
        if isinstance(grader, str):
            (tmp_path / "bad.yaml").write_text(grader)
            from serve.compare.grading import load_grader

            load_grader(str(tmp_path / "bad.yaml"))
        else:
            run(tmp_path, monkeypatch, grader)
    path = tmp_path / ("bad.yaml" if isinstance(grader, str) else "grader.json")
    assert str(err.value).startswith(message.format(path=path)) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "raw").exists()  # nothing was sent
