"""serve.compare's preference accuracy (``preference_data``) on a fake vLLM server: /tokenize renders a
word-level chat template, /v1/completions echoes known log-probabilities; the scores, CIs, report and resume."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from compare_fakes import FakeBackend, config
from conftest import write_jsonl

SYSTEM = "Classify the card question."
# (query, preferred, non-preferred)
PAIRS = [("where is my card", "card_arrival", "card_linking"), ("card was eaten", "card_swallowed", "card_arrival"),
         ("link my card", "card_linking", "card_arrival"), ("card declined", "declined_card_payment", "card_arrival")]
# model -> per pair (preferred, non-preferred) log-probabilities of the answer's tokens and end of turn
LOGP = {"base": [(-4.0, -3.0), (-6.0, -5.5), (-2.0, -2.5), (-9.0, -8.0)],  # 1 of 4 right
        "finetuned": [(-1.0, -3.0), (-0.5, -4.5), (-0.2, -2.2), (-3.0, -2.0)],  # 3 of 4
        "sft_dpo": [(-0.5, -6.5), (-0.1, -8.1), (-0.1, -5.1), (-1.0, -4.0)]}  # 4 of 4
PROMPT_LOGP = -7.0  # every prompt token's: must not count


def dpo_rows(pairs=PAIRS) -> list[dict]:
    return [{"input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]},
             "preferred_output": [{"role": "assistant", "content": good}],
             "non_preferred_output": [{"role": "assistant", "content": bad}]} for q, good, bad in pairs]


class FakeVLLM:
    """POST /tokenize (a word-level template: role id, word ids, end id per message; the generation prompt is
    the assistant's role id) and completions with echo: each answer token gets an equal share of LOGP."""

    ROLE = {"system": 1, "user": 2, "assistant": 3}
    END = 4

    def __init__(self, fail_tokenize=(), fail_score=()):
        self.vocab: dict[str, int] = {}
        self.answers: dict[tuple, tuple[str, int, int]] = {}  # full ids -> (answer, pair, where it starts)
        self.posts, self.creates = [], []
        self.fail_tokenize, self.fail_score = set(fail_tokenize), set(fail_score)

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    async def post(self, url, cast_to, body):
        self.posts.append((url, body))
        await asyncio.sleep(0)
        msgs = body["messages"]
        query = msgs[1]["content"]
        if query in self.fail_tokenize:
            raise RuntimeError("tokenizer exploded")
        ids = []
        for m in msgs:
            ids += [self.ROLE[m["role"]], *self.ids(m["content"]), self.END]
        if body["add_generation_prompt"]:
            ids.append(self.ROLE["assistant"])
        if msgs[-1]["role"] == "assistant":
            pair = next(i for i, p in enumerate(PAIRS) if p[0] == query)
            self.answers[tuple(ids)] = (msgs[-1]["content"], pair, len(ids) - len(self.ids(msgs[-1]["content"])) - 1)
        return {"tokens": ids, "count": len(ids), "max_model_len": 512}

    async def create(self, model, prompt, **kwargs):
        self.creates.append((model, kwargs))
        await asyncio.sleep(0)
        choices = []
        for i, ids in enumerate(prompt):
            answer, pair, start = self.answers[tuple(ids)]
            if (model, pair) in self.fail_score:
                import httpx
                import openai

                raise openai.APITimeoutError(request=httpx.Request("POST", "http://fake/v1/completions"))
            good, bad = LOGP[model][pair]
            total = good if answer == PAIRS[pair][1] else bad
            n = len(ids) - start
            logps = [None] + [PROMPT_LOGP] * (start - 1) + [total / n] * n
            choices.append(SimpleNamespace(index=i, text="", logprobs=SimpleNamespace(token_logprobs=logps)))
        return SimpleNamespace(choices=choices)


class PreferenceBackend(FakeBackend):
    def __init__(self, server: FakeVLLM, served=("base", "finetuned", "sft_dpo")):
        super().__init__(served=served)
        self.server = server

    def async_client(self, **kwargs):
        client = super().async_client(**kwargs)
        client.post = self.server.post
        client.completions = SimpleNamespace(create=self.server.create)
        return client


def expected_ci(rows: list[float], resamples: int = 1000, seed: int = 0) -> list[float]:
    """The percentile bootstrap of the mean, computed here by hand."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.asarray(rows)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])]


def test_scores_come_from_the_answer_tokens_after_the_servers_prompt(tmp_path):
    from serve.compare.preference import load_pairs, preference_deltas, preference_summary, run_preferences

    write_jsonl(tmp_path / "pairs.jsonl", dpo_rows())
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    server = FakeVLLM()
    cfg = config(concurrency=3)
    models = {a: a for a in LOGP}
    results = asyncio.run(run_preferences(PreferenceBackend(server), cfg, models, pairs, tmp_path, resume=False))
    for alias in models:  # the answers' log-probabilities, the prompt's left out
        assert [(r["preferred"], r["non_preferred"]) for r in map(results[alias].get, range(4))] == \
            [pytest.approx(x) for x in LOGP[alias]]
    # three renderings per pair (the prompt with the generation prompt, prompt + each answer) at the server's root
    assert len(server.posts) == 12 and {url for url, _ in server.posts} == {"http://fake/tokenize"}
    assert sum(b["add_generation_prompt"] for _, b in server.posts) == 4
    assert all(b["add_special_tokens"] is False and b["model"] == "base" for _, b in server.posts)
    # one completions request per pair and model, both answers in it, nothing generated
    assert len(server.creates) == 12
    assert all(kw == {"max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0} for _, kw in server.creates)

    by = {a: preference_summary(cfg, pairs, results[a]) for a in models}
    assert [by[a]["preference_accuracy"] for a in models] == [0.25, 0.75, 1.0]
    assert by["finetuned"]["preference_accuracy_ci95"] == expected_ci([1, 1, 1, 0])
    assert by["base"]["preference_accuracy_ci95"] == expected_ci([0, 0, 1, 0])
    assert by["sft_dpo"]["preference_accuracy_ci95"] == [1.0, 1.0]
    assert by["finetuned"]["preference_margin"] == pytest.approx((2 + 4 + 2 - 1) / 4)
    assert by["finetuned"]["preference_margin_ci95"] == expected_ci([2, 4, 2, -1])
    assert by["base"]["preference_failed"] == 0 and by["base"]["preference_pairs"] == 4

    deltas = preference_deltas(cfg, pairs, results)  # each model against the one before it
    assert [(d["model"], d["against"], d["delta"]) for d in deltas] == [("finetuned", "base", 0.5),
                                                                       ("sft_dpo", "finetuned", 0.25)]
    assert deltas[1]["ci95"] == expected_ci([0, 0, 0, 1])


def test_main_reports_preference_accuracy_counts_failures_and_resumes(tmp_path, monkeypatch, capsys):
    import serve.compare
    import serve.compare.cli

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"ANSWER q{i}"}]}
            for i in range(3)]
    data = write_jsonl(tmp_path / "heldout.jsonl", rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", dpo_rows())
    server = FakeVLLM(fail_tokenize={"card declined"}, fail_score={("finetuned", 0)})
    backend = PreferenceBackend(server)
    monkeypatch.setattr(serve.compare.cli, "load_backend", lambda *a, **k: backend)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--train-data", str(data), "--out", str(out), "--models", "base,finetuned,sft_dpo",
            "--preference-data", str(pairs), "--bootstrap", "200"]
    assert serve.compare.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    by = {m["alias"]: m for m in metrics["models"]}
    # pair 3 failed to render (every model), pair 0 failed for finetuned: failures count as wrong
    assert [by[a]["preference_failed"] for a in LOGP] == [1, 2, 1]
    assert [by[a]["preference_accuracy"] for a in LOGP] == [0.25, 0.5, 0.75]
    assert by["finetuned"]["preference_margin"] == pytest.approx(3.0)  # the margins of the scored pairs
    assert "preference_accuracy" not in by["tfidf-logreg"]
    assert [d["model"] for d in metrics["preference_deltas"]] == ["finetuned", "sft_dpo"]
    saved = [json.loads(x) for x in (out / "raw/finetuned.preference.jsonl").read_text().splitlines()]
    assert sorted(r["error"] or "" for r in saved) == ["", "", "timeout", "tokenize_RuntimeError"]

    printed = capsys.readouterr().out
    assert "sft_dpo: accuracy 1.000, macro-F1 1.000, preference accuracy 0.750 [" in printed
    assert "  sft_dpo vs finetuned: preference_accuracy +0.250 [95% CI" in printed
    report = (out / "report.md").read_text()
    section = report[report.index("## Preference accuracy"):]
    assert f"4 preference pairs from `{pairs}`" in section and "(200 resamples, seed 0)" in section
    assert "| sft_dpo | 0.750 | [" in section and "| +6.333 |" in section
    assert "- finetuned vs base: preference_accuracy +0.250" in section

    # --resume sends only the failed ones; with the server mended every model has every pair
    server.fail_tokenize, server.fail_score = set(), set()
    server.posts, server.creates = [], []
    assert serve.compare.main([*argv, "--resume"]) == 0
    assert len(server.posts) == 6  # pairs 0 and 3 rendered again
    assert sorted(m for m, _ in server.creates) == ["base", "finetuned", "finetuned", "sft_dpo"]
    by = {m["alias"]: m for m in json.loads((out / "metrics.json").read_text())["models"]}
    assert [by[a]["preference_accuracy"] for a in LOGP] == [0.25, 0.75, 1.0]
    assert [by[a]["preference_failed"] for a in LOGP] == [0, 0, 0]


def test_preference_config_mistakes_are_one_line(tmp_path, monkeypatch):
    import serve.compare
    import serve.compare.cli
    from tunekit.errors import UserError

    data = write_jsonl(tmp_path / "heldout.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}])
    with pytest.raises(UserError, match="preference_data: .*nope.jsonl not found"):
        config(preference_data=str(tmp_path / "nope.jsonl")).check("compare.yaml")
    with pytest.raises(UserError, match="preference_limit: applies to preference_data, which is not set"):
        config(preference_limit=5).check("compare.yaml")
    bad = dpo_rows()[:2]
    bad[1]["non_preferred_output"] = []
    write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(UserError, match=r"preference_data: .*bad.jsonl is not valid DPO JSONL: .*bad.jsonl:2: "
                                        r"invalid_non_preferred_output"):
        serve.compare.main(["--data", str(data), "--preference-data", str(tmp_path / "bad.jsonl"),
                            "--out", str(tmp_path / "out")])
    write_jsonl(tmp_path / "pairs.jsonl", dpo_rows())
    from serve.compare.preference import load_pairs

    assert [p.preferred for p in load_pairs(tmp_path / "pairs.jsonl", limit=2)] == ["card_arrival", "card_swallowed"]
    backend = FakeBackend()
    backend.name = "openai"
    monkeypatch.setattr(serve.compare.cli, "load_backend", lambda *a, **k: backend)
    with pytest.raises(UserError, match="preference_data: needs the local vLLM backend"):
        serve.compare.main(["--data", str(data), "--preference-data", str(tmp_path / "pairs.jsonl"),
                            "--out", str(tmp_path / "out")])
