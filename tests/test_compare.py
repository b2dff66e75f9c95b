"""serve.compare: scoring functions, and whole runs against the session's real vLLM server."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, SMOL_TOY, chat_rows, ctrl_c_able, free_port, write_jsonl


# ---- scoring, on known answers --------------------------------------------------------------

def test_parse_json_finds_the_object_in_prose():
    from serve.compare import extract_label, parse_json

    assert parse_json('Sure! ```json\n{"category": "card_arrival"}\n```') == {"category": "card_arrival"}
    assert parse_json("no json {here") is None
    assert extract_label('{"category": "x"} trailing', "category") == "x"
    assert extract_label('{"other": 1}', "category") is None
    assert extract_label(" positive. ", None) == "positive"


def test_label_metrics_match_hand_computed_values():
    from serve.compare import label_metrics

    refs = ["a", "a", "b", "b"]
    m = label_metrics(refs, ["a", "b", "b", None])
    assert m["accuracy"] == 0.5 and m["parsed"] == 0.75
    # a: P=1 R=.5 F=.667; b: P=.5 R=.5 F=.5 -> macro F1 .5833
    assert m["macro_f1"] == pytest.approx(0.5833, abs=1e-4)
    assert m["confusion"]["labels"] == ["a", "b", "<unparsed>"]
    assert m["confusion"]["matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    auc = label_metrics(refs, ["a", "a", "b", "b"], scores=[[.9, .1], [.6, .4], [.3, .7], [.2, .8]],
                        classes=["a", "b"])
    assert auc["roc_auc"] == 1.0


def test_json_and_text_scores():
    from serve.compare import json_metrics, rouge_l

    refs = ['{"sentiment": "positive", "stars": 5}', '{"sentiment": "negative", "stars": 1}']
    m = json_metrics(refs, ['{"sentiment": "positive", "stars": 4}', "not json"], [])
    assert m["valid_json"] == 0.5 and m["exact_match"] == 0.0
    assert m["field_accuracy"] == {"sentiment": 0.5, "stars": 0.0}
    assert rouge_l("the card has not arrived", "the card has not arrived") == 1.0
    assert rouge_l("card arrived", "my card has arrived") == pytest.approx(2 * (1 * .5) / 1.5)
    assert rouge_l("", "x") == 0.0


# ---- whole runs against the real server -----------------------------------------------------

@pytest.fixture(scope="module")
def toy_compare(vllm_server, tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    write_jsonl(d / "heldout.jsonl", chat_rows(SMOL_TOY))
    write_jsonl(d / "train.jsonl", chat_rows(SMOL_TOY) * 2)

    def config(**overrides):
        cfg = {"serve_config": str(vllm_server.config), "data": str(d / "heldout.jsonl"),
               "train_data": str(d / "train.jsonl"), "task": "label", "models": ["base", "finetuned"],
               "concurrency": 8, "out": str(d / "out"), **overrides}
        path = d / f"compare-{len(list(d.glob('compare-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return d, config


def run_compare(server, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "serve.compare", *args], cwd=ROOT, env=server.env(),
                          capture_output=True, text=True, timeout=timeout)


def test_compare_scores_base_finetuned_and_baseline(vllm_server, toy_compare, openapi_validate):
    d, config = toy_compare
    proc = run_compare(vllm_server, "--config", str(config()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((d / "out/metrics.json").read_text())
    by = {m["alias"]: m for m in metrics["models"]}
    assert set(by) == {"base", "finetuned", "tfidf-logreg"}
    assert by["finetuned"]["accuracy"] >= 0.9 and by["base"]["accuracy"] == 0.0
    assert by["tfidf-logreg"]["accuracy"] == 1.0 and by["tfidf-logreg"]["roc_auc"] == 1.0  # red/blue is one word
    for m in ("base", "finetuned"):
        assert by[m]["answered"] == 16 and by[m]["failed"] == {}
        assert by[m]["latency_p50_s"] > 0 and by[m]["latency_p95_s"] >= by[m]["latency_p50_s"]
        assert by[m]["input_tokens"] > 16 * 10 and by[m]["output_tokens"] > 0
        assert by[m]["cost_usd"] == 0.0
    rows = list(csv.DictReader(open(d / "out/predictions.csv")))
    assert len(rows) == 16 and rows[0]["reference"] == SMOL_TOY[0][1]
    assert {"input", "reference", "base_answer", "finetuned_answer", "finetuned_score", "tfidf-logreg_answer"} <= set(rows[0])
    report = (d / "out/report.md").read_text()
    assert "| finetuned (`finetuned`) |" in report and "![metrics.png](metrics.png)" in report
    for png in ("metrics.png", "latency.png", "confusion_finetuned.png"):
        assert (d / "out" / png).stat().st_size > 1000
    assert "finetuned: accuracy" in proc.stdout and "report: " in proc.stdout


def test_failures_are_counted_then_resume_finishes(vllm_server, toy_compare):
    d, config = toy_compare
    out = d / "failing"
    proc = run_compare(vllm_server, "--config", str(config(timeout_s=0.001, max_retries=0, out=str(out),
                                                           models=["finetuned"])))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    fin = m["models"][0]
    assert fin["failed"] == {"timeout": 16} and fin["answered"] == 0 and fin["accuracy"] == 0.0
    assert m["complete"] is False
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 16 and all(r["finetuned_error"] == "timeout" for r in rows)
    assert '"timeout": 16' in (out / "report.md").read_text()

    proc = run_compare(vllm_server, "--config", str(config(out=str(out), models=["finetuned"])), "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fin = json.loads((out / "metrics.json").read_text())["models"][0]
    assert fin["failed"] == {} and fin["answered"] == 16 and fin["accuracy"] >= 0.9


def test_ctrl_c_keeps_answers_and_resume_sends_only_the_rest(vllm_server, toy_compare):
    d, config = toy_compare
    out = d / "interrupted"
    many = chat_rows(SMOL_TOY) * 2
    write_jsonl(d / "many.jsonl", many)
    cfg = config(out=str(out), data=str(d / "many.jsonl"), concurrency=1, models=["finetuned"], baseline=False)
    proc = subprocess.Popen([sys.executable, "-m", "serve.compare", "--config", str(cfg)], cwd=ROOT,
                            env=vllm_server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_able)
    raw = out / "raw/finetuned.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not raw.exists() or len(raw.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)  # it writes the partial report first
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    kept = len(raw.read_text().splitlines())
    assert 5 <= kept < len(many)
    assert json.loads((out / "metrics.json").read_text())["complete"] is False

    proc = run_compare(vllm_server, "--config", str(cfg), "--resume", "--concurrency", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(raw.read_text().splitlines()) == len(many)  # only the missing ones were sent
    fin = json.loads((out / "metrics.json").read_text())["models"][0]
    assert fin["answered"] == len(many) and fin["accuracy"] >= 0.9


def test_unknown_model_and_bad_config_are_clear(vllm_server, toy_compare, tmp_path):
    d, config = toy_compare
    proc = run_compare(vllm_server, "--config", str(config(models=["nope"])))
    assert proc.returncode == 2 and "model(s) nope not served" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": str(tmp_path / "missing.jsonl"), "task": "regression"}))
    proc = run_compare(vllm_server, "--config", str(bad))
    assert proc.returncode == 2
    assert "missing.jsonl not found" in proc.stderr and "task: 'regression'" in proc.stderr


def test_start_server_with_extra_adapters_compares_a_checkpoint(vllm_server, smol_adapter, toy_compare, tmp_path):
    """--start-server --adapter NAME=DIR: a training checkpoint is served and scored beside the final adapter."""
    d, config = toy_compare
    serve = yaml.safe_load(vllm_server.config.read_text())
    serve["server"].update(port=free_port(), adapters={})  # a second server, nothing served but the base
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text(yaml.safe_dump(serve))
    cfg = config(serve_config=str(serve_cfg), out=str(tmp_path / "out"), models=["ckpt10", "finetuned"],
                 baseline=False)
    proc = run_compare(vllm_server, "--config", str(cfg), "--adapter", "x=y")
    assert proc.returncode == 2 and "--adapter needs --start-server" in proc.stderr
    ckpt = smol_adapter / "checkpoint-10"
    proc = run_compare(vllm_server, "--config", str(cfg), "--limit", "8", "--start-server",
                       "--adapter", f"ckpt10={ckpt}", "--adapter", f"finetuned={smol_adapter}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {m["alias"]: m for m in json.loads((tmp_path / "out/metrics.json").read_text())["models"]}
    assert set(by) == {"ckpt10", "finetuned"}
    assert by["ckpt10"]["answered"] == by["finetuned"]["answered"] == 8
    assert by["finetuned"]["accuracy"] >= 0.9
