"""Benchmark: which CPU training recipe learns the demo's card slice best in the demo's budget.

    python bench/recipe.py                               # every lever below (~5-10 min each on 2 cores
                                                         # with AVX512-BF16, scoring included)
    python bench/recipe.py --only start lr2e-3           # some of them
    python bench/recipe.py --lever 'mine=--learning_rate 3e-3 --lora_r 32'   # one more row (only it runs)
    python bench/recipe.py --use-case sensors            # a label use case's levers: length and balancing
    python bench/recipe.py --use-case sensors --only auto-balanced
    python bench/recipe.py --use-case app_reviews        # the write-up's 5 epochs against balancing and 10

**A label use case** (``--use-case NAME``: ``USE_CASE_LEVERS``): each lever is that use case's CPU profile
(``configs/NAME/sft_cpu.yaml``) with the lever's flags, trained on the demo's build (``runs/NAME/data``) and
scored on its held-out set (the valid split) by greedy decoding (Hugging Face ``generate``, the run's own chat
template, temperature 0, the compare config's answer length): accuracy and macro-F1 as ``tunekit compare``
computes them (serve/compare/scoring.py), beside the TF-IDF + logistic-regression baseline's, with the
training wall time. Written to ``bench/results/recipe_NAME.json``.

Each lever is ``configs/banking77/sft_cpu.yaml`` (the CPU profile ``make demo`` trains) with START's
flags on top (the profile as it was before this benchmark tuned it: batch 16, learning rate 1e-3,
160 steps) and then the lever's own; ``--steps_factor K`` (this script's flag) trains K x 160 steps,
so a lever that halves the batch with K = 2 sees the same examples. ``profile`` is the profile as it
is now, at the demo's own steps (``configs/banking77/demo.yaml``). Each is trained by
``train/sft.py`` in its own subprocess (cwd = the repository root, ``HF_HUB_OFFLINE=1``, no
evaluation or checkpoints during training) on the demo's data (``runs/demo/data``, built by the
demo's own build commands when missing).

Accuracy is measured without a server, on the demo's 540 held-out card queries
(``runs/demo/test/train.jsonl``): one teacher-forced forward pass per batch of the prompt (the run's
own chat template, generation prompt added) followed by the reference answer and the end-of-turn
token. An answer counts as right when the model's argmax at every one of those positions is the
reference token: exactly the condition under which greedy decoding (temperature 0, what
``tunekit compare`` asks vLLM for) writes the reference answer and stops. It can only undercount
(an answer spelled with other tokens of the same text, which a trained adapter does not do).
The TF-IDF + logistic-regression baseline of ``tunekit compare`` is trained on the same train split
and scored on the same queries.

Printed: one row per lever with training wall time (the whole subprocess), steady tokens/s
(sft.py's summary), final training loss, held-out exact-match accuracy, and the baseline's
accuracy; written to ``bench/results/recipe.json`` (rows of levers not run this time are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROFILE = "configs/banking77/sft_cpu.yaml"
DATA = "runs/demo/data"
HELDOUT = "runs/demo/test/train.jsonl"
OUT = "runs/recipe"

# The profile before tuning, the base of every lever but `profile`.
START = "--per_device_train_batch_size 16 --learning_rate 1e-3 --lr_scheduler_type cosine --lora_last_layers 15"
START_STEPS = 160

# name -> flags on top of START; --steps_factor K trains K x START_STEPS steps. "profile": today's profile as is.
LEVERS = {
    "profile": None,
    "start": "",
    "lr2e-3": "--learning_rate 2e-3",
    "lr3e-3": "--learning_rate 3e-3",
    "constant-lr": "--lr_scheduler_type constant_with_warmup",
    "batch8": "--per_device_train_batch_size 8 --steps_factor 2",
    "batch4": "--per_device_train_batch_size 4 --steps_factor 4",
    "batch8-lr2e-3": "--per_device_train_batch_size 8 --learning_rate 2e-3 --steps_factor 2",
    "all-layers": "--lora_last_layers 30",
    "top8-layers": "--lora_last_layers 8",
    "lr2e-3-2x": "--learning_rate 2e-3 --steps_factor 2",
    "batch8-lr2e-3-2x": "--per_device_train_batch_size 8 --learning_rate 2e-3 --steps_factor 4",
}


# use case -> lever -> train/sft.py flags on its CPU profile (the profile as it is: "")
USE_CASE_LEVERS = {
    "sensors": {  # 480 readings at batch 16: 30 steps an epoch; OpenAI's auto epochs for 480 are 3
        "fixed60": "--max_steps 60 --balance_labels off",  # the profile before train/recipe.py
        "auto": "--max_steps auto --num_train_epochs 3 --balance_labels off",
        "fixed60-balanced": "--max_steps 60 --balance_labels on",
        "auto-balanced": "--max_steps auto --num_train_epochs 3 --balance_labels on",
        "auto-sqrt": "--max_steps auto --num_train_epochs 3 --balance_labels on --balance_strength 0.5",
        "ep6": "--max_steps auto --num_train_epochs 6 --balance_labels off",
        "ep6-sqrt": "--max_steps auto --num_train_epochs 6 --balance_labels on --balance_strength 0.5",
        "ep6-balanced": "--max_steps auto --num_train_epochs 6 --balance_labels on",  # the profile now
    },
    "app_reviews": {  # 81 reviews at batch 8: 11 steps an epoch; 46 % positive, 14 % neutral
        "profile": "",  # 50 steps: the write-up's 5 epochs
        "balanced": "--balance_labels on",
        "ep10": "--max_steps auto --num_train_epochs 10",
        "ep10-balanced": "--max_steps auto --num_train_epochs 10 --balance_labels on",
    },
}


def demo_steps() -> int:
    from tunekit import demo

    return demo.load_use_case("banking77").steps


def ensure_data() -> None:
    """The demo's train/valid split and held-out sample, built by the demo's own commands."""
    if Path(f"{DATA}/train.jsonl").is_file() and Path(HELDOUT).is_file():
        return
    from tunekit.demo import steps

    for name, cmd in steps(demo_steps()):
        if name.startswith("build"):
            subprocess.run(cmd, cwd=ROOT, check=True)


def train(name: str, flags: list[str], steps: int | None, profile: str = PROFILE, data: str = DATA,
          out_root: str = OUT) -> dict:
    out = ROOT / out_root / name
    cmd = [sys.executable, "train/sft.py", "--config", profile, "--train_file", f"{data}/train.jsonl",
           "--valid_file", f"{data}/valid.jsonl", "--output_dir", str(out),
           *(["--max_steps", str(steps)] if steps else []),
           "--eval_strategy", "no", "--save_strategy", "no", "--plots", "false", *flags]
    shutil.rmtree(out, ignore_errors=True)  # sft.py resumes or refuses an existing run
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{name}: train/sft.py failed ({proc.returncode}): {' | '.join(tail)}")
    summary = json.loads((out / "summary.json").read_text())
    return {"run_dir": str(out), "wall_s": round(wall, 1), "tokens_per_s": summary.get("tokens_per_s"),
            "final_loss": summary.get("train_loss_last"), "trained_steps": summary.get("steps")}


def exact_match(run_dir: str, batch: int = 32) -> float:
    """Held-out share whose reference answer is the greedy answer (see the module docstring)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.compare.data import load_examples

    tok = AutoTokenizer.from_pretrained(run_dir)
    tok.chat_template = Path(run_dir, "chat_template.jinja").read_text()
    base = json.loads(Path(run_dir, "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run_dir)
    model.eval()
    inner = model.get_base_model()  # LoRA layers are injected in place: its decoder runs them
    end = tok.eos_token_id  # the end-of-turn token greedy decoding stops at (SmolLM2: <|im_end|>)
    rows = []
    for ex in load_examples(HELDOUT):
        prompt = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(ex.reference, add_special_tokens=False)["input_ids"] + [end]
        rows.append((p, a))
    right = 0
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id or 0)
            mask = torch.zeros_like(ids)
            for j, (p, a) in enumerate(chunk):  # right padding: positions are those of an unpadded prompt
                seq = p + a
                ids[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
            # the decoder once, the vocabulary projection only where an answer token is predicted
            hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for j, (p, a) in enumerate(chunk):
                got = inner.lm_head(hidden[j, len(p) - 1:len(p) - 1 + len(a)]).argmax(-1).tolist()
                right += got == a
    return right / len(rows)


def baseline_accuracy() -> float:
    from serve.compare.baseline import baseline_rows, train_baseline
    from serve.compare.config import CompareConfig
    from serve.compare.data import load_examples
    from tunekit.config import load_config

    cfg = load_config(CompareConfig, "configs/banking77/compare_cards.yaml",
                      {"train_data": f"{DATA}/train.jsonl", "data": HELDOUT})
    examples = load_examples(HELDOUT)
    scores = baseline_rows(cfg, examples, train_baseline(cfg, examples))
    return sum(scores) / len(scores)


def greedy_answers(run_dir: str, heldout: str, max_new_tokens: int, batch: int = 32) -> list[str]:
    """The adapter's greedy answers to the held-out prompts (left-padded batches, the run's chat template)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve.compare.data import load_examples

    tok = AutoTokenizer.from_pretrained(run_dir, padding_side="left")
    tok.chat_template = Path(run_dir, "chat_template.jinja").read_text()
    base = json.loads(Path(run_dir, "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run_dir).eval()
    prompts = [tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
               for ex in load_examples(heldout)]
    answers = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            answers += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def use_case_main(name: str, only: list[str] | None, extras: dict[str, str], out_path: str | None) -> int:
    """The levers of a label use case (module doc)."""
    from serve.compare.baseline import baseline_summary, train_baseline
    from serve.compare.config import CompareConfig
    from serve.compare.data import load_examples
    from serve.compare.tasks import label_summary
    from tunekit import demo
    from tunekit.config import load_config

    if name not in USE_CASE_LEVERS:
        raise SystemExit(f"--use-case {name}: levers are defined for {', '.join(USE_CASE_LEVERS)}")
    case = demo.load_use_case(name)
    data, heldout = f"runs/{name}/data", f"runs/{name}/data/valid.jsonl"
    if not Path(data, "train.jsonl").is_file():
        subprocess.run(dict(demo.steps(1, name))["build"], cwd=ROOT, check=True)
    cfg = load_config(CompareConfig, case.compare, {"train_data": f"{data}/train.jsonl", "data": heldout})
    examples = load_examples(heldout)
    refs = [ex.reference for ex in examples]
    base = baseline_summary(cfg, examples, train_baseline(cfg, examples))
    tfidf = {"accuracy": base["accuracy"], "macro_f1": base["macro_f1"]}
    print(f"TF-IDF + logistic regression on {heldout}: accuracy {tfidf['accuracy']:.3f}, macro-F1 "
          f"{tfidf['macro_f1']:.3f}", flush=True)
    chosen = only or ([] if extras else list(USE_CASE_LEVERS[name]))  # --lever alone: only those rows
    levers = {k: USE_CASE_LEVERS[name][k] for k in chosen if k in USE_CASE_LEVERS[name]} | extras  # --only's order
    out = Path(out_path or f"bench/results/recipe_{name}.json")
    kept = json.loads(out.read_text())["results"] if out.is_file() else []
    kept = [r for r in kept if r["lever"] not in levers]
    results = []
    max_new = demo.answer_length(case.compare) or 16
    for lever, flags in levers.items():
        print(f"[{len(results) + 1}/{len(levers)}] {lever}: {flags}", flush=True)
        row = {"lever": lever, "flags": flags, **train(lever, shlex.split(flags), None, case.sft, data,
                                                       f"{OUT}/{name}")}
        answers = greedy_answers(row["run_dir"], heldout, max_new)
        scores = label_summary(cfg, refs, answers)
        predicted = {}
        for a in answers:
            predicted[a.strip()] = predicted.get(a.strip(), 0) + 1
        row.update(accuracy=scores["accuracy"], macro_f1=scores["macro_f1"],
                   top_answer_share=round(max(predicted.values()) / len(answers), 3))
        results.append(row)
        out.write_text(json.dumps({"use_case": name, "tfidf": tfidf, "heldout": heldout, "profile": case.sft,
                                   "results": kept + results}, indent=2))
        print(f"    {row['trained_steps']} steps in {row['wall_s']:.0f} s, accuracy {row['accuracy']:.3f}, macro-F1 "
              f"{row['macro_f1']:.3f}, most common answer {row['top_answer_share']:.0%} (TF-IDF "
              f"{tfidf['accuracy']:.3f} / {tfidf['macro_f1']:.3f})", flush=True)
    print(f"\n| lever | flags on {case.sft} | steps | training | accuracy | macro-F1 | most common answer |\n"
          "|---|---|---|---|---|---|---|")
    for r in kept + results:
        print(f"| {r['lever']} | `{r['flags']}` | {r['trained_steps']} | {r['wall_s'] / 60:.1f} min | "
              f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['top_answer_share']:.0%} |")
    print(f"| TF-IDF + logistic regression | | | | {tfidf['accuracy']:.3f} | {tfidf['macro_f1']:.3f} | |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--use-case", help="a label use case's levers (USE_CASE_LEVERS) instead of the card demo's")
    ap.add_argument("--only", nargs="+", metavar="LEVER", help=f"run these levers only: {', '.join(LEVERS)}")
    ap.add_argument("--lever", action="append", default=[], metavar="NAME=FLAGS",
                    help="one more lever (alone: only the --lever rows run)")
    ap.add_argument("--out", default=None,
                    help="results; rows of levers not run this time are kept, a lever run again is replaced")
    args = ap.parse_args(argv)
    extras = dict(extra.partition("=")[::2] for extra in args.lever)
    if args.use_case and args.use_case != "banking77":
        os.chdir(ROOT)
        return use_case_main(args.use_case, args.only, extras, args.out)
    args.out = args.out or "bench/results/recipe.json"
    unknown = sorted(set(args.only or ()) - set(LEVERS) - set(extras))
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: no such lever; use {', '.join(LEVERS)} or define it with --lever")
    chosen = args.only or ([] if extras else list(LEVERS))
    levers = {k: LEVERS.get(k, extras.get(k)) for k in chosen} | extras
    os.chdir(ROOT)
    ensure_data()
    tfidf = baseline_accuracy()
    print(f"TF-IDF + logistic regression: {tfidf:.3f} on {HELDOUT}", flush=True)
    out = Path(args.out)
    kept = json.loads(out.read_text())["results"] if out.is_file() else []
    kept = [r for r in kept if r["lever"] not in levers]
    results = []
    for name, flags in levers.items():
        if flags is None:  # the profile as it is, at the demo's steps
            words, steps = [], demo_steps()
        else:
            words = shlex.split(START) + shlex.split(flags)
            factor = 1.0
            if "--steps_factor" in words:  # our own flag: a smaller batch sees the same examples in more steps
                k = words.index("--steps_factor")
                factor = float(words[k + 1])
                del words[k:k + 2]
            steps = int(START_STEPS * factor)
        print(f"[{len(results) + 1}/{len(levers)}] {name}: {steps} steps {' '.join(words)}", flush=True)
        row = {"lever": name, "flags": flags if flags is not None else "(the profile)", "steps": steps,
               **train(name, words, steps)}
        t0 = time.perf_counter()
        row["accuracy"] = round(exact_match(row["run_dir"]), 3)
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)  # after every lever: a stopped run keeps its rows
        out.write_text(json.dumps({"tfidf": tfidf, "heldout": HELDOUT, "profile": PROFILE, "start": START,
                                   "results": kept + results}, indent=2))
        print(f"    {row['wall_s']:.0f} s, {row['tokens_per_s']} tokens/s, loss {row['final_loss']}, "
              f"accuracy {row['accuracy']:.3f} (TF-IDF {tfidf:.3f}; scored in {row['eval_s']:.0f} s)", flush=True)
    print("\n| lever | flags on START | steps | training | tokens/s | final loss | accuracy | TF-IDF |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in kept + results:
        print(f"| {r['lever']} | `{r['flags'] or '(START)'}` | {r['steps']} | {r['wall_s'] / 60:.1f} min | "
              f"{r['tokens_per_s']} | {r['final_loss']} | {r['accuracy']:.3f} | {tfidf:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
