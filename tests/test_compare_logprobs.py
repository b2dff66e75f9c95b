"""serve.compare's ROC AUC of the language models, from the top log-probabilities of the label's first token; and
the preference accuracy against the session's real server (its fakes: test_compare_preference.py)."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, SMOL_TOY, chat_rows, write_jsonl


def lp(p: float) -> float:
    return math.log(p)


# ---- the mapping from hand-made top_logprobs to class scores ----------------------------------

def test_a_plain_label_is_read_at_its_first_token():
    from serve.compare import class_scores, label_start

    tokens = [("AL", [("AL", lp(.6)), ("BR", lp(.3)), ("the", lp(.1))]), ("PHA", [("PHA", lp(.99))])]
    assert label_start(tokens, None) == (0, "")
    assert class_scores(tokens, ["ALPHA", "BRAVO"], None) == {"ALPHA": pytest.approx(2 / 3, abs=1e-6),
                                                             "BRAVO": pytest.approx(1 / 3, abs=1e-6)}
    # leading blank tokens are skipped; the alternatives are stripped and lower-cased
    tokens = [("\n", [("\n", lp(.9))]), (" bravo", [(" bravo", lp(.5)), ("Alpha", lp(.25)), (" ", lp(.2))])]
    assert label_start(tokens, None) == (1, " ")  # the token, and its part before the label
    assert class_scores(tokens, ["ALPHA", "BRAVO"], None) == {"ALPHA": pytest.approx(1 / 3, abs=1e-6),
                                                             "BRAVO": pytest.approx(2 / 3, abs=1e-6)}


def test_a_json_answer_is_read_where_the_label_fields_value_starts():
    from serve.compare import class_scores, label_start

    classes = ["card_arrival", "card_linking", "lost_card"]
    tokens = [('{"', []), ("category", []), ('":', []), (' "', []),
              ("card", [("card", lp(.5)), ("lost", lp(.3)), ("Card", lp(.1)), ("x", lp(.1))]),
              ("_arr", []), ("ival", []), ('"}', [])]
    assert label_start(tokens, "category") == (4, "")
    # "card" starts two classes: each gets its mass; normalised over the classes
    assert class_scores(tokens, classes, "category") == {"card_arrival": 0.4, "card_linking": 0.4, "lost_card": 0.2}

    # the value starts inside a token that also holds the opening quote, after another field
    tokens = [('{"stars": 5, "label":', []), (' "pos', [(' "pos', lp(.7)), (' "neg', lp(.2)), (' "', lp(.1))]),
              ('itive"}', [])]
    assert label_start(tokens, "label") == (1, ' "')
    assert class_scores(tokens, ["negative", "positive"], "label") == {"negative": pytest.approx(2 / 9, abs=1e-6),
                                                                       "positive": pytest.approx(7 / 9, abs=1e-6)}
    # a one-token value with its closing quote
    tokens = [('{"label": "', []), ('a"', [('a"', lp(.8)), ('b"}', lp(.2))]), ("}", [])]
    assert class_scores(tokens, ["a", "b"], "label") == {"a": 0.8, "b": 0.2}


def test_no_mass_on_a_class_or_no_label_gives_uniform_scores():
    from serve.compare import class_scores, label_start

    assert class_scores([("Hello", [("Hello", 0.0)])], ["ALPHA", "BRAVO"], None) == {"ALPHA": 0.5, "BRAVO": 0.5}
    tokens = [('{"other": "a"}', [('{"other": "a"}', 0.0)])]
    assert label_start(tokens, "label") is None
    assert class_scores(tokens, ["a", "b", "c"], "label") == {c: round(1 / 3, 6) for c in "abc"}
    assert class_scores([], ["a", "b"], None) == {"a": 0.5, "b": 0.5}  # a reply without log-probabilities
    assert label_start([('{"label": "', [])], "label") is None  # the value never starts


def test_score_matrix_fills_what_is_missing():
    import numpy as np

    from serve.compare.logprobs import score_matrix

    m = score_matrix([{"class_scores": {"b": 0.75, "a": 0.25}}, {"class_scores": {"c": 1.0}}, None,
                      {"answer": "x"}], ["a", "b", "c"])
    assert np.allclose(m, [[.25, .75, 0], [0, 0, 1], [1 / 3] * 3, [1 / 3] * 3]) and np.allclose(m.sum(axis=1), 1)


def test_reply_tokens_reads_the_sdk_shape():
    from openai.types.chat import ChatCompletion

    from serve.compare.logprobs import reply_tokens

    reply = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "AL"},
                     "logprobs": {"content": [{"token": "AL", "logprob": -0.1, "bytes": None,
                                               "top_logprobs": [{"token": "AL", "logprob": -0.1, "bytes": None},
                                                                {"token": "BR", "logprob": -2.0, "bytes": None}]}]}}]})
    assert reply_tokens(reply.choices[0]) == [("AL", [("AL", -0.1), ("BR", -2.0)])]
    assert reply_tokens(SimpleNamespace(message=None)) == []


# ---- the runner asks for them, keeps the class scores, and resumes ----------------------------

class LogprobCompletions:
    """finetuned answers the right code word with p=0.8; base answers prose with no mass on a class."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []

    async def create(self, model, messages, **kwargs):
        user = messages[-1]["content"]
        self.calls.append((model, user, kwargs))
        await asyncio.sleep(0)
        right, other = ("ALPHA", "BRAVO") if int(user.split()[-1]) % 2 else ("BRAVO", "ALPHA")
        text, top = (right, [(right[:2], .8), (other[:2], .2)]) if model == "finetuned" else ("Sure", [("Sure", 1.)])
        tokens = [SimpleNamespace(token=text[:2], logprob=math.log(top[0][1]),
                                  top_logprobs=[SimpleNamespace(token=t, logprob=math.log(p)) for t, p in top])]
        logprobs = SimpleNamespace(content=tokens) if kwargs.get("logprobs") else None
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text), finish_reason="stop",
                                                        logprobs=logprobs)],
                               usage=SimpleNamespace(prompt_tokens=7, completion_tokens=2))


def test_runner_keeps_class_scores_and_resume_sends_what_lacks_them(tmp_path):
    from serve.compare import CompareConfig, Example, RawStore, run_requests, summarise

    completions = LogprobCompletions()

    async def close():
        pass

    backend = SimpleNamespace(name="local", async_client=lambda **k: SimpleNamespace(
        chat=SimpleNamespace(completions=completions), close=close), sampling_kwargs=lambda **k: {"temperature": 0.0})
    exs = [Example(i, i + 1, [{"role": "user", "content": f"code {i}"}], "ALPHA" if i % 2 else "BRAVO")
           for i in range(6)]
    models, classes = {"base": "base", "finetuned": "finetuned"}, ["ALPHA", "BRAVO"]

    def run(resume, **keys):
        cfg = CompareConfig(data="unused", task="label", concurrency=2, **keys)
        return cfg, asyncio.run(run_requests(backend, cfg, models, exs, tmp_path, resume,
                                             classes if cfg.logprobs else None))  # as main passes them

    run(False)  # without logprobs: nothing asked, nothing kept
    assert all("logprobs" not in kw for _, _, kw in completions.calls) and len(completions.calls) == 12
    cfg, results = run(True, logprobs=True)  # kept answers lack class scores: sent again, asking for them
    assert len(completions.calls) == 24
    assert all(kw["logprobs"] is True and kw["top_logprobs"] == 20 for _, _, kw in completions.calls[12:])
    assert results["finetuned"][1]["class_scores"] == {"ALPHA": 0.8, "BRAVO": 0.2}
    assert results["base"][1]["class_scores"] == {"ALPHA": 0.5, "BRAVO": 0.5}
    saved = RawStore(tmp_path, "finetuned").load()  # what --resume reads back
    assert saved[2]["class_scores"] == {"ALPHA": 0.2, "BRAVO": 0.8} and len(saved) == 6
    assert "logprob" not in (tmp_path / "raw/finetuned.jsonl").read_text()  # scores are kept, not log-probabilities
    cfg, results = run(True, logprobs=True)
    assert len(completions.calls) == 24  # all kept with their scores: nothing sent

    by = {a: summarise(cfg, backend, a, a, exs, results[a], classes) for a in models}
    assert by["finetuned"]["roc_auc"] == 1.0 and by["base"]["roc_auc"] == 0.5
    assert by["finetuned"]["accuracy"] == 1.0 and by["base"]["off_label"] == 1.0  # "Sure": parsed, not a class
    cfg_off = CompareConfig(data="unused", task="label")
    assert "roc_auc" not in summarise(cfg_off, backend, "finetuned", "finetuned", exs, results["finetuned"], classes)


# ---- against the session's real vLLM server ---------------------------------------------------

@pytest.mark.slow
def test_logprobs_give_the_language_models_a_roc_auc(vllm_server, tmp_path):
    write_jsonl(tmp_path / "heldout.jsonl", chat_rows(SMOL_TOY[:8]))  # binary: ALPHA / BRAVO
    write_jsonl(tmp_path / "train.jsonl", chat_rows(SMOL_TOY) * 2)
    out = tmp_path / "out"
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(yaml.safe_dump({"serve_config": str(vllm_server.config), "data": str(tmp_path / "heldout.jsonl"),
                                   "train_data": str(tmp_path / "train.jsonl"), "task": "label",
                                   "models": ["base", "finetuned"], "logprobs": True, "concurrency": 8,
                                   "out": str(out)}))
    proc = subprocess.run([sys.executable, "-m", "serve.compare", "--config", str(cfg)], cwd=ROOT,
                          env=vllm_server.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    by = {m["alias"]: m for m in metrics["models"]}
    for alias in ("base", "finetuned"):
        assert 0.0 <= by[alias]["roc_auc"] <= 1.0, by[alias]
        saved = [json.loads(ln) for ln in (out / f"raw/{alias}.jsonl").read_text().splitlines()]
        assert len(saved) == 8
        for rec in saved:
            assert set(rec["class_scores"]) <= {"ALPHA", "BRAVO"}
            assert sum(rec["class_scores"].values()) == pytest.approx(1.0, abs=1e-4)
    report = (out / "report.md").read_text()
    assert "ROC AUC of the language models: from the first label token's top-20 log-probabilities" in report
    assert "- finetuned vs base: accuracy +" in report and len(list(csv.DictReader(open(out / "predictions.csv")))) == 8

    proc = subprocess.run([sys.executable, "-m", "serve.compare", "--config", str(cfg), "--resume"], cwd=ROOT,
                          env=vllm_server.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "raw/finetuned.jsonl").read_text().splitlines()) == 8  # the scores were kept: nothing sent
    assert json.loads((out / "metrics.json").read_text())["models"][1]["roc_auc"] == by["finetuned"]["roc_auc"]


@pytest.mark.slow
def test_preference_accuracy_from_the_servers_log_probabilities(vllm_server, smol_adapter, tmp_path, monkeypatch):
    """4 code-word pairs scored by the session's server, base and adapter: each answer's log-probability is
    the one HF computes in-process over the same tokens (the answer and the end of turn after the rendered
    prompt; vLLM's CPU dtype differs a little), so pairs rank as HF ranks them; the adapter trained on the
    pairs' answers widens the margin."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import SMOL
    from serve.client import load_backend
    from serve.compare import CompareConfig
    from serve.compare.preference import load_pairs, preference_summary, run_preferences

    monkeypatch.setenv("TUNEKIT_API_KEY", vllm_server.api_key)
    rows = [{"input": {"messages": chat_rows([(q, a)])[0]["messages"][:2]},
             "preferred_output": [{"role": "assistant", "content": a}],
             "non_preferred_output": [{"role": "assistant", "content": "BRAVO" if a == "ALPHA" else "ALPHA"}]}
            for q, a in SMOL_TOY[:4]]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    backend = load_backend(vllm_server.config)
    cfg = CompareConfig(data="unused", concurrency=4)
    models = {"base": backend.resolve("base"), "finetuned": backend.resolve("finetuned")}
    results = asyncio.run(run_preferences(backend, cfg, models, pairs, tmp_path, resume=False))
    by = {a: preference_summary(cfg, pairs, results[a]) for a in models}
    assert by["base"]["preference_failed"] == by["finetuned"]["preference_failed"] == 0
    assert by["finetuned"]["preference_margin"] > by["base"]["preference_margin"] + 1

    tok = AutoTokenizer.from_pretrained(SMOL)
    base = AutoModelForCausalLM.from_pretrained(SMOL).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SMOL), smol_adapter).eval()
    for alias, model in (("base", base), ("finetuned", tuned)):
        for pair in pairs:
            hf = {}
            for key, answer in (("preferred", pair.preferred), ("non_preferred", pair.non_preferred)):
                p = tok.apply_chat_template(pair.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
                full = tok.apply_chat_template([*pair.messages, {"role": "assistant", "content": answer}],
                                               tokenize=True, return_dict=True)["input_ids"]
                with torch.no_grad():
                    logp = model(torch.tensor([full])).logits[0, :-1].float().log_softmax(-1)
                hf[key] = float(sum(logp[i, full[i + 1]] for i in range(len(p) - 1, len(full) - 1)))
                assert results[alias][pair.idx][key] == pytest.approx(hf[key], rel=0.05, abs=0.5), (alias, pair, key)
            rec = results[alias][pair.idx]
            if abs(hf["preferred"] - hf["non_preferred"]) > 1:  # the same ranking, but for near-ties (bf16 noise)
                assert (rec["preferred"] > rec["non_preferred"]) == (hf["preferred"] > hf["non_preferred"])
