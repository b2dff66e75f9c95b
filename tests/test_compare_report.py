"""serve.compare's outputs without a server: report.md, metrics.json's deltas with bootstrap CIs,
predictions.csv, the before/after examples, the format check and the JSON baseline."""

from __future__ import annotations

import csv
import json

import pytest

from compare_fakes import FakeBackend, config, fake_run
from conftest import write_jsonl


# ---- the report: its files from a small fake result set --------------------------------------

def test_report_writes_its_files_for_the_label_task_with_the_baseline(tmp_path):
    from serve.compare import baseline_summary, deltas, write_outputs

    refs = ['{"category": "a"}', '{"category": "b"}', '{"category": "a"}', '{"category": "b"}']
    cfg, exs, results, metrics = fake_run("label", {"label_field": "category", "examples": 2}, refs, {
        "base": ['{"category": "b"}', "no idea", None, '{"category": "b"}'],
        "finetuned": ['{"category": "a"}', '{"category": "b"}', '{"category": "a"}', '{"category": "b"}']})
    exs[1].messages.insert(0, {"role": "system", "content": "Réponds en JSON ✓"})
    exs[0].messages[-1]["content"] = "long " * 100
    baseline = {"preds": ["a", "b", "b", "b"], "scores": [[.9, .1], [.2, .8], [.4, .6], [.1, .9]],
                "classes": ["a", "b"], "fit_s": 0.01, "latency_s": 0.0001, "train_examples": 8}
    metrics["models"].append(baseline_summary(cfg, exs, baseline))
    metrics["deltas"] = deltas(cfg, exs, results, baseline, metrics["models"])
    plots = write_outputs(tmp_path, cfg, exs, results, baseline, metrics)

    d = {(x["model"], x["against"]): x for x in json.loads((tmp_path / "metrics.json").read_text())["deltas"]}
    assert list(d) == [("finetuned", "base"), ("base", "tfidf-logreg"), ("finetuned", "tfidf-logreg")]
    assert [x["delta"] for x in d.values()] == [0.75, -0.5, 0.25]
    assert all(x["ci95"][0] <= x["delta"] <= x["ci95"][1] for x in d.values())
    assert d["base", "tfidf-logreg"]["ci95"][1] == 0.0  # all four resampled from the two ties: 1/16 > 2.5%
    assert (d["finetuned", "base"]["input_tokens_delta"], d["finetuned", "base"]["latency_p50_s_delta"]) == (5, 0.05)

    assert plots == ["metrics.png", "latency.png", "confusion_base.png", "confusion_finetuned.png",
                     "confusion_tfidf-logreg.png"]
    for png in plots:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and (tmp_path / png).stat().st_size > 1000
    m = json.loads((tmp_path / "metrics.json").read_text())
    by = {s["alias"]: s for s in m["models"]}
    assert by["finetuned"]["accuracy"] == 1.0 and by["base"]["accuracy"] == 0.25 and by["base"]["parsed"] == 0.5
    assert by["base"]["failed"] == {"timeout": 1} and by["tfidf-logreg"]["accuracy"] == 0.75
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", encoding="utf-8")))
    assert [r["finetuned_score"] for r in rows] == ["1.0"] * 4
    assert [r["base_score"] for r in rows] == ["0.0", "0.0", "0.0", "1.0"] and rows[2]["base_error"] == "timeout"
    assert [r["tfidf-logreg_score"] for r in rows] == ["1.0", "1.0", "0.0", "1.0"] and rows[2]["input"] == "q2"
    assert list(rows[0])[:9] == ["idx", "line", "system", "input", "reference", "base_answer", "base_score",
                                 "base_latency_s", "base_error"]
    assert list(rows[0])[-2:] == ["tfidf-logreg_answer", "tfidf-logreg_score"] and len(rows) == 4
    assert [r["system"] for r in rows] == ["", "Réponds en JSON ✓", "", ""] and rows[0]["input"] == "long " * 100
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert ("## What the fine-tune buys\n\nDeltas of accuracy; 95% CIs from a paired bootstrap over the 4 held-out "
            "examples (1000 resamples, seed 0).\n\n- finetuned vs base: accuracy +0.750 [95% CI +") in report
    assert "(finetuned is better by 0.750); p50 latency +0.050 s, p95 latency " in report
    assert "tokens in +5, tokens out +2, cost +0.0000 USD" in report
    assert ("- base vs tfidf-logreg: accuracy -0.500 [95% CI -1.000, +0.000] (base is worse by 0.500; "
            "the CI includes 0: within noise)") in report
    helps = report.split("## Where the fine-tune helps: finetuned beats base (2 of 3 shown)\n\n")[1]
    assert helps.startswith("- example 0 (line 1): base 0.000, finetuned 1.000\n  - input: long long")
    assert "…\n  - reference: {\"category\": \"a\"}\n  - base: {\"category\": \"b\"}\n" in helps
    assert "- example 1 (line 2)" in helps and "  - base: no idea\n" in helps and "example 2" not in helps
    assert max(len(ln) for ln in helps.splitlines()) < 320  # inputs and answers are cut at ~300 characters
    assert "## Where the fine-tune is worse: base beats finetuned (0 of 0 shown)\n\nNone." in report
    assert "off-label: answers that parse but name none of the classes" in report
    assert "ROC AUC of the language models" not in report  # logprobs off
    assert ("| model | accuracy | macro-F1 | precision | recall | parsed | off-label | ROC AUC | failed | p50 s "
            "| p95 s | tokens in / out | cost USD |\n" + "|" + "---|" * 13) in report
    assert "| finetuned (`finetuned`) | 1.000 | 1.000 |" in report
    assert "| tfidf-logreg (`TF-IDF + logistic regression`) | 0.750 |" in report
    assert '"base": {"timeout": 1}' in report and "![confusion_base.png](confusion_base.png)" in report


@pytest.mark.parametrize("task, refs, answers, row", [
    ("json", ['{"s": 1, "t": 2}', '{"s": 3, "t": 4}'], ['{"s": 1, "t": 2}', '{"s": 3, "t": 0}'],
     "| model | 1.000 | 0.500 | s 1.00, t 0.50 | 0 |"),
    ("text", ["the card has arrived", "it is lost"], ["the card has arrived", "no"], "| model | 0.500 | 0 |"),
])
def test_report_writes_its_files_for_the_other_tasks(tmp_path, task, refs, answers, row):
    from serve.compare import TASKS, write_outputs

    cfg, exs, results, metrics = fake_run(task, {}, refs, {"model": answers})
    if task == "text":
        metrics["judge"] = [{"judge": "j", "pair": ["model", "other"], "model": 2}]
    plots = write_outputs(tmp_path, cfg, exs, results, None, metrics)
    assert plots == ["metrics.png", "latency.png"]
    assert json.loads((tmp_path / "metrics.json").read_text())["models"][0][TASKS[task].headline] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert row in report and "Failed requests (counted as wrong, listed in predictions.csv): none." in report
    header = [ln for ln in report.splitlines() if ln.startswith("| model |")][0]
    assert header.count("|") == 2 + len([c for c in TASKS[task].columns if c.shown(cfg)]) + 5
    assert "format ok" not in header  # only with format_check
    if task == "text":
        assert "LLM judge `j` (both orders, a win needs both): model 2" in report
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", encoding="utf-8")))
    assert [float(r["model_score"]) for r in rows] == [1.0, 0.0]


# ---- what the fine-tune buys: bootstrap CIs, before/after examples, format check, json baseline --

def test_paired_bootstrap_matches_hand_computed_values():
    import time

    import numpy as np

    from serve.compare import paired_bootstrap

    assert paired_bootstrap([1, 1, 1, 1], [0, 0, 0, 0], 200) == (1.0, [1.0, 1.0])  # no spread: a point CI
    assert paired_bootstrap([1, 0], [0, 0], 0) == (0.5, None)  # bootstrap 0: the delta, no CI
    a, b = [1.0, 0.0] * 50, [0.0] * 100
    delta, (lo, hi) = paired_bootstrap(a, b, 2000, seed=7)
    # mean of 100 coin flips: 0.5 +- 1.96 * sqrt(0.25 / 100) = [0.402, 0.598]
    assert delta == 0.5 and lo == pytest.approx(0.402, abs=0.03) and hi == pytest.approx(0.598, abs=0.03)
    idx = np.random.default_rng(7).integers(0, 100, size=(2000, 100))  # same indices for both sides
    diffs = (np.asarray(a)[idx] - np.asarray(b)[idx]).mean(axis=1)
    assert [lo, hi] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    assert paired_bootstrap(a, b, 2000, seed=7) == (delta, [lo, hi])  # the seed makes it reproducible
    u, v = np.linspace(0, 1, 50) ** 2, np.linspace(0, 1, 50)[::-1]  # continuous scores (ROUGE-L-like)
    assert paired_bootstrap(u, v, 500, seed=1)[1] != paired_bootstrap(u, v, 500, seed=2)[1]
    # paired: b = a shifted by one wrong answer -> every resample's delta is tiny, unlike unpaired sampling
    rng = np.random.default_rng(0)
    x = (rng.random(3000) < 0.7).astype(float)
    y = x.copy()
    y[np.flatnonzero(x)[:30]] = 0.0
    t0 = time.perf_counter()
    delta, (lo, hi) = paired_bootstrap(x, y, 1000, seed=0)
    assert time.perf_counter() - t0 < 1.0  # 1000 resamples x 3000 examples
    assert delta == pytest.approx(0.01) and 0.005 < lo <= delta <= hi < 0.015


def test_examples_sections_list_both_directions():
    from serve.compare.findings import example_lines

    refs = ["a", "b", "a", "b", "a"]
    cfg, exs, results, _ = fake_run("label", {}, refs, {"base": ["a", "a", "a", "a", "b"],
                                                       "finetuned": ["b", "b", "a", "b", "a"]})
    text = "\n".join(example_lines(cfg, exs, results))
    helps, worse = text.split("## Where the fine-tune is worse: base beats finetuned (1 of 1 shown)")
    assert "## Where the fine-tune helps: finetuned beats base (3 of 3 shown)" in helps
    assert [ln for ln in helps.splitlines() if ln.startswith("- ")] == [
        "- example 1 (line 2): base 0.000, finetuned 1.000", "- example 3 (line 4): base 0.000, finetuned 1.000",
        "- example 4 (line 5): base 0.000, finetuned 1.000"]
    assert worse.strip().splitlines() == ["- example 0 (line 1): base 1.000, finetuned 0.000", "  - input: q0",
                                          "  - reference: a", "  - base: a", "  - finetuned: b"]
    assert example_lines(config(task="label", examples=0), exs, results) == []
    assert example_lines(cfg, exs, {"base": results["base"]}) == []  # one model: nothing to compare


def test_format_check_counts_markdown_headings_and_shows_its_column(tmp_path):
    from serve.compare import CompareConfig, write_outputs
    from tunekit.errors import UserError

    answers = ["# Title\ntext", "no heading", "##NoSpace", "text\n### Sub heading", None]
    cfg, exs, results, metrics = fake_run("text", {"format_check": "markdown_headings"}, ["x"] * 5,
                                          {"model": answers})
    assert metrics["models"][0]["format_ok"] == 0.4  # 2 of 5; a failed request is not ok
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| model | ROUGE-L | format ok | failed |" in report and "| model | 0.000 | 0.400 | 1 |" in report
    assert "Figures from elsewhere" not in report
    cfg.reference_figures = ["a write-up's forest: ROC AUC 0.85", "its DistilBERT: accuracy 0.93"]
    write_outputs(tmp_path, cfg, exs, results, None, metrics)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Figures from elsewhere" in report
    assert "- a write-up's forest: ROC AUC 0.85\n- its DistilBERT: accuracy 0.93" in report
    data = write_jsonl(tmp_path / "d.jsonl", [])
    for keys, message in [
        ({"task": "text", "format_check": "html"}, "format_check: 'html'; use one of markdown_headings"),
        ({"task": "label", "format_check": "markdown_headings"}, "format_check: applies to the text task only"),
        ({"task": "json", "logprobs": True}, "logprobs: applies to the label task only (task is 'json')"),
        ({"bootstrap": -1}, "bootstrap: -1 must be 0 (off) or more resamples"),
    ]:
        with pytest.raises(UserError, match=r"^compare.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
            CompareConfig(data=str(data), **keys).check("compare.yaml")


def test_json_baseline_learns_each_reference_object_as_a_class(tmp_path, monkeypatch, capsys):
    import serve.compare
    import serve.compare.cli
    from serve.compare import TASKS

    assert TASKS["json"].baseline
    pos, neg = '{"sentiment": "positive", "stars": 5}', '{"stars": 1, "sentiment": "negative"}'
    rows = lambda pairs: [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                          for q, a in pairs]
    train = write_jsonl(tmp_path / "train.jsonl", rows([("great phone, love it", pos), ("awful, it broke", neg),
                                                        ("love it, great", pos), ("broke at once, awful", neg)]))
    held = write_jsonl(tmp_path / "held.jsonl", rows([("great", pos), ("awful", neg), ("love", pos)]))
    monkeypatch.setattr(serve.compare.cli, "load_backend", lambda *a, **k: FakeBackend())
    out = tmp_path / "out"
    argv = ["--data", str(held), "--train-data", str(train), "--task", "json", "--out", str(out), "--seed", "3"]
    assert serve.compare.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    base = {s["alias"]: s for s in m["models"]}["tfidf-logreg"]
    assert (base["exact_match"], base["valid_json"], base["field_accuracy"]) == (1.0, 1.0, {"sentiment": 1.0,
                                                                                           "stars": 1.0})
    assert base["classes"] == 2
    d = {(x["model"], x["against"]): x for x in m["deltas"]}
    assert d["finetuned", "base"]["delta"] == 0.0 and d["base", "tfidf-logreg"]["delta"] == -1.0
    assert d["base", "tfidf-logreg"]["ci95"] == [-1.0, -1.0] and d["base", "tfidf-logreg"]["seed"] == 3
    csv_rows = list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))
    assert [r["tfidf-logreg_answer"] for r in csv_rows] == [
        '{"sentiment": "positive", "stars": 5}', '{"sentiment": "negative", "stars": 1}',
        '{"sentiment": "positive", "stars": 5}']
    printed = capsys.readouterr().out
    assert "base vs tfidf-logreg: exact_match -1.000 [95% CI -1.000, -1.000] (base is worse by 1.000)" in printed
    assert f"predictions: {out / 'predictions.csv'}" in printed

    assert serve.compare.main([*argv, "--json-fields", "sentiment", "--bootstrap", "0"]) == 0  # restricted objects
    m = json.loads((out / "metrics.json").read_text())
    assert {s["alias"]: s for s in m["models"]}["tfidf-logreg"]["field_accuracy"] == {"sentiment": 1.0}
    assert all(x["ci95"] is None for x in m["deltas"])
    assert list(csv.DictReader(open(out / "predictions.csv")))[1]["tfidf-logreg_answer"] == '{"sentiment": "negative"}'


