"""``grader``: every model's answers scored by an OpenAI grader (serve.graders, the graders API's and reinforcement
training's own implementation), beside the task's metrics.

    python -m serve.compare --config configs/banking77/compare.yaml --grader grader.json

The grader file (.json or .yaml) holds one grader object, e.g. ``{"type": "string_check", "name": "intent",
"input": "{{ sample.output_json.category }}", "reference": "{{ item.category }}", "operation": "eq"}``, checked
as the graders API checks it. Each held-out answer is graded against its example's ``item``: the line's other
fields, ``reference_answer`` (the reference, its last assistant message) and, when the reference is a JSON
object, its fields: the item ``python -m data_prep.reinforcement`` makes of the same line, so a grader written for
a reinforcement job scores its held-out file here unchanged. A failed request and a grading error (a python
grader raising, an answer that is not JSON for ``sample.output_json``) score 0, as OpenAI's do; the errors are
counted. Per model: ``grader_reward``, the mean reward, with a 95% CI from a bootstrap over the examples
(``bootstrap`` resamples, ``seed``: findings.paired_bootstrap against zero, as preference accuracy's), and
``grader_errors``; and ``grader_deltas``: each model's mean reward against the first of ``models``, paired over the
same examples. Model graders (score_model, label_model) ask the comparison's own backend. Answers are graded on
``concurrency`` threads (a python grader is one sandboxed process per answer).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tunekit.errors import UserError

from .findings import delta_line, paired_bootstrap

if TYPE_CHECKING:
    from .config import CompareConfig


def load_grader(path: str) -> dict:
    """The grader object of ``path`` (JSON or YAML), validated; a problem is one UserError naming ``grader``."""
    import yaml

    from serve.graders import GraderInvalid, validate

    if not Path(path).is_file():
        raise UserError(f"grader: {path} not found (a .json or .yaml file holding one OpenAI grader object)")
    try:
        grader = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML
    except yaml.YAMLError as e:
        raise UserError(f"grader: {path} is not JSON or YAML ({str(e).splitlines()[0]})") from None
    try:
        return validate(grader)
    except GraderInvalid as e:
        raise UserError(f"grader: {path}: {e.param}: {e.message}") from None


def grade_answers(cfg: CompareConfig, grader: dict, examples, results: dict[str, dict], client=None
                  ) -> dict[str, list[dict]]:
    """alias -> one ``{"reward", "error"}`` per example (a failed request: reward 0, error "no answer")."""
    from tqdm import tqdm

    from serve.graders import grade

    def one(job):
        alias, ex = job
        answer = results[alias].get(ex.idx, {}).get("answer")
        if answer is None:
            return {"reward": 0.0, "error": "no answer"}
        res = grade(grader, answer, ex.item, client=client)
        flags = [k for k, v in res.errors.items() if v is True]
        return {"reward": float(res.reward), "error": ",".join(flags) or None}

    jobs = [(alias, ex) for alias in results for ex in examples]
    with ThreadPoolExecutor(max(1, cfg.concurrency)) as pool:
        graded = list(tqdm(pool.map(one, jobs), total=len(jobs), desc=f"grading ({grader.get('type')})",
                           disable=len(jobs) < 50))
    out: dict[str, list[dict]] = {alias: [] for alias in results}
    for (alias, _), g in zip(jobs, graded):
        out[alias].append(g)
    return out


def grader_summary(cfg: CompareConfig, grader: dict, graded: list[dict]) -> dict:
    rewards = [g["reward"] for g in graded]
    errors = sum(1 for g in graded if g["error"] and g["error"] != "no answer")
    _, bounds = paired_bootstrap(rewards, [0.0] * len(rewards), cfg.bootstrap, cfg.seed)
    return {"grader": f"{grader.get('type')} {grader.get('name')!r}", "grader_reward": round(sum(rewards) / len(rewards), 4),
            "grader_reward_ci95": [round(x, 4) for x in bounds] if bounds else None, "grader_errors": errors}


def grader_deltas(cfg: CompareConfig, graded: dict[str, list[dict]]) -> list[dict]:
    """Each model's mean reward against the first of ``models``, with a paired-bootstrap CI."""
    aliases = list(graded)
    out = []
    for model in aliases[1:]:
        a = [g["reward"] for g in graded[model]]
        b = [g["reward"] for g in graded[aliases[0]]]
        delta, bounds = paired_bootstrap(a, b, cfg.bootstrap, cfg.seed)
        out.append({"model": model, "against": aliases[0], "metric": "grader_reward", "delta": round(delta, 4),
                    "ci95": [round(x, 4) for x in bounds] if bounds else None, "n": len(a),
                    "resamples": cfg.bootstrap, "seed": cfg.seed})
    return out


def interval(bounds) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "–"


def console_part(s: dict) -> str:
    if "grader_reward" not in s:
        return ""
    return f", grader reward {s['grader_reward']:.3f} {interval(s.get('grader_reward_ci95'))}"


def report_lines(cfg: CompareConfig, metrics: dict) -> list[str]:
    """report.md's grader section: the mean reward per model with its CI and errors, then the deltas."""
    scored = [s for s in metrics["models"] if "grader_reward" in s]
    if not scored:
        return []
    how = (f"95% CIs from a bootstrap over the {metrics['examples']} examples ({cfg.bootstrap} resamples, seed "
           f"{cfg.seed})" if cfg.bootstrap > 0 else "bootstrap off: no CIs")
    lines = ["", f"## Grader: {scored[0]['grader']} (`{cfg.grader}`)", "",
             f"Each answer's reward from the grader against its example's item (failed requests and grading errors "
             f"score 0); {how}.", "", "| model | mean reward | 95% CI | grading errors |", "|---|---|---|---|"]
    lines += [f"| {s['alias']} | {s['grader_reward']:.3f} | {interval(s.get('grader_reward_ci95'))} | "
              f"{s['grader_errors']} |" for s in scored]
    deltas = metrics.get("grader_deltas") or []
    if deltas:
        lines += ["", *[f"- {delta_line(d)}" for d in deltas]]
    return lines
