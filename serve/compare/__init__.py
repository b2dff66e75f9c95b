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

# The package: cli (CompareConfig, main), data (held-out examples), scoring and tasks (the task
# table), runner (concurrent requests, resume, judge), baseline (TF-IDF), summary, report.
from .baseline import BASELINE, baseline_summary, train_baseline
from .cli import CompareConfig, main
from .data import Example, load_examples
from .report import plot, write_outputs, write_predictions, write_report
from .runner import RawStore, ask, check_reachable, judge, run_requests
from .scoring import extract_label, json_metrics, label_metrics, parse_json, rouge_l
from .summary import inference_price, percentile, summarise
from .tasks import TASKS, Task, fmt, row_score

__all__ = ["BASELINE", "TASKS", "CompareConfig", "Example", "RawStore", "Task", "ask", "baseline_summary",
           "check_reachable", "extract_label", "fmt", "inference_price", "json_metrics", "judge", "label_metrics",
           "load_examples", "main", "parse_json", "percentile", "plot", "row_score", "rouge_l", "run_requests",
           "summarise", "train_baseline", "write_outputs", "write_predictions", "write_report"]
