"""serve.compare without a server: the task table, the runner's resume, the report files, the backend."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, write_jsonl

# ---- the task table: every task scores a right and a wrong answer, and yields its headline ----

# task -> (config keys, reference, a correct answer, a wrong answer)
CASES = {
    "label": ({"label_field": "category"}, '{"category": "card_arrival"}',
              'Sure! ```json\n{"category": "card_arrival"}\n```', '{"category": "lost_card"}'),
    "json": ({}, '{"sentiment": "positive", "stars": 5}', '{"stars": 5, "sentiment": "positive"}',
             '{"sentiment": "positive", "stars": 4}'),
    "text": ({}, "the card has not arrived yet", "The card has not arrived yet.", "completely unrelated words"),
}


def config(**keys):
    from serve.compare import CompareConfig

    return CompareConfig(data="unused.jsonl", **keys)


def test_every_task_of_the_table_has_a_case():
    from serve.compare import TASKS

    assert set(TASKS) == set(CASES)


@pytest.mark.filterwarnings("ignore:A single label was found")  # two answers to one reference
@pytest.mark.parametrize("name", list(CASES))
def test_each_task_scores_a_right_and_a_wrong_answer(name):
    from serve.compare import TASKS, row_score

    keys, ref, right, wrong = CASES[name]
    cfg = config(task=name, **keys)
    task = TASKS[name]
    assert row_score(cfg, ref, right) == 1.0
    assert row_score(cfg, ref, wrong) == 0.0
    assert row_score(cfg, ref, None) == 0.0  # a failed request scores as wrong

    half = task.metrics(cfg, [ref, ref], [right, wrong])
    assert half[task.headline] == 0.5
    assert task.metrics(cfg, [ref, ref], [right, right])[task.headline] == 1.0
    assert task.metrics(cfg, [ref, ref], [None, None])[task.headline] == 0.0
    assert task.plotted[0] == task.headline and all(k in half for k in task.plotted)
    assert all(key in half for _, key in task.also_printed)
    cells = [c.cell(half) for c in task.columns]
    assert all(isinstance(c, str) and c for c in cells) and "0.500" in cells


def test_label_task_without_a_label_field_takes_the_whole_answer():
    from serve.compare import TASKS, row_score

    cfg = config(task="label")
    assert row_score(cfg, "positive", " positive. ") == 1.0 and row_score(cfg, "positive", "negative") == 0.0
    m = TASKS["label"].metrics(cfg, ["a", "a", "b", "b"], ["a", "b", "b", None])
    assert m["accuracy"] == 0.5 and m["parsed"] == 0.75


def test_json_task_scores_only_the_configured_fields():
    from serve.compare import row_score

    cfg = config(task="json", json_fields=["sentiment"])
    assert row_score(cfg, '{"sentiment": "positive", "stars": 5}', '{"sentiment": "positive", "stars": 1}') == 1.0
    assert row_score(cfg, '{"sentiment": "positive"}', "not json") == 0.0


def test_config_check_names_the_tasks_of_the_table(tmp_path):
    from serve.compare import CompareConfig
    from tunekit.errors import UserError

    data = write_jsonl(tmp_path / "d.jsonl", [])
    with pytest.raises(UserError, match=r"^compare.yaml: task: 'regression'; use one of label, json, text$"):
        CompareConfig(data=str(data), task="regression").check("compare.yaml")


# ---- the runner: concurrent requests, and resume sends only what is missing ------------------

class FakeCompletions:
    """chat.completions of an AsyncOpenAI: answers 'ANSWER <user text>', or fails for the ones in fail."""

    def __init__(self, fail=()):
        self.calls: list[tuple[str, str]] = []
        self.fail = set(fail)

    async def create(self, model, messages, **sampling):
        import httpx
        import openai

        user = messages[-1]["content"]
        self.calls.append((model, user))
        await asyncio.sleep(0)
        if user in self.fail:
            raise openai.APITimeoutError(request=httpx.Request("POST", "http://fake/v1/chat/completions"))
        content = "JUDGED 1" if user.startswith("Question:") else f"ANSWER {user}"
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content),
                                                        finish_reason="stop")],
                               usage=SimpleNamespace(prompt_tokens=7, completion_tokens=2))


class FakeBackend:
    """The parts of serve.client.Backend that serve.compare uses; one fake client shared by every call."""

    name, base_url, api_key = "local", "http://fake/v1", None

    def __init__(self, fail=(), served=("base", "finetuned")):
        self.completions = FakeCompletions(fail)
        self.served = served
        self.settings = SimpleNamespace(server=SimpleNamespace(adapters={}, model="fake"))

    def async_client(self, **kwargs):
        async def close():
            pass

        return SimpleNamespace(chat=SimpleNamespace(completions=self.completions), close=close)

    def client(self, **kwargs):
        return SimpleNamespace(models=SimpleNamespace(list=lambda: [SimpleNamespace(id=m) for m in self.served]))

    def sampling_kwargs(self, **overrides):
        return {"temperature": 0.0, "max_tokens": overrides.get("max_tokens") or 8}

    def resolve(self, alias):
        return alias

    def explain(self, exc, model=None):
        return exc


def examples(n):
    from serve.compare import Example

    return [Example(i, i + 1, [{"role": "user", "content": f"q{i}"}], f"ANSWER q{i}") for i in range(n)]


def run(backend, out, exs, resume, models=("base", "finetuned"), **cfg_keys):
    from serve.compare import run_requests

    cfg = config(task="text", concurrency=3, **cfg_keys)
    return asyncio.run(run_requests(backend, cfg, {m: m for m in models}, exs, out, resume))


def test_resume_sends_only_what_is_missing(tmp_path):
    exs = examples(6)
    first = FakeBackend(fail={"q1", "q4"})
    results = run(first, tmp_path, exs, resume=False)
    assert len(first.completions.calls) == 12
    assert {i for i, r in results["base"].items() if r["error"] == "timeout"} == {1, 4}
    assert results["base"][0]["answer"] == "ANSWER q0" and results["base"][0]["input_tokens"] == 7
    raw = tmp_path / "raw/base.jsonl"
    assert len(raw.read_text().splitlines()) == 6  # every finished request, failed ones too

    # a Ctrl-C cut the last line of finetuned's file, and q5 never finished
    lines = (tmp_path / "raw/finetuned.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["idx"] != 5]
    (tmp_path / "raw/finetuned.jsonl").write_text("\n".join(kept) + "\n" + kept[-1][:20])

    second = FakeBackend()
    results = run(second, tmp_path, exs, resume=True)
    assert sorted(second.completions.calls) == [("base", "q1"), ("base", "q4"),
                                                ("finetuned", "q1"), ("finetuned", "q4"), ("finetuned", "q5")]
    for alias in ("base", "finetuned"):
        assert sorted(results[alias]) == list(range(6))
        assert all(r["error"] is None and r["answer"] == f"ANSWER q{i}" for i, r in results[alias].items())

    third = FakeBackend()
    run(third, tmp_path, exs, resume=True)
    assert third.completions.calls == []  # all done: nothing sent

    fresh = FakeBackend()
    run(fresh, tmp_path, exs, resume=False, models=("base",))
    assert len(fresh.completions.calls) == 6  # without --resume everything is sent again
    assert len(raw.read_text().splitlines()) == 6  # ... into a new file


def test_answered_reads_back_what_a_stopped_run_kept(tmp_path):
    from serve.compare.runner import answered

    run(FakeBackend(fail={"q2"}), tmp_path, examples(4), resume=False, models=("base",))
    assert sorted(answered(tmp_path, ["base"])["base"]) == [0, 1, 3]


def test_check_reachable_names_a_model_the_server_lacks():
    from serve.compare import check_reachable
    from tunekit.errors import UserError

    check_reachable(FakeBackend(), ["base", "finetuned"])
    with pytest.raises(UserError, match="model\\(s\\) nope not served by http://fake/v1; it serves base, finetuned"):
        check_reachable(FakeBackend(), ["base", "nope"])


# ---- the report: its files from a small fake result set --------------------------------------

def fake_run(task: str, cfg_keys: dict, refs: list[str], answers: dict[str, list]):
    """summaries + metrics of a run whose records are given: alias -> one answer per example (None: failed)."""
    from serve.compare import Example, summarise

    cfg = config(task=task, **cfg_keys)
    backend = FakeBackend()
    exs = [Example(i, i + 1, [{"role": "user", "content": f"q{i}"}], r) for i, r in enumerate(refs)]
    results = {}
    for alias, ans in answers.items():
        results[alias] = {i: {"idx": i, "answer": a, "error": None if a is not None else "timeout",
                              "latency_s": 0.1 * (i + 1), "input_tokens": 5, "output_tokens": 2,
                              "finish_reason": "stop", "t_start": 100.0 + i, "t_end": 100.5 + i, "model": alias}
                          for i, a in enumerate(ans)}
    summaries = [summarise(cfg, backend, a, a, exs, results[a]) for a in answers]
    metrics = {"config": {}, "backend": "local", "examples": len(exs), "sampling": {"temperature": 0.0},
               "elapsed_s": 1.0, "complete": False, "models": summaries}
    return cfg, exs, results, metrics


def test_report_writes_its_files_for_the_label_task_with_the_baseline(tmp_path):
    from serve.compare import baseline_summary, write_outputs

    refs = ['{"category": "a"}', '{"category": "b"}', '{"category": "a"}', '{"category": "b"}']
    cfg, exs, results, metrics = fake_run("label", {"label_field": "category"}, refs, {
        "base": ['{"category": "b"}', "no idea", None, '{"category": "b"}'],
        "finetuned": ['{"category": "a"}', '{"category": "b"}', '{"category": "a"}', '{"category": "b"}']})
    baseline = {"preds": ["a", "b", "b", "b"], "scores": [[.9, .1], [.2, .8], [.4, .6], [.1, .9]],
                "classes": ["a", "b"], "fit_s": 0.01, "latency_s": 0.0001, "train_examples": 8}
    metrics["models"].append(baseline_summary(cfg, exs, baseline))
    plots = write_outputs(tmp_path, cfg, exs, results, baseline, metrics)

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
    assert [r["tfidf-logreg_score"] for r in rows] == ["1.0", "1.0", "0.0", "1.0"] and rows[0]["input"] == "q0"
    report = (tmp_path / "report.md").read_text()
    assert ("| model | accuracy | macro-F1 | precision | recall | parsed | ROC AUC | failed | p50 s | p95 s "
            "| tokens in / out | cost USD |\n" + "|" + "---|" * 12) in report
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
    assert header.count("|") == 2 + len(TASKS[task].columns) + 5
    if task == "text":
        assert "LLM judge `j` (both orders, a win needs both): model 2" in report
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv", encoding="utf-8")))
    assert [float(r["model_score"]) for r in rows] == [1.0, 0.0]


def test_console_lines_show_the_headline_and_the_task_extras():
    from serve.compare.report import console_lines

    s = {"alias": "finetuned", "accuracy": 0.9, "macro_f1": 0.85, "latency_p50_s": 0.25, "failed": {"timeout": 2}}
    assert console_lines(config(task="label"), [s]) == [
        "       finetuned: accuracy 0.900, macro-F1 0.850, p50 0.250 s, failed 2"]
    assert console_lines(config(task="text"), [{**s, "rouge_l": 0.5}])[0].endswith("rouge_l 0.500, p50 0.250 s, failed 2")


# ---- main end to end on the fake backend ----------------------------------------------------

def test_main_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    import serve.compare
    import serve.compare.cli

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"ANSWER q{i}"}]}
            for i in range(5)]
    data = write_jsonl(tmp_path / "heldout.jsonl", rows)
    backend = FakeBackend(fail={"q3"})
    monkeypatch.setattr(serve.compare.cli, "load_backend", lambda *a, **k: backend)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--models", "base,finetuned"]
    assert serve.compare.main(argv) == 0
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    assert m["complete"] is False and [s["answered"] for s in m["models"]] == [4, 4]
    assert "finetuned: accuracy 0.800, macro-F1" in capsys.readouterr().out

    backend.completions = FakeCompletions()
    assert serve.compare.main([*argv, "--resume"]) == 0
    assert sorted(backend.completions.calls) == [("base", "q3"), ("finetuned", "q3")]
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    assert m["complete"] is True and [s["accuracy"] for s in m["models"]] == [1.0, 1.0]


def test_python_m_serve_compare_turns_a_user_error_into_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serve.compare", "--config", str(tmp_path / "missing.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "missing.yaml" in proc.stderr


# ---- importing serve.compare, and writing plots, leave matplotlib's backend alone ------------

def test_import_and_plots_keep_the_matplotlib_backend(tmp_path):
    script = f"""
import sys, matplotlib
matplotlib.use("svg")
before = matplotlib.get_backend()
import serve.compare, serve.compare.report, serve.compare.cli, serve.compare.runner, serve.compare.baseline
after_import = matplotlib.get_backend()
from pathlib import Path
from serve.compare import CompareConfig, plot
s = {{"alias": "m", "n": 2, "accuracy": 0.5, "macro_f1": 0.5, "latency_p50_s": 0.1, "latency_p95_s": 0.2,
     "confusion": {{"labels": ["a", "b"], "matrix": [[1, 0], [1, 0]]}}}}
files = plot(Path({str(tmp_path)!r}), CompareConfig(data="x"), [s])
print(before, after_import, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, ",".join(files))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["svg", "svg", "svg", "False", "metrics.png,latency.png,confusion_m.png"]
    assert Path(tmp_path / "confusion_m.png").stat().st_size > 1000


# ---- the flags are generated from CompareConfig's fields, and override compare.yaml ---------

def test_compare_flags_are_generated_from_the_config_fields(tmp_path):
    """Every CompareConfig key is a flag (no exclusions); a flag given overrides the YAML, the rest stay."""
    import dataclasses

    from serve.compare.cli import CompareConfig, config_overrides, parser
    from tunekit.config import load_config

    cfg_path = tmp_path / "compare.yaml"
    cfg_path.write_text("data: heldout.jsonl\nbackend: local\nlimit: 10\nconcurrency: 32\nbaseline: true\n"
                        "models: [base]\nout: runs/x\n")
    args = parser().parse_args(["--config", str(cfg_path), "--backend", "openai", "--limit", "5", "--no-baseline",
                                "--timeout_s", "30", "--json-fields", "a", "b"])
    assert set(args.config_flags) == {f.name for f in dataclasses.fields(CompareConfig)}
    cfg = load_config(CompareConfig, args.config, config_overrides(args))
    assert (cfg.backend, cfg.limit, cfg.baseline, cfg.timeout_s, cfg.json_fields) == ("openai", 5, False, 30.0,
                                                                                       ["a", "b"])
    assert (cfg.data, cfg.concurrency, cfg.models, cfg.out) == ("heldout.jsonl", 32, ["base"], "runs/x")  # the YAML's
    assert load_config(CompareConfig, args.config, config_overrides(parser().parse_args([]))).backend == "local"


def test_compare_models_flag_takes_commas_or_spaces_and_backend_is_checked():
    from serve.compare.cli import config_overrides, parser

    for argv in (["--models", "base,finetuned"], ["--models", "base", "finetuned"], ["--models", "base,", "finetuned"]):
        assert config_overrides(parser().parse_args(argv))["models"] == ["base", "finetuned"], argv
    assert config_overrides(parser().parse_args([]))["models"] is None  # not given: the YAML's models stay
    with pytest.raises(SystemExit):
        parser().parse_args(["--backend", "vllm"])


def test_compare_yaml_backend_must_be_local_or_openai(tmp_path):
    from serve.compare.cli import CompareConfig
    from tunekit.config import load_config
    from tunekit.errors import UserError

    bad = tmp_path / "compare.yaml"
    bad.write_text("data: x.jsonl\nbackend: vllm\n")
    with pytest.raises(UserError, match=r"compare.yaml: backend is 'vllm'; use one of 'local', 'openai'"):
        load_config(CompareConfig, bad)
