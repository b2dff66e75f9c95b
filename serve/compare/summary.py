"""A model's summary: answered / failed counts, latency percentiles, tokens, cost, and the task's metrics.

Cost: OpenAI prices from tunekit/prices.yaml; local cost = the model's wall time x ``gpu_hour_usd``.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from tunekit.config import read_yaml
from tunekit.constants import PRICES_FILE

from .data import Example
from .tasks import TASKS

if TYPE_CHECKING:
    from ..client import Backend
    from .config import CompareConfig


def inference_price(model: str) -> dict | None:
    prices = read_yaml(PRICES_FILE).get("inference", {}) if PRICES_FILE.exists() else {}
    if model in prices:
        return prices[model]
    if model.startswith("ft:"):
        base = model.split(":")[1]
        key = next((k for k in prices if k == f"ft:{base}" or k.startswith(f"ft:{base}-")), None)
        return prices.get(key) if key else None
    return next((v for k, v in prices.items() if k.startswith(model + "-")), None)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return round(float(np.percentile(values, q)), 4)


def summarise(cfg: CompareConfig, backend: Backend, alias: str, model: str, examples: list[Example],
              recs: dict[int, dict], classes: list[str] | None = None) -> dict:
    """``classes`` (label task): what counts as a class, and with ``logprobs`` the columns of ROC AUC's scores."""
    answers = [recs.get(ex.idx, {}).get("answer") for ex in examples]
    errors = Counter(recs[ex.idx]["error"] if ex.idx in recs else "not_sent" for ex in examples
                     if ex.idx not in recs or recs[ex.idx].get("error"))
    ok = [recs[ex.idx] for ex in examples if ex.idx in recs and not recs[ex.idx].get("error")]
    lat = [r["latency_s"] for r in ok]
    tin = sum(r["input_tokens"] or 0 for r in ok)
    tout = sum(r["output_tokens"] or 0 for r in ok)
    summary = {"alias": alias, "model": model, "backend": backend.name, "n": len(examples), "answered": len(ok),
               "failed": dict(errors), "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
               "input_tokens": tin, "output_tokens": tout,
               "stopped": round(sum(r.get("finish_reason") == "stop" for r in ok) / max(1, len(ok)), 4)}
    if ok:
        wall = max(r["t_end"] for r in ok) - min(r["t_start"] for r in ok)
        summary["wall_s"] = round(wall, 2)
        summary["output_tokens_per_s"] = round(tout / wall, 1) if wall > 0 else None
    if backend.name == "openai":
        price = inference_price(model)
        summary["cost_usd"] = (round((tin * price["input"] + tout * price["output"]) / 1e6, 6) if price else None)
        summary["cost_basis"] = "tunekit/prices.yaml" if price else f"no price for {model} in tunekit/prices.yaml"
    else:
        summary["cost_usd"] = round(summary.get("wall_s", 0) * cfg.gpu_hour_usd / 3600, 6)
        summary["cost_basis"] = f"wall time x gpu_hour_usd {cfg.gpu_hour_usd}"
    scores = None
    if cfg.logprobs and classes:
        from .logprobs import score_matrix

        scores = score_matrix([recs.get(ex.idx) for ex in examples], classes)
    summary.update(TASKS[cfg.task].metrics(cfg, [ex.reference for ex in examples], answers, classes=classes,
                                           scores=scores))
    return summary
