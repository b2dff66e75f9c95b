"""Token statistics, the default-epochs heuristic and the training-cost estimate for chat JSONL.

    python -m data_prep stats runs/demo/data/train.jsonl
    python -m data_prep stats train.jsonl --model gpt-4o-mini-2024-07-18 --epochs 5 --json
    python -m data_prep stats train.jsonl --tokenizer .cache/models/smollm2-135m
    python -m data_prep stats prefs.jsonl          # a DPO file: recognised by its keys

Counts use o200k_base for gpt-4o models (offline, see ``tokens.py``), or a local tokenizer's chat
template. Cost = billed tokens per epoch x epochs x price per 1M training tokens
(``tunekit/prices.yaml``); billed tokens cap each example at 65,536, as OpenAI does.

A DPO file (``preference.py``) reports prompt, preferred-output and non-preferred-output tokens.
The rule used for its bill: each example is billed prompt + preferred + non-preferred tokens per
epoch (the prompt once, both outputs), with no cap (an example over the limit is invalid anyway).
Its tokens per example, the histogram and the limit count the prompt plus the longer output.
"""

from __future__ import annotations

from pathlib import Path

from .build import token_stats
from tunekit.constants import DEFAULT_OPENAI_MODEL, PRICES_FILE
from tunekit.config import read_yaml
from tunekit.errors import UserError
from .sources import check_readable, iter_jsonl
from .validate import MAX_TOKENS_PER_EXAMPLE, detect_method

TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 3, 100, 25_000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 1, 25


def default_epochs(n_examples: int) -> int:
    """OpenAI's cookbook heuristic for the epochs a job uses when none are given."""
    if n_examples == 0:
        return TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def training_price(model: str, prices_file: Path = PRICES_FILE) -> float | None:
    """USD per 1M training tokens; an alias such as ``gpt-4o-mini`` finds its dated snapshot."""
    prices = read_yaml(prices_file).get("training", {}) if prices_file.exists() else {}
    key = model if model in prices else next((k for k in prices if k.startswith(model + "-")), None)
    return None if key is None else float(prices[key])


def load_examples(path: Path) -> list[list[dict]]:
    check_readable(path, "jsonl")
    out = []
    for lineno, ex in iter_jsonl(path):
        if not isinstance(ex, dict) or not isinstance(ex.get("messages"), list):
            raise UserError(f"{path}:{lineno}: not a chat example (no 'messages' list); "
                            f"run `tunekit validate {path}`")
        out.append(ex["messages"])
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def load_tokenizer(path: str):
    """A local Hugging Face tokenizer for --tokenizer; a folder without one is a UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer there ({str(e).splitlines()[0]})") from None


def count_tokens(conversations: list[list[dict]], model: str, tokenizer_path: str | None) -> list[int]:
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
        texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    from .tokens import MessageCounter

    counter = MessageCounter(model, expected_examples=len(conversations))
    return [counter.messages(c) for c in conversations]


def preference_counts(examples: list[dict], model: str, tokenizer_path: str | None) -> list[tuple[int, int, int]]:
    """(prompt, preferred, non-preferred) tokens per DPO example; with a local tokenizer, an output's
    tokens are those its turn adds to the rendered prompt (generation prompt included)."""
    from .preference import OUTPUTS, count_tokens as count_pair

    if not tokenizer_path:
        from .tokens import MessageCounter

        counter = MessageCounter(model, expected_examples=len(examples))
        return [count_pair(ex, counter) for ex in examples]
    tok = load_tokenizer(tokenizer_path)

    def length(messages, **kw) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"])

    out = []
    for ex in examples:
        prompt = ex["input"]["messages"]
        n = length(prompt, add_generation_prompt=True)
        out.append((n, *(length(prompt + ex[key]) - n for key in OUTPUTS)))
    return out


def _billing(billed: int, n: int, model: str, tokenizer: str | None, epochs: int | None,
             prices_file: Path) -> dict:
    n_epochs = epochs or default_epochs(n)
    price = None if tokenizer else training_price(model, prices_file)
    return {
        "epochs": n_epochs, "epochs_source": "--epochs" if epochs else "default heuristic",
        "billed_tokens_per_epoch": billed,
        "billed_tokens_total": billed * n_epochs,
        "price_per_1m_training_tokens": price,
        "estimated_cost_usd": None if price is None else round(billed * n_epochs * price / 1e6, 4),
    }


def compute(path: Path, model: str = DEFAULT_OPENAI_MODEL, tokenizer: str | None = None,
            epochs: int | None = None, prices_file: Path = PRICES_FILE) -> dict:
    """The statistics of a supervised or (recognised by its keys) a DPO file."""
    if detect_method(path) == "dpo":
        return compute_preference(path, model, tokenizer, epochs, prices_file)
    conversations = load_examples(path)
    counts = count_tokens(conversations, model, tokenizer)
    billed = sum(min(MAX_TOKENS_PER_EXAMPLE, c) for c in counts)
    return {
        "file": str(path), "tokenizer": tokenizer or model, "examples": len(counts),
        "tokens_per_example": token_stats(counts),
        "messages_per_example": token_stats([len(c) for c in conversations]),
        "over_limit": sum(c > MAX_TOKENS_PER_EXAMPLE for c in counts),
        "limit": MAX_TOKENS_PER_EXAMPLE,
        **_billing(billed, len(counts), model, tokenizer, epochs, prices_file),
        "counts": counts,
    }


def compute_preference(path: Path, model: str = DEFAULT_OPENAI_MODEL, tokenizer: str | None = None,
                       epochs: int | None = None, prices_file: Path = PRICES_FILE) -> dict:
    """A DPO file's statistics: ``counts`` (and the limit) are prompt + the longer output; the bill
    is prompt + preferred + non-preferred per example and epoch (see the module docstring)."""
    from .preference import load_preference_examples

    examples = load_preference_examples(path)
    triples = preference_counts(examples, model, tokenizer)
    counts = [p + max(a, b) for p, a, b in triples]
    return {
        "file": str(path), "tokenizer": tokenizer or model, "method": "dpo", "examples": len(counts),
        "tokens_per_example": token_stats(counts),
        "prompt_tokens": token_stats([t[0] for t in triples]),
        "preferred_tokens": token_stats([t[1] for t in triples]),
        "non_preferred_tokens": token_stats([t[2] for t in triples]),
        "messages_per_example": token_stats([len(ex["input"]["messages"]) for ex in examples]),
        "over_limit": sum(c > MAX_TOKENS_PER_EXAMPLE for c in counts),
        "limit": MAX_TOKENS_PER_EXAMPLE,
        **_billing(sum(map(sum, triples)), len(counts), model, tokenizer, epochs, prices_file),
        "billing_rule": "prompt + preferred + non-preferred tokens per example, per epoch",
        "counts": counts,
    }


def histogram(counts: list[int], out: Path, title: str, limit: int | None = None) -> Path:
    # matplotlib's object API: no pyplot, so no backend switch (a notebook's stays as it is)
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.hist(counts, bins=min(50, max(5, len(set(counts)))), color="#4C72B0", edgecolor="white")
    for q, style in ((50, "-"), (95, "--")):
        v = float(np.percentile(counts, q))
        ax.axvline(v, color="#DD8452", linestyle=style, label=f"p{q} = {v:.0f}")
    if limit and max(counts) > 0.8 * limit:
        ax.axvline(limit, color="red", label=f"limit {limit}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def format_text(s: dict) -> str:
    t = s["tokens_per_example"]
    dpo = s.get("method") == "dpo"
    lines = [
        f"{s['file']}: {s['examples']} examples" + (" (DPO preference pairs)" if dpo else "")
        + f", tokenizer {s['tokenizer']}",
        f"  tokens/example{' (prompt + longer output)' if dpo else ''}  min {t['min']}  max {t['max']}  "
        f"mean {t['mean']}  median {t['median']:.0f}  p5 {t['p5']:.0f}  p95 {t['p95']:.0f}  total {t['total']:,}",
    ]
    if dpo:
        lines += [f"  {name:<22}mean {s[key]['mean']}  max {s[key]['max']}  total {s[key]['total']:,}"
                  for name, key in (("prompt tokens", "prompt_tokens"), ("preferred output", "preferred_tokens"),
                                    ("non-preferred output", "non_preferred_tokens"))]
    lines += [
        f"  over the {s['limit']:,}-token limit: {s['over_limit']}",
        f"  epochs: {s['epochs']} ({s['epochs_source']})",
        f"  billed training tokens: {s['billed_tokens_per_epoch']:,} per epoch, {s['billed_tokens_total']:,} in all"
        + (f" ({s['billing_rule']})" if dpo else ""),
    ]
    if s["estimated_cost_usd"] is not None:
        lines.append(f"  estimated OpenAI training cost: ${s['estimated_cost_usd']:.2f} "
                     f"(${s['price_per_1m_training_tokens']:.2f} per 1M training tokens)")
    elif s["price_per_1m_training_tokens"] is None and s["tokenizer"].startswith(("gpt-", "ft:")):
        lines.append("  estimated cost: no training price for this model in tunekit/prices.yaml")
    if s.get("plot"):
        lines.append(f"  histogram: {s['plot']}")
    return "\n".join(lines)
