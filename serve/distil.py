"""Distil a model: its answers to a prompt set, written as chat JSONL that another model trains on.

    python -m serve.distil --serve-config configs/banking77/serve.yaml --model finetuned \\
        --data runs/banking77/data/train.jsonl --out runs/banking77/distil/train.jsonl
    tunekit distil --backend openai --model ft:gpt-4o-mini-2024-07-18:org:banking77:abc123 \\
        --data prompts.jsonl --out runs/distil/train.jsonl --concurrency 16
    tunekit distil --config distil.yaml --resume        # after Ctrl-C or failed requests: only the rest

Why: OpenAI takes no new fine-tuning jobs from 6 January 2027 and retires each ``ft:`` model with its
base model. Before that, send the ft: model the prompts it serves and keep its answers: train/sft.py
(``tunekit train``) then trains a local model on OUT to answer the same way.

Input (``data``): chat JSONL. Each line's messages up to its last user message are the prompt; an
assistant answer after it is dropped. Earlier assistant turns stay as context, marked ``weight: 0``
(OpenAI's rule; train/sft.py ignores weights). The system message is the line's own, else the serve
config's ``system``; ``--system TEXT`` replaces it on every line, ``--system ''`` removes it.

Requests go through serve.compare's runner: ``concurrency`` in flight, the SDK's retries with backoff,
sampling pinned by the serve config (top_p, seed, max_tokens) with ``temperature`` 0 by default. Every
finished request is kept at once in OUT's work folder (``OUT_STEM.distil/raw/``), so Ctrl-C loses
nothing and ``--resume`` sends only what is missing, failed requests again.

Output: OUT, one ``{"messages": [system?, ..., user, assistant]}`` per answered prompt in input order,
written atomically when the run ends, and ``OUT_STEM.distil/report.json``: prompts, answered, and every
skipped prompt with its reason (error after retries, an empty answer or a refusal, an answer cut at
max_tokens, a prompt that is no valid example), tokens, cost (OpenAI: tunekit/prices.yaml) and wall time.
Nothing is dropped without a line in the report. Exit status 1 when requests failed after their retries
(rerun with --resume), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tunekit.config import add_dataclass_flags, flag_overrides, load_config, opt
from tunekit.errors import UserError, run_main

from .client import Backend, load_backend
from .compare.data import Example
from .compare.runner import RawStore, check_reachable, run_requests
from .compare.summary import inference_price

MIN_EXAMPLES = 10  # data_prep validate (OpenAI) wants at least this many


@dataclass
class DistilConfig:
    data: str = opt("", "prompt set: chat JSONL; each line's messages up to its last user message are a prompt")
    out: str = opt("", "chat JSONL to write: the prompts with the model's answers")
    serve_config: str | None = opt(None, "serve.yaml: backend, models, sampling, system (default: built-in defaults)")
    backend: Literal["local", "openai"] | None = opt(None, "overrides the serve config's backend and LLM_BACKEND")
    model: str = opt("finetuned", "the teacher: an alias (finetuned, base, an adapter) or a model id (ft:gpt-...)")
    system: str | None = opt(None, "system message for every prompt, replacing the line's ('' for none; "
                                   "default: the line's own, else the serve config's system)")
    limit: int | None = opt(None, "only the first N prompts")
    concurrency: int = opt(8, "requests in flight")
    max_retries: int = opt(4, "retries per request on 429/5xx/timeouts")
    timeout_s: float = opt(120.0, "seconds per request")
    max_tokens: int | None = opt(None, "overrides the serve config's sampling.max_tokens; answers cut there "
                                       "are skipped")
    temperature: float = opt(0.0, "sampling temperature (0: the model's most likely answer)")
    resume: bool = opt(False, "keep the answers already received (OUT_STEM.distil/raw) and send only the rest")

    def check(self, where: str) -> None:
        problems = []
        if not self.data:
            problems.append("data: required (chat JSONL of prompts, e.g. train.jsonl from `tunekit build`)")
        elif not Path(self.data).is_file():
            problems.append(f"data: {self.data} not found")
        if not self.out:
            problems.append("out: required (the chat JSONL to write, e.g. runs/distil/train.jsonl)")
        elif not self.out.endswith(".jsonl"):
            problems.append(f"out: {self.out} should end in .jsonl")
        elif self.data and Path(self.out).resolve() == Path(self.data).resolve():
            problems.append("out: is the input file; write the answers to another file")
        if not self.model:
            problems.append("model: give an alias or a model id")
        for key, low in (("concurrency", 1), ("limit", 1), ("max_tokens", 1), ("max_retries", 0)):
            value = getattr(self, key)
            if value is not None and value < low:
                problems.append(f"{key}: {value} must be at least {low}")
        if self.timeout_s <= 0 or self.temperature < 0:
            problems.append("timeout_s must be above 0 and temperature at least 0")
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems))


@dataclass
class Prompt(Example):
    """A compare Example (``messages`` are sent as they are) plus the messages OUT keeps before the answer."""

    keep: list[dict] = field(default_factory=list)


def load_prompts(path: str | Path, system: str | None = None, default_system: str | None = None,
                 limit: int | None = None) -> tuple[list[Prompt], list[dict]]:
    """(prompts, skipped): skipped are the lines that hold no prompt, each with its line and reason."""
    from data_prep.sources import iter_jsonl
    from data_prep.validate import check_example

    prompts, skipped = [], []
    for line, row in iter_jsonl(Path(path)):
        idx = len(prompts) + len(skipped)
        if limit and idx >= limit:
            break
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise UserError(f"{path}:{line}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            skipped.append({"idx": idx, "line": line, "reason": "no_user_message", "detail": "no user message"})
            continue
        cut = msgs[:users[-1] + 1]
        reference = next((str(m.get("content", "")) for m in msgs[users[-1] + 1:] if m["role"] == "assistant"), "")
        if system is not None or not any(m["role"] == "system" for m in cut):
            text = system if system is not None else default_system
            cut = [m for m in cut if m["role"] != "system"]
            cut = ([{"role": "system", "content": text}] if text else []) + cut
        keep = [{**m, "weight": m.get("weight", 0)} if m["role"] == "assistant" else dict(m) for m in cut]
        problems = check_example({"messages": [*keep, {"role": "assistant", "content": "answer"}]})
        if problems:
            skipped.append({"idx": idx, "line": line, "reason": "invalid_prompt",
                            "detail": "; ".join(f"{c}: {m}" for c, m in problems)})
            continue
        sent = [{k: v for k, v in m.items() if k != "weight"} for m in cut]
        prompts.append(Prompt(idx, line, sent, reference, keep=keep))
    if not prompts and not skipped:
        raise UserError(f"{path}: no prompts")
    return prompts, skipped


def prompt_hash(p: Prompt) -> str:
    return hashlib.sha256(json.dumps(p.messages, sort_keys=True).encode()).hexdigest()[:16]


def check_manifest(work: Path, manifest: dict, resume: bool) -> None:
    """--resume only onto answers of the same model and sampling to the same prompts; then record this run."""
    path = work / "manifest.json"
    if resume and path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model_id", "sampling"):
            if old.get(key) != manifest[key]:
                raise UserError(f"--resume: {work}/raw holds answers for {key} {old.get(key)!r}, this run asks for "
                                f"{manifest[key]!r}; drop --resume to start again")
        changed = [i for i, h in manifest["prompts"].items() if old.get("prompts", {}).get(i, h) != h]
        if changed:
            raise UserError(f"--resume: {len(changed)} prompt(s) differ from those {work}/raw answered (first: "
                            f"prompt {int(changed[0]) + 1}); drop --resume to start again")
        manifest = {**manifest, "prompts": {**old.get("prompts", {}), **manifest["prompts"]}}
    write_atomic(path, json.dumps(manifest))


def verdict(rec: dict | None) -> tuple[str | None, str]:
    """(None, "") for an answer to keep, else (reason, detail)."""
    if rec is None:
        return "not_sent", "no request finished (interrupted)"
    if rec.get("error"):
        return f"error:{rec['error']}", rec.get("error_message") or f"{rec['error']} after retries"
    if rec.get("finish_reason") == "content_filter":
        return "refusal", "finish_reason content_filter"
    if rec.get("finish_reason") == "length":
        return "truncated", f"cut at max_tokens ({rec.get('output_tokens')} tokens); raise --max-tokens"
    if not (rec.get("answer") or "").strip():
        return "empty", "no text in the answer (a refusal, or tool calls only)"
    return None, ""


def account(prompts: list[Prompt], skipped_inputs: list[dict], recs: dict[int, dict], backend_name: str,
            model_id: str) -> tuple[list[dict], dict]:
    """(rows for OUT, report): every prompt is answered or skipped with a reason; tokens and cost."""
    rows, skipped = [], list(skipped_inputs)
    for p in prompts:
        rec = recs.get(p.idx)
        reason, detail = verdict(rec)
        if reason:
            skipped.append({"idx": p.idx, "line": p.line, "reason": reason, "detail": detail})
        else:
            rows.append({"messages": [*p.keep, {"role": "assistant", "content": rec["answer"]}]})
    got = [recs[p.idx] for p in prompts if p.idx in recs and not recs[p.idx].get("error")]
    tin, tout = sum(r.get("input_tokens") or 0 for r in got), sum(r.get("output_tokens") or 0 for r in got)
    report = {"prompts": len(prompts) + len(skipped_inputs), "answered": len(rows),
              "skipped": dict(Counter(s["reason"] for s in skipped)),
              "skipped_prompts": sorted(skipped, key=lambda s: s["idx"]),
              "input_tokens": tin, "output_tokens": tout}  # every response received: what is billed
    price = inference_price(model_id) if backend_name == "openai" else None
    report["cost_usd"] = round((tin * price["input"] + tout * price["output"]) / 1e6, 6) if price else None
    report["cost_basis"] = ("tunekit/prices.yaml" if price else f"no price for {model_id} in tunekit/prices.yaml"
                            if backend_name == "openai" else "local backend: no per-token price")
    return rows, report


def write_atomic(path: Path, text: str) -> None:
    """A reader sees the old file or the whole new one, never half of it (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".distil")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.distil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="distil.yaml, whose keys mirror the flags below; flags override it")
    flags = add_dataclass_flags(p, DistilConfig, metavars={
        "data": "FILE.jsonl", "out": "OUT.jsonl", "serve_config": "FILE.yaml", "model": "MODEL", "system": "TEXT",
        "limit": "N", "concurrency": "N", "max_retries": "N", "timeout_s": "S", "max_tokens": "N",
        "temperature": "T"})
    p.set_defaults(config_flags=flags)
    return p


def distil(cfg: DistilConfig, backend: Backend) -> tuple[dict, int]:
    """Send, account, write OUT and the report; (report, exit status)."""
    model_id = backend.resolve(cfg.model)
    backend.settings.sampling.temperature = cfg.temperature
    sampling = backend.sampling_kwargs(max_tokens=cfg.max_tokens)
    prompts, skipped_inputs = load_prompts(cfg.data, cfg.system, backend.settings.system, cfg.limit)
    out, work = Path(cfg.out), work_dir(cfg.out)
    print(f"distilling {model_id}{f' ({cfg.model})' if cfg.model != model_id else ''} via {backend.name} "
          f"({backend.base_url or 'api.openai.com'}): {len(prompts)} prompts -> {out}", file=sys.stderr)
    check_reachable(backend, [model_id])
    check_manifest(work, {"model_id": model_id, "sampling": sampling,
                          "prompts": {str(p.idx): prompt_hash(p) for p in prompts}}, cfg.resume)
    before = {i for i, r in RawStore(work, model_id).load().items() if not r.get("error")} if cfg.resume else set()
    t0, interrupted = time.perf_counter(), False
    try:
        recs = asyncio.run(run_requests(backend, cfg, {model_id: model_id}, prompts, work, cfg.resume))[model_id]
    except KeyboardInterrupt:
        interrupted = True
        recs = RawStore(work, model_id).load()
    rows, report = account(prompts, skipped_inputs, recs, backend.name, model_id)
    report = {"data": cfg.data, "out": str(out), "backend": backend.name, "model": cfg.model, "model_id": model_id,
              "sampling": sampling, "complete": not interrupted, **report,
              "resumed": len(before & {p.idx for p in prompts}), "wall_s": round(time.perf_counter() - t0, 2),
              "config": asdict(cfg)}
    write_atomic(work / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if interrupted:
        print(f"interrupted: {len(rows)} answers kept in {work / 'raw'}; {out} not written; finish with the same "
              "command plus --resume", file=sys.stderr)
        return report, 130
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return report, 1 if any(r.startswith("error:") for r in report["skipped"]) else 0


def console_lines(report: dict, work: Path) -> list[str]:
    skipped = ", ".join(f"{r} {n}" for r, n in report["skipped"].items()) or "none"
    cost = f"${report['cost_usd']:.4f}" if report["cost_usd"] is not None else f"n/a ({report['cost_basis']})"
    lines = [f"{report['out']}: {report['answered']} of {report['prompts']} prompts answered by {report['model_id']}"
             f" (skipped: {skipped}; {report['resumed']} kept from an earlier run)",
             f"  tokens {report['input_tokens']:,} in / {report['output_tokens']:,} out; cost {cost}; "
             f"wall {report['wall_s']:.1f} s",
             f"  report: {work / 'report.json'} (every skipped prompt with its line and reason)"]
    if any(r.startswith("error:") for r in report["skipped"]):
        lines.append("  some requests failed after their retries: rerun the same command with --resume")
    if report["answered"] < MIN_EXAMPLES:
        lines.append(f"  note: OpenAI fine-tuning needs at least {MIN_EXAMPLES} examples; "
                     "`tunekit validate` will say so")
    return lines


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = load_config(DistilConfig, args.config, flag_overrides(args, args.config_flags))
    cfg.check(args.config or "distil")
    backend = load_backend(cfg.serve_config, cfg.backend)
    report, status = distil(cfg, backend)
    if status != 130:
        print("\n".join(console_lines(report, work_dir(cfg.out))))
    return status


if __name__ == "__main__":
    sys.exit(run_main(main))
