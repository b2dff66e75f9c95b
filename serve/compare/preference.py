"""Preference accuracy from the server's log-probabilities (``preference_data``: OpenAI's DPO JSONL).

Each pair (``input.messages``, a preferred and a non-preferred answer) is scored under every compared model
by the vLLM server itself, nothing recomputed in-process:

1. ``POST /tokenize`` (vLLM's, at the server's root) with ``messages`` renders the pair's prompt through the
   server's own chat template (``add_generation_prompt: true``), and the prompt plus each answer as the
   assistant's turn (``add_generation_prompt: false``); ``add_special_tokens: false``, the template adds
   them. Once per pair: vLLM 0.32 has one tokenizer and template for the base model and its adapters.
2. ``POST /v1/completions`` with both token-id sequences as ``prompt``, ``echo: true``, ``max_tokens: 0``
   and ``logprobs: 0``: nothing is generated, and ``choices[i].logprobs.token_logprobs`` holds the
   log-probability the model gives every prompt token after the first (vLLM's ``prompt_logprobs``).
3. An answer's log-probability is the sum over the tokens after the prompt's: the answer and the template's
   end of turn (``<|im_end|>``), what DPO scores and bench/dpo_use_case.py computes with HF.

Per model: ``preference_accuracy``, the share of pairs whose preferred answer gets the higher
log-probability (the quantity DPO's ``rewards/accuracies`` tracks, here for the model itself; a failed
request counts as wrong), with a 95% CI from a bootstrap over the pairs (``bootstrap`` resamples,
``seed``: findings.paired_bootstrap against zero); ``preference_margin``, the mean log-probability
difference (nats) with its CI; and deltas of the accuracy of each model against the one before it in
``models`` (base -> SFT -> SFT + DPO: what each stage adds), paired over the same pairs. Each scored pair
is appended to ``out/raw/<alias>.preference.jsonl`` at once; ``--resume`` sends only the rest.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING


from .findings import delta_line, paired_bootstrap, signed
from .runner import RawStore

if TYPE_CHECKING:
    from ..client import Backend
    from .config import CompareConfig


@dataclass
class Pair:
    idx: int
    messages: list[dict]  # input.messages: the prompt
    preferred: str
    non_preferred: str
    tools: list | None = field(default=None)


def load_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """The first ``limit`` pairs of an OpenAI DPO JSONL; every problem is one error naming ``preference_data``."""
    from data_prep.validate import checked_examples

    return [Pair(i, ex["input"]["messages"], ex["preferred_output"][0].get("content") or "",
                 ex["non_preferred_output"][0].get("content") or "", ex["input"].get("tools"))
            for i, ex in enumerate(checked_examples(path, "preference_data", "dpo", limit))]


def answer_logprob(token_logprobs: list[float | None], start: int) -> float:
    """The sum of the echoed log-probabilities from position ``start`` on (the answer's tokens)."""
    tail = token_logprobs[start:]
    if not tail or any(v is None for v in tail):
        raise ValueError(f"the server returned no log-probabilities after token {start}")
    return float(sum(tail))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _error(e: Exception) -> tuple[str, str]:
    import openai

    if isinstance(e, openai.APITimeoutError):
        return "timeout", ""
    if isinstance(e, openai.APIConnectionError):
        return "connection", ""
    if isinstance(e, openai.APIStatusError):
        return f"http_{e.status_code}", str(getattr(e, "message", e))[:300]
    return type(e).__name__, " ".join(str(e).split())[:300]


async def tokenize(client, root: str, model: str, pair: Pair) -> tuple[list[int], list[int], int, int]:
    """(prompt + preferred ids, prompt + non-preferred ids, where each answer starts) by the server's template."""
    async def ids(messages, generation: bool) -> list[int]:
        body = {"model": model, "messages": messages, "add_generation_prompt": generation,
                "continue_final_message": False, "add_special_tokens": False}
        if pair.tools:
            body["tools"] = pair.tools
        return list((await client.post(f"{root}/tokenize", cast_to=object, body=body))["tokens"])

    prompt, good, bad = await asyncio.gather(
        ids(pair.messages, True), ids([*pair.messages, {"role": "assistant", "content": pair.preferred}], False),
        ids([*pair.messages, {"role": "assistant", "content": pair.non_preferred}], False))
    # the rendered prompt is a prefix of each conversation; the longest common prefix where a template differs
    return good, bad, common_prefix(prompt, good), common_prefix(prompt, bad)


async def score(client, model: str, tokens: tuple[list[int], list[int], int, int]) -> tuple[float, float]:
    """(preferred, non-preferred) log-probabilities under ``model``: one completions request, nothing generated."""
    good, bad, good_start, bad_start = tokens
    reply = await client.completions.create(model=model, prompt=[good, bad], max_tokens=0, echo=True, logprobs=0,
                                            temperature=0.0)
    by = {c.index: c for c in reply.choices}
    return (answer_logprob(by[0].logprobs.token_logprobs, good_start),
            answer_logprob(by[1].logprobs.token_logprobs, bad_start))


async def run_preferences(backend: Backend, cfg: CompareConfig, models: dict[str, str], pairs: list[Pair], out: Path,
                          resume: bool) -> dict[str, dict[int, dict]]:
    """alias -> pair index -> record (``preferred`` and ``non_preferred`` log-probabilities, or ``error``);
    with resume, only what is missing (failed ones again) is sent."""
    from tqdm import tqdm

    stores, results = {}, {}
    for alias in models:
        store = stores[alias] = RawStore(out, f"{alias}.preference")
        if not resume and store.path.exists():
            store.path.unlink()
        done = store.load() if resume else {}
        results[alias] = {i: r for i, r in done.items() if not r.get("error") and i < len(pairs)}
    todo = [p for p in pairs if any(p.idx not in results[a] for a in models)]
    if not todo:
        return results
    client = backend.async_client(max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    root = (backend.base_url or "").rstrip("/").removesuffix("/v1")
    first = next(iter(models.values()))
    sem = asyncio.Semaphore(cfg.concurrency)
    bar = tqdm(total=sum(p.idx not in results[a] for p in todo for a in models), desc="preference pairs",
               unit="req", file=sys.stderr)

    def keep(alias: str, rec: dict) -> None:
        rec["model"] = models[alias]
        stores[alias].append(rec)
        results[alias][rec["idx"]] = rec
        bar.update(1)
        if rec["error"]:
            bar.set_postfix_str(f"last error: {rec['error']}")

    async def one(pair: Pair):
        async with sem:
            try:
                tokens = await tokenize(client, root, first, pair)
            except Exception as e:  # noqa: BLE001 - the pair fails for every model, with its reason
                error, message = _error(e)
                for alias in models:
                    if pair.idx not in results[alias]:
                        keep(alias, {"idx": pair.idx, "preferred": None, "non_preferred": None,
                                     "error": f"tokenize_{error}", "error_message": message, "latency_s": None})
                return
        for alias, model in models.items():
            if pair.idx in results[alias]:
                continue
            async with sem:
                rec = {"idx": pair.idx, "preferred": None, "non_preferred": None, "error": None}
                t0 = time.perf_counter()
                try:
                    rec["preferred"], rec["non_preferred"] = await score(client, model, tokens)
                except Exception as e:  # noqa: BLE001 - counted and shown, never dropped
                    rec["error"], message = _error(e)
                    if message:
                        rec["error_message"] = message
                rec["latency_s"] = round(time.perf_counter() - t0, 4)
            keep(alias, rec)

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:
        bar.close()
        await client.close()
    return results


def rows(pairs: list[Pair], recs: dict[int, dict]) -> tuple[list[float], list[float]]:
    """(per pair 1.0 when the preferred answer scored higher, else 0.0 (failed too); the margins of scored pairs)."""
    right, margins = [], []
    for p in pairs:
        rec = recs.get(p.idx) or {}
        good, bad = rec.get("preferred"), rec.get("non_preferred")
        ok = not rec.get("error") and good is not None and bad is not None
        right.append(float(ok and good > bad))
        if ok:
            margins.append(good - bad)
    return right, margins


def ci(values: list[float], cfg: CompareConfig) -> list[float] | None:
    if not values:
        return None
    _, bounds = paired_bootstrap(values, [0.0] * len(values), cfg.bootstrap, cfg.seed)
    return [round(x, 4) for x in bounds] if bounds else None


def preference_summary(cfg: CompareConfig, pairs: list[Pair], recs: dict[int, dict]) -> dict:
    """The keys a model's summary gains: accuracy and mean margin, each with its 95% CI; pairs, failed."""
    right, margins = rows(pairs, recs)
    failed = len(pairs) - len(margins)
    return {"preference_pairs": len(pairs), "preference_failed": failed,
            "preference_accuracy": round(sum(right) / len(right), 4), "preference_accuracy_ci95": ci(right, cfg),
            "preference_margin": round(sum(margins) / len(margins), 4) if margins else None,
            "preference_margin_ci95": ci(margins, cfg)}


def preference_deltas(cfg: CompareConfig, pairs: list[Pair], results: dict[str, dict]) -> list[dict]:
    """Each model's preference accuracy against the one before it in ``models``, paired over the same pairs."""
    aliases = list(results)
    right = {a: rows(pairs, results[a])[0] for a in aliases}
    out = []
    for before, model in zip(aliases, aliases[1:]):
        delta, bounds = paired_bootstrap(right[model], right[before], cfg.bootstrap, cfg.seed)
        out.append({"model": model, "against": before, "metric": "preference_accuracy", "delta": round(delta, 4),
                    "ci95": [round(x, 4) for x in bounds] if bounds else None, "n": len(pairs),
                    "resamples": cfg.bootstrap, "seed": cfg.seed})
    return out


def interval(bounds, sign: bool = False) -> str:
    if not bounds:
        return ""
    return f"[{signed(bounds[0])}, {signed(bounds[1])}]" if sign else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def console_part(s: dict) -> str:
    """`, preference accuracy 0.875 [0.812, 0.938], margin +1.234` for a model's console line ('' without)."""
    if s.get("preference_accuracy") is None:
        return ""
    failed = f" ({s['preference_failed']} failed)" if s.get("preference_failed") else ""
    return (f", preference accuracy {s['preference_accuracy']:.3f} {interval(s.get('preference_accuracy_ci95'))}"
            .rstrip() + f"{failed}, margin {signed(s.get('preference_margin'))}")


def report_lines(cfg: CompareConfig, metrics: dict) -> list[str]:
    """report.md's preference section (none without ``preference_data``)."""
    scored = [s for s in metrics["models"] if "preference_accuracy" in s]
    if not scored:
        return []
    how = (f"95% CIs from a bootstrap over the {scored[0]['preference_pairs']} pairs ({cfg.bootstrap} resamples, "
           f"seed {cfg.seed})" if cfg.bootstrap > 0 else "bootstrap off: no CIs")
    lines = ["", "## Preference accuracy", "",
             f"{scored[0]['preference_pairs']} preference pairs from `{cfg.preference_data}`: how often each model "
             "gives the preferred answer a higher log-probability than the non-preferred one after the pair's "
             "prompt (summed over the answer's tokens and the end of turn, read from the server: `echo` with "
             f"`logprobs` on /v1/completions of the prompt rendered by its /tokenize); {how}. A failed request "
             "counts as wrong.", "",
             "| model | preference accuracy | 95% CI | mean margin (nats) | 95% CI | failed |", "|---|---|---|---|---|---|"]
    for s in scored:
        lines.append(f"| {s['alias']} | {s['preference_accuracy']:.3f} | {interval(s.get('preference_accuracy_ci95'))} "
                     f"| {signed(s.get('preference_margin'))} | {interval(s.get('preference_margin_ci95'), sign=True)} "
                     f"| {s['preference_failed']} |")
    deltas = metrics.get("preference_deltas") or []
    if deltas:
        lines += ["", "Each model against the one before it (paired over the same pairs):", "",
                  *[f"- {delta_line(d)}" for d in deltas]]
    return lines
