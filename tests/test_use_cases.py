"""The five use cases of configs/ end to end: each one's configs load and pass their checks, the
banking77 main-category mapping, `tunekit demo --use-case X` (dry runs here; whole tiny runs against
the session's vLLM server, marked slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

USE_CASES = ["app_reviews", "banking77_json", "sensors", "assistant", "imdb"]
TASK = {"app_reviews": "label", "banking77_json": "json", "sensors": "label", "assistant": "text", "imdb": "label"}
FILES = ("build.yaml", "sft_cpu.yaml", "sft_t4.yaml", "serve.yaml", "serve_t4.yaml", "compare.yaml", "openai.yaml",
         "demo.yaml")
TUNEKIT = str(Path(sys.executable).parent / "tunekit")
STAGES = ("build", "validate", "stats", "train", "compare")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def first_line(path: Path) -> str:
    return path.read_text(encoding="utf-8").splitlines()[0]


# ---------------------------------------------------------------- every use case's configs


def test_the_demo_knows_every_use_case_with_a_description():
    from tunekit import demo

    cases = demo.use_cases()
    assert set(cases) == {*USE_CASES, "banking77", "banking77_dpo"} and demo.DEFAULT_USE_CASE == "banking77"
    for name in cases:
        case = demo.load_use_case(name)
        assert case.description and "\n" not in case.description
        for key in ("build", "sft", "compare"):
            assert (ROOT / getattr(case, key)).is_file(), (name, key)
        assert case.heldout == "valid" or (ROOT / case.heldout).is_file()
        assert first_line(ROOT / "configs" / name / "demo.yaml").startswith("# tunekit demo")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each use case's build (a seeded sample of 80 rows) and held-out set, as the demo makes them."""
    from data_prep.build import BuildConfig, build
    from tunekit import demo
    from tunekit.config import load_config

    out = {}
    for name in USE_CASES:
        case = demo.load_use_case(name)
        d = tmp_path_factory.mktemp(name)
        cfg = load_config(BuildConfig, ROOT / case.build, {"out": str(d / "data"), "sample": 80})
        cfg.input = str(ROOT / cfg.input)
        report = build(cfg, progress=False)
        assert report["rows_out"]["valid"] >= 10, report
        if case.heldout != "valid":
            test = load_config(BuildConfig, ROOT / case.build, {"out": str(d / "test"), "valid_fraction": 0.0,
                                                                "input": str(ROOT / case.heldout), "sample": 40})
            build(test, progress=False)
        out[name] = d
    return out


@pytest.mark.parametrize("name", USE_CASES)
def test_each_use_case_has_every_config_and_each_passes_its_checks(name, built, monkeypatch):
    from data_prep.build import BuildConfig
    from serve.client import load_settings
    from serve.compare.config import CompareConfig
    from serve.compare.tasks import TASKS
    from serve.vllm_server import VLLMServer
    from train.jobs.create import OpenAIJobConfig
    from train.sft import parse
    from tunekit.config import load_config
    from tunekit.constants import VLLM_LORA_RANKS

    monkeypatch.chdir(ROOT)  # config paths are relative to the working directory
    folder = ROOT / "configs" / name
    for f in FILES:
        assert (folder / f).is_file(), f"configs/{name}/{f} missing"
    rel = f"configs/{name}"

    assert first_line(folder / "build.yaml") == f"# python -m data_prep build --config {rel}/build.yaml"
    load_config(BuildConfig, folder / "build.yaml").check()

    for profile in ("sft_cpu.yaml", "sft_t4.yaml"):
        assert first_line(folder / profile).startswith("# accelerate launch") and f"{rel}/{profile}" in \
            first_line(folder / profile)
        script, training, model = parse(["--config", str(folder / profile)])
        assert training.assistant_only_loss and model.use_peft and model.lora_r in VLLM_LORA_RANKS
        assert training.output_dir.startswith(f"runs/{name}/") and script.train_file.startswith(f"runs/{name}/")
        if profile == "sft_t4.yaml":  # the banking77 T4 profile's settings
            assert model.model_name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and model.dtype == "float16"
            assert training.fp16 and not training.bf16 and model.load_in_4bit
            assert model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
            assert model.attn_implementation == "sdpa" and training.optim == "paged_adamw_8bit"
            assert training.gradient_checkpointing and model.lora_target_modules == "all-linear"
        else:
            assert training.use_cpu and model.model_name_or_path == ".cache/models/SmolLM2-135M-Instruct"

    adapter = built[name] / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj"]}))
    for serve in ("serve.yaml", "serve_t4.yaml"):
        assert first_line(folder / serve) == f"# python -m serve.vllm_server --config {rel}/{serve}"
        settings = load_settings(folder / serve, backend="local")
        assert settings.system and set(settings.server.adapters) == {"finetuned"}
        settings.server.adapters = {"finetuned": str(adapter)}
        settings.server.max_model_len_from, settings.server.max_model_len = None, 512  # no hub tokenizer offline
        cmd = VLLMServer(settings).command()[0]
        assert "--enable-lora" in cmd and "--max-lora-rank" in cmd
    assert load_settings(folder / "serve_t4.yaml", backend="local").server.dtype == "half"

    assert first_line(folder / "compare.yaml").startswith(f"# python -m serve.compare --config {rel}/compare.yaml")
    cmp = load_config(CompareConfig, folder / "compare.yaml")
    assert cmp.task == TASK[name] and cmp.serve_config == f"{rel}/serve.yaml" and cmp.out == f"runs/{name}/compare"
    heldout = "test/train.jsonl" if cmp.data.endswith("test/train.jsonl") else "data/valid.jsonl"
    cmp.data, cmp.train_data = str(built[name] / heldout), str(built[name] / "data/train.jsonl")
    cmp.check(str(folder / "compare.yaml"))
    assert TASKS[cmp.task].headline
    assert (cmp.bootstrap, cmp.seed, cmp.examples) == (1000, 0, 5)
    assert cmp.logprobs == (name == "imdb")
    assert cmp.format_check == ("markdown_headings" if name == "assistant" else None)
    if name == "banking77_json":
        assert cmp.json_fields == ["category", "subcategory"]
    if name == "assistant":
        assert cmp.judge_model and cmp.max_tokens and cmp.max_tokens >= 256

    assert first_line(folder / "openai.yaml") == f"# tunekit jobs create --config {rel}/openai.yaml"
    job = load_config(OpenAIJobConfig, folder / "openai.yaml")
    assert job.train_file == f"runs/{name}/data/train.jsonl" and job.valid_file == f"runs/{name}/data/valid.jsonl"
    assert job.seed == 42 and job.backend == "openai" and job.suffix


def test_app_reviews_keeps_the_write_ups_split_and_job():
    from tunekit.config import read_yaml

    build = read_yaml(ROOT / "configs/app_reviews/build.yaml")
    assert build["sample"] == 1000 and build["valid_fraction"] == 0.3 and build["seed"] == 42
    job = read_yaml(ROOT / "configs/app_reviews/openai.yaml")
    assert (job["n_epochs"], job["batch_size"], job["seed"], job["model"]) == (5, 8, 42, "gpt-4o-mini-2024-07-18")
    assert job["suffix"] == "spotify-chatbot-reviewer"


def test_imdb_carries_the_write_ups_figures():
    for path in ("configs/imdb/compare.yaml", "configs/imdb/data/README.md"):
        text = (ROOT / path).read_text(encoding="utf-8")
        for figure in ("0.8505", "0.89", "0.9365", "0.9366"):
            assert figure in text, (path, figure)


def test_assistant_data_has_markdown_brief_writer_conversations():
    rows = read_jsonl(ROOT / "configs/assistant/data/conversations.jsonl")
    briefs = [r for r in rows if "Project Briefs" in r["messages"][0]["content"]]
    assert len(briefs) >= 24 and len(rows) - len(briefs) == 40
    for r in briefs:
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert all(any(line.startswith("#") for line in a.splitlines()) for a in answers)
    assert len({r["messages"][1]["content"] for r in briefs}) >= len(briefs) - 1  # varied requests


# ---------------------------------------------------------------- the main-category mapping


def test_main_categories_cover_each_intent_exactly_once():
    intents = json.loads((ROOT / "configs/banking77/data/categories.json").read_text())
    mapping = yaml.safe_load((ROOT / "configs/banking77_json/main_categories.yaml").read_text())
    listed = [i for members in mapping.values() for i in members]
    assert 6 <= len(mapping) <= 10
    assert sorted(listed) == sorted(intents) and len(listed) == 77


def test_mapping_lookup_derives_the_main_category_and_drops_an_unknown_intent(tmp_path):
    from data_prep.__main__ import main

    rows = [("where is my card?", "card_arrival"), ("my card is still not here", "card_arrival"),
            ("top up failed", "top_up_failed"), ("why was my top-up declined", "top_up_failed"),
            ("send money abroad", "transfer_timing"), ("how long does a transfer take", "transfer_timing"),
            ("what is this?", "not_an_intent")]
    src = tmp_path / "in.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "category"), *rows])
    cfg = yaml.safe_load((ROOT / "configs/banking77_json/build.yaml").read_text())
    cfg.update(input=str(src), out=str(tmp_path / "out"), valid_fraction=0.5)
    cfg["derive"]["main_category"] = cfg["derive"]["main_category"].replace(
        "configs/banking77_json/main_categories.yaml", str(ROOT / "configs/banking77_json/main_categories.yaml"))
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["build", "--config", str(tmp_path / "build.yaml"), "-q"]) == 0
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["rows_in"] == 7 and report["rows_dropped"] == {"template_error": 1}
    assert "derive.main_category: value 'not_an_intent' not in" in report["drop_examples"]["template_error"][0]
    assert report["labels"]["train"] == {"cards": 1, "top_up": 1, "transfers": 1} == report["labels"]["valid"]
    answers = [json.loads(ex["messages"][-1]["content"]) for name in ("train", "valid")
               for ex in read_jsonl(tmp_path / f"out/{name}.jsonl")]
    assert {(a["category"], a["subcategory"]) for a in answers} == {
        ("cards", "card_arrival"), ("top_up", "top_up_failed"), ("transfers", "transfer_timing")}


# ---------------------------------------------------------------- tunekit demo --use-case


@pytest.mark.parametrize("name", USE_CASES)
def test_demo_dry_run_prints_the_five_stages(name, tmp_path, monkeypatch, capsys):
    from tunekit import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--use-case", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert [s for s in stages if s in STAGES] == list(STAGES), out
    case = demo.load_use_case(name)
    assert (tmp_path / "configs" / name / "demo.yaml").is_file()  # the packaged configs, copied to ./configs
    assert all((tmp_path / "configs" / folder).is_dir() for folder in case.needs)
    assert f"--out runs/{name}/compare" in out and "--start-server" in out
    assert f"--max_steps {case.steps} " in out


def test_demo_tiny_slice_and_running_server_flags(tmp_path, monkeypatch):
    from tunekit import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--use-case", "sensors", "--dry-run"]) == 0
    plan = dict(demo.steps(2, "sensors", train_rows=32, limit=8, serve_config="s.yaml", max_tokens=48,
                           train_args=["--lora_r", "8"]))
    build = plan["build"]
    sample, fraction = int(build[build.index("--sample") + 1]), float(build[build.index("--valid-fraction") + 1])
    assert sample - round(sample * fraction) == 32 and round(sample * fraction) >= demo.MIN_VALID
    assert plan["load the adapter"][-3:] == ["add", "sensors-ft", "runs/sensors/sft"]
    compare = plan["compare"]
    assert "--start-server" not in compare and compare[compare.index("--models") + 1] == "base,sensors-ft"
    assert compare[compare.index("--serve-config") + 1] == "s.yaml"
    assert compare[compare.index("--limit") + 1] == "8" and compare[compare.index("--max-tokens") + 1] == "48"
    assert plan["train"][-2:] == ["--lora_r", "8"] and "--max_steps" in plan["train"]
    # against a running server, the answers keep the use case's length (serve.yaml: 8), not that server's
    compare = dict(demo.steps(2, "sensors", serve_config="s.yaml"))["compare"]
    assert compare[compare.index("--max-tokens") + 1] == "8"


def test_dpo_demo_plans_sft_then_dpo_from_its_adapter_and_compares_all_three(tmp_path, monkeypatch, capsys):
    """banking77_dpo: after SFT, the pairs are built and validated, train/dpo.py starts from the SFT stage's
    output, and the comparison serves both adapters and scores the held-out pairs."""
    from tunekit import demo
    from tunekit.cli import script_for
    from train.dpo import parse

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--use-case", "banking77_dpo", "--dry-run", "--dpo-steps", "7"]) == 0
    out = capsys.readouterr().out
    stages = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert stages[stages.index("train"):] == ["train", "build the preference pairs", "validate the pairs", "train dpo",
                                              "compare"], out
    assert "--max_steps 360 --eval_steps 360 " in out and "--max_steps 7 --eval_steps 7 " in out
    case = demo.load_use_case("banking77_dpo")
    assert (case.steps, case.dpo_steps, case.out, case.needs) == (360, 100, "runs/banking77_dpo", ["banking77"])
    assert (tmp_path / "configs/banking77_dpo/README.md").is_file()

    plan = dict(demo.steps(3, "banking77_dpo", train_rows=32, limit=8, dpo_steps=2))
    o = "runs/banking77_dpo"
    build = plan["build the preference pairs"]
    assert build[build.index("--config") + 1] == "configs/banking77/build_dpo.yaml"
    assert build[build.index("--out") + 1] == f"{o}/dpo_data"
    assert build[build.index("--sample"):] == plan["build"][plan["build"].index("--sample"):]  # the same slice
    assert plan["validate the pairs"][-3:] == ["dpo", f"{o}/dpo_data/train.jsonl", f"{o}/dpo_data/valid.jsonl"]
    dpo = plan["train dpo"]
    at = dpo.index("--config")
    assert dpo[at - 1] == str(script_for(case.dpo)) and dpo[at - 1].endswith("train/dpo.py")
    script, training, _ = parse(dpo[at:])  # train/dpo.py's own parser takes every flag
    sft = plan["train"]
    assert script.init_adapter == sft[sft.index("--output_dir") + 1] == f"{o}/sft"
    assert (script.method, script.train_file, script.valid_file, training.output_dir, training.max_steps) == (
        "dpo", f"{o}/dpo_data/train.jsonl", f"{o}/dpo_data/valid.jsonl", f"{o}/sft_dpo", 2)
    compare = plan["compare"]
    assert [compare[i + 1] for i, a in enumerate(compare) if a == "--adapter"] == [
        f"finetuned={o}/sft", f"sft_dpo={o}/sft_dpo"]
    assert compare[compare.index("--models") + 1] == "base,finetuned,sft_dpo"
    assert compare[compare.index("--preference-data") + 1] == f"{o}/dpo_data/valid.jsonl"
    assert compare[compare.index("--preference-limit") + 1] == "8" == compare[compare.index("--limit") + 1]

    # against a running server: both adapters are loaded under the use case's names and compared
    plan = demo.steps(3, "banking77_dpo", serve_config="s.yaml")
    loads = [cmd[-3:] for stage, cmd in plan if stage.startswith("load the")]
    assert loads == [["add", "banking77_dpo-ft", f"{o}/sft"], ["add", "banking77_dpo-dpo", f"{o}/sft_dpo"]]
    compare = dict(plan)["compare"]
    assert compare[compare.index("--models") + 1] == "base,banking77_dpo-ft,banking77_dpo-dpo"
    assert "--start-server" not in compare and "--adapter" not in compare
    # a second run against that server: each adapter of the first is removed before its new one is added
    from types import SimpleNamespace

    ran = []
    monkeypatch.setattr(demo, "running_server", lambda config: (None, {"banking77_dpo-ft", "banking77_dpo-dpo"}))
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, env: ran.append(cmd) or SimpleNamespace(returncode=0))
    assert demo.main(["--use-case", "banking77_dpo", "--serve-config", "s.yaml"]) == 0
    adapters = [cmd[-3:] if cmd[-3] == "add" else cmd[-2:] for cmd in ran if "serve.adapters" in cmd]
    assert adapters == [["remove", "banking77_dpo-ft"], ["add", "banking77_dpo-ft", f"{o}/sft"],
                        ["remove", "banking77_dpo-dpo"], ["add", "banking77_dpo-dpo", f"{o}/sft_dpo"]]
    assert "--model banking77_dpo-dpo 'Where is my card?'" in capsys.readouterr().out  # the closing hint

    # --dpo-steps on a use case without DPO, and a dpo profile that is not one: one line each
    from tunekit.errors import UserError

    with pytest.raises(UserError, match="--dpo-steps: the use case sensors has no DPO stage"):
        demo.main(["--use-case", "sensors", "--dry-run", "--dpo-steps", "5"])
    (tmp_path / "configs/banking77_dpo/demo.yaml").write_text(
        (tmp_path / "configs/banking77_dpo/demo.yaml").read_text().replace(
            "dpo: configs/banking77/dpo_cpu.yaml", "dpo: configs/banking77/sft_cpu.yaml"))
    with pytest.raises(UserError, match="dpo: configs/banking77/sft_cpu.yaml has no `method: dpo`"):
        demo.steps(3, "banking77_dpo")
    with pytest.raises(UserError, match="dpo and dpo_build: give both"):
        demo.UseCase(description="x", build="b", sft="s", compare="c", dpo="d").check("demo.yaml")


def test_demo_lists_use_cases_and_an_unknown_one_is_one_line(tmp_path):
    proc = subprocess.run([TUNEKIT, "demo", "--use-case", "list"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and all(name in proc.stdout for name in USE_CASES)
    proc = subprocess.run([TUNEKIT, "demo", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "banking77_json" in proc.stdout and "--serve-config" in proc.stdout
    proc = subprocess.run([TUNEKIT, "demo", "--use-case", "nope", "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --use-case nope: no such use case; use one of app_reviews, assistant, banking77, banking77_dpo, "
        "banking77_json, imdb, sensors (tunekit demo --use-case list describes them)"]
    assert not (tmp_path / "configs").exists()


# ---------------------------------------------------------------- whole tiny runs (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", USE_CASES)
def test_demo_runs_each_use_case_against_a_running_server(name, vllm_server, tmp_path):
    """build -> validate -> stats -> 2 training steps on 32 rows -> the adapter loaded into the session's
    server -> comparison on 8 held-out examples, from an empty working directory."""
    from serve.compare.tasks import TASKS

    cmd = [TUNEKIT, "demo", "--use-case", name, "--steps", "2", "--train-rows", "32", "--limit", "8",
           "--serve-config", str(vllm_server.config)]
    if TASK[name] == "text":
        cmd += ["--max-tokens", "48"]
    # after --: train/sft.py flags. The session server's --max-lora-rank is 8 (its own adapter's rank); one
    # thread and no evaluation keep 2 steps quick on a busy 2-core machine.
    cmd += ["--", "--lora_r", "8", "--lora_alpha", "16", "--per_device_train_batch_size", "4", "--num_threads", "1",
            "--eval_strategy", "no"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=vllm_server.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "runs" / name / "compare"
    metrics = json.loads((out / "metrics.json").read_text())
    task = TASKS[metrics["config"]["task"]]
    by = {m["alias"]: m for m in metrics["models"]}
    expected = {"base", f"{name}-ft"} | ({"tfidf-logreg"} if task.baseline else set())
    assert set(by) == expected and metrics["examples"] == 8
    for alias in expected:
        assert by[alias].get(task.headline) is not None, (alias, by[alias])
    assert by[f"{name}-ft"]["answered"] == 8, by[f"{name}-ft"]
    report = (out / "report.md").read_text()
    assert f"{name}-ft" in report and "demo finished" in proc.stdout
    rows = list(csv.DictReader((out / "predictions.csv").open(encoding="utf-8")))
    assert len(rows) == 8 and {"system", "input", "reference", "base_answer", f"{name}-ft_answer"} <= set(rows[0])
    assert all(r["system"] and r["input"] for r in rows)  # what the sensors write-up exports, for every use case
    if metrics["config"]["logprobs"] and len({r["reference"] for r in rows}) > 1:  # AUC needs both classes
        assert by[f"{name}-ft"].get("roc_auc") is not None, by[f"{name}-ft"]
    if metrics["config"]["format_check"]:
        assert by[f"{name}-ft"].get("format_ok") is not None and "format ok" in report, by[f"{name}-ft"]
    assert (tmp_path / "runs" / name / "sft" / "adapter_config.json").is_file()
    assert os.path.isdir(tmp_path / "configs" / name)
