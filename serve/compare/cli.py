"""``python -m serve.compare`` / ``tunekit compare``: the config (CompareConfig, compare.yaml) and main(argv)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tunekit.config import add_dataclass_flags, flag_overrides, load_config
from tunekit.errors import UserError

from ..client import load_backend
from .baseline import baseline_summary, train_baseline
from .data import load_examples
from .findings import delta_line, deltas
from .grading import grade_answers, grader_deltas, grader_summary, load_grader
from .report import console_lines, write_outputs
from .preference import load_pairs, preference_deltas, preference_summary, run_preferences
from .runner import RawStore, answered, check_reachable, judge, run_requests
from .scoring import FORMAT_CHECKS
from .summary import summarise
from .tasks import TASKS, label_classes


@dataclass
class CompareConfig:
    data: str = field(default="", metadata={
        "help": "held-out chat JSONL; the last assistant message is the reference"})
    serve_config: str | None = field(default=None, metadata={
        "help": "serve.yaml: backend, models, sampling (default: built-in defaults)"})
    task: str = field(default="label", metadata={"help": "label | json | text"})
    label_field: str | None = field(default=None, metadata={
        "help": "label task: JSON field of the answer holding the label"})
    json_fields: list[str] = field(default_factory=list, metadata={
        "help": "json task: fields to score (default: the reference's)"})
    train_data: str | None = field(default=None, metadata={
        "help": "chat JSONL the bag-of-words baseline learns from (label and json tasks)"})
    baseline: bool = field(default=True, metadata={"help": "score the TF-IDF baseline beside the models"})
    models: list[str] = field(default_factory=lambda: ["base", "finetuned"], metadata={
        "help": "aliases or model ids, space- or comma-separated"})
    backend: Literal["local", "openai"] | None = field(default=None, metadata={
        "help": "overrides the serve config's backend and LLM_BACKEND"})
    limit: int | None = field(default=None, metadata={"help": "only the first N held-out examples"})
    concurrency: int = field(default=16, metadata={"help": "requests in flight"})
    max_retries: int = field(default=4, metadata={"help": "retries per request on 429/5xx/timeouts"})
    timeout_s: float = field(default=120.0, metadata={"help": "seconds per request"})
    max_tokens: int | None = field(default=None, metadata={"help": "overrides the serve config's sampling.max_tokens"})
    gpu_hour_usd: float = field(default=0.0, metadata={
        "help": "local cost: what an hour of the serving machine costs"})
    judge_model: str | None = field(default=None, metadata={
        "help": "text task: alias or id of the judge (same backend)"})
    bootstrap: int = field(default=1000, metadata={
        "help": "paired-bootstrap resamples for the CIs of the deltas against the base and the baseline (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    logprobs: bool = field(default=False, metadata={
        "help": "label task: ask for top-20 log-probabilities, for the language models' ROC AUC"})
    examples: int = field(default=5, metadata={
        "help": "report.md: up to N examples where the second model beats the first, and N the other way"})
    format_check: str | None = field(default=None, metadata={
        "help": f"text task: share of answers in a format ({' | '.join(FORMAT_CHECKS)})"})
    preference_data: str | None = field(default=None, metadata={
        "help": "OpenAI DPO JSONL: each model's preference accuracy (preferred answer's log-probability above the "
                "non-preferred one's, read from the local vLLM server), its bootstrap CI and the mean margin"})
    preference_limit: int | None = field(default=None, metadata={"help": "only the first N preference pairs"})
    grader: str | None = field(default=None, metadata={
        "help": "an OpenAI grader (.json or .yaml file): each model's mean reward with a bootstrap CI and deltas, "
                "each answer graded against its example's item (see serve/compare/grading.py)"})
    reference_figures: list[str] = field(default_factory=list, metadata={
        "help": "report.md: figures measured elsewhere (e.g. a write-up's, on other splits), shown as context"})
    out: str = field(default="runs/compare", metadata={"help": "output folder"})

    def check(self, where: str) -> None:
        problems = []
        if not self.data:
            problems.append("data: required (held-out chat JSONL, e.g. valid.jsonl from `tunekit build`)")
        elif not Path(self.data).is_file():
            problems.append(f"data: {self.data} not found (build it with `tunekit build`)")
        if self.task not in TASKS:
            problems.append(f"task: {self.task!r}; use one of {', '.join(TASKS)}")
        if self.train_data and not Path(self.train_data).is_file():
            problems.append(f"train_data: {self.train_data} not found")
        if not self.models:
            problems.append("models: give at least one alias or model id")
        if self.concurrency < 1:
            problems.append(f"concurrency: {self.concurrency} must be at least 1")
        if self.bootstrap < 0:
            problems.append(f"bootstrap: {self.bootstrap} must be 0 (off) or more resamples")
        if self.examples < 0:
            problems.append(f"examples: {self.examples} must be 0 (no examples section) or more")
        if self.logprobs and self.task != "label":
            problems.append(f"logprobs: applies to the label task only (task is {self.task!r}); drop it")
        if self.format_check is not None and self.format_check not in FORMAT_CHECKS:
            problems.append(f"format_check: {self.format_check!r}; use one of {', '.join(FORMAT_CHECKS)}")
        elif self.format_check is not None and self.task != "text":
            problems.append(f"format_check: applies to the text task only (task is {self.task!r}); drop it")
        if self.preference_data and not Path(self.preference_data).is_file():
            problems.append(f"preference_data: {self.preference_data} not found (OpenAI DPO JSONL, e.g. the valid.jsonl "
                            "of `tunekit build` with method: dpo)")
        if self.preference_limit is not None and self.preference_limit < 1:
            problems.append(f"preference_limit: {self.preference_limit} must be at least 1 (null: every pair)")
        elif self.preference_limit is not None and not self.preference_data:
            problems.append("preference_limit: applies to preference_data, which is not set; drop it")
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.compare", description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="compare.yaml, whose keys mirror the flags below; flags override it")
    flags = add_dataclass_flags(p, CompareConfig, metavars={
        "data": "FILE.jsonl", "serve_config": "FILE.yaml", "train_data": "FILE.jsonl", "json_fields": "FIELD",
        "models": "MODEL", "limit": "N", "concurrency": "N", "max_retries": "N", "timeout_s": "S",
        "max_tokens": "N", "gpu_hour_usd": "USD", "judge_model": "MODEL", "out": "DIR", "bootstrap": "N",
        "seed": "N", "examples": "N", "format_check": "CHECK", "reference_figures": "TEXT",
        "preference_data": "FILE.jsonl", "preference_limit": "N", "grader": "FILE.json"})
    p.add_argument("--resume", action="store_true", help="keep the answers already in OUT/raw and send the rest")
    p.add_argument("--start-server", action="store_true",
                   help="local backend: start the vLLM server of the serve config for this run, stop it after")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN_DIR",
                   help="with --start-server: serve this adapter (a run or checkpoint folder) too, e.g. "
                        "steps160=runs/banking77/sft_cpu/checkpoint-160 --models base,steps160,finetuned")
    p.set_defaults(config_flags=flags)
    return p


def config_overrides(args) -> dict:
    """The config flags given; ``--models a,b`` and ``--models a b`` both list two models."""
    given = flag_overrides(args, args.config_flags)
    if given.get("models"):
        given["models"] = [m.strip() for item in given["models"] for m in item.split(",") if m.strip()]
    return given


def start_server(backend):
    """--start-server: the local vLLM server of the serve config, started and ready."""
    if backend.name != "local":
        raise UserError("--start-server starts the local vLLM server; drop it for the openai backend")
    from ..vllm_server import VLLMServer

    server = VLLMServer(backend.settings, api_key=backend.api_key)
    t0 = time.perf_counter()
    print(f"starting the vLLM server ({backend.settings.server.model}) ...", file=sys.stderr, flush=True)
    server.start()
    print(f"server ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return server


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    cfg = load_config(CompareConfig, args.config, config_overrides(args))  # --backend > compare.yaml's backend
    cfg.check(args.config or "compare")
    task = TASKS[cfg.task]
    backend = load_backend(cfg.serve_config, cfg.backend)  # then LLM_BACKEND, then the serve config's
    if args.adapter:
        from ..vllm_server import parse_adapters

        if not args.start_server:
            raise UserError("--adapter needs --start-server; to add an adapter to a running server: "
                            "python -m serve.adapters add NAME RUN_DIR")
        backend.settings.server.adapters.update(parse_adapters(args.adapter))
    examples = load_examples(cfg.data, cfg.limit)
    grader = load_grader(cfg.grader) if cfg.grader else None  # a bad grader is an error before any request
    pairs = load_pairs(cfg.preference_data, cfg.preference_limit) if cfg.preference_data else None
    if pairs and backend.name != "local":
        raise UserError("preference_data: needs the local vLLM backend (the log-probabilities of a given answer come "
                        "from its completions endpoint with echo); drop it for the openai backend")
    classes = label_classes(cfg, examples) if cfg.task == "label" else None
    models = {alias: backend.resolve(alias) for alias in cfg.models}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparing {', '.join(f'{a} ({m})' if a != m else a for a, m in models.items())} on {len(examples)} "
          f"examples via {backend.name} ({backend.base_url or 'api.openai.com'})", file=sys.stderr)

    server = start_server(backend) if args.start_server else None
    interrupted = False
    judged = preferences = graded = None
    try:
        check_reachable(backend, list(models.values()))
        t0 = time.perf_counter()
        try:
            results = asyncio.run(run_requests(backend, cfg, models, examples, out, args.resume,
                                               classes if cfg.logprobs else None))
        except KeyboardInterrupt:
            interrupted = True
            results = answered(out, models)
        if pairs and not interrupted:  # while the server is up
            try:
                preferences = asyncio.run(run_preferences(backend, cfg, models, pairs, out, args.resume))
            except KeyboardInterrupt:
                interrupted = True
                preferences = {a: RawStore(out, f"{a}.preference").load() for a in models}
        if grader and not interrupted:  # while the server is up: model graders ask it
            graded = grade_answers(cfg, grader, examples, results, backend.client())
        elapsed = time.perf_counter() - t0
        if task.judge and cfg.judge_model and len(models) >= 2 and not interrupted:  # while the server is up
            answers = {a: {i: r.get("answer") for i, r in results[a].items()} for a in models}
            for ex in examples:
                for a in models:
                    answers[a].setdefault(ex.idx, None)
            names = list(models)
            judged = [asyncio.run(judge(backend, cfg, examples, answers, names[0], n)) for n in names[1:]]
    finally:
        if server:
            server.stop()

    baseline = train_baseline(cfg, examples)
    summaries = [summarise(cfg, backend, alias, models[alias], examples, results[alias], classes)
                 for alias in models]
    if preferences is not None:
        for s in summaries:
            s.update(preference_summary(cfg, pairs, preferences[s["alias"]]))
    if graded:
        for s in summaries:
            s.update(grader_summary(cfg, grader, graded[s["alias"]]))
            for ex, g in zip(examples, graded[s["alias"]]):  # predictions.csv's <model>_reward
                results[s["alias"]].setdefault(ex.idx, {"error": "not_sent"})["reward"] = g["reward"]
    if baseline:
        summaries.append(baseline_summary(cfg, examples, baseline))
    metrics = {"config": asdict(cfg), "backend": backend.name, "examples": len(examples),
               "sampling": backend.sampling_kwargs(max_tokens=cfg.max_tokens), "elapsed_s": round(elapsed, 2),
               "complete": not interrupted and all(s["answered"] == s["n"] for s in summaries), "models": summaries,
               "deltas": deltas(cfg, examples, results, baseline, summaries)}
    if judged is not None:
        metrics["judge"] = judged
    if preferences is not None:
        metrics["preference_deltas"] = preference_deltas(cfg, pairs, preferences)
    if graded:
        metrics["grader_deltas"] = grader_deltas(cfg, graded)
    write_outputs(out, cfg, examples, results, baseline, metrics)

    for line in console_lines(cfg, summaries):
        print(line)
    for d in metrics["deltas"] + metrics.get("preference_deltas", []) + metrics.get("grader_deltas", []):
        print(f"  {delta_line(d)}")
    print(f"report: {out / 'report.md'} (predictions: {out / 'predictions.csv'}; metrics.json, plots)")
    if interrupted:
        print("interrupted: answers so far are kept; finish with the same command plus --resume", file=sys.stderr)
        return 130
    return 0
