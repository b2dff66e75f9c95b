"""A job's hyperparameters: "auto" resolved as OpenAI does, and what each number means for train/sft.py and
train/dpo.py.

**Resolution** (``resolve``), once the training file is validated and its ``n`` examples counted; the job
object then shows numbers, not "auto", in ``method.<type>.hyperparameters`` (and, for a supervised job, the
deprecated top-level ``hyperparameters``), as OpenAI's does from that point on. A DPO job resolves the
three below as a supervised one does, plus ``beta``; its top-level ``hyperparameters`` is ``{}`` (``job_fields``):
OpenAI sends null there for DPO jobs ("only returned when running supervised jobs"), which its own schema
(a required object) and the SDK's model refuse, so the empty object is the valid way to say "none".

- ``n_epochs``: ``data_prep.stats.default_epochs(n)``, the rule of OpenAI's data-preparation cookbook: 3,
  raised for small files so that n x epochs reaches 100 (at most 25 epochs), lowered for big ones so that
  it stays under 25,000 (at least 1). A 10-example file gets 10, as OpenAI's jobs show.
- ``batch_size``: 0.2% of ``n`` rounded, at least 1 and at most 256: OpenAI's documented default ("~0.2%
  of the number of examples in the training set, capped at 256", fine-tunes API reference).
- ``learning_rate_multiplier``: 2.0 for gpt-3.5-turbo models, 1.8 for every other name: the value
  OpenAI's gpt-3.5-turbo and gpt-4o-mini-2024-07-18 jobs report for "auto" (at batch sizes 1 and 3 alike),
  so that a script written against OpenAI, which often passes 1.8 or 2 itself, means the same here.
  OpenAI's older documented rule, "0.05, 0.1, or 0.2 depending on final batch_size (larger learning rates
  tend to perform better with larger batch sizes)", is for its retired base models; its batch dependence
  is kept below, in the local learning rate.
- ``beta`` (DPO): 0.1, TRL's DPOConfig default and the value of OpenAI's DPO examples.

The multiplier's "auto" depends on the base model: a job on an ``ft:`` model (one this server made) uses its
base snapshot's.

**Locally** (``plan``), on a train/sft.py profile with ``learning_rate`` LR, ``per_device_train_batch_size``
B and ``gradient_accumulation_steps`` A (one training process):

- ``n_epochs`` -> ``num_train_epochs``, and ``max_steps`` = n_epochs x ceil(ceil(n / per_device) /
  accumulation), capped by the server's ``max_steps`` (CPU demos).
- ``batch_size`` -> ``per_device_train_batch_size`` x ``gradient_accumulation_steps``, exactly: the
  per-device batch is the largest divisor of batch_size not above B (B itself when batch_size is a
  multiple of it), the accumulation the rest; the profile's A is replaced.
- ``learning_rate_multiplier`` m -> ``learning_rate`` = LR x m / m_auto x s, where m_auto is the model's
  "auto" multiplier above (so "auto" trains at the profile's own, tuned rate) and s = sqrt(batch_size /
  (B x A)) clamped to [0.5, 2]: OpenAI's "larger for larger batch sizes" within its documented 4x range
  (0.05 to 0.2 around 0.1), centred on the profile's own batch, by the square-root rule for Adam.
- ``beta`` -> ``beta`` of train/dpo.py (TRL's DPOConfig.beta: how far the policy may move from the reference,
  the adapter disabled): the same number. A DPO step's batch counts preference pairs (one chosen and one
  rejected completion each), so the batch and step rules above apply unchanged.
"""

from __future__ import annotations

import math

KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_BATCH = 256
AUTO_BETA = 0.1


def auto_multiplier(model: str) -> float:
    return 2.0 if str(model).startswith("gpt-3.5-turbo") else 1.8


def auto_batch_size(n: int) -> int:
    return min(MAX_BATCH, max(1, (2 * n + 500) // 1000))  # round(n * 0.002), halves up


def resolve(hp: dict, n: int, model: str, method: str = "supervised") -> dict:
    """The job's hyperparameters with each "auto" (or missing) replaced by OpenAI's default for ``n`` examples
    (``model``: the base snapshot; ``method``: "supervised" or "dpo", which adds ``beta``)."""
    from data_prep.stats import default_epochs

    auto = {"n_epochs": default_epochs(n), "batch_size": auto_batch_size(n),
            "learning_rate_multiplier": auto_multiplier(model), "beta": AUTO_BETA}
    out = {key: auto[key] if hp.get(key) in (None, "auto") else hp[key] for key in (*KEYS, "beta")}
    numbers = {"n_epochs": int(out["n_epochs"]), "batch_size": int(out["batch_size"]),
               "learning_rate_multiplier": float(out["learning_rate_multiplier"])}
    return {"beta": float(out["beta"]), **numbers} if method == "dpo" else numbers


def job_fields(method: str, hp: dict) -> dict:
    """The job object's ``method`` and ``hyperparameters`` for ``hp`` (as requested, or resolved)."""
    return {"method": {"type": method, method: {"hyperparameters": dict(hp)}},
            "hyperparameters": dict(hp) if method == "supervised" else {}}


def split_batch(batch: int, per_device: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) whose product is ``batch``, the per-device batch at most ``per_device``."""
    device = max(d for d in range(1, max(1, min(batch, per_device)) + 1) if batch % d == 0)
    return device, batch // device


def plan(sft: dict, hp: dict, n: int, model: str, max_steps: int | None = None) -> dict:
    """The train/sft.py (or train/dpo.py: ``beta`` too) settings of resolved hyperparameters ``hp`` on profile
    ``sft`` (see the module doc)."""
    base_device = max(1, int(sft.get("per_device_train_batch_size") or 8))
    base_accum = max(1, int(sft.get("gradient_accumulation_steps") or 1))
    base_lr = float(sft.get("learning_rate") or 1e-4)
    device, accum = split_batch(hp["batch_size"], base_device)
    scale = min(2.0, max(0.5, math.sqrt(hp["batch_size"] / (base_device * base_accum))))
    lr = base_lr * hp["learning_rate_multiplier"] / auto_multiplier(model) * scale
    steps = math.ceil(math.ceil(n / device) / accum) * hp["n_epochs"]
    out = {"num_train_epochs": hp["n_epochs"], "per_device_train_batch_size": device,
           "gradient_accumulation_steps": accum, "learning_rate": float(f"{lr:.6g}"),
           "max_steps": min(steps, max_steps) if max_steps else steps, "steps_for_epochs": steps,
           "profile_learning_rate": base_lr, "batch_scale": round(scale, 4)}
    return {**out, "beta": hp["beta"]} if "beta" in hp else out


def describe(plan_: dict, hp: dict, model: str) -> str:
    """One line for the job's events: what the numbers mean on this machine."""
    capped = plan_["max_steps"] < plan_["steps_for_epochs"]
    dpo = f"DPO, beta {plan_['beta']:g}; " if "beta" in plan_ else ""
    return (f"{dpo}n_epochs {hp['n_epochs']}, batch_size {hp['batch_size']} ({plan_['per_device_train_batch_size']} per "
            f"step x {plan_['gradient_accumulation_steps']} accumulated), learning_rate_multiplier "
            f"{hp['learning_rate_multiplier']:g} -> learning rate {plan_['learning_rate']:g} (the profile's "
            f"{plan_['profile_learning_rate']:g} x {hp['learning_rate_multiplier']:g} / {auto_multiplier(model):g}, "
            f"OpenAI's default, x {plan_['batch_scale']:g} for the batch size); {plan_['max_steps']} steps"
            + (f" (the server caps jobs at max_steps; the epochs would take {plan_['steps_for_epochs']})"
               if capped else ""))
