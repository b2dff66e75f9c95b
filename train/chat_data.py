"""Chat data and templates for training: reading and checking data_prep's chat JSONL, choosing the
training chat template (one that renders like the model's own and marks the assistant's turns with
``{% generation %}``), and the token lengths of the examples under it."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from tunekit.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
GEN_MARKERS = re.compile(r"\{%-?\s*(generation|endgeneration)\s*-?%\}")


def load_chat_jsonl(path: str, key: str) -> list[dict]:
    """Read and check a chat JSONL file; every problem becomes one error naming the config key."""
    from data_prep.validate import checked_examples

    return [{"messages": [{"role": m["role"], "content": m["content"]} for m in ex["messages"]]}
            for ex in checked_examples(path, key)]


def resolve_chat_template(tokenizer, chat_template_path: str | None) -> str:
    """The template to train with: it must render exactly like the model's own and mark assistant turns.

    Order: ``chat_template_path`` if given; the model's template if it already has
    ``{% generation %}`` markers; a template in train/templates/ that equals the model's once its
    markers are removed; TRL's training version of the model's template.
    """
    if chat_template_path:
        p = Path(chat_template_path)
        if not p.is_file():
            raise UserError(f"chat_template_path: {p} not found (a .jinja file)")
        return p.read_text(encoding="utf-8")
    own = tokenizer.chat_template
    if not own:
        raise UserError("model_name_or_path: this tokenizer has no chat template; "
                        "give one with chat_template_path (a .jinja file with {% generation %} markers)")
    if GEN_MARKERS.search(own):
        return own
    for candidate in sorted(TEMPLATES.glob("*_training.jinja")):
        text = candidate.read_text(encoding="utf-8")
        if renders_like(tokenizer, text, own):
            return text
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:
        patched = None
    if not patched:
        raise UserError("chat_template_path: the model's chat template has no {% generation %} markers and "
                        "neither train/templates/ nor TRL has a training version of it; write one (the same "
                        "template with {% generation %}...{% endgeneration %} around each assistant reply and "
                        "its end-of-turn token) and set chat_template_path")
    return patched


PROBES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "{\"x\": 1}"},
     {"role": "user", "content": "émoji 😀"}, {"role": "assistant", "content": " two\nlines "}],
]


def renders_like(tokenizer, template: str, reference: str) -> bool:
    """Do two chat templates render the same text for a set of probe conversations?"""
    try:
        return all(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g, chat_template=template)
                   == tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g,
                                                    chat_template=reference)
                   for m in PROBES for g in (False, True))
    except Exception:  # a template that cannot render the probes is not the same template
        return False


def check_lengths(rows: list[dict], tokenizer, template: str, max_length: int | None,
                  max_fraction: float) -> dict:
    """Token lengths under the training template; too many over max_length is an error."""
    import numpy as np

    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, chat_template=template) for r in rows]
    lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    stats = {"examples": int(lengths.size), "max": int(lengths.max()), "p95": float(np.percentile(lengths, 95)),
             "mean": round(float(lengths.mean()), 1), "total": int(lengths.sum())}
    if max_length:
        over = int((lengths > max_length).sum())
        stats["over_max_length"] = over
        if over / lengths.size > max_fraction:
            suggest = int(2 ** math.ceil(math.log2(max(lengths.max(), 8))))
            raise UserError(f"max_length: {max_length} is shorter than {over} of {lengths.size} examples "
                            f"({over / lengths.size:.0%}; longest {lengths.max()} tokens), whose answers "
                            f"would be cut off; set max_length: {suggest}")
        if over:
            print(f"warning: {over} example(s) are longer than max_length {max_length} and will be truncated",
                  file=sys.stderr)
    return stats
