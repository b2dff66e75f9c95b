"""``python -m serve.compare`` / ``tunekit compare``: the flags (from CompareConfig, config.py) and main(argv)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tunekit.config import add_dataclass_flags, flag_overrides, load_config
from tunekit.errors import UserError

from ..client import load_backend
from .baseline import baseline_summary, train_baseline
from .config import CompareConfig
from .data import load_examples
from .findings import delta_line, deltas
from .grading import grade_answers, grader_deltas, grader_summary, load_grader
from .report import console_lines, write_outputs
from .preference import load_pairs, preference_deltas, preference_summary, run_preferences
from .runner import RawStore, answered, check_reachable, judge, run_requests
from .summary import summarise
from .tasks import TASKS, label_classes


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
