"""Training recipes: how long to train and how to sample skewed labels, the rules train/sft.py applies.

**How long** (``max_steps: auto``, in a profile or as ``--max_steps auto``), from the train file's size ``n``,
as OpenAI's fine-tuning does for ``n_epochs: "auto"``:

    epochs = 3, raised for small files so that n x epochs reaches 100 (at most 25 epochs), lowered for big
             ones so that n x epochs stays under 25,000 (at least 1)       (``auto_epochs``)
             -- or the profile's own ``num_train_epochs`` when it sets one (``names_epochs``), as a job's
             ``n_epochs`` number replaces OpenAI's "auto"
    steps  = epochs x ceil(ceil(n / (per-device batch x processes)) / gradient accumulation)   (``auto_steps``)

The epochs are OpenAI's data-preparation cookbook rule (``data_prep.stats.default_epochs``, which the local
fine-tuning API resolves "auto" with too); a step is one optimizer update, so the steps are the epochs'
updates at the profile's batch. 480 sensor readings at batch 16: 3 epochs, 90 steps; 81 reviews at batch 8:
3 epochs, 33 steps; the card demo's 2,950 queries at batch 8: 3 epochs, 1,107 steps.

**A time budget** (``max_minutes``, ``--max_minutes 10``), for a slow CPU: the run measures its steps (the mean
over the steps since the first, which pays for warm-up) after ``PROBE_STEPS`` steps and again every
``PROBE_STEPS`` steps, and lowers ``max_steps`` to what fits in the minutes left (never raises it), with the
learning-rate schedule re-planned for the new length (the cosine decay then still ends at the last step). The
minutes count the training loop (evaluations and checkpoints included), not loading the model.

**Skewed labels** (``balance_labels: auto | on | off``): when the answers are labels (the last assistant message
of every example, at most one distinct answer per ``MIN_PER_LABEL`` examples) whose distribution is skewed
(its entropy below ``SKEW_ENTROPY`` of the balanced distribution's: the 70 % majority of 5 sensor actions is
0.64, a 80/20 binary split 0.72; the 27 card intents 0.99), ``auto`` trains on class-balanced draws: a sampler
that draws each example with probability proportional to 1 / its label's count (to the power
``balance_strength``: 1, the default, makes each of the k labels 1/k of the batches; 0.5 is square-root
balancing), so minority examples repeat and majority ones are seen less often. ``on`` forces it (for labels),
``off`` never. The sampler replaces ``group_by_length``. On the sensors use case (bench/recipe.py
``--use-case sensors``) full balancing over the auto epochs (3) found the rare actions (macro-F1 0.633 against
0.165 on the file's mix) but not their thresholds (accuracy 0.758); over 6 epochs, the sensors profile's
``num_train_epochs``, it reached 0.983 and 0.966, against 0.850 and 0.539 on the file's mix.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections import Counter
from pathlib import Path

from tunekit.errors import UserError

AUTO = "auto"
PROBE_STEPS = 10
MIN_PER_LABEL = 4
SKEW_ENTROPY = 0.8
BALANCE_MODES = ("auto", "on", "off")


# ----------------------------------------------------------------------------- how long


def auto_epochs(n: int) -> int:
    """OpenAI's "auto" epochs for ``n`` training examples (see the module doc)."""
    from data_prep.stats import default_epochs

    return default_epochs(n)


def auto_steps(n: int, per_device_batch: int, accumulation: int = 1, processes: int = 1,
               epochs: float | None = None) -> int:
    """Optimizer steps of ``epochs`` (default: ``auto_epochs(n)``) over ``n`` examples at this batch."""
    epochs = auto_epochs(n) if epochs is None else epochs
    per_epoch = math.ceil(math.ceil(n / max(1, per_device_batch * processes)) / max(1, accumulation))
    return max(1, math.ceil(epochs * per_epoch))


def take_auto(argv: list[str]) -> tuple[list[str], bool]:
    """(argv for TRL's parser, whether max_steps is "auto"): ``--max_steps auto`` on the command line, or
    ``max_steps: auto`` in the ``--config`` YAML with no number on the command line, becomes ``--max_steps -1``
    (TRL's parser takes integers only) and is resolved by the caller with ``auto_steps``."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("--max_steps", "--max-steps"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value.strip().lower() != AUTO:
                return argv, False  # a number on the command line wins over the YAML
            argv[i:i + (1 if eq else 2)] = ["--max_steps", "-1"]
            return argv, True
    if str(config_yaml(argv).get("max_steps", "")).strip().lower() == AUTO:
        return [*argv, "--max_steps", "-1"], True
    return argv, False


def names_epochs(argv: list[str]) -> bool:
    """Whether a run names its epochs (``--num_train_epochs`` on the command line, or ``num_train_epochs`` in
    the ``--config`` YAML): ``max_steps: auto`` then trains those instead of OpenAI's auto epochs (TRL's
    default of 3 is not a choice)."""
    if any(arg.partition("=")[0] in ("--num_train_epochs", "--num-train-epochs") for arg in argv):
        return True
    return config_yaml(argv).get("num_train_epochs") is not None


def config_yaml(argv: list[str]) -> dict:
    """The keys of the ``--config`` YAML the command line names ({} without one, or when it is not a file: TRL's
    parser then says so)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return {}
    from tunekit.config import read_yaml

    path = argv[argv.index("--config") + 1]
    return (read_yaml(path) or {}) if Path(path).is_file() else {}


def count_examples(path: str) -> int:
    """Non-empty lines of a JSONL file (its examples, before they are checked)."""
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise UserError(f"train_file: cannot read {path} ({e.strerror}); max_steps: auto sizes the run from "
                        "it") from None


def replan_schedule(scheduler, total_steps: int) -> bool:
    """Point a transformers LambdaLR schedule (cosine, linear, ...: a ``partial`` with ``num_training_steps``) at a
    new total; False when it has no such length (constant schedules), which is left as it is."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    lambdas = getattr(inner, "lr_lambdas", None) or []
    changed = False
    for i, fn in enumerate(lambdas):
        if isinstance(fn, functools.partial) and "num_training_steps" in fn.keywords:
            lambdas[i] = functools.partial(fn.func, *fn.args, **{**fn.keywords, "num_training_steps": total_steps})
            changed = True
    return changed


def _time_budget_class():
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """``max_minutes``: lowers ``state.max_steps`` to what the measured step time leaves room for (module doc)."""

        def __init__(self, minutes: float, trainer, probe: int = PROBE_STEPS, clock=time.perf_counter):
            self.budget_s, self.trainer, self.probe, self.clock = minutes * 60, trainer, probe, clock
            self.t0 = self.t1 = None
            self.start_step = self.planned = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.start_step, self.planned = self.clock(), state.global_step, state.max_steps

        def on_step_end(self, args, state, control, **kwargs):
            done = state.global_step - self.start_step
            if done == 1:
                self.t1 = self.clock()  # the first step pays for warm-up: timed from its end
                return
            if done < 2 or done % self.probe or state.global_step >= state.max_steps:
                return
            now = self.clock()
            per_step = (now - self.t1) / (done - 1)
            fits = state.global_step + int(max(0.0, self.budget_s - (now - self.t0)) / per_step)
            if fits < state.max_steps:
                state.max_steps = max(state.global_step, fits)
                replan_schedule(self.trainer.lr_scheduler, state.max_steps)
                if state.global_step >= state.max_steps:
                    control.should_training_stop = True
                if state.is_world_process_zero:
                    print(f"max_minutes {self.budget_s / 60:g}: {per_step:.2f} s a step, so {state.max_steps} steps "
                          f"instead of {self.planned} (the learning-rate schedule ends there)", file=sys.stderr,
                          flush=True)

    return TimeBudget


def __getattr__(name: str):
    """``TimeBudget`` subclasses transformers' TrainerCallback, so it is defined on first use: the step rule above
    (``auto_epochs``, ``auto_steps``) then imports without transformers (the fine-tuning API plans jobs with it)."""
    if name == "TimeBudget":
        globals()[name] = cls = _time_budget_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- skewed labels


def answer_labels(rows: list[dict]) -> list[str]:
    """Each example's label: the content of its last assistant message."""
    return [next((m["content"] for m in reversed(r["messages"]) if m["role"] == "assistant"), "") for r in rows]


def label_skew(labels: list[str]) -> dict | None:
    """The label distribution of ``labels`` (None when they are not labels: one value, or fewer than
    ``MIN_PER_LABEL`` examples per distinct value): labels, counts, the most common's share and the entropy
    over the balanced distribution's."""
    counts = Counter(labels)
    n, k = len(labels), len(counts)
    if k < 2 or k * MIN_PER_LABEL > n:
        return None
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    top, top_count = counts.most_common(1)[0]
    return {"labels": k, "examples": n, "top": top, "top_share": round(top_count / n, 4),
            "entropy_ratio": round(entropy / math.log(k), 4), "counts": dict(counts.most_common())}


def decide_balance(mode: str, labels: list[str]) -> tuple[bool, str]:
    """(balance?, one line saying why) for ``balance_labels`` ``mode`` on these labels."""
    if mode not in BALANCE_MODES:
        raise UserError(f"balance_labels: {mode!r}; use one of {', '.join(BALANCE_MODES)}")
    if mode == "off":
        return False, "balance_labels off"
    skew = label_skew(labels)
    if skew is None:
        if mode == "on":
            raise UserError(f"balance_labels: on, but the train file's {len(labels)} answers are not labels "
                            f"({len(set(labels))} distinct; balancing needs at least {MIN_PER_LABEL} examples per "
                            "distinct answer); set balance_labels: off")
        return False, f"balance_labels auto: the answers are not labels ({len(set(labels))} distinct)"
    what = (f"{skew['labels']} labels, the most common ({skew['top'][:40]!r}) {skew['top_share']:.0%} of "
            f"{skew['examples']}, entropy {skew['entropy_ratio']:.2f} of balanced")
    if mode == "on" or skew["entropy_ratio"] < SKEW_ENTROPY:
        return True, (f"balance_labels {mode}: {what}: class-balanced sampling (each label 1/{skew['labels']} of the "
                      "draws)")
    return False, f"balance_labels auto: {what} (at least {SKEW_ENTROPY}): the file's own mix"


def balanced_sampler(labels: list[str], seed: int, strength: float = 1.0):
    """A sampler over the examples whose draws are class-balanced: each example weighs 1 / its label's count to
    the power ``strength`` (1: every label alike; 0.5: square-root balancing, between the file's mix and alike;
    0: the file's mix), ``len(labels)`` draws with replacement, seeded: a resumed run redraws the same order."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    counts = Counter(labels)
    weights = torch.tensor([counts[x] ** -strength for x in labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))
