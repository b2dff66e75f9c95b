"""Fakes shared by the serve.compare tests that need no server: a config, a backend, a finished run."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


def config(**keys):
    from serve.compare import CompareConfig

    return CompareConfig(data="unused.jsonl", **keys)


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
