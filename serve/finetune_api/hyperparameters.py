"""A job's hyperparameters: "auto" resolved as OpenAI does, and what each number means for train/sft.py,
train/dpo.py and train/grpo.py.

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
- reinforcement (OpenAI publishes no "auto" values for these; the job shows what runs here): ``n_epochs``,
  ``batch_size`` (prompts per step) and ``learning_rate_multiplier`` as above; ``compute_multiplier`` 1.0;
  ``eval_interval`` the profile's ``eval_steps`` and ``eval_samples`` the validation examples evaluated (all of
  them, at most the profile's ``max_eval_examples``): these two depend on the profile and the validation file and
  read "auto" until the job starts; ``reasoning_effort`` stays as given ("default" when not).

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

A reinforcement job (train/grpo.py, TRL's GRPOTrainer, whose batches count completions, G per prompt):

- ``compute_multiplier`` c -> ``num_generations`` G = round(G0 x c) within [2, 64] (G0: the profile's; 2 is
  GRPO's least, a group needs a spread): "Multiplier on amount of compute used for exploring search space";
- ``batch_size`` b (prompts per step) -> b x G completions = ``per_device_train_batch_size`` x
  ``gradient_accumulation_steps``, split as above with B the profile's per-device completions; steps = n_epochs
  x ceil(n / b); the learning rate's batch factor s = sqrt(b / (B x A / G0)), the profile's prompts per step;
- ``eval_interval`` -> ``eval_steps`` (at most the job's steps); ``eval_samples`` -> ``max_eval_examples`` (the
  seeded sample of validation prompts each evaluation samples and grades; its eval batch is made a multiple of
  the evaluation's completions per prompt, ``num_generations_eval`` or G);
- ``reasoning_effort``: no local meaning (the base models served here do not reason before answering); the job
  records it and its events say so.
"""

from __future__ import annotations

import math

from train.recipe import auto_steps

KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_BATCH = 256
AUTO_BETA = 0.1
MIN_GENERATIONS, MAX_GENERATIONS = 2, 64
DEFAULT_MAX_EVAL_EXAMPLES = 256  # train/core.py's max_eval_examples default


def auto_multiplier(model: str) -> float:
    return 2.0 if str(model).startswith("gpt-3.5-turbo") else 1.8


def auto_batch_size(n: int) -> int:
    return min(MAX_BATCH, max(1, (2 * n + 500) // 1000))  # round(n * 0.002), halves up


def resolve(hp: dict, n: int, model: str, method: str = "supervised", profile: dict | None = None,
            n_valid: int | None = None) -> dict:
    """The job's hyperparameters with each "auto" (or missing) replaced by OpenAI's default for ``n`` examples
    (``model``: the base snapshot; ``method``: "supervised", "dpo" (adds ``beta``) or "reinforcement" (adds its
    four, eval_interval and eval_samples from the training ``profile`` and the ``n_valid`` validation examples
    when given, else left "auto"))."""
    from data_prep.stats import default_epochs

    auto = {"n_epochs": default_epochs(n), "batch_size": auto_batch_size(n),
            "learning_rate_multiplier": auto_multiplier(model), "beta": AUTO_BETA}
    out = {key: auto[key] if hp.get(key) in (None, "auto") else hp[key] for key in (*KEYS, "beta")}
    numbers = {"n_epochs": int(out["n_epochs"]), "batch_size": int(out["batch_size"]),
               "learning_rate_multiplier": float(out["learning_rate_multiplier"])}
    if method == "dpo":
        return {"beta": float(out["beta"]), **numbers}
    if method == "reinforcement":
        return {**numbers, **reinforcement_auto(hp, profile, n_valid)}
    return numbers


def reinforcement_auto(hp: dict, profile: dict | None, n_valid: int | None) -> dict:
    given = lambda key: hp.get(key) not in (None, "auto")  # noqa: E731
    out = {"compute_multiplier": float(hp["compute_multiplier"]) if given("compute_multiplier") else 1.0,
           "eval_interval": int(hp["eval_interval"]) if given("eval_interval") else "auto",
           "eval_samples": int(hp["eval_samples"]) if given("eval_samples") else "auto"}
    if profile is not None and out["eval_interval"] == "auto":
        out["eval_interval"] = max(1, int(profile.get("eval_steps") or 1))
    if n_valid and out["eval_samples"] == "auto":
        cap = profile.get("max_eval_examples", DEFAULT_MAX_EVAL_EXAMPLES) if profile is not None else None
        out["eval_samples"] = min(n_valid, int(cap)) if cap else n_valid
    out["reasoning_effort"] = hp.get("reasoning_effort") or "default"
    return out


def job_fields(method: str | dict, hp: dict) -> dict:
    """The job object's ``method`` and ``hyperparameters`` for ``hp`` (as requested, or resolved); ``method``: its
    type, or the job's method object, whose other keys (a reinforcement job's grader) are kept."""
    kind = method if isinstance(method, str) else method["type"]
    keep = {} if isinstance(method, str) else {k: v for k, v in (method.get(kind) or {}).items()
                                               if k != "hyperparameters"}
    return {"method": {"type": kind, kind: {**keep, "hyperparameters": dict(hp)}},
            "hyperparameters": dict(hp) if kind == "supervised" else {}}


def split_batch(batch: int, per_device: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) whose product is ``batch``, the per-device batch at most ``per_device``."""
    device = max(d for d in range(1, max(1, min(batch, per_device)) + 1) if batch % d == 0)
    return device, batch // device


def plan(sft: dict, hp: dict, n: int, model: str, max_steps: int | None = None) -> dict:
    """The train/sft.py (or train/dpo.py: ``beta`` too; train/grpo.py: ``num_generations`` and the evaluation's
    settings too) settings of resolved hyperparameters ``hp`` on profile ``sft`` (see the module doc)."""
    base_device = max(1, int(sft.get("per_device_train_batch_size") or 8))
    base_accum = max(1, int(sft.get("gradient_accumulation_steps") or 1))
    base_lr = float(sft.get("learning_rate") or 1e-4)
    if "compute_multiplier" in hp:
        return reinforcement_plan(sft, hp, n, model, max_steps, base_device, base_accum, base_lr)
    device, accum = split_batch(hp["batch_size"], base_device)
    scale = min(2.0, max(0.5, math.sqrt(hp["batch_size"] / (base_device * base_accum))))
    lr = base_lr * hp["learning_rate_multiplier"] / auto_multiplier(model) * scale
    steps = auto_steps(n, device, accum, epochs=hp["n_epochs"])  # train/recipe.py's rule, as max_steps: auto
    out = {"num_train_epochs": hp["n_epochs"], "per_device_train_batch_size": device,
           "gradient_accumulation_steps": accum, "learning_rate": float(f"{lr:.6g}"),
           "max_steps": min(steps, max_steps) if max_steps else steps, "steps_for_epochs": steps,
           "profile_learning_rate": base_lr, "batch_scale": round(scale, 4)}
    return {**out, "beta": hp["beta"]} if "beta" in hp else out


def reinforcement_plan(sft: dict, hp: dict, n: int, model: str, max_steps: int | None, base_device: int,
                       base_accum: int, base_lr: float) -> dict:
    """train/grpo.py's settings (see the module doc): completions per step, generations, steps, evaluation."""
    base_gen = max(MIN_GENERATIONS, int(sft.get("num_generations") or 8))
    gens = min(MAX_GENERATIONS, max(MIN_GENERATIONS, round(base_gen * hp["compute_multiplier"])))
    prompts = hp["batch_size"]
    device, accum = split_batch(prompts * gens, base_device)
    base_prompts = max(1.0, base_device * base_accum / base_gen)
    scale = min(2.0, max(0.5, math.sqrt(prompts / base_prompts)))
    lr = base_lr * hp["learning_rate_multiplier"] / auto_multiplier(model) * scale
    steps = auto_steps(n, prompts, epochs=hp["n_epochs"])  # a step takes `prompts` prompts (x gens completions)
    total = min(steps, max_steps) if max_steps else steps
    eval_gens = int(sft.get("num_generations_eval") or gens)
    eval_batch = int(sft.get("per_device_eval_batch_size") or base_device)
    out = {"num_train_epochs": hp["n_epochs"], "per_device_train_batch_size": device,
           "gradient_accumulation_steps": accum, "learning_rate": float(f"{lr:.6g}"), "max_steps": total,
           "steps_for_epochs": steps, "profile_learning_rate": base_lr, "batch_scale": round(scale, 4),
           "num_generations": gens, "profile_num_generations": base_gen, "prompts_per_step": prompts,
           "per_device_eval_batch_size": max(eval_gens, eval_batch // eval_gens * eval_gens)}
    if hp.get("eval_interval") not in (None, "auto"):
        out["eval_steps"] = min(int(hp["eval_interval"]), total)
    if hp.get("eval_samples") not in (None, "auto"):
        out["max_eval_examples"] = int(hp["eval_samples"])
    return out


def describe(plan_: dict, hp: dict, model: str) -> str:
    """One line for the job's events: what the numbers mean on this machine."""
    capped = plan_["max_steps"] < plan_["steps_for_epochs"]
    if "num_generations" in plan_:
        return describe_reinforcement(plan_, hp, model, capped)
    dpo = f"DPO, beta {plan_['beta']:g}; " if "beta" in plan_ else ""
    return (f"{dpo}n_epochs {hp['n_epochs']}, batch_size {hp['batch_size']} ({plan_['per_device_train_batch_size']} per "
            f"step x {plan_['gradient_accumulation_steps']} accumulated), learning_rate_multiplier "
            f"{hp['learning_rate_multiplier']:g} -> learning rate {plan_['learning_rate']:g} (the profile's "
            f"{plan_['profile_learning_rate']:g} x {hp['learning_rate_multiplier']:g} / {auto_multiplier(model):g}, "
            f"OpenAI's default, x {plan_['batch_scale']:g} for the batch size); {plan_['max_steps']} steps"
            + (f" (the server caps jobs at max_steps; the epochs would take {plan_['steps_for_epochs']})"
               if capped else ""))


def describe_reinforcement(plan_: dict, hp: dict, model: str, capped: bool) -> str:
    evals = (f"; evaluation every {plan_['eval_steps']} steps on {plan_.get('max_eval_examples', 'all the')} "
             "validation prompts" if "eval_steps" in plan_ else "")
    return (f"reinforcement (GRPO); n_epochs {hp['n_epochs']}, batch_size {hp['batch_size']} prompts x "
            f"{plan_['num_generations']} completions ({plan_['per_device_train_batch_size']} per step x "
            f"{plan_['gradient_accumulation_steps']} accumulated), compute_multiplier {hp['compute_multiplier']:g} -> "
            f"num_generations {plan_['num_generations']} (the profile's {plan_['profile_num_generations']} x "
            f"{hp['compute_multiplier']:g}), learning_rate_multiplier {hp['learning_rate_multiplier']:g} -> learning "
            f"rate {plan_['learning_rate']:g} (the profile's {plan_['profile_learning_rate']:g} x "
            f"{hp['learning_rate_multiplier']:g} / {auto_multiplier(model):g}, OpenAI's default, x "
            f"{plan_['batch_scale']:g} for the batch size){evals}; {plan_['max_steps']} steps"
            + (f" (the server caps jobs at max_steps; the epochs would take {plan_['steps_for_epochs']})"
               if capped else ""))
