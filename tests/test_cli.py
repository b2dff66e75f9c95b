"""The `tunekit` command: one entry point for every stage, usable from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from tunekit.cli import COMMANDS, SFT_SCRIPT, accelerate_command

TUNEKIT = Path(sys.executable).parent / "tunekit"


def tunekit(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(TUNEKIT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_lists_every_subcommand_from_an_empty_directory(tmp_path):
    proc = tunekit("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("build", "validate", "stats", "train", "merge", "serve", "adapters", "chat", "compare", "ui",
                 "jobs", "api"):
        assert f"  {name} " in proc.stdout


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "train"])
def test_each_subcommand_has_help(name, tmp_path):
    proc = tunekit(name, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-1500:]


def test_unknown_subcommand_is_one_line(tmp_path):
    proc = tunekit("trian", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: tunekit trian: no such subcommand")
    assert "Traceback" not in proc.stderr


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    proc = tunekit("validate", str(tmp_path / "missing.jsonl"), cwd=tmp_path)
    assert proc.returncode in (1, 2) and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = tunekit("train", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: nope.yaml: config file not found (e.g. configs/banking77/sft_cpu.yaml)")


def test_train_wraps_accelerate_launch_with_one_process_or_a_config_file():
    single = accelerate_command("cfg.yaml", ["--max-steps", "5"])
    assert single[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in single
    assert single[-5:] == [str(SFT_SCRIPT), "--config", "cfg.yaml", "--max-steps", "5"]
    multi = accelerate_command("cfg.yaml", [], accelerate_config=str(ROOT / "configs/accelerate/ddp.yaml"))
    assert "--config_file" in multi and "--num_processes" not in multi


def test_make_demo_full_runs_tunekit_commands_whose_flags_parse():
    """`make demo-full` (the README's full-task command) dry-run: its tunekit commands, and the training
    flags as train/sft.py reads them."""
    import shlex

    from train.sft import parse

    proc = subprocess.run(["make", "-n", "-s", "demo-full", "FULL_STEPS=1000"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if "/tunekit " in line]
    assert [c[1] for c in commands] == ["build", "build", "train", "compare"]
    train, compare = commands[2], commands[3]
    assert train[2] == "configs/banking77/sft_cpu.yaml"
    _script, training, _model = parse(["--config", str(ROOT / train[2]), *train[3:]])
    assert (training.max_steps, training.eval_steps, training.save_steps) == (1000, 500, 500)
    assert "--start-server" in compare and compare[compare.index("--models") + 1] == "base,steps500,finetuned"
    assert compare[compare.index("--adapter") + 1] == f"steps500={training.output_dir}/checkpoint-500"


def test_demo_copies_only_what_is_missing(tmp_path, monkeypatch):
    from tunekit import demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs/banking77").mkdir(parents=True)
    (tmp_path / "configs/banking77/sft_cpu.yaml").write_text("# mine\n")
    assert demo.main(["--dry-run", "--steps", "7"]) == 0
    assert (tmp_path / "configs/banking77/sft_cpu.yaml").read_text() == "# mine\n"  # never overwritten
    assert (tmp_path / "configs/banking77/build_cards.yaml").is_file()
    assert demo.copy_missing(demo.examples_dir() / "banking77", tmp_path / "configs/banking77") == []
    train = dict(demo.steps(7))["train"]
    assert train[train.index("--max_steps") + 1] == "7"


def test_demo_refuses_a_missing_vllm_interpreter(tmp_path, monkeypatch, capsys):
    from tunekit.errors import run_main
    from tunekit import demo

    monkeypatch.chdir(tmp_path)
    assert run_main(demo.main, ["--dry-run", "--vllm-python", "/no/such/python"]) == 2
    assert "--vllm-python: /no/such/python not found" in capsys.readouterr().err
