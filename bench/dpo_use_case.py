"""Does DPO help? The demo's card intents: SFT, then DPO on top, against SFT alone, on held-out pairs.

    python bench/dpo_use_case.py                          # 200 SFT steps, then 100 DPO steps (~20 min, 2 cores)
    python bench/dpo_use_case.py --sft-steps 640 --dpo-steps 200 --eval 329
    python bench/dpo_use_case.py --dry-run                # the commands, nothing run
    python bench/dpo_use_case.py --name lr5e-5 --dpo-args "--learning_rate 5e-5"   # one more DPO variant

A finished run is not trained again (``tunekit train`` reuses it), and each model's scores are kept in
runs/dpo_use_case/eval/, so a variant (``--name``, ``--dpo-args``) costs only its own DPO run and scoring.

The pairs are configs/banking77/build_dpo.yaml's: a card query, its intent as the preferred answer and the
intent it is most often mistaken for (data/confusable.yaml) as the non-preferred one; the supervised data is
build_cards.yaml's, the same queries and split. Steps, each the command a user runs:

1. ``tunekit build`` of both files;
2. ``tunekit train configs/banking77/sft_cpu.yaml`` (--sft-steps) -> runs/dpo_use_case/sft;
3. ``tunekit train configs/banking77/dpo_cpu.yaml --init-adapter runs/dpo_use_case/sft`` (--dpo-steps): DPO on
   top of the supervised adapter, anchored to it -> runs/dpo_use_case/sft_dpo;
4. on --eval held-out pairs (the valid split, seeded sample): **preference accuracy** (how often the model's
   log-probability of the preferred answer is above the non-preferred one's; the same quantity DPO's
   ``rewards/accuracies`` tracks, here for the model itself) and **task accuracy** (greedy answer parsed as
   JSON, its category equal to the preferred one), for the base model, SFT alone and SFT + DPO.

Prints a table and writes bench/results/dpo_use_case.json (figures, wall times, the machine's CPU flags).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train.hardware import cpu_flags  # noqa: E402
OUT = ROOT / "runs/dpo_use_case"
TUNEKIT = [sys.executable, "-m", "tunekit"]
MODEL = ROOT / ".cache/models/SmolLM2-135M-Instruct"


def commands(args) -> list[tuple[str, list[str]]]:
    return [
        ("build sft data", [*TUNEKIT, "build", "--config", "configs/banking77/build_cards.yaml",
                            "--out", str(OUT / "sft_data")]),
        ("build dpo pairs", [*TUNEKIT, "build", "--config", "configs/banking77/build_dpo.yaml",
                             "--out", str(OUT / "dpo_data")]),
        ("train sft", [*TUNEKIT, "train", "configs/banking77/sft_cpu.yaml", "--train-file",
                       str(OUT / "sft_data/train.jsonl"), "--valid-file", str(OUT / "sft_data/valid.jsonl"),
                       "--output-dir", str(OUT / "sft"), "--max-steps", str(args.sft_steps),
                       "--eval-strategy", "no", "--save-steps", str(args.sft_steps)]),
        ("train sft+dpo", [*TUNEKIT, "train", "configs/banking77/dpo_cpu.yaml", "--init-adapter", str(OUT / "sft"),
                           "--train-file", str(OUT / "dpo_data/train.jsonl"), "--valid-file",
                           str(OUT / "dpo_data/valid.jsonl"), "--output-dir", str(OUT / dpo_dir(args)),
                           "--max-steps", str(args.dpo_steps), "--eval-strategy", "no",
                           "--save-steps", str(args.dpo_steps), *shlex.split(args.dpo_args)]),
    ]


def dpo_dir(args) -> str:
    return "sft_dpo" + (f"_{args.name}" if args.name else "")


def load(adapter: Path | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter or MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return tok, model.eval()


def answer_logp(tok, model, prompt: list[dict], answer: str) -> float:
    import torch

    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                   return_dict=True)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0, :-1].float().log_softmax(-1)
    return float(sum(logp[i, full[i + 1]] for i in range(len(p) - 1, len(full) - 1)))


def category(text: str) -> str | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value.get("category") if isinstance(value, dict) else None


def evaluate(adapter: Path | None, pairs: list[dict]) -> dict:
    import torch

    tok, model = load(adapter)
    tok.padding_side = "left"
    started = time.time()
    ranked = sum(answer_logp(tok, model, p["input"]["messages"], p["preferred_output"][0]["content"])
                 > answer_logp(tok, model, p["input"]["messages"], p["non_preferred_output"][0]["content"])
                 for p in pairs)
    right = 0
    for i in range(0, len(pairs), 16):
        batch = pairs[i:i + 16]
        enc = tok.apply_chat_template([p["input"]["messages"] for p in batch], add_generation_prompt=True,
                                      tokenize=True, padding=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        for p, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            right += category(tok.decode(ids, skip_special_tokens=True)) == category(p["preferred_output"][0]["content"])
    return {"preference_accuracy": round(ranked / len(pairs), 4), "task_accuracy": round(right / len(pairs), 4),
            "eval_s": round(time.time() - started, 1)}


def cached(name: str, adapter: Path | None, pairs: list[dict]) -> dict:
    """evaluate(), kept in runs/dpo_use_case/eval/ per model and number of pairs (a finished run does not change)."""
    path = OUT / "eval" / f"{name.replace(' ', '_').replace('/', '_')}_{len(pairs)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate(adapter, pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--eval", type=int, default=200, help="held-out pairs to score (a seeded sample)")
    ap.add_argument("--name", default="", help="a DPO variant's name: its run is runs/dpo_use_case/sft_dpo_NAME")
    ap.add_argument("--dpo-args", default="", help="train/dpo.py flags of the variant, e.g. '--learning_rate 5e-5'")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    walls = {}
    for name, cmd in commands(args):
        print("$ " + " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        started = time.time()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        walls[name] = round(time.time() - started, 1)
    if args.dry_run:
        return 0
    pairs = [json.loads(line) for line in (OUT / "dpo_data/valid.jsonl").read_text().splitlines() if line.strip()]
    pairs = random.Random(0).sample(pairs, min(args.eval, len(pairs)))
    label = "sft+dpo" + (f" ({args.name})" if args.name else "")
    results = {name: cached(name, adapter, pairs) for name, adapter in
               (("base", None), ("sft", OUT / "sft"), (label, OUT / dpo_dir(args)))}
    print(f"\n{len(pairs)} held-out pairs (banking77 card intents; non-preferred = the most confusable intent)")
    print(f"{'model':<10} {'preference acc':>15} {'task acc':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['preference_accuracy']:>15.3f} {r['task_accuracy']:>9.3f}")
    print("wall time (s): " + ", ".join(f"{k} {v}" for k, v in walls.items()))
    record = {"command": "python bench/dpo_use_case.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps, "dpo_args": args.dpo_args,
              "eval_pairs": len(pairs), "results": results, "wall_s": walls,
              "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
              "dpo_summary": json.loads((OUT / dpo_dir(args) / "summary.json").read_text())}
    path = ROOT / "bench/results" / f"dpo_use_case{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
