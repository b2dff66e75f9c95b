"""Build chat fine-tuning files from a CSV, JSONL or Parquet file.

    python -m data_prep build --config configs/banking77/build.yaml
    python -m data_prep build --input reviews.csv --out runs/reviews/data \\
        --system "You label app reviews." --user "{{ review_text }}" \\
        --assistant "{{ review_rating | lookup({'1':'negative','5':'positive'}, 'neutral') }}" \\
        --dropna review_text --sample 1000 --valid-fraction 0.3 --seed 42
    python -m data_prep build --config configs/banking77_json/build.yaml   # derive + lookup_file
    python -m data_prep build --input prefs.csv --out runs/prefs/data --method dpo \\
        --user "{{ prompt }}" --chosen "{{ chosen }}" --rejected "{{ rejected }}"

``derive`` adds columns computed from each row (templates, in order, each seeing the ones before)
that the other templates and ``stratify`` can use like the input's own, e.g. a main category looked
up from the intent with ``lookup_file``; a row whose derived value fails is dropped as a
``template_error`` with the reason.

``method: dpo`` writes OpenAI's DPO format instead (``preference.py``): the system and user templates
make the prompt, ``chosen`` and ``rejected`` the preferred and non-preferred answers. Cleaning,
dropna/fillna/keep, derive, sample, dedupe, max_tokens (prompt + the longer answer) and the split
work as for chat; a row whose answers are empty or equal is dropped with that reason, and all pairs
of one prompt land on the same side of the split.

Writes ``OUT/train.jsonl`` and ``OUT/valid.jsonl`` (OpenAI's chat or DPO format) and ``OUT/report.json``,
which accounts for every input row: ``rows_in == sum(rows_out) + sum(rows_dropped)``.
Outputs appear together at the end or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .clean import clean_text
from .preference import count_tokens as count_pair
from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.errors import UserError
from .sources import check_readable, detect_format, read_jsonl, read_tabular
from .templates import RowError, compile_template, make_env, render
from .tokens import MessageCounter, encoding_name

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class BuildConfig:
    """The keys of a build config file; each is also a flag of ``python -m data_prep build``."""

    input: str = field(default="", metadata={"help": "CSV, TSV, JSONL or Parquet file"})
    out: str = field(default="", metadata={"help": "output folder"})
    system: str | None = field(default=None, metadata={
        "help": "system prompt (a template too); replaces the one in conversations"})
    user: str | None = field(default=None, metadata={
        "help": "Jinja2 template for the user message over the row's columns, e.g. 'Review: {{ review_text }}'"})
    assistant: str | None = field(default=None, metadata={"help": "Jinja2 template for the assistant answer"})
    method: Literal["supervised", "dpo"] = field(default="supervised", metadata={
        "help": "supervised: chat examples (user + assistant); dpo: OpenAI's preference pairs (user + chosen + "
                "rejected)"})
    chosen: str | None = field(default=None, metadata={"help": "with method dpo: template for the preferred answer"})
    rejected: str | None = field(default=None, metadata={
        "help": "with method dpo: template for the non-preferred answer"})
    derive: dict[str, str] = field(default_factory=dict, metadata={
        "help": "new columns from templates over each row, e.g. main_category=\"{{ category | "
                "lookup_file('groups.yaml') }}\"; templates and stratify can use them"})
    dropna: list[str] = field(default_factory=list, metadata={"help": "drop rows where any of these columns is empty"})
    fillna: dict[str, str] = field(default_factory=dict, metadata={"help": "fill empty cells of a column"})
    keep: dict[str, list[str]] = field(default_factory=dict, metadata={
        "help": "keep only rows whose column is one of these values (config file only)"})
    sample: int | None = field(default=None, metadata={"help": "keep a seeded random sample of N examples"})
    valid_fraction: float = field(default=0.2, metadata={"help": "share of examples in valid.jsonl"})
    stratify: str | None = field(default=None, metadata={
        "help": "column whose label proportions both files keep"})
    seed: int = field(default=42, metadata={"help": "seed for sampling and the split"})
    max_tokens: int | None = field(default=None, metadata={"help": "drop examples longer than N o200k tokens"})
    dedupe: bool = field(default=False, metadata={
        "help": "drop exact duplicate examples (they never straddle the split either way)"})
    clean: bool = field(default=True, metadata={
        "help": "strip HTML, decode entities, normalise Unicode and whitespace in the data"})
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = field(default="NFC", metadata={
        "help": "Unicode normalisation of the data"})
    encoding: str = field(default="utf-8", metadata={"help": "input encoding (a BOM is fine)"})
    format: Literal["csv", "jsonl", "parquet"] | None = field(default=None, metadata={
        "help": "input format (default: from the extension)"})
    delimiter: str | None = field(default=None, metadata={"help": "CSV delimiter (default: tab for .tsv, ',' otherwise)"})
    model: str = field(default=DEFAULT_OPENAI_MODEL, metadata={
        "help": "OpenAI model whose tokenizer counts tokens for the report"})

    def check(self) -> None:
        problems = []
        if not self.input:
            problems.append("input: required (the CSV, JSONL or Parquet file to read)")
        if not self.out:
            problems.append("out: required (the folder to write train.jsonl, valid.jsonl, report.json)")
        if self.method == "dpo":
            if not (self.user and self.chosen and self.rejected):
                problems.append("method dpo: give the user, chosen and rejected templates (the prompt, the "
                                "preferred and the non-preferred answer)")
            if self.assistant:
                problems.append("assistant: not used with method dpo; give chosen and rejected instead")
        elif self.method == "supervised":
            if bool(self.user) != bool(self.assistant):
                problems.append("user/assistant: give both templates, or neither for a JSONL of conversations")
            if self.chosen or self.rejected:
                problems.append("chosen/rejected: only used with method: dpo (--method dpo)")
        else:
            problems.append(f"method: {self.method!r}; use supervised or dpo")
        if not 0 <= self.valid_fraction < 1:
            problems.append(f"valid_fraction: {self.valid_fraction} is not in [0, 1)")
        if self.sample is not None and self.sample < 1:
            problems.append(f"sample: {self.sample} must be a positive number of rows")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens: {self.max_tokens} must be positive")
        if self.unicode_form not in ("NFC", "NFKC", "NFD", "NFKD", "none"):
            problems.append(f"unicode_form: {self.unicode_form!r}; use NFC, NFKC, NFD, NFKD or none")
        if not isinstance(self.dropna, list) or not isinstance(self.fillna, dict):
            problems.append("dropna must be a list of columns and fillna a mapping {column: value}")
        if not isinstance(self.derive, dict) or not all(isinstance(v, str) and v for v in self.derive.values()):
            problems.append("derive: expected a mapping {new column: template}, e.g. "
                            "main_category: \"{{ category | lookup_file('groups.yaml') }}\"")
        elif set(self.derive) & set(self.keep):
            problems.append(f"keep: {', '.join(sorted(set(self.derive) & set(self.keep)))} is a derived column; "
                            "keep filters the input's own columns (drop rows of a derived one with a lookup instead)")
        if problems:
            raise UserError("; ".join(problems))


def _key(seed: int, text: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()


def split(examples: list[dict], valid_fraction: float, seed: int, stratify: bool) -> tuple[list, list]:
    """Seeded split by groups (``ex["group"]``: identical examples, or DPO pairs of one prompt),
    so exact duplicates never straddle it.

    With ``stratify``, each label's groups are split on their own, so both files keep the
    label proportions (to within one example per label).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        groups[ex["group"]].append(ex)
    strata: dict[str, list[str]] = defaultdict(list)
    for text, members in groups.items():
        strata[members[0]["label"] if stratify else ""].append(text)
    valid_texts: set[str] = set()
    for label, texts in strata.items():
        texts.sort(key=lambda t: _key(seed, t))
        target = round(sum(len(groups[t]) for t in texts) * valid_fraction)
        taken = 0
        for t in texts:   # a group that would overshoot the target is passed over for a smaller one
            if taken + len(groups[t]) <= target:
                valid_texts.add(t)
                taken += len(groups[t])
    order = sorted(examples, key=lambda ex: ex["order"])
    return ([ex for ex in order if ex["group"] not in valid_texts],
            [ex for ex in order if ex["group"] in valid_texts])


def token_stats(counts: list[int]) -> dict:
    import numpy as np

    if not counts:
        return {"examples": 0, "total": 0}
    a = np.asarray(counts)
    return {"examples": int(a.size), "total": int(a.sum()), "min": int(a.min()), "max": int(a.max()),
            "mean": round(float(a.mean()), 1), "median": float(np.median(a)),
            "p5": float(np.percentile(a, 5)), "p95": float(np.percentile(a, 95))}


def _messages_from_conversation(row: dict, cfg: BuildConfig, system_text: str | None) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError("no 'messages' list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RowError(f"bad message {str(m)[:80]!r}: needs a role in {ROLES} and string content")
        msg = {"role": m["role"], "content": m["content"]}
        if "weight" in m:
            msg["weight"] = m["weight"]
        out.append(msg)
    if system_text is not None:
        out = [m for m in out if m["role"] != "system"]
        out.insert(0, {"role": "system", "content": system_text})
    return out


def _render_record(cfg: BuildConfig, templates: dict, values: dict, row: dict, fix) -> dict:
    """One row's output line: ``{"messages": [...]}`` or a DPO example. Raises RowError."""
    system_text = render(templates["system"], values).strip() if "system" in templates else None
    if "user" not in templates:   # a JSONL of conversations
        messages = _messages_from_conversation(row, cfg, system_text)
        for m in messages:
            if m["role"] != "system" or system_text is None:
                m["content"] = fix(m["content"])
        return {"messages": messages}
    messages = [] if not system_text else [{"role": "system", "content": system_text}]
    messages.append({"role": "user", "content": render(templates["user"], values).strip()})

    def answer(key: str) -> list[dict]:
        return [{"role": "assistant", "content": render(templates[key], values).strip()}]

    if cfg.method == "dpo":
        return {"input": {"messages": messages}, "preferred_output": answer("chosen"),
                "non_preferred_output": answer("rejected")}
    return {"messages": messages + answer("assistant")}


def _drop_reason(record: dict) -> tuple[str, str] | None:
    """(reason, detail) when a rendered example cannot be kept."""
    dpo = "input" in record
    messages = record["input"]["messages"] if dpo else record["messages"]
    empty = next((m["role"] for m in messages if not m["content"]), None)
    if empty:
        return f"empty_{empty}", f"the {empty} message is empty after rendering and cleaning"
    if not dpo:
        return None if any(m["role"] == "assistant" for m in messages) else ("no_assistant", "no assistant message")
    chosen, rejected = record["preferred_output"][0]["content"], record["non_preferred_output"][0]["content"]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text:
            return f"empty_{name}", f"the {name} answer is empty after rendering and cleaning"
    if chosen == rejected:
        return "chosen_equals_rejected", f"chosen and rejected are both {chosen[:80]!r}; DPO learns nothing from it"
    return None


def _count(record: dict, counter: MessageCounter) -> int:
    """An example's length for max_tokens and the report; for DPO, the prompt + the longer answer."""
    if "input" not in record:
        return counter.messages(record["messages"])
    prompt, chosen, rejected = count_pair(record, counter)
    return prompt + max(chosen, rejected)


def _token_report(cfg: BuildConfig, counter: MessageCounter, train: list[dict], valid: list[dict]) -> dict:
    tokens = {"model": cfg.model, "train": token_stats([ex["tokens"] for ex in train]),
              "valid": token_stats([ex["tokens"] for ex in valid])}
    if cfg.method != "dpo":
        tokens["train_assistant"] = token_stats([counter.assistant(ex["record"]["messages"]) for ex in train])
        return tokens
    parts = [count_pair(ex["record"], counter) for ex in train]
    for i, name in enumerate(("train_prompt", "train_chosen", "train_rejected")):
        tokens[name] = token_stats([p[i] for p in parts])
    return tokens


def build(cfg: BuildConfig, progress: bool = True) -> dict:
    """Run the whole build; returns the report (also written to OUT/report.json)."""
    started = time.perf_counter()
    cfg.check()
    encoding_name(cfg.model)   # an unknown model fails here, before the input is read
    path = Path(cfg.input)
    fmt = detect_format(path, cfg.format)
    check_readable(path, fmt)

    env = make_env()
    templates, needed = {}, set()
    derived: dict[str, object] = {}
    for name, source in cfg.derive.items():
        derived[name], cols = compile_template(env, source, f"derive.{name}")
        needed.update(c for c in cols if c not in derived)
    for role in ("system", "user", "assistant", "chosen", "rejected"):
        source = getattr(cfg, role)
        if source:
            templates[role], cols = compile_template(env, source, role)
            needed.update(c for c in cols if c not in derived)
    conversation_mode = "user" not in templates
    if conversation_mode:
        if fmt != "jsonl":
            raise UserError("user/assistant: templates are required unless the input is a JSONL "
                            "of conversations ({\"messages\": [...]} per line)")
        needed.add("messages")
    if cfg.stratify and cfg.stratify not in derived:
        needed.add(cfg.stratify)
    needed.update(cfg.keep)
    needed_cols = sorted(needed)

    # Ask the reader for a few spare candidates so rows dropped later still leave `sample` examples.
    candidates = None if cfg.sample is None else cfg.sample + max(50, cfg.sample // 10)
    if fmt == "jsonl":
        src = read_jsonl(path, needed_cols, cfg.fillna, cfg.dropna, candidates, cfg.seed, cfg.encoding, cfg.keep)
    else:
        src = read_tabular(path, fmt, needed_cols, cfg.fillna, cfg.dropna, candidates, cfg.seed,
                           cfg.encoding, cfg.delimiter, cfg.keep)
    if src.rows_in == 0:
        raise UserError(f"{path}: no data rows (only a header?)")
    clash = sorted(set(derived) & set(src.columns))
    if clash:
        raise UserError(f"derive: {', '.join(clash)} is already a column of {path}; give the derived column "
                        "another name")
    dropped = Counter(src.dropped)
    if src.sampled_out:
        dropped["not_sampled"] += src.sampled_out
    drop_examples: dict[str, list[str]] = defaultdict(list)

    def drop(reason: str, detail: str) -> None:
        dropped[reason] += 1
        if len(drop_examples[reason]) < 3:
            drop_examples[reason].append(detail[:300])

    form = None if cfg.unicode_form == "none" else cfg.unicode_form
    fix = (lambda s: clean_text(s, form)) if cfg.clean else (lambda s: s)
    counter = MessageCounter(cfg.model, expected_examples=min(len(src.rows), cfg.sample or len(src.rows)))
    examples: list[dict] = []
    seen: set[str] = set()
    rows = src.rows
    try:
        from tqdm import tqdm
        rows = tqdm(rows, desc="examples", unit=" rows", disable=not progress or len(rows) < 20000,
                    mininterval=1.0)
    except ImportError:
        pass
    for i, row in enumerate(rows):
        if cfg.sample is not None and len(examples) >= cfg.sample:
            dropped["not_sampled"] += 1
            continue
        where = f"line {row['__line']}" if "__line" in row else f"row {row_preview(row)}"
        values = {k: fix(v) if isinstance(v, str) else v for k, v in row.items()}
        try:
            # Cleaning applies to the data (cell values, conversation turns), never to the
            # templates' own text: a prompt may well say "<intent>" on purpose.
            for name, template in derived.items():
                try:
                    values[name] = render(template, values).strip()
                except RowError as e:
                    raise RowError(f"derive.{name}: {e}") from None
            record = _render_record(cfg, templates, values, row, fix)
        except RowError as e:
            drop("template_error", f"{where}: {e}")
            continue
        problem = _drop_reason(record)
        if problem:
            drop(problem[0], f"{where}: {problem[1]}")
            continue
        n_tokens = _count(record, counter)
        if cfg.max_tokens and n_tokens > cfg.max_tokens:
            drop("over_max_tokens", f"{where}: {n_tokens} tokens > max_tokens {cfg.max_tokens}")
            continue
        # the chat split key stays the messages' JSON, so existing splits do not move
        text = json.dumps(record.get("messages", record), ensure_ascii=False, sort_keys=True)
        group = json.dumps(record["input"]["messages"], ensure_ascii=False, sort_keys=True) if "input" in record else text
        if cfg.dedupe:
            if text in seen:
                drop("duplicate", f"{where}: same example as an earlier row")
                continue
            seen.add(text)
        label = values.get(cfg.stratify) if cfg.stratify else None
        examples.append({"record": record, "tokens": n_tokens, "label": "" if label is None else str(label),
                         "text": text, "group": group, "order": _key(cfg.seed, f"{i}\x00{text}")})

    if not examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.most_common())
        raise UserError(f"{path}: every row was dropped ({reasons}); check dropna/templates/max_tokens")
    train, valid = split(examples, cfg.valid_fraction, cfg.seed, bool(cfg.stratify))
    dup_groups = sum(1 for n in Counter(ex["text"] for ex in examples).values() if n > 1)

    report = {
        "input": str(path), "format": fmt, "columns": src.columns,
        "rows_in": src.rows_in,
        "rows_out": {"train": len(train), "valid": len(valid)},
        "rows_dropped": dict(sorted(dropped.items())),
        "drop_examples": dict(drop_examples),
        "duplicate_groups_kept": dup_groups,
        "tokens": _token_report(cfg, counter, train, valid),
        "config": asdict(cfg),
    }
    if cfg.stratify:
        report["labels"] = {"train": dict(Counter(ex["label"] for ex in train).most_common()),
                            "valid": dict(Counter(ex["label"] for ex in valid).most_common())}
    if report["rows_in"] != len(train) + len(valid) + sum(dropped.values()):
        raise AssertionError(f"row accounting is off: {report['rows_in']} in, {report['rows_out']} out, "
                             f"{dict(dropped)} dropped")
    report["elapsed_s"] = round(time.perf_counter() - started, 3)
    write_outputs(Path(cfg.out), {"train.jsonl": train, "valid.jsonl": valid}, report)
    return report


def row_preview(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)[:120]


def write_outputs(out: Path, files: dict[str, list[dict]], report: dict) -> None:
    """Write every file to a temporary name, then rename them all into place."""
    out.mkdir(parents=True, exist_ok=True)
    tmp_paths = []
    try:
        for name, rows in files.items():
            tmp = out / f".{name}.tmp{os.getpid()}"
            tmp_paths.append((tmp, out / name))
            with tmp.open("w", encoding="utf-8") as f:
                for ex in rows:
                    f.write(json.dumps(ex["record"], ensure_ascii=False) + "\n")
        tmp = out / f".report.json.tmp{os.getpid()}"
        tmp_paths.append((tmp, out / "report.json"))
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for tmp, final in tmp_paths:
            os.replace(tmp, final)
    finally:
        for tmp, _ in tmp_paths:
            tmp.unlink(missing_ok=True)
