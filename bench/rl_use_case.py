"""Does reinforcement (GRPO with a grader) help? Two tasks, each scored on held-out examples by its own grader.

    python bench/rl_use_case.py --task imdb --control   # GRPO from the base model, a python grader; SFT control
    python bench/rl_use_case.py --task cards --control  # 80 SFT steps, then 120 GRPO steps on top; SFT control
    python bench/rl_use_case.py --task imdb --dry-run   # the commands, nothing run
    python bench/rl_use_case.py --name lr3e-4 --rl-args "--learning_rate 3e-4"   # one more GRPO variant

**imdb** (the default; ``configs/imdb/grpo_cpu.yaml``): the base model, asked for one word (positive or
negative) about the last 300 characters of a movie review, answers with a sentence and never with the word
alone. GRPO with a ``python`` grader (1 for exactly the review's label; less for a longer answer that names only
the right label; 0 for one that names the other) teaches it, from the base model, with no written answers:
the reward is the only teacher. The control trains SFT on the same reviews with their labels as the answers.

**cards** (``configs/banking77/grpo_cpu.yaml``): the card demo's SFT adapter (80 steps), then GRPO on top with
``string_check`` of ``sample.output_json.category`` against ``item.category``; the control is more SFT.

What it runs, each step the command a user runs (cwd = the repository root, HF_HUB_OFFLINE=1): ``tunekit
build`` of the task's data, ``python -m data_prep.reinforcement`` (the same split as OpenAI RFT JSONL: the
prompt without its answer, the answer as ``item.reference_answer`` or its JSON fields), the SFT start (cards),
``tunekit train`` of the GRPO profile, and with --control the SFT control. Then, on the held-out examples, for
each model: **accuracy**, the share whose greedy answer (temperature 0) the training's own grader scores 1,
with a 95% Wilson interval, and the paired difference of GRPO against its start with a 95% bootstrap interval.

A finished run is not trained again (``tunekit train`` reuses it); scores are kept in runs/rl_use_case*/eval/.
Prints a table and writes bench/results/rl_use_case[_TASK].json (figures, wall times, the runs' summaries, CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train/sft.py: idle threads sleep on a busy machine
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve.compare.findings import paired_bootstrap  # noqa: E402
from train.hardware import cpu_flags  # noqa: E402

TUNEKIT = [sys.executable, "-m", "tunekit"]
MODEL = ROOT / ".cache/models/SmolLM2-135M-Instruct"
TASKS = {
    "imdb": {"out": ROOT / "runs/rl_use_case_imdb", "build": "configs/imdb/build_rl.yaml",
             "sft": "configs/imdb/sft_cpu.yaml", "rl": "configs/imdb/grpo_cpu.yaml", "start_steps": 0,
             "what": "held-out IMDB reviews (the last 300 characters); accuracy = the grader scores the greedy "
                     "answer 1 (exactly the review's label)"},
    "cards": {"out": ROOT / "runs/rl_use_case", "build": "configs/banking77/build_cards.yaml",
              "sft": "configs/banking77/sft_cpu.yaml", "rl": "configs/banking77/grpo_cpu.yaml", "start_steps": 80,
              "what": "held-out card queries (banking77 test split); accuracy = the grader scores the greedy "
                      "answer 1 (its JSON names the query's intent)"},
}


def sft(task: dict, data: Path, out: Path, steps: int) -> list[str]:
    return [*TUNEKIT, "train", task["sft"], "--train-file", str(data / "train.jsonl"), "--valid-file",
            str(data / "valid.jsonl"), "--output-dir", str(out), "--max-steps", str(steps), "--eval-strategy", "no",
            "--save-steps", str(steps)]


def commands(args) -> list[tuple[str, list[str]]]:
    task = TASKS[args.task]
    out, data = task["out"], task["out"] / "data"
    plan = [("build", [*TUNEKIT, "build", "--config", task["build"], "--out", str(data)])]
    if args.task == "cards":  # the card demo's held-out queries: a seeded sample of banking77's test split
        plan.append(("build test", [*TUNEKIT, "build", "--config", task["build"], "--input",
                                    "configs/banking77/data/test.csv", "--valid-fraction", "0", "--sample",
                                    str(args.test), "--out", str(out / "test")]))
    plan.append(("rft prompts", [sys.executable, "-m", "data_prep.reinforcement", str(data / "train.jsonl"),
                                 str(data / "valid.jsonl"), "--out", str(out / "rl_data")]))
    start = start_steps(args)
    if start:
        plan.append(("train sft", sft(task, data, out / "sft", start)))
    plan.append(("train grpo", [*TUNEKIT, "train", task["rl"], *(["--init-adapter", str(out / "sft")] if start else []),
                                "--train-file", str(out / "rl_data/train.jsonl"), "--valid-file",
                                str(out / "rl_data/valid.jsonl"), "--output-dir", str(out / rl_dir(args)),
                                "--max-steps", str(args.rl_steps), "--save-steps", str(args.rl_steps),
                                *shlex.split(args.rl_args)]))
    if args.control:
        steps = start + args.control_steps
        plan.append(("train sft (control)", sft(task, data, out / f"sft_{steps}", steps)))
    return plan


def start_steps(args) -> int:
    return TASKS[args.task]["start_steps"] if args.sft_steps is None else args.sft_steps


def rl_dir(args) -> str:
    return ("sft_grpo" if start_steps(args) else "grpo") + (f"_{args.name}" if args.name else "")


def greedy_rewards(adapter: Path | None, examples: list[dict], grader: dict, batch: int = 32) -> list[float]:
    """Per held-out example, the grader's reward for the model's greedy answer (temperature 0, at most 32 new
    tokens): the task metric at serving time, scored by the same grader the training used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.reinforcement import from_chat, item_of
    from serve.graders import grade

    tok = AutoTokenizer.from_pretrained(adapter or MODEL)
    if adapter is not None:
        tok.chat_template = (adapter / "chat_template.jinja").read_text()
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    rewards = []
    for i in range(0, len(examples), batch):
        chunk = [from_chat(ex) for ex in examples[i:i + batch]]
        enc = tok.apply_chat_template([ex["messages"] for ex in chunk], add_generation_prompt=True, tokenize=True,
                                      padding=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        for ex, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True)
            rewards.append(grade(grader, {"output_text": text}, item_of(ex)).reward)
    return rewards


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    p = k / n
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(mid - half, 4), round(mid + half, 4)]


def cached(out: Path, name: str, adapter: Path | None, examples: list[dict], grader: dict) -> dict:
    path = out / "eval" / f"{name.replace(' ', '_').replace('/', '_')}_{len(examples)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.time()
    right = [int(r == 1.0) for r in greedy_rewards(adapter, examples, grader)]
    result = {"accuracy": round(sum(right) / len(right), 4), "accuracy_ci95": wilson(sum(right), len(right)),
              "right": right, "eval_s": round(time.time() - started, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="imdb")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT steps before GRPO (cards: 80; imdb: 0, none)")
    ap.add_argument("--rl-steps", type=int, default=None, help="GRPO steps (imdb: 60; cards: 120)")
    ap.add_argument("--test", type=int, default=540, help="cards: held-out test queries (a seeded sample of 1,080)")
    ap.add_argument("--control", action="store_true", help="also SFT for --sft-steps + --control-steps")
    ap.add_argument("--control-steps", type=int, default=None, help="the control's SFT steps past the start "
                    "(default: --rl-steps)")
    ap.add_argument("--name", default="", help="a GRPO variant's name: its run is grpo_NAME (sft_grpo_NAME)")
    ap.add_argument("--rl-args", default="", help="train/grpo.py flags of the variant, e.g. '--learning_rate 3e-4'")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    args = ap.parse_args(argv)
    args.rl_steps = args.rl_steps or (60 if args.task == "imdb" else 120)
    args.control_steps = args.control_steps or args.rl_steps
    task = TASKS[args.task]
    out = task["out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    walls = {}
    for name, cmd in commands(args):
        print("$ " + shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        started = time.time()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        walls[name] = round(time.time() - started, 1)
    if args.dry_run:
        return 0
    held_out = out / ("test/train.jsonl" if args.task == "cards" else "data/valid.jsonl")
    examples = [json.loads(line) for line in held_out.read_text().splitlines() if line.strip()]
    start = start_steps(args)
    label = ("sft+grpo" if start else "grpo") + (f" ({args.name})" if args.name else "")
    models = [("base", None)] + ([("sft", out / "sft")] if start else []) + [(label, out / rl_dir(args))]
    if args.control:
        models.append((f"sft {start + args.control_steps} steps", out / f"sft_{start + args.control_steps}"))
    grader = yaml.safe_load((ROOT / task["rl"]).read_text())["grader"]
    results = {name: cached(out, name, adapter, examples, grader) for name, adapter in models}
    before = "sft" if start else "base"
    diff, diff_ci = paired_bootstrap(results[label]["right"], results[before]["right"], resamples=5000)
    diff, diff_ci = round(diff, 4), [round(x, 4) for x in diff_ci]
    summary = json.loads((out / rl_dir(args) / "summary.json").read_text())
    print(f"\n{len(examples)} {task['what']}")
    print(f"{'model':<22} {'accuracy':>9} {'95% CI':>17}")
    for name, r in results.items():
        print(f"{name:<22} {r['accuracy']:>9.3f} {str(r['accuracy_ci95']):>17}")
    print(f"{label} - {before}: {diff:+.3f} (paired 95% bootstrap CI {diff_ci})")
    print(f"GRPO mean reward: first logged step {summary.get('reward_first')}, last {summary.get('reward_last')} "
          f"(means of the first and last steps: {summary.get('reward_first_steps_mean')} -> "
          f"{summary.get('reward_last_steps_mean')}); eval reward {summary.get('eval_reward_last')}; plot "
          f"{out / rl_dir(args) / 'reward.png'}")
    print("wall time (s): " + ", ".join(f"{k} {v}" for k, v in walls.items()))
    record = {"command": "python bench/rl_use_case.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "task": args.task, "sft_steps": start, "rl_steps": args.rl_steps, "rl_args": args.rl_args,
              "test_examples": len(examples),
              "results": {k: {m: v for m, v in r.items() if m != "right"} for k, r in results.items()},
              "grpo_minus_start": diff, "grpo_minus_start_ci95": diff_ci, "wall_s": walls,
              "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "grpo_summary": summary,
              "start_summary": json.loads((out / "sft/summary.json").read_text()) if start else None}
    suffix = ("" if args.task == "cards" else f"_{args.task}") + (f"_{args.name}" if args.name else "")
    path = ROOT / "bench/results" / f"rl_use_case{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
