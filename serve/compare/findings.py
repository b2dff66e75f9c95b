"""What the fine-tune buys: deltas of the headline metric with paired-bootstrap CIs, and before/after examples.

Deltas: every model against the first of ``models`` (the base), and every model against the baseline
when it runs. The headline metric is a mean of per-example scores (the task table's ``per_example``),
so the paired bootstrap resamples example indices (``bootstrap`` times, numpy seeded with ``seed``),
the same indices for both sides, and takes the 2.5th and 97.5th percentiles of the resampled mean
difference. Beside it, the differences of latency, tokens and cost that the table shows per model.

Collapse (``collapse``): a fine-tune that gives one answer to most inputs (an adapter trained on skewed labels
that learned the majority answer) can score a fair accuracy while being useless. Per model, the answers are
normalised as the task compares them (the label; the JSON object on the scored fields; the text with its
whitespace folded; on the label task only answers that name a class count, the others being the table's
off-label) and the most common one's share of the inputs is set beside its share of the references.
A model is flagged when that answer covers at least ``COLLAPSE_SHARE`` of the inputs and either it covers
``COLLAPSE_MARGIN`` more of them than the references give that answer (a majority answer given everywhere, or
a rare one), or nearly every input (``COLLAPSE_ALL``) while more than ``1 - COLLAPSE_ALL`` of the references
differ, or (label task) its macro-F1 is at most ``MACRO_F1_RATIO`` of its accuracy. Held-out sets under
``COLLAPSE_MIN_EXAMPLES`` are not judged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections import Counter

from .baseline import BASELINE, baseline_rows
from .scoring import canonical_json, extract_label, parse_json
from .tasks import TASKS, row_score

if TYPE_CHECKING:
    from .config import CompareConfig

# (summary key, name in the report, unit, digits): differences shown beside each delta
SIDE_KEYS = (("latency_p50_s", "p50 latency", " s", 3), ("latency_p95_s", "p95 latency", " s", 3),
             ("input_tokens", "tokens in", "", 0), ("output_tokens", "tokens out", "", 0),
             ("cost_usd", "cost", " USD", 4))


def paired_bootstrap(a, b, resamples: int, seed: int = 0) -> tuple[float, list[float] | None]:
    """mean(a - b), and its 95% percentile CI over ``resamples`` resamples of the indices (None if 0)."""
    import numpy as np

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    delta = float(diff.mean()) if len(diff) else 0.0
    if resamples <= 0 or not len(diff):
        return delta, None
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(resamples)
    step = max(1, 4_000_000 // n)  # resamples per batch: a few million indices at a time
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        means[start:start + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return delta, [float(lo), float(hi)]


def answers_of(recs: dict[int, dict], examples) -> list[str | None]:
    return [recs.get(ex.idx, {}).get("answer") for ex in examples]


def deltas(cfg: CompareConfig, examples, results: dict[str, dict], baseline: dict | None,
           summaries: list[dict]) -> list[dict]:
    """metrics.json's ``deltas``: one entry per (model, the one it is measured against)."""
    task = TASKS[cfg.task]
    refs = [ex.reference for ex in examples]
    rows = {alias: task.per_example(cfg, refs, answers_of(recs, examples)) for alias, recs in results.items()}
    aliases = list(results)
    pairs = [(m, aliases[0]) for m in aliases[1:]]
    if baseline:
        rows[BASELINE] = baseline_rows(cfg, examples, baseline)
        pairs += [(m, BASELINE) for m in aliases]
    by = {s["alias"]: s for s in summaries}
    out = []
    for model, against in pairs:
        delta, ci = paired_bootstrap(rows[model], rows[against], cfg.bootstrap, cfg.seed)
        entry = {"model": model, "against": against, "metric": task.headline, "delta": round(delta, 4),
                 "ci95": [round(x, 4) for x in ci] if ci else None, "n": len(examples),
                 "resamples": cfg.bootstrap, "seed": cfg.seed}
        for key, *_ in SIDE_KEYS:
            x, y = by.get(model, {}).get(key), by.get(against, {}).get(key)
            entry[f"{key}_delta"] = round(x - y, 6) if x is not None and y is not None else None
        out.append(entry)
    return out


COLLAPSE_SHARE, COLLAPSE_MARGIN, COLLAPSE_ALL, MACRO_F1_RATIO, COLLAPSE_MIN_EXAMPLES = 0.5, 0.2, 0.95, 0.5, 10
COLLAPSE_FIX = ("class-balanced training (train/sft.py `balance_labels: on`), more steps (`max_steps: auto`), and "
                "the train file's label distribution (`tunekit stats TRAIN.jsonl`)")


def normalised(cfg: CompareConfig, text: str | None) -> str | None:
    """An answer (or reference) as the task compares it; None when it has none (unparsed, failed)."""
    if text is None:
        return None
    if cfg.task == "label":
        return extract_label(text, cfg.label_field)
    if cfg.task == "json":
        obj = parse_json(text)
        return canonical_json(obj, cfg.json_fields) if isinstance(obj, dict) else None
    return " ".join(text.split()) or None


def collapse(cfg: CompareConfig, examples, results: dict[str, dict], summaries: list[dict]) -> list[dict]:
    """The models that give one answer to most inputs (see the module doc): one entry each, for metrics.json's
    ``collapse``, report.md's warning and the console's."""
    n = len(examples)
    refs = Counter(r for ex in examples if (r := normalised(cfg, ex.reference)) is not None)
    if n < COLLAPSE_MIN_EXAMPLES or not refs:
        return []
    ref_answer, ref_count = refs.most_common(1)[0]
    by = {s["alias"]: s for s in summaries}
    out = []
    for alias, recs in results.items():
        answers = Counter(a for a in (normalised(cfg, x) for x in answers_of(recs, examples)) if a is not None
                          and (cfg.task != "label" or a in refs))  # off-label answers are the table's off-label
        if not answers:
            continue
        answer, count = answers.most_common(1)[0]
        share, ref_share, same = count / n, ref_count / n, refs.get(answer, 0) / n
        s = by.get(alias, {})
        acc, f1 = s.get("accuracy"), s.get("macro_f1")
        reasons = []
        if share >= same + COLLAPSE_MARGIN:
            reasons.append(f"it is the reference of {same:.0%}")
        elif share >= COLLAPSE_ALL and ref_share <= COLLAPSE_ALL:
            reasons.append(f"{1 - ref_share:.0%} of the references are something else")
        if cfg.task == "label" and acc and f1 is not None and f1 <= MACRO_F1_RATIO * acc:
            reasons.append(f"macro-F1 {f1:.3f} against accuracy {acc:.3f}")
        if share >= COLLAPSE_SHARE and reasons:
            out.append({"model": alias, "answer": answer, "count": count, "n": n, "share": round(share, 4),
                        "distinct_answers": len(answers), "reference_share": round(same, 4),
                        "reference_top": ref_answer,
                        "reference_top_share": round(ref_share, 4), "reference_classes": len(refs),
                        "reasons": reasons})
    return out


def collapse_line(c: dict) -> str:
    """``finetuned gives one answer ("none") to 118 of 120 inputs (98%) while ...: it has likely collapsed ...``"""
    k = c["distinct_answers"]
    return (f"{c['model']} gives one answer ({_short(c['answer'], 60)!r}) to {c['count']} of {c['n']} inputs "
            f"({c['share']:.0%}; {k} distinct answer{'s' * (k != 1)}, the references have "
            f"{c['reference_classes']}) while {'; '.join(c['reasons'])}: it has likely collapsed onto one answer. "
            f"Likely fixes: {COLLAPSE_FIX}.")


def collapse_lines(metrics: dict) -> list[str]:
    """report.md's warning section (none without a collapsed model)."""
    found = metrics.get("collapse") or []
    return ["", "## Warning: a model gives one answer to most inputs", "", *[f"- {collapse_line(c)}" for c in found]
            ] if found else []


def signed(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v + 0.0:+.{digits}f}"  # + 0.0: no "-0.000"


def delta_line(d: dict) -> str:
    """``finetuned vs base: accuracy +0.412 [95% CI +0.371, +0.455] (finetuned is better by 0.412); ...``"""
    m, metric, delta, ci = d["model"], d["metric"], d["delta"], d["ci95"]
    text = f"{m} vs {d['against']}: {metric} {signed(delta)}"
    if ci:
        text += f" [95% CI {signed(ci[0])}, {signed(ci[1])}]"
    text += (f" ({m} is better by {delta:.3f}" if delta > 0 else f" ({m} is worse by {-delta:.3f}" if delta < 0
             else " (no difference")
    if ci and ci[0] <= 0 <= ci[1] and delta != 0:
        text += "; the CI includes 0: within noise"
    side = [f"{name} {signed(d.get(f'{key}_delta'), digits)}{unit}" for key, name, unit, digits in SIDE_KEYS
            if d.get(f"{key}_delta") is not None]
    return text + ")" + ("; " + ", ".join(side) if side else "")


def delta_lines(metrics: dict) -> list[str]:
    """report.md's "What the fine-tune buys" section (none without deltas)."""
    ds = metrics.get("deltas") or []
    if not ds:
        return []
    d = ds[0]
    how = (f"95% CIs from a paired bootstrap over the {d['n']} held-out examples ({d['resamples']} resamples, "
           f"seed {d['seed']})" if d["resamples"] > 0 else "bootstrap off: no CIs")
    return ["", "## What the fine-tune buys", "", f"Deltas of {d['metric']}; {how}.", "",
            *[f"- {delta_line(x)}" for x in ds]]


def _short(text: str | None, limit: int = 300) -> str:
    one = " ".join((text or "").split())
    return one if len(one) <= limit else one[:limit - 1] + "…"


def example_lines(cfg: CompareConfig, examples, results: dict[str, dict]) -> list[str]:
    """report.md's before/after sections: up to ``examples`` held-out examples where the second model
    (the fine-tune) scores above the first (the base), then up to as many the other way round."""
    aliases = list(results)
    if cfg.examples <= 0 or len(aliases) < 2:
        return []
    a, b = aliases[:2]
    scored = []
    for ex in examples:
        ra, rb = results[a].get(ex.idx, {}), results[b].get(ex.idx, {})
        scored.append((ex, ra, rb, row_score(cfg, ex.reference, ra.get("answer")),
                       row_score(cfg, ex.reference, rb.get("answer"))))
    better = sorted((s for s in scored if s[4] > s[3]), key=lambda s: (s[3] - s[4], s[0].idx))
    worse = sorted((s for s in scored if s[3] > s[4]), key=lambda s: (s[4] - s[3], s[0].idx))

    def answer(rec: dict) -> str:
        if rec.get("answer") is None:
            return f"(no answer: {rec.get('error') or 'not sent'})"
        return _short(rec["answer"])

    lines = []
    for title, rows in ((f"Where the fine-tune helps: {b} beats {a}", better),
                        (f"Where the fine-tune is worse: {a} beats {b}", worse)):
        shown = rows[:cfg.examples]
        lines += ["", f"## {title} ({len(shown)} of {len(rows)} shown)", ""]
        if not rows:
            lines.append("None.")
        for ex, ra, rb, sa, sb in shown:
            lines += [f"- example {ex.idx} (line {ex.line}): {a} {sa:.3f}, {b} {sb:.3f}",
                      f"  - input: {_short(ex.text)}", f"  - reference: {_short(ex.reference)}",
                      f"  - {a}: {answer(ra)}", f"  - {b}: {answer(rb)}"]
    return lines
