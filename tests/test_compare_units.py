"""serve.compare without a server: the task table, the runner's resume, the report files, the backend."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compare_fakes import FakeBackend, FakeCompletions, config
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
    by_field = config(task="label", label_field="category")
    assert row_score(by_field, "no json", "no json either") == 0.0  # no label on either side is no match




def test_json_task_scores_only_the_configured_fields():
    from serve.compare import row_score

    cfg = config(task="json", json_fields=["sentiment"])
    assert row_score(cfg, '{"sentiment": "positive", "stars": 5}', '{"sentiment": "positive", "stars": 1}') == 1.0
    assert row_score(cfg, '{"sentiment": "positive"}', "not json") == 0.0
    assert row_score(cfg, "[1, 2]", '{"sentiment": null}') == 1.0  # a reference that is no object: {}
    assert row_score(config(task="json"), "[1, 2]", "[1, 2]") == 0.0  # an answer that is no object


def test_config_check_names_the_tasks_of_the_table(tmp_path):
    from serve.compare import CompareConfig
    from tunekit.errors import UserError

    data = write_jsonl(tmp_path / "d.jsonl", [])
    with pytest.raises(UserError, match=r"^compare.yaml: task: 'regression'; use one of label, json, text$"):
        CompareConfig(data=str(data), task="regression").check("compare.yaml")


# ---- the runner: concurrent requests, and resume sends only what is missing ------------------


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


def test_the_judge_asks_while_the_started_server_is_up_and_counts_failures(tmp_path, monkeypatch):
    """--start-server with a text task and judge_model: every judge request is sent before the server
    stops (it was once sent after, and each verdict failed); a failed verdict is `failed`, not a tie."""
    import serve.compare
    import serve.compare.cli

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"ANSWER q{i}"}]}
            for i in range(3)]
    data = write_jsonl(tmp_path / "heldout.jsonl", rows)
    backend = FakeBackend()
    events = []

    class Server:
        def stop(self):
            events.append(("stop", len(backend.completions.calls)))

    monkeypatch.setattr(serve.compare.cli, "load_backend", lambda *a, **k: backend)
    monkeypatch.setattr(serve.compare.cli, "start_server", lambda b: Server())
    original = backend.completions.create

    async def create(model, messages, **sampling):  # the judge's prompt about q1 fails, once per order
        if messages[-1]["content"].startswith("Question:\nq1"):
            backend.completions.calls.append((model, "judge q1"))
            raise RuntimeError("connection refused")
        return await original(model, messages, **sampling)

    backend.completions.create = create
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--models", "base,finetuned", "--task", "text",
            "--judge-model", "base", "--start-server"]
    assert serve.compare.main(argv) == 0
    judge_calls = [c for c in backend.completions.calls if c[1].startswith(("Question:", "judge"))]
    assert len(judge_calls) == 6 and events == [("stop", 12)]  # 6 answers, then 6 verdicts, then the stop
    verdicts = json.loads((tmp_path / "out/metrics.json").read_text())["judge"]
    assert verdicts == [{"judge": "base", "pair": ["base", "finetuned"], "tie_or_inconsistent": 2, "failed": 1,
                         "failed_reason": "RuntimeError: connection refused"}]
    report = (tmp_path / "out/report.md").read_text()
    assert "failed 1 (the first failure: RuntimeError: connection refused)" in report


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

    from serve.compare.cli import config_overrides, parser
    from serve.compare.config import CompareConfig
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
    from serve.compare.config import CompareConfig
    from tunekit.config import load_config
    from tunekit.errors import UserError

    bad = tmp_path / "compare.yaml"
    bad.write_text("data: x.jsonl\nbackend: vllm\n")
    with pytest.raises(UserError, match=r"compare.yaml: backend is 'vllm'; use one of 'local', 'openai'"):
        load_config(CompareConfig, bad)
