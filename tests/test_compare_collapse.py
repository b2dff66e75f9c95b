"""serve.compare's collapse warning: a model that gives one answer to most inputs is named in metrics.json,
report.md and on the console, with the likely fixes; a model that merely follows skewed references is not."""

from __future__ import annotations

import json

import pytest

from compare_fakes import fake_run


def label(x: str) -> str:
    return json.dumps({"action": x})


# 20 readings, 70% "none" like the sensors use case: 14 none, 3 inspect, 2 stop, 1 cool
REFS = [label(x) for x in ["none"] * 14 + ["inspect"] * 3 + ["stop"] * 2 + ["cool"]]


def test_a_majority_answer_for_everything_is_flagged_in_metrics_report_and_console(tmp_path):
    from serve.compare import write_outputs
    from serve.compare.report import console_lines

    collapsed = [label("none")] * 20  # accuracy 0.70, macro-F1 0.165 over the four classes
    off_label = [label("I cannot tell")] * 19 + [label("none")]  # one answer, but no class: the base's off-label
    cfg, exs, results, metrics = fake_run("label", {"label_field": "action"}, REFS,
                                          {"base": off_label, "finetuned": collapsed})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)

    found = json.loads((tmp_path / "metrics.json").read_text())["collapse"]
    assert [c["model"] for c in found] == ["finetuned"]
    c = found[0]
    assert (c["answer"], c["count"], c["n"], c["share"], c["distinct_answers"]) == ("none", 20, 20, 1.0, 1)
    assert (c["reference_top"], c["reference_top_share"], c["reference_classes"]) == ("none", 0.7, 4)
    assert c["reference_share"] == 0.7
    assert c["reasons"] == ["it is the reference of 70%", "macro-F1 0.206 against accuracy 0.700"]
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Warning: a model gives one answer to most inputs\n\n")[1].split("\n\n")[0]
    assert section.startswith("- finetuned gives one answer ('none') to 20 of 20 inputs (100%; 1 distinct answer, "
                              "the references have 4) while it is the reference of 70%; macro-F1 ")
    assert "class-balanced training (train/sft.py `balance_labels: on`), more steps" in section
    assert "label distribution" in section
    warnings = [ln for ln in console_lines(cfg, metrics["models"]) if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: finetuned gives one answer ('none')")


def test_one_answer_far_above_the_references_share_is_flagged_on_the_json_task(tmp_path):
    from serve.compare import write_outputs

    refs = [json.dumps({"category": c, "sub": s}) for c, s in
            [("cards", "lost"), ("cards", "pin"), ("top_up", "failed"), ("transfers", "late")] * 5]
    # 12 of 20 the same object with its keys in another order (the same object), then right: 14 of 20 in all
    answers = ['{"sub": "lost", "category": "cards"}'] * 12 + refs[12:]
    cfg, exs, results, metrics = fake_run("json", {}, refs, {"finetuned": answers})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    [c] = json.loads((tmp_path / "metrics.json").read_text())["collapse"]
    assert (c["count"], c["share"], c["reference_top_share"], c["distinct_answers"]) == (14, 0.7, 0.25, 4)
    assert c["answer"] == '{"category": "cards", "sub": "lost"}'
    assert c["reasons"] == ["it is the reference of 25%"]
    assert "## Warning: a model gives one answer to most inputs" in (tmp_path / "report.md").read_text()


def test_a_rare_answer_given_to_most_inputs_is_flagged(tmp_path):
    """Balanced draws trained too briefly can answer a rare class everywhere: 85% of the inputs get "stop",
    the reference of 10%, though the most common reference ("none") covers 70%."""
    from serve.compare import write_outputs

    answers = [label("stop")] * 17 + [label("none")] * 3
    cfg, exs, results, metrics = fake_run("label", {"label_field": "action"}, REFS, {"finetuned": answers})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    [c] = metrics["collapse"]
    assert (c["answer"], c["share"], c["reference_share"], c["reasons"]) == ("stop", 0.85, 0.1,
                                                                             ["it is the reference of 10%"])


@pytest.mark.parametrize("answers", [
    REFS,  # right on every input: it follows the references' own skew (70% none)
    [label("none")] * 16 + REFS[16:],  # 80% none, 10 points above the references, three classes still answered
    [label(x) for x in ["none"] * 5 + ["inspect"] * 5 + ["stop"] * 5 + ["cool"] * 5],  # spread out, just wrong
])
def test_a_model_that_follows_skewed_references_or_spreads_its_answers_is_not_flagged(tmp_path, answers):
    from serve.compare import write_outputs

    cfg, exs, results, metrics = fake_run("label", {"label_field": "action"}, REFS, {"finetuned": answers})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["collapse"] == []
    assert "Warning" not in (tmp_path / "report.md").read_text()


def test_few_examples_are_not_judged_and_a_repeated_text_reply_is(tmp_path):
    from serve.compare import write_outputs

    cfg, exs, results, metrics = fake_run("label", {"label_field": "action"}, REFS[:9] + [label("stop")],
                                          {"finetuned": [label("none")] * 10})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    assert [c["reasons"] for c in metrics["collapse"]] == [["10% of the references are something else"]]
    cfg, exs, results, metrics = fake_run("label", {"label_field": "action"}, REFS[:8] + [label("stop")],
                                          {"finetuned": [label("none")] * 9})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    assert metrics["collapse"] == []  # 10 examples are judged, 9 are not
    refs = [f"reply number {i}" for i in range(12)]
    cfg, exs, results, metrics = fake_run("text", {}, refs, {"model": ["Sure!  I can\nhelp."] * 11 + ["no"]})
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    [c] = metrics["collapse"]
    assert (c["answer"], c["count"], c["reasons"]) == ("Sure! I can help.", 11, ["it is the reference of 0%"])
