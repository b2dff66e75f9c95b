"""Does reinforcement (GRPO with a grader) help? The card intents: a short SFT, then GRPO on top, on held-out queries.

    python bench/rl_use_case.py                         # 80 SFT steps, then 60 GRPO steps, 540 test queries
    python bench/rl_use_case.py --sft-steps 80 --rl-steps 100 --control
    python bench/rl_use_case.py --dry-run               # the commands, nothing run
    python bench/rl_use_case.py --name lr3e-4 --rl-args "--learning_rate 3e-4"   # one more GRPO variant

What it measures, each step the command a user runs (cwd = the repository root, HF_HUB_OFFLINE=1):

1. ``tunekit build`` of the card intents (``configs/banking77/build_cards.yaml``) and of 540 test queries
   (``configs/banking77/data/test.csv``, seeded sample, as the demo's held-out set);
2. ``python -m data_prep.reinforcement``: the same train/valid split as OpenAI RFT JSONL (the prompt without
   its answer; ``item.category`` = the intent);
3. ``tunekit train configs/banking77/sft_cpu.yaml`` for --sft-steps -> runs/rl_use_case/sft;
4. ``tunekit train configs/banking77/grpo_cpu.yaml --init-adapter runs/rl_use_case/sft`` for --rl-steps: GRPO
   from the supervised adapter, the grader ``string_check`` of ``sample.output_json.category`` against
   ``item.category`` (1 for the right intent, else 0) -> runs/rl_use_case/sft_grpo;
5. with --control: SFT for --sft-steps + --control-steps from the start (the same budget spent on more SFT);
6. on the held-out queries, for the base model, SFT and SFT + GRPO (and the control): **accuracy**, the share
   whose greedy answer (temperature 0) the training's own grader scores 1 (its JSON names the query's intent),
   with a 95% Wilson interval, and the paired difference of SFT + GRPO against SFT with a 95% bootstrap
   interval.

A finished run is not trained again (``tunekit train`` reuses it); scores are kept in runs/rl_use_case/eval/.
Prints a table and writes bench/results/rl_use_case.json (figures, wall times, the runs' summaries, the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train/sft.py: idle threads sleep on a busy machine
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train.hardware import cpu_flags  # noqa: E402

OUT = ROOT / "runs/rl_use_case"
TUNEKIT = [sys.executable, "-m", "tunekit"]
MODEL = ROOT / ".cache/models/SmolLM2-135M-Instruct"
RL_CONFIG = "configs/banking77/grpo_cpu.yaml"


def commands(args) -> list[tuple[str, list[str]]]:
    data = OUT / "data"
    plan = [
        ("build", [*TUNEKIT, "build", "--config", "configs/banking77/build_cards.yaml", "--out", str(data)]),
        ("build test", [*TUNEKIT, "build", "--config", "configs/banking77/build_cards.yaml", "--input",
                        "configs/banking77/data/test.csv", "--valid-fraction", "0", "--sample", str(args.test),
                        "--out", str(OUT / "test")]),
        ("rft prompts", [sys.executable, "-m", "data_prep.reinforcement", str(data / "train.jsonl"),
                         str(data / "valid.jsonl"), "--out", str(OUT / "rl_data")]),
        ("train sft", [*TUNEKIT, "train", "configs/banking77/sft_cpu.yaml", "--train-file", str(data / "train.jsonl"),
                       "--valid-file", str(data / "valid.jsonl"), "--output-dir", str(OUT / "sft"),
                       "--max-steps", str(args.sft_steps), "--eval-strategy", "no", "--save-steps",
                       str(args.sft_steps)]),
        ("train sft+grpo", [*TUNEKIT, "train", RL_CONFIG, "--init-adapter", str(OUT / "sft"),
                            "--train-file", str(OUT / "rl_data/train.jsonl"), "--valid-file",
                            str(OUT / "rl_data/valid.jsonl"), "--output-dir", str(OUT / rl_dir(args)),
                            "--max-steps", str(args.rl_steps), "--save-steps", str(args.rl_steps),
                            *shlex.split(args.rl_args)]),
    ]
    if args.control:
        steps = args.sft_steps + args.control_steps
        plan.append(("train sft (control)", [
            *TUNEKIT, "train", "configs/banking77/sft_cpu.yaml", "--train-file", str(data / "train.jsonl"),
            "--valid-file", str(data / "valid.jsonl"), "--output-dir", str(OUT / f"sft_{steps}"),
            "--max-steps", str(steps), "--eval-strategy", "no", "--save-steps", str(steps)]))
    return plan


def rl_dir(args) -> str:
    return "sft_grpo" + (f"_{args.name}" if args.name else "")


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


def paired_diff(a: list[int], b: list[int], resamples: int = 5000) -> tuple[float, list[float]]:
    """mean(b - a) and its 95% bootstrap interval over the same examples."""
    d = [y - x for x, y in zip(a, b)]
    rng = random.Random(0)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(resamples))
    return round(sum(d) / len(d), 4), [round(means[int(0.025 * resamples)], 4), round(means[int(0.975 * resamples)], 4)]


def cached(name: str, adapter: Path | None, examples: list[dict], grader: dict) -> dict:
    path = OUT / "eval" / f"{name.replace(' ', '_').replace('/', '_')}_{len(examples)}.json"
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
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--test", type=int, default=540, help="held-out test queries (a seeded sample of the 1,080)")
    ap.add_argument("--control", action="store_true", help="also SFT for --sft-steps + --control-steps")
    ap.add_argument("--control-steps", type=int, default=60, help="the control's extra SFT steps")
    ap.add_argument("--name", default="", help="a GRPO variant's name: its run is runs/rl_use_case/sft_grpo_NAME")
    ap.add_argument("--rl-args", default="", help="train/grpo.py flags of the variant, e.g. '--learning_rate 3e-4'")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    args = ap.parse_args(argv)
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
    examples = [json.loads(line) for line in (OUT / "test/train.jsonl").read_text().splitlines() if line.strip()]
    label = "sft+grpo" + (f" ({args.name})" if args.name else "")
    models = [("base", None), ("sft", OUT / "sft"), (label, OUT / rl_dir(args))]
    if args.control:
        models.append((f"sft {args.sft_steps + args.control_steps} steps", OUT / f"sft_{args.sft_steps + args.control_steps}"))
    grader = yaml.safe_load((ROOT / RL_CONFIG).read_text())["grader"]
    results = {name: cached(name, adapter, examples, grader) for name, adapter in models}
    diff, diff_ci = paired_diff(results["sft"]["right"], results[label]["right"])
    summary = json.loads((OUT / rl_dir(args) / "summary.json").read_text())
    print(f"\n{len(examples)} held-out card queries (banking77 test split); accuracy = the grader scores the "
          "greedy answer 1 (its JSON names the query's intent)")
    print(f"{'model':<22} {'accuracy':>9} {'95% CI':>17}")
    for name, r in results.items():
        print(f"{name:<22} {r['accuracy']:>9.3f} {str(r['accuracy_ci95']):>17}")
    print(f"{label} - sft: {diff:+.3f} (paired 95% bootstrap CI {diff_ci})")
    print(f"GRPO mean reward: first logged step {summary.get('reward_first')}, last {summary.get('reward_last')}; "
          f"eval reward {summary.get('eval_reward_last')}; plot {OUT / rl_dir(args) / 'reward.png'}")
    print("wall time (s): " + ", ".join(f"{k} {v}" for k, v in walls.items()))
    record = {"command": "python bench/rl_use_case.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "sft_steps": args.sft_steps, "rl_steps": args.rl_steps, "rl_args": args.rl_args,
              "test_examples": len(examples),
              "results": {k: {m: v for m, v in r.items() if m != "right"} for k, r in results.items()},
              "grpo_minus_sft": diff, "grpo_minus_sft_ci95": diff_ci, "wall_s": walls,
              "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "grpo_summary": summary,
              "sft_summary": json.loads((OUT / "sft/summary.json").read_text())}
    path = ROOT / "bench/results" / f"rl_use_case{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
