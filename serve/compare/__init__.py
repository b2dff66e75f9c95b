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
         the label), share off-label (parsed, but none of the classes: wrong); a TF-IDF +
         logistic-regression baseline trained on ``train_data`` is scored beside the models, with
         ROC AUC from its probabilities; with ``logprobs`` the language models get a ROC AUC too,
         from the top-20 log-probabilities of the token where the label starts
  json   share of valid JSON objects, per-field accuracy, exact match; the baseline learns each
         distinct reference object of ``train_data`` as a class
  text   ROUGE-L F1 against the reference, ``format_check`` (markdown_headings: the share of
         answers with a heading line), and optionally an LLM judge (``judge_model``) that sees
         both answers in both orders

What the fine-tune buys: the headline metric's delta of every model against the first of
``models`` (the base) and against the baseline, with a 95% CI from a paired bootstrap over the
held-out examples (``bootstrap`` resamples, ``seed``), beside the latency, token and cost deltas;
and up to ``examples`` held-out examples where the second model beats the first, and the reverse.

With ``preference_data`` (OpenAI's DPO JSONL, local backend): each model's **preference accuracy**,
the share of pairs whose preferred answer gets a higher log-probability than the non-preferred one
after the pair's prompt, read from the vLLM server (its /tokenize renders the prompt with the served
chat template; /v1/completions with ``echo`` and ``logprobs`` scores the answer's tokens), with a 95%
bootstrap CI, the mean margin, and each model's delta against the one before it in ``models``
(``preference_limit``: the first N pairs); see preference.py.

With ``grader`` (an OpenAI grader in a .json/.yaml file): each model's answers graded against their
examples' items with serve.graders, the mean reward with a 95% bootstrap CI and its deltas against the first
model, beside the task's metrics; see grading.py.

Per model: latency p50/p95, input/output tokens, and cost (OpenAI prices from tunekit/prices.yaml;
local cost = the model's wall time x ``gpu_hour_usd``). Writes to ``out``: predictions.csv (system
message, input, reference, each model's answer and score), metrics.json (with the deltas), report.md
with PNG plots. Failed requests
(timeout, server error) and unparseable answers are counted and shown, never dropped: they score as
wrong. Every finished request is appended to ``out/raw/<model>.jsonl`` at once, so Ctrl-C keeps what
was done and ``--resume`` sends only the rest.
"""

# The package: config (CompareConfig), cli (main), data (held-out examples), scoring and tasks (the task
# table), logprobs (class scores from log-probabilities), preference (preference accuracy from the
# server's log-probabilities), runner (concurrent requests, resume, judge),
# baseline (TF-IDF), summary, findings (bootstrap deltas, before/after examples), grading (grader rewards), report.
from .baseline import BASELINE, baseline_summary, train_baseline
from .cli import main
from .config import CompareConfig
from .data import Example, load_examples
from .findings import deltas, paired_bootstrap
from .logprobs import class_scores, label_start
from .preference import load_pairs, preference_summary, run_preferences
from .report import plot, write_outputs, write_predictions, write_report
from .runner import RawStore, ask, check_reachable, judge, run_requests
from .scoring import extract_label, json_metrics, label_metrics, parse_json, rouge_l
from .summary import inference_price, percentile, summarise
from .tasks import TASKS, Task, fmt, row_score

__all__ = ["BASELINE", "TASKS", "CompareConfig", "Example", "RawStore", "Task", "ask", "baseline_summary",
           "check_reachable", "class_scores", "deltas", "extract_label", "fmt", "inference_price", "json_metrics",
           "judge", "label_metrics", "label_start", "load_examples", "load_pairs", "main", "paired_bootstrap",
           "parse_json", "percentile", "plot", "preference_summary", "row_score", "rouge_l", "run_preferences",
           "run_requests", "summarise", "train_baseline", "write_outputs", "write_predictions", "write_report"]
