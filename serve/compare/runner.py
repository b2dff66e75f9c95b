"""Requests: every example to every model concurrently, each finished one kept at once for --resume.

``out/raw/<model>.jsonl`` gets one line per finished request (keyed by the example's index), flushed
as it arrives, so Ctrl-C keeps what was done; with ``resume`` the answered ones are not sent again
(failed ones are). With ``logprobs`` (label task) each request also asks for the top-20
log-probabilities of its tokens, and the record keeps the per-class scores made from them
(``class_scores``, see logprobs.py), not the log-probabilities; a kept record without them is sent
again. Also the pairwise LLM judge of the text task, and the early reachability check.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tunekit.errors import UserError

from .data import Example

if TYPE_CHECKING:
    from ..client import Backend
    from .config import CompareConfig


class RawStore:
    """out/raw/<model>.jsonl: one line per finished request, appended and flushed at once."""

    def __init__(self, out: Path, model: str):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
        self.path = out / "raw" / f"{safe}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._checked_end = False

    def load(self) -> dict[int, dict]:
        done = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by Ctrl-C
                done[rec["idx"]] = rec
        return done

    def append(self, rec: dict) -> None:
        line = json.dumps(rec) + "\n"
        if not self._checked_end:  # a line cut by a crash would swallow the first record appended after it
            self._checked_end = True
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        line = "\n" + line
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def answered(out: Path, aliases) -> dict[str, dict[int, dict]]:
    """What out/raw holds for each alias, failed requests left out (after Ctrl-C)."""
    return {alias: {i: r for i, r in RawStore(out, alias).load().items() if not r.get("error")} for alias in aliases}


async def ask(client, sem: asyncio.Semaphore, model: str, ex: Example, sampling: dict, to_scores=None) -> dict:
    """One request; failures become a record with the reason (the SDK already retried). ``to_scores``:
    (the reply's tokens with their top log-probabilities) -> the record's ``class_scores``."""
    import openai

    from .logprobs import reply_tokens

    async with sem:
        t0 = time.perf_counter()
        rec = {"idx": ex.idx, "answer": None, "error": None, "latency_s": None, "input_tokens": None,
               "output_tokens": None, "finish_reason": None, "t_start": time.time()}
        try:
            reply = await client.chat.completions.create(model=model, messages=ex.messages, **sampling)
            rec.update(answer=reply.choices[0].message.content or "", finish_reason=reply.choices[0].finish_reason,
                       input_tokens=reply.usage.prompt_tokens if reply.usage else None,
                       output_tokens=reply.usage.completion_tokens if reply.usage else None)
            if to_scores is not None:
                rec["class_scores"] = to_scores(reply_tokens(reply.choices[0]))
        except openai.APITimeoutError:
            rec["error"] = "timeout"
        except openai.APIConnectionError:
            rec["error"] = "connection"
        except openai.APIStatusError as e:
            rec["error"] = f"http_{e.status_code}"
            rec["error_message"] = str(getattr(e, "message", e))[:300]
        rec["latency_s"] = round(time.perf_counter() - t0, 4)
        rec["t_end"] = time.time()
        return rec


async def run_requests(backend: Backend, cfg: CompareConfig, models: dict[str, str], examples: list[Example],
                       out: Path, resume: bool, classes: list[str] | None = None) -> dict[str, dict[int, dict]]:
    """alias -> example index -> record, for every (alias, example); with resume, sends only what is missing.
    ``classes`` (``logprobs``): ask for log-probabilities, and keep each answer's scores on these classes."""
    from tqdm import tqdm

    client = backend.async_client(max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    sampling = backend.sampling_kwargs(max_tokens=cfg.max_tokens)
    to_scores = None
    if classes:
        from .logprobs import TOP_LOGPROBS, class_scores

        sampling.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        to_scores = functools.partial(class_scores, classes=classes, label_field=cfg.label_field)
    sem = asyncio.Semaphore(cfg.concurrency)
    results, tasks = {}, []
    for alias, model in models.items():
        store = RawStore(out, alias)
        done = store.load() if resume else {}
        if not resume and store.path.exists():
            store.path.unlink()
        done = {i: r for i, r in done.items() if r.get("error") is None  # failed requests are sent again
                and (to_scores is None or "class_scores" in r)}  # ... and those kept without class scores
        results[alias] = done
        for ex in examples:
            if ex.idx not in done:
                tasks.append((alias, model, store, ex))
    if not tasks:
        return results
    bar = tqdm(total=len(tasks), desc="requests", unit="req", file=sys.stderr)

    async def one(alias, model, store, ex):
        rec = await ask(client, sem, model, ex, sampling, to_scores)
        rec["model"] = model
        store.append(rec)
        results[alias][ex.idx] = rec
        bar.update(1)
        if rec["error"]:
            bar.set_postfix_str(f"last error: {rec['error']}")

    try:
        await asyncio.gather(*(one(*t) for t in tasks))
    finally:
        bar.close()
        await client.close()
    return results


async def judge(backend: Backend, cfg: CompareConfig, examples, answers: dict[str, list], a: str, b: str) -> dict:
    """Pairwise LLM judge, both orders; a win counts only when both orders agree. A pair with a failed
    request (server gone, timeout, a prompt longer than the server's context) is counted as ``failed``,
    not as a tie, and the first failure's reason is kept as ``failed_reason``."""
    client = backend.async_client(max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    model = backend.resolve(cfg.judge_model)
    sem = asyncio.Semaphore(cfg.concurrency)
    reasons: list[str] = []

    async def verdict(ex, first, second):
        prompt = (f"Question:\n{ex.text}\n\nReference answer:\n{ex.reference}\n\nAnswer 1:\n{first}\n\n"
                  f"Answer 2:\n{second}\n\nWhich answer is better? Reply with exactly 1, 2 or tie.")
        async with sem:
            try:
                r = await client.chat.completions.create(model=model, temperature=0, max_tokens=4,
                                                         messages=[{"role": "user", "content": prompt}])
                return (r.choices[0].message.content or "").strip().lower()
            except Exception as e:  # noqa: BLE001 - a failed verdict counts as no verdict, with its reason
                reasons.append(" ".join(f"{type(e).__name__}: {e}".split())[:300])
                return "error"

    async def both_orders(ex):
        x, y = answers[a][ex.idx] or "", answers[b][ex.idx] or ""
        return await asyncio.gather(verdict(ex, x, y), verdict(ex, y, x))

    wins = Counter()
    for v1, v2 in await asyncio.gather(*(both_orders(ex) for ex in examples)):  # `concurrency` in flight
        if "error" in (v1, v2):
            wins["failed"] += 1
        elif v1.startswith("1") and v2.startswith("2"):
            wins[a] += 1
        elif v1.startswith("2") and v2.startswith("1"):
            wins[b] += 1
        else:
            wins["tie_or_inconsistent"] += 1
    await client.close()
    return {"judge": model, "pair": [a, b], **wins, **({"failed_reason": reasons[0]} if reasons else {})}


def check_reachable(backend: Backend, models: list[str]) -> None:
    """Fail early, with one clear line, when the server is down, the key is wrong or a model is unknown."""
    client = backend.client(max_retries=1)
    try:
        served = {m.id for m in client.models.list()}
    except Exception as e:  # noqa: BLE001
        raise backend.explain(e) from None
    missing = [m for m in models if m not in served]
    if missing and backend.name == "local":
        raise UserError(f"model(s) {', '.join(missing)} not served by {backend.base_url}; it serves "
                        f"{', '.join(sorted(served))} (add adapters with `python -m serve.adapters add NAME RUN_DIR`)")
