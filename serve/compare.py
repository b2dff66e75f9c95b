"""The same held-out prompts through several models on either backend, scored side by side.

    python -m serve.compare --config configs/banking77/compare.yaml
    python -m serve.compare --config configs/banking77/compare.yaml --backend openai --models base,finetuned
    python -m serve.compare --config configs/banking77/compare.yaml --limit 50 --resume
    python -m serve.compare --config configs/banking77/compare.yaml --start-server \\
        --adapter steps160=runs/banking77/sft_cpu/checkpoint-160 --models base,steps160,finetuned

Each held-out example (chat JSONL: the last assistant message is the reference) goes to every
model concurrently (async, ``concurrency`` requests in flight, retries with backoff, pinned
sampling: temperature 0 and an explicit max_tokens). Scoring follows ``task``:

  label  accuracy, macro-F1, precision, recall, confusion matrix, share of answers that parse
         (``label_field`` names the JSON field holding the label; without it the whole answer is
         the label); a TF-IDF + logistic-regression baseline trained on ``train_data`` is scored
         beside the models, with ROC AUC from its probabilities
  json   share of valid JSON objects and per-field accuracy
  text   ROUGE-L F1 against the reference, and optionally an LLM judge (``judge_model``) that sees
         both answers in both orders

Per model: latency p50/p95, input/output tokens, and cost (OpenAI prices from tunekit/prices.yaml;
local cost = the model's wall time x ``gpu_hour_usd``). Writes to ``out``: predictions.csv (input,
reference, each model's answer and score), metrics.json, report.md with PNG plots. Failed requests
(timeout, server error) and unparseable answers are counted and shown, never dropped: they score as
wrong. Every finished request is appended to ``out/raw/<model>.jsonl`` at once, so Ctrl-C keeps what
was done and ``--resume`` sends only the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunekit.constants import PRICES_FILE
from tunekit.config import load_config, read_yaml
from tunekit.errors import UserError
from data_prep.sources import iter_jsonl

from .client import Backend, load_backend

TASKS = ("label", "json", "text")
BASELINE = "tfidf-logreg"


@dataclass
class CompareConfig:
    data: str = ""  # held-out chat JSONL; the last assistant message is the reference
    serve_config: str | None = None  # serve.yaml: backend, models, sampling (default: built-in defaults)
    task: str = "label"  # label | json | text
    label_field: str | None = None  # label task: JSON field of the answer holding the label
    json_fields: list[str] = field(default_factory=list)  # json task: fields to score (default: the reference's)
    train_data: str | None = None  # chat JSONL the bag-of-words baseline learns from (label task)
    baseline: bool = True
    models: list[str] = field(default_factory=lambda: ["base", "finetuned"])  # aliases or model ids
    backend: str | None = None  # overrides the serve config's backend (LLM_BACKEND and --backend override this)
    limit: int | None = None  # the first N held-out examples
    concurrency: int = 16
    max_retries: int = 4
    timeout_s: float = 120.0
    max_tokens: int | None = None  # overrides the serve config's sampling.max_tokens
    gpu_hour_usd: float = 0.0  # local cost: what an hour of the serving machine costs
    judge_model: str | None = None  # text task: alias or id of the judge (same backend)
    out: str = "runs/compare"

    def check(self, where: str) -> None:
        problems = []
        if not self.data:
            problems.append("data: required (held-out chat JSONL, e.g. valid.jsonl from data_prep build)")
        elif not Path(self.data).is_file():
            problems.append(f"data: {self.data} not found (build it with `python -m data_prep build`)")
        if self.task not in TASKS:
            problems.append(f"task: {self.task!r}; use one of {', '.join(TASKS)}")
        if self.train_data and not Path(self.train_data).is_file():
            problems.append(f"train_data: {self.train_data} not found")
        if not self.models:
            problems.append("models: give at least one alias or model id")
        if self.concurrency < 1:
            problems.append(f"concurrency: {self.concurrency} must be at least 1")
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Data

@dataclass
class Example:
    idx: int
    line: int
    messages: list[dict]  # the prompt: everything before the reference answer
    reference: str

    @property
    def text(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    out = []
    for line, row in iter_jsonl(Path(path)):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            raise UserError(f"{path}:{line}: expected {{\"messages\": [..., {{\"role\": \"assistant\", ...}}]}} "
                            "(the last message is the reference answer)")
        out.append(Example(len(out), line, msgs[:-1], str(msgs[-1].get("content", ""))))
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{path}: no examples")
    return out


# ----------------------------------------------------------------------------------------------
# Parsing and scoring

def parse_json(text: str):
    """The first JSON object in an answer (models wrap JSON in prose or code fences), else None."""
    text = text.strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            return obj
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def extract_label(text: str | None, label_field: str | None) -> str | None:
    if text is None:
        return None
    if label_field is None:
        label = text.strip().strip(".").strip()
        return label or None
    obj = parse_json(text)
    if isinstance(obj, dict) and obj.get(label_field) is not None:
        return str(obj[label_field]).strip()
    return None


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def label_metrics(refs: list[str], preds: list[str | None], scores=None, classes=None) -> dict:
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)  # absent classes score 0, as documented
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = sorted(set(refs))
    shown = [p if p in labels else ("<unparsed>" if p is None else "<other>") for p in preds]
    extra = [x for x in ("<other>", "<unparsed>") if x in shown]
    p, r, f1, _ = precision_recall_fscore_support(refs, shown, labels=labels, average="macro", zero_division=0)
    out = {"n": len(refs), "accuracy": accuracy_score(refs, shown), "macro_f1": f1, "precision": p, "recall": r,
           "parsed": sum(x is not None for x in preds) / len(preds),
           "confusion": {"labels": labels + extra,
                         "matrix": confusion_matrix(refs, shown, labels=labels + extra).tolist()}}
    if scores is not None and classes is not None and len(labels) > 1:
        import numpy as np

        try:
            if len(classes) == 2:
                out["roc_auc"] = roc_auc_score([c == classes[1] for c in refs], np.asarray(scores)[:, 1])
            else:
                keep = [i for i, c in enumerate(refs) if c in set(classes)]
                sc = np.asarray(scores)[keep]
                sc = sc / sc.sum(axis=1, keepdims=True)
                out["roc_auc"] = roc_auc_score([refs[i] for i in keep], sc, multi_class="ovr", labels=list(classes))
        except ValueError:
            pass  # a class absent from the held-out set: no AUC
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def json_metrics(refs: list[str], answers: list[str | None], fields: list[str]) -> dict:
    ref_objs = [parse_json(r) or {} for r in refs]
    objs = [parse_json(a) if a is not None else None for a in answers]
    fields = fields or sorted({k for o in ref_objs if isinstance(o, dict) for k in o})
    valid = [isinstance(o, dict) for o in objs]
    per_field = {f: round(sum(isinstance(o, dict) and o.get(f) == r.get(f) for o, r in zip(objs, ref_objs))
                          / len(refs), 4) for f in fields}
    exact = sum(isinstance(o, dict) and all(o.get(f) == r.get(f) for f in fields) for o, r in zip(objs, ref_objs))
    return {"n": len(refs), "valid_json": round(sum(valid) / len(refs), 4), "field_accuracy": per_field,
            "exact_match": round(exact / len(refs), 4)}


def row_score(cfg: CompareConfig, reference: str, answer: str | None) -> float:
    if answer is None:
        return 0.0
    if cfg.task == "label":
        return float(extract_label(answer, cfg.label_field) == extract_label(reference, cfg.label_field))
    if cfg.task == "json":
        obj, ref = parse_json(answer), parse_json(reference) or {}
        fields = cfg.json_fields or list(ref)
        return float(isinstance(obj, dict) and all(obj.get(f) == ref.get(f) for f in fields))
    return round(rouge_l(answer, reference), 4)


# ----------------------------------------------------------------------------------------------
# Requests

class RawStore:
    """out/raw/<model>.jsonl: one line per finished request, appended and flushed at once."""

    def __init__(self, out: Path, model: str):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
        self.path = out / "raw" / f"{safe}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


async def ask(client, sem: asyncio.Semaphore, model: str, ex: Example, sampling: dict) -> dict:
    """One request; failures become a record with the reason (the SDK already retried)."""
    import openai

    async with sem:
        t0 = time.perf_counter()
        rec = {"idx": ex.idx, "answer": None, "error": None, "latency_s": None, "input_tokens": None,
               "output_tokens": None, "finish_reason": None, "t_start": time.time()}
        try:
            reply = await client.chat.completions.create(model=model, messages=ex.messages, **sampling)
            rec.update(answer=reply.choices[0].message.content or "", finish_reason=reply.choices[0].finish_reason,
                       input_tokens=reply.usage.prompt_tokens if reply.usage else None,
                       output_tokens=reply.usage.completion_tokens if reply.usage else None)
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
                       out: Path, resume: bool) -> dict[str, dict[int, dict]]:
    from tqdm import tqdm

    client = backend.async_client(max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    sampling = backend.sampling_kwargs(max_tokens=cfg.max_tokens)
    sem = asyncio.Semaphore(cfg.concurrency)
    results, tasks = {}, []
    for alias, model in models.items():
        store = RawStore(out, alias)
        done = store.load() if resume else {}
        if not resume and store.path.exists():
            store.path.unlink()
        done = {i: r for i, r in done.items() if r.get("error") is None}  # failed requests are sent again
        results[alias] = done
        for ex in examples:
            if ex.idx not in done:
                tasks.append((alias, model, store, ex))
    if not tasks:
        return results
    bar = tqdm(total=len(tasks), desc="requests", unit="req", file=sys.stderr)

    async def one(alias, model, store, ex):
        rec = await ask(client, sem, model, ex, sampling)
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


# ----------------------------------------------------------------------------------------------
# Baseline

def train_baseline(cfg: CompareConfig, examples: list[Example]) -> dict | None:
    """TF-IDF + logistic regression on the user messages of train_data (label task only)."""
    if cfg.task != "label" or not cfg.baseline or not cfg.train_data:
        return None
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train = load_examples(cfg.train_data)
    x = [ex.text for ex in train]
    y = [extract_label(ex.reference, cfg.label_field) for ex in train]
    keep = [i for i, label in enumerate(y) if label is not None]
    if len({y[i] for i in keep}) < 2:
        return None
    t0 = time.perf_counter()
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, C=10.0))
    pipe.fit([x[i] for i in keep], [y[i] for i in keep])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = [ex.text for ex in examples]
    preds = list(pipe.predict(texts))
    scores = pipe.predict_proba(texts)
    per = (time.perf_counter() - t0) / len(examples)
    return {"preds": [str(p) for p in preds], "scores": scores, "classes": [str(c) for c in pipe.classes_],
            "fit_s": round(fit_s, 3), "latency_s": per, "train_examples": len(keep)}


# ----------------------------------------------------------------------------------------------
# Cost, summary, report

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
              recs: dict[int, dict]) -> dict:
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
    refs = [ex.reference for ex in examples]
    if cfg.task == "label":
        summary.update(label_metrics([extract_label(r, cfg.label_field) or "<none>" for r in refs],
                                     [extract_label(a, cfg.label_field) for a in answers]))
    elif cfg.task == "json":
        summary.update(json_metrics(refs, answers, cfg.json_fields))
    else:
        summary["rouge_l"] = round(sum(rouge_l(a or "", r) for a, r in zip(answers, refs)) / len(refs), 4)
    return summary


async def judge(backend: Backend, cfg: CompareConfig, examples, answers: dict[str, list], a: str, b: str) -> dict:
    """Pairwise LLM judge, both orders; a win counts only when both orders agree."""
    client = backend.async_client(max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    model = backend.resolve(cfg.judge_model)
    sem = asyncio.Semaphore(cfg.concurrency)

    async def verdict(ex, first, second):
        prompt = (f"Question:\n{ex.text}\n\nReference answer:\n{ex.reference}\n\nAnswer 1:\n{first}\n\n"
                  f"Answer 2:\n{second}\n\nWhich answer is better? Reply with exactly 1, 2 or tie.")
        async with sem:
            try:
                r = await client.chat.completions.create(model=model, temperature=0, max_tokens=4,
                                                         messages=[{"role": "user", "content": prompt}])
                return (r.choices[0].message.content or "").strip().lower()
            except Exception:  # noqa: BLE001 - a failed verdict counts as no verdict
                return "error"

    wins = Counter()
    for ex in examples:
        x, y = answers[a][ex.idx] or "", answers[b][ex.idx] or ""
        v1, v2 = await asyncio.gather(verdict(ex, x, y), verdict(ex, y, x))
        if v1.startswith("1") and v2.startswith("2"):
            wins[a] += 1
        elif v1.startswith("2") and v2.startswith("1"):
            wins[b] += 1
        else:
            wins["tie_or_inconsistent"] += 1
    await client.close()
    return {"judge": model, "pair": [a, b], **wins}


def write_predictions(path: Path, cfg, examples, results, baseline) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        header = ["idx", "line", "input", "reference"]
        for alias in results:
            header += [f"{alias}_answer", f"{alias}_score", f"{alias}_latency_s", f"{alias}_error"]
        if baseline:
            header += [f"{BASELINE}_answer", f"{BASELINE}_score"]
        w.writerow(header)
        for ex in examples:
            row = [ex.idx, ex.line, ex.text, ex.reference]
            for alias, recs in results.items():
                rec = recs.get(ex.idx, {"error": "not_sent"})
                row += [rec.get("answer"), row_score(cfg, ex.reference, rec.get("answer")), rec.get("latency_s"),
                        rec.get("error") or ""]
            if baseline:
                pred = baseline["preds"][ex.idx]
                row += [pred, float(pred == extract_label(ex.reference, cfg.label_field))]
            w.writerow(row)
    tmp.replace(path)


def plot(out: Path, cfg: CompareConfig, summaries: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    metric = {"label": "accuracy", "json": "exact_match", "text": "rouge_l"}[cfg.task]
    names = [s["alias"] for s in summaries]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 3.2))
    keys = [metric] + (["macro_f1"] if cfg.task == "label" else [])
    w = 0.8 / len(keys)
    for k, key in enumerate(keys):
        vals = [s.get(key) or 0 for s in summaries]
        bars = ax.bar(np.arange(len(names)) + k * w, vals, w, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(names)) + w * (len(keys) - 1) / 2, names)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} on {summaries[0]['n']} held-out examples")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)
    files.append("metrics.png")

    timed = [s for s in summaries if s.get("latency_p50_s") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(timed)), 3.2))
        x = np.arange(len(timed))
        ax.bar(x - 0.2, [s["latency_p50_s"] for s in timed], 0.4, label="p50")
        ax.bar(x + 0.2, [s["latency_p95_s"] for s in timed], 0.4, label="p95")
        ax.set_xticks(x, [s["alias"] for s in timed])
        ax.set_ylabel("seconds per request")
        ax.legend(fontsize=8)
        ax.set_title(f"latency at concurrency {cfg.concurrency}")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=120)
        plt.close(fig)
        files.append("latency.png")

    for s in summaries:
        conf = s.get("confusion")
        if not conf:
            continue
        m = np.asarray(conf["matrix"], dtype=float)
        n = len(conf["labels"])
        size = min(14, 3 + 0.28 * n)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), conf["labels"], rotation=90, fontsize=6 if n > 20 else 8)
        ax.set_yticks(range(n), conf["labels"], fontsize=6 if n > 20 else 8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(f"{s['alias']}: accuracy {s['accuracy']:.2f}")
        fig.tight_layout()
        name = f"confusion_{re.sub(r'[^A-Za-z0-9_.-]+', '_', s['alias'])}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_report(out: Path, cfg: CompareConfig, metrics: dict, plots: list[str]) -> None:
    rows = metrics["models"]
    lines = [f"# Comparison: {Path(cfg.data).name}", "",
             f"{metrics['examples']} held-out examples from `{cfg.data}`, backend `{metrics['backend']}`, "
             f"task `{cfg.task}`, sampling {json.dumps(metrics['sampling'])}.", ""]
    if cfg.task == "label":
        lines += ["| model | accuracy | macro-F1 | precision | recall | parsed | ROC AUC | failed | p50 s | p95 s "
                  "| tokens in / out | cost USD |", "|" + "---|" * 12]
        for s in rows:
            failed = sum(s.get("failed", {}).values())
            lines.append(f"| {s['alias']} (`{s['model']}`) | {fmt(s.get('accuracy'))} | {fmt(s.get('macro_f1'))} | "
                         f"{fmt(s.get('precision'))} | {fmt(s.get('recall'))} | {fmt(s.get('parsed'))} | "
                         f"{fmt(s.get('roc_auc'))} | {failed} | {fmt(s.get('latency_p50_s'))} | "
                         f"{fmt(s.get('latency_p95_s'))} | {s.get('input_tokens', '–')} / {s.get('output_tokens', '–')} "
                         f"| {fmt(s.get('cost_usd'), 4)} |")
    elif cfg.task == "json":
        lines += ["| model | valid JSON | exact match | per field | failed | p50 s | p95 s | tokens in / out | cost USD |",
                  "|" + "---|" * 9]
        for s in rows:
            fields = ", ".join(f"{k} {v:.2f}" for k, v in s.get("field_accuracy", {}).items())
            lines.append(f"| {s['alias']} | {fmt(s.get('valid_json'))} | {fmt(s.get('exact_match'))} | {fields} | "
                         f"{sum(s.get('failed', {}).values())} | {fmt(s.get('latency_p50_s'))} | "
                         f"{fmt(s.get('latency_p95_s'))} | {s.get('input_tokens')} / {s.get('output_tokens')} | "
                         f"{fmt(s.get('cost_usd'), 4)} |")
    else:
        lines += ["| model | ROUGE-L | failed | p50 s | p95 s | tokens in / out | cost USD |", "|" + "---|" * 7]
        for s in rows:
            lines.append(f"| {s['alias']} | {fmt(s.get('rouge_l'))} | {sum(s.get('failed', {}).values())} | "
                         f"{fmt(s.get('latency_p50_s'))} | {fmt(s.get('latency_p95_s'))} | "
                         f"{s.get('input_tokens')} / {s.get('output_tokens')} | {fmt(s.get('cost_usd'), 4)} |")
        for j in metrics.get("judge", []):
            lines += ["", f"LLM judge `{j['judge']}` (both orders, a win needs both): "
                      + ", ".join(f"{k} {v}" for k, v in j.items() if k not in ("judge", "pair"))]
    failures = {s["alias"]: s["failed"] for s in rows if s.get("failed")}
    lines += ["", "Failed requests (counted as wrong, listed in predictions.csv): "
              + (json.dumps(failures) if failures else "none") + "."]
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="compare.yaml (see CompareConfig in this file)")
    p.add_argument("--backend", choices=["local", "openai"], help="overrides the config and LLM_BACKEND")
    p.add_argument("--models", help="comma-separated aliases or model ids (default: the config's models)")
    p.add_argument("--limit", type=int, help="only the first N held-out examples")
    p.add_argument("--data", help="held-out chat JSONL (overrides data)")
    p.add_argument("--out", help="output folder (overrides out)")
    p.add_argument("--concurrency", type=int, help="requests in flight (overrides concurrency)")
    p.add_argument("--resume", action="store_true", help="keep the answers already in OUT/raw and send the rest")
    p.add_argument("--start-server", action="store_true",
                   help="local backend: start the vLLM server of the serve config for this run, stop it after")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN_DIR",
                   help="with --start-server: serve this adapter (a run or checkpoint folder) too, e.g. "
                        "steps160=runs/banking77/sft_cpu/checkpoint-160 --models base,steps160,finetuned")
    args = p.parse_args(argv)

    overrides = {"limit": args.limit, "data": args.data, "out": args.out, "concurrency": args.concurrency,
                 "models": args.models.split(",") if args.models else None}
    cfg = load_config(CompareConfig, args.config, overrides)
    cfg.check(args.config or "compare")
    backend = load_backend(cfg.serve_config, args.backend or cfg.backend)
    if args.adapter:
        from .vllm_server import parse_adapters

        if not args.start_server:
            raise UserError("--adapter needs --start-server; to add an adapter to a running server: "
                            "python -m serve.adapters add NAME RUN_DIR")
        backend.settings.server.adapters.update(parse_adapters(args.adapter))
    examples = load_examples(cfg.data, cfg.limit)
    models = {alias: backend.resolve(alias) for alias in cfg.models}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparing {', '.join(f'{a} ({m})' if a != m else a for a, m in models.items())} on {len(examples)} "
          f"examples via {backend.name} ({backend.base_url or 'api.openai.com'})", file=sys.stderr)

    server = None
    if args.start_server:
        if backend.name != "local":
            raise UserError("--start-server starts the local vLLM server; drop it for the openai backend")
        from .vllm_server import VLLMServer

        server = VLLMServer(backend.settings, api_key=backend.api_key)
        t0 = time.perf_counter()
        print(f"starting the vLLM server ({backend.settings.server.model}) ...", file=sys.stderr, flush=True)
        server.start()
        print(f"server ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    interrupted = False
    try:
        _check_reachable(backend, list(models.values()))
        t0 = time.perf_counter()
        try:
            results = asyncio.run(run_requests(backend, cfg, models, examples, out, args.resume))
        except KeyboardInterrupt:
            interrupted = True
            results = {alias: {i: r for i, r in RawStore(out, alias).load().items() if not r.get("error")}
                       for alias in models}
        elapsed = time.perf_counter() - t0
    finally:
        if server:
            server.stop()

    baseline = train_baseline(cfg, examples)
    summaries = [summarise(cfg, backend, alias, models[alias], examples, results[alias]) for alias in models]
    if baseline:
        refs = [extract_label(ex.reference, cfg.label_field) or "<none>" for ex in examples]
        b = {"alias": BASELINE, "model": "TF-IDF + logistic regression", "backend": "local (scikit-learn)",
             "n": len(examples), "answered": len(examples), "failed": {},
             "latency_p50_s": round(baseline["latency_s"], 6), "latency_p95_s": round(baseline["latency_s"], 6),
             "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "fit_s": baseline["fit_s"],
             "train_examples": baseline["train_examples"]}
        b.update(label_metrics(refs, baseline["preds"], baseline["scores"], baseline["classes"]))
        summaries.append(b)
    metrics = {"config": asdict(cfg), "backend": backend.name, "examples": len(examples),
               "sampling": backend.sampling_kwargs(max_tokens=cfg.max_tokens), "elapsed_s": round(elapsed, 2),
               "complete": not interrupted and all(s["answered"] == s["n"] for s in summaries), "models": summaries}
    if cfg.task == "text" and cfg.judge_model and len(models) >= 2 and not interrupted:
        answers = {a: {i: r.get("answer") for i, r in results[a].items()} for a in models}
        for ex in examples:
            for a in models:
                answers[a].setdefault(ex.idx, None)
        names = list(models)
        metrics["judge"] = [asyncio.run(judge(backend, cfg, examples, answers, names[0], n)) for n in names[1:]]
    write_predictions(out / "predictions.csv", cfg, examples, results, baseline)
    plots = plot(out, cfg, summaries)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_report(out, cfg, metrics, plots)

    headline = {"label": "accuracy", "json": "exact_match", "text": "rouge_l"}[cfg.task]
    for s in summaries:
        failed = sum(s.get("failed", {}).values())
        print(f"{s['alias']:>16}: {headline} {fmt(s.get(headline))}"
              + (f", macro-F1 {fmt(s.get('macro_f1'))}" if cfg.task == "label" else "")
              + f", p50 {fmt(s.get('latency_p50_s'))} s, failed {failed}")
    print(f"report: {out / 'report.md'} (predictions.csv, metrics.json, plots)")
    if interrupted:
        print("interrupted: answers so far are kept; finish with the same command plus --resume", file=sys.stderr)
        return 130
    return 0


def _check_reachable(backend: Backend, models: list[str]) -> None:
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
