"""CompareConfig: the keys of compare.yaml, which are also ``tunekit compare``'s flags, and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunekit.errors import UserError

from .scoring import FORMAT_CHECKS
from .tasks import TASKS


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
