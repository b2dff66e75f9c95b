"""python -m train.openai_ft as a user runs it, against the local fine-tuning API (real server, real SDK).

The whole client path (create -> follow, detached with Ctrl-C and re-attached -> results) runs
through a proxy that injects 500s, 429s and dropped connections.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, ctrl_c_able
from test_finetune_api import KEY, FaultProxy, Server, ft_model_dir, toy_files, training_pids  # noqa: F401 (fixtures)

COMMANDS = ("create", "follow", "list", "status", "cancel", "checkpoints", "results")


@pytest.fixture(scope="module")
def server(tmp_path_factory, ft_model_dir):  # noqa: F811
    s = Server(tmp_path_factory.mktemp("ftapi_cli"), ft_model_dir).start()
    yield s
    s.stop()


def cli(*args: str, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.openai_ft", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "TUNEKIT_API_KEY")}
    return {**env, "PYTHONPATH": str(ROOT), "TUNEKIT_REGISTRY": str(tmp_path / "registry.json"),
            "HF_HUB_OFFLINE": "1"}


def job_config(tmp_path: Path, toy: Path, base_url: str, **extra) -> Path:
    cfg = {"train_file": str(toy / "train.jsonl"), "valid_file": str(toy / "valid.jsonl"), "local_model": "tiny-llama",
           "suffix": "toy", "seed": 7, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0,
           "backend": "local", "base_url": base_url, "jobs_dir": str(tmp_path / "jobs"), "max_retries": 6, **extra}
    path = tmp_path / "openai.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_create_follow_detach_reattach_results_through_a_faulty_proxy(server, toy_files, tmp_path):  # noqa: F811
    proxy = FaultProxy(server.base_url.removesuffix("/v1"), every=4)
    try:
        base_url = proxy.url + "/v1"
        env = cli_env(tmp_path)
        (tmp_path / ".env").write_text(f"TUNEKIT_API_KEY={KEY}\n")  # the key comes from .env in the cwd
        created = cli("create", "--config", str(job_config(tmp_path, toy_files, base_url)), cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr[-2000:]
        out = created.stdout
        assert "32 examples" in out and "x 2 epochs" in out and "local backend: no charge" in out
        assert out.count("uploaded ") == 2 and KEY not in out + created.stderr
        job_id = out.split("created ", 1)[1].split()[0]
        # its training held (SIGSTOP) until the follow below has detached: the tiny model trains its 16 steps in
        # well under a second, so a job left to run could end before the Ctrl-C (nothing to detach from)
        deadline = time.time() + 120
        while not (held := [pid for pid in training_pids(server.data_dir) if job_id in cmdline(pid)]):
            assert time.time() < deadline, "the job's training did not start"
            time.sleep(0.02)
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)
        for pid in set(training_pids(server.data_dir)) - set(held):  # a child started as its parent was stopped
            if job_id in cmdline(pid):
                os.kill(pid, signal.SIGSTOP)
                held.append(pid)
        record = json.loads((tmp_path / "jobs" / f"{job_id}.json").read_text())
        assert record["backend"] == "local" and record["request"]["method"]["supervised"]["hyperparameters"] == \
            {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}

        # the same files again: reused by content hash, not uploaded twice. Done while the first job trains: the
        # second waits behind it (one job at a time) and is cancelled before it would start a training process.
        second = cli("create", "--config", str(job_config(tmp_path, toy_files, base_url, n_epochs=1)), cwd=tmp_path,
                     env=env)
        assert second.returncode == 0 and second.stdout.count("reusing ") == 2, second.stdout + second.stderr
        job2 = second.stdout.split("created ", 1)[1].split()[0]
        cancel = cli("cancel", job2, "--jobs-dir", str(tmp_path / "jobs"), cwd=tmp_path, env=env)
        assert cancel.returncode == 0 and "cancelled" in cancel.stdout
        again = cli("cancel", job2, "--jobs-dir", str(tmp_path / "jobs"), cwd=tmp_path, env=env)
        assert again.returncode == 2 and "cannot be cancelled" in again.stderr and "Traceback" not in again.stderr

        # follow, detach with Ctrl-C after the first event, let the training go on, follow again to the end
        follow = ["follow", job_id, "--jobs-dir", str(tmp_path / "jobs"), "--interval", "0.3", "--max-retries", "0"]
        proc = subprocess.Popen([sys.executable, "-m", "train.openai_ft", *follow], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=ctrl_c_able)
        first, deadline = [], time.time() + 120
        for line in proc.stdout:
            first.append(line)
            if line[:2].isdigit() or time.time() > deadline:
                break
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)  # (communicate() would skip what the line iterator has buffered)
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        rest, err = proc.stdout.read(), proc.stderr.read()
        first += rest.splitlines(keepends=True)
        assert proc.returncode == 0, err[-2000:]
        assert f"Re-attach with: tunekit jobs follow {job_id}" in "".join(first)
        again = cli(*follow, cwd=tmp_path, env=env)
        assert again.returncode == 0, again.stderr[-2000:]
        seen_before = [l.strip() for l in first if l[:2].isdigit()]
        seen_after = [l.strip() for l in again.stdout.splitlines() if l[:2].isdigit()]
        assert seen_before and seen_after and not set(seen_before) & set(seen_after)  # nothing printed twice
        events = seen_before + seen_after
        assert any("step 16/16" in l and "train loss" in l for l in events), "".join(first) + "\n---\n" + again.stdout
        assert any("valid loss" in l for l in events)
        ft_name = f"ft:tiny-llama:personal:toy:{job_id.removeprefix('ftjob-')}"  # OpenAI's shape
        assert f"succeeded: {ft_name}" in again.stdout
        assert "retrying" in again.stderr + err  # the polling loop met injected failures and went on
        assert {"500", "429", "drop"} <= set(proxy.injected)

        registry = json.loads((tmp_path / "registry.json").read_text())
        assert registry["local"]["finetuned"]["model"] == ft_name
        assert registry["local"]["finetuned"]["job_id"] == job_id

        results = cli("results", job_id, "--jobs-dir", str(tmp_path / "jobs"), "--out", str(tmp_path / "res"),
                      cwd=tmp_path, env=env)
        assert results.returncode == 0, results.stderr[-2000:]
        csv_text = (tmp_path / "res/results.csv").read_text()
        assert csv_text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
        assert len(csv_text.splitlines()) == 1 + 8
        assert (tmp_path / "res/results.png").stat().st_size > 10_000

        ckpts = cli("checkpoints", job_id, "--jobs-dir", str(tmp_path / "jobs"), cwd=tmp_path, env=env)
        assert ckpts.returncode == 0 and ":ckpt-step-16" in ckpts.stdout
        status = cli("status", job_id, "--jobs-dir", str(tmp_path / "jobs"), cwd=tmp_path, env=env)
        assert status.returncode == 0 and "succeeded" in status.stdout and "n_epochs 2, batch_size 4" in status.stdout
        listed = cli("list", "--backend", "local", "--base-url", base_url, cwd=tmp_path, env=env)
        assert listed.returncode == 0 and job_id in listed.stdout

    finally:
        proxy.close()


def test_invalid_files_are_refused_before_anything_is_uploaded(server, toy_files, tmp_path):  # noqa: F811
    cfg = job_config(tmp_path, toy_files, server.base_url, train_file=str(toy_files / "bad.jsonl"))
    proc = cli("create", "--config", str(cfg), cwd=tmp_path, env={**cli_env(tmp_path), "TUNEKIT_API_KEY": KEY})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{toy_files / 'bad.jsonl'}:17: example_missing_assistant_message" in proc.stderr
    assert f"{toy_files / 'bad.jsonl'}:18: invalid_json" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_server_refusals_are_one_line_with_the_servers_message(server, toy_files, tmp_path):  # noqa: F811
    env = {**cli_env(tmp_path), "TUNEKIT_API_KEY": KEY}
    proc = cli("create", "--config", str(job_config(tmp_path, toy_files, server.base_url, local_model="gpt-9")),
               cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "400 model 'gpt-9' is not available" in proc.stderr
    wrong = cli("status", "ftjob-x", "--backend", "local", "--base-url", server.base_url, cwd=tmp_path,
                env={**env, "TUNEKIT_API_KEY": "wrong"})
    assert wrong.returncode == 2 and "refused the API key; set TUNEKIT_API_KEY" in wrong.stderr
    assert "wrong" not in wrong.stderr
    missing = cli("status", "ftjob-nope", "--backend", "local", "--base-url", server.base_url, cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "404 Fine-tuning job ftjob-nope not found" in missing.stderr
    down = cli("list", "--backend", "local", "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "1",
               "--timeout", "2", cwd=tmp_path, env=env)
    assert down.returncode == 2 and "cannot reach http://127.0.0.1:9/v1" in down.stderr


def test_a_failed_job_shows_its_error(server, toy_files, tmp_path):  # noqa: F811
    """A file that passes the client's checks but not the server's (too few examples for it) fails."""
    from openai import OpenAI

    c = OpenAI(base_url=server.base_url, api_key=KEY)
    short = tmp_path / "short.jsonl"
    short.write_text("".join((toy_files / "train.jsonl").read_text().splitlines(keepends=True)[:3]))
    job = c.fine_tuning.jobs.create(training_file=c.files.create(file=open(short, "rb"), purpose="fine-tune").id,
                                    model="tiny-llama")
    env = {**cli_env(tmp_path), "TUNEKIT_API_KEY": KEY}
    proc = cli("follow", job.id, "--backend", "local", "--base-url", server.base_url, "--interval", "0.3",
               "--jobs-dir", str(tmp_path / "jobs"), cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1 and "failed: invalid_n_examples: Training file has 3 example(s)" in proc.stderr
    assert "at least 10 examples" in proc.stderr and "(param training_file)" in proc.stderr


def test_bad_config_key_and_missing_openai_key(tmp_path):
    cfg = tmp_path / "openai.yaml"
    cfg.write_text("train_file: x.jsonl\nn_epoch: 3\n")
    proc = cli("create", "--config", str(cfg), cwd=tmp_path, env=cli_env(tmp_path))
    assert proc.returncode == 2 and "unknown config key(s) n_epoch" in proc.stderr and "n_epochs" in proc.stderr
    proc = cli("list", cwd=tmp_path, env=cli_env(tmp_path))
    assert proc.returncode == 2 and "OPENAI_API_KEY is not set" in proc.stderr


def test_every_command_has_help():
    for command in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "train.openai_ft", command, "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "--backend" in proc.stdout and "--base-url" in proc.stdout, command


def test_result_files_decode_plain_or_base64():
    from train.jobs.results import decode_result

    text = "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.0,0.5,,\n"
    assert decode_result(text.encode()) == text
    assert decode_result(base64.b64encode(text.encode())) == text


def test_openai_and_finetune_api_configs_load():
    from tunekit.config import load_config
    from serve.finetune_api import FinetuneAPIConfig
    from train.jobs.create import OpenAIJobConfig

    seen = 0
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        rel = path.relative_to(ROOT)
        first = path.read_text().splitlines()[0]
        if path.name == "openai.yaml":
            assert first == f"# tunekit jobs create --config {rel}"
            cfg = load_config(OpenAIJobConfig, path)
            assert cfg.backend in ("openai", "local") and cfg.train_file
        elif path.name == "finetune_api.yaml":
            assert first == f"# python -m serve.finetune_api --config {rel}"
            cfg = load_config(FinetuneAPIConfig, path)
            assert (ROOT / cfg.sft_config).is_file()
        else:
            continue
        seen += 1
    assert seen >= 2


# ---- create's flags are generated from OpenAIJobConfig's fields, and override openai.yaml ----

def test_create_flags_are_generated_from_the_config_fields(tmp_path):
    """Every OpenAIJobConfig key is a create flag (assume_yes keeps the spelling --yes); a flag overrides the YAML."""
    import dataclasses

    from train.jobs.cli import parser
    from train.jobs.create import OpenAIJobConfig
    from tunekit.config import flag_overrides, load_config

    cfg_path = tmp_path / "openai.yaml"
    cfg_path.write_text("train_file: t.jsonl\nn_epochs: 2\nseed: 7\nbackend: openai\nassume_yes: false\n"
                        "poll_interval_s: 10\n")
    args = parser().parse_args(["create", "--config", str(cfg_path), "--n-epochs", "3", "--backend", "local",
                                "--learning_rate_multiplier", "0.5", "--batch-size", "auto", "--yes",
                                "--poll-interval-s", "2"])
    assert set(args.config_flags) == {f.name for f in dataclasses.fields(OpenAIJobConfig)}
    cfg = load_config(OpenAIJobConfig, args.config, flag_overrides(args, args.config_flags))
    assert (cfg.n_epochs, cfg.backend, cfg.learning_rate_multiplier, cfg.batch_size, cfg.assume_yes,
            cfg.poll_interval_s) == (3, "local", 0.5, "auto", True, 2.0)
    assert (cfg.train_file, cfg.seed) == ("t.jsonl", 7)  # not given: the YAML's
    plain = parser().parse_args(["create", "--config", str(cfg_path)])
    cfg = load_config(OpenAIJobConfig, plain.config, flag_overrides(plain, plain.config_flags))
    assert (cfg.n_epochs, cfg.backend, cfg.assume_yes) == (2, "openai", False)


def test_create_n_epochs_is_a_number_or_auto_and_yes_keeps_its_spellings():
    from train.jobs.cli import parser

    assert parser().parse_args(["create", "--n-epochs", "3"]).n_epochs == 3
    assert parser().parse_args(["create", "--n-epochs", "auto"]).n_epochs == "auto"
    assert parser().parse_args(["create", "--n_epochs", "1"]).n_epochs == 1
    for flag in ("--yes", "--assume-yes"):
        assert parser().parse_args(["create", flag]).assume_yes is True
    assert parser().parse_args(["create"]).assume_yes is None  # not given: the config's assume_yes decides
    # the other commands keep their own flags
    args = parser().parse_args(["list", "--timeout", "2", "--max-retries", "1"])
    assert (args.timeout, args.max_retries) == (2.0, 1)


def test_cmd_create_layers_the_flags_over_the_yaml(tmp_path, monkeypatch):
    import train.jobs.create
    from train.jobs.cli import parser

    cfg_path = tmp_path / "openai.yaml"
    cfg_path.write_text("train_file: t.jsonl\nmodel: gpt-4o-mini-2024-07-18\nn_epochs: 2\nsuffix: yaml\n")
    seen = {}

    def stop(cfg):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(train.jobs.create, "check_files", stop)
    args = parser().parse_args(["create", "--config", str(cfg_path), "--suffix", "flag", "--n-epochs", "auto",
                                "--jobs-dir", str(tmp_path / "jobs")])
    with pytest.raises(KeyboardInterrupt):
        args.fn(args)
    cfg = seen["cfg"]
    assert (cfg.suffix, cfg.n_epochs, cfg.jobs_dir, cfg.train_file) == ("flag", "auto", str(tmp_path / "jobs"),
                                                                      "t.jsonl")
