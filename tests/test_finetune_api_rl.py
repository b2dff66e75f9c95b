# ruff: noqa: F811 (the fixtures of test_finetune_api*.py, imported, are taken by name as arguments)
"""serve.finetune_api: ``method.type: "reinforcement"`` jobs (OpenAI's RFT) trained by train/grpo.py.

Without a server (FastAPI's TestClient, the worker driven step by step): the request checks with OpenAI's
codes, the grader checked as the graders API checks it, the python-grader policy, the job objects against
OpenAI's schemas, file validation by the RFT rules, what each hyperparameter means in the training YAML, and
train/grpo.py's metrics as OpenAI's RFT metrics events. Then (marked slow) OpenAI's reinforcement fine-tuning
guide as a script against a real server training the tiny Llama: files, grader validation, the job, its
events with the reward per step, checkpoints, the result file, and chat with the adapter (served by a
stand-in vLLM server that records the adapter loaded into it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_finetune_api import KEY as SERVER_KEY
from test_finetune_api import Server, check_schema, ft_model_dir, openapi_schemas  # noqa: F401
from test_finetune_api_units import KEY, assert_error, cfg, upload  # noqa: F401

LABELS = ["yes", "no"]
GRADER = {"type": "string_check", "name": "label", "input": "{{ sample.output_text }}",
          "reference": "{{ item.label }}", "operation": "ilike"}
PY = {"type": "python", "name": "starts", "source": "def grade(sample, item):\n"
      "    return 1.0 if sample['output_text'].strip().lower().startswith(item['label']) else 0.0\n"}


def rft(q: str, label: str, **extra) -> dict:
    """One line of OpenAI's RFT format: the prompt ends with the user's turn; the other fields are the item."""
    return {"messages": [{"role": "developer", "content": "Answer yes or no."}, {"role": "user", "content": q}],
            "label": label, **extra}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


RFT_TRAIN = jsonl(rft(f"w{i} w{i + 1}", LABELS[i % 2]) for i in range(12))
RL_HP = "method.reinforcement.hyperparameters"


@pytest.fixture(scope="session")
def schemas(request) -> dict:
    return request.getfixturevalue("openapi_schemas")


@pytest.fixture
def rl_cfg(cfg, tmp_path):
    """The units' server config with a train/grpo.py profile of its base model."""
    profile = tmp_path / "grpo.yaml"
    profile.write_text(f"method: reinforcement\nmodel_name_or_path: {tmp_path / 'tiny-llama'}\nnum_generations: 8\n"
                       "per_device_train_batch_size: 16\nlearning_rate: 0.0001\neval_strategy: steps\neval_steps: 30\n"
                       "per_device_eval_batch_size: 16\nnum_generations_eval: 4\nmax_eval_examples: 32\n"
                       "max_completion_length: 24\n")
    return dataclasses.replace(cfg, rl_config=str(profile), sft_overrides={"max_length": 64, "shared_prefix": True},
                               max_file_mb=1.0)


def make_app(cfg):
    from fastapi.testclient import TestClient

    from serve.finetune_api import create_app

    app = create_app(cfg, KEY, run_worker=False)
    return app, TestClient(app, headers={"Authorization": f"Bearer {KEY}"}, raise_server_exceptions=False)


@pytest.fixture
def rl(rl_cfg):
    app, client = make_app(rl_cfg)
    yield app, client
    app.state.store.close()


def rl_body(file_id: str, hp: dict | None = None, grader=GRADER, **method) -> dict:
    return {"model": "o4-mini", "training_file": file_id,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp or {},
                                                                  **method}}}


# ----------------------------------------------------------------------------- request checks

RL_ERRORS = [  # (method, param, code, part of the message)
    ({"type": "reinforcement"}, "method.reinforcement.grader", "missing_required_parameter",
     "Missing required parameter: 'method.reinforcement.grader'."),
    ({"type": "reinforcement", "reinforcement": {"hyperparameters": {}}}, "method.reinforcement.grader",
     "missing_required_parameter", ""),
    ({"type": "reinforcement", "reinforcement": {"grader": {**GRADER, "operation": "regex"}}},
     "method.reinforcement.grader.operation", "invalid_value", "expected one of eq, ne, like, ilike"),
    ({"type": "reinforcement", "reinforcement": {"grader": {"type": "multi", "name": "m", "calculate_output": "a +",
                                                            "graders": {"a": GRADER}}}},
     "method.reinforcement.grader.calculate_output", "invalid_value", ""),
    ({"type": "reinforcement", "reinforcement": {"grader": {**PY, "source": "def other(s, i):\n    return 1\n"}}},
     "method.reinforcement.grader.source", "invalid_value", "grade(sample, item)"),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "reward": 1}}, "method.reinforcement.reward",
     "unknown_parameter", "Unknown parameter: 'method.reinforcement.reward'."),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "response_format": {"type": "xml"}}},
     "method.reinforcement.response_format.type", "invalid_value", "'json_schema', 'json_object', and 'text'"),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 0}}},
     f"{RL_HP}.compute_multiplier", "decimal_below_min_value", "Expected a value > 1e-05, but got 0 instead."),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 10.5}}},
     f"{RL_HP}.compute_multiplier", "decimal_above_max_value", "Expected a value <= 10, but got 10.5 instead."),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"eval_interval": 0}}},
     f"{RL_HP}.eval_interval", "integer_below_min_value", "Expected a value >= 1, but got 0 instead."),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"eval_samples": 2.5}}},
     f"{RL_HP}.eval_samples", "invalid_type", "expected one of 'auto' or an integer, but got a decimal instead"),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"reasoning_effort": "auto"}}},
     f"{RL_HP}.reasoning_effort", "invalid_value", "Supported values are: 'default', 'low', 'medium', and 'high'."),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"n_epochs": 51}}},
     f"{RL_HP}.n_epochs", "integer_above_max_value", "<= 50"),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"beta": 0.1}}},
     f"{RL_HP}.beta", "unknown_parameter", ""),
    ({"type": "reinforcement", "dpo": {"hyperparameters": {}}, "reinforcement": {"grader": GRADER}}, "method.dpo",
     "invalid_value", "method.type is 'reinforcement'"),
]


@pytest.mark.parametrize("method,param,code,message", RL_ERRORS, ids=[e[1] for e in RL_ERRORS])
def test_reinforcement_request_errors_are_openai_400s(rl, schemas, method, param, code, message):
    app, client = rl
    fid = upload(client, RFT_TRAIN).json()["id"]
    resp = client.post("/v1/fine_tuning/jobs", json={"model": "o4-mini", "training_file": fid, "method": method})
    assert_error(resp, 400, param, code, message)
    check_schema(schemas, "ErrorResponse", resp.json())
    top = client.post("/v1/fine_tuning/jobs", json={**rl_body(fid), "hyperparameters": {"n_epochs": 2}})
    assert_error(top, 400, "hyperparameters", "invalid_value", "give a reinforcement job's as "
                 "'method.reinforcement.hyperparameters'")
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_reinforcement_jobs_show_their_grader_and_hyperparameters_as_openai_does(rl, schemas):
    app, client = rl
    fid = upload(client, RFT_TRAIN).json()["id"]
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", "compute_multiplier": "auto",
            "eval_interval": "auto", "eval_samples": "auto", "reasoning_effort": "default"}
    given = {"compute_multiplier": 10, "eval_interval": 3, "eval_samples": 5, "reasoning_effort": "high",
             "learning_rate_multiplier": 0.5}
    for hp, shown in (({}, auto), (given, {**auto, **given, "compute_multiplier": 10.0})):
        resp = client.post("/v1/fine_tuning/jobs", json=rl_body(fid, hp))
        assert resp.status_code == 200, resp.text
        job = resp.json()
        check_schema(schemas, "FineTuningJob", job)
        check_schema(schemas, "FineTuneReinforcementMethod", job["method"]["reinforcement"])
        assert job["method"] == {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": shown}}
        assert job["hyperparameters"] == {} and job["model"] == "o4-mini-2025-04-16"  # the alias as its snapshot
    # OpenAI's guide: a multi grader as a {name: grader} map, and a response_format (kept, not enforced here)
    multi = {"type": "multi", "name": "m", "graders": {"label": GRADER, "close": {
        "type": "text_similarity", "name": "close", "input": "{{ sample.output_text }}", "reference": "{{ item.label }}",
        "evaluation_metric": "fuzzy_match"}}, "calculate_output": "0.5 * label + 0.5 * close"}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {"type": "object"}}}
    job = client.post("/v1/fine_tuning/jobs", json=rl_body(fid, grader=multi, response_format=fmt)).json()
    assert job["method"]["reinforcement"]["grader"] == multi and job["method"]["reinforcement"]["response_format"] == fmt
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["method"] == job["method"]


def test_reinforcement_is_refused_naming_the_key_without_a_profile_of_the_base(cfg, tmp_path):
    app, client = make_app(dataclasses.replace(cfg, rl_config=str(tmp_path / "nope.yaml")))
    fid = upload(client, RFT_TRAIN).json()["id"]
    assert_error(client.post("/v1/fine_tuning/jobs", json=rl_body(fid)), 400, "method.type", "unsupported_value",
                 "rl_config (")
    app.state.store.close()


# ----------------------------------------------------------------------------- python graders: the policy


def test_python_graders_follow_the_server_config(rl_cfg):
    from serve.graders.sandbox import isolation

    cases = [("127.0.0.1", "auto", isolation().complete), ("0.0.0.0", "auto", False), ("0.0.0.0", "on", True),
             ("127.0.0.1", "off", False)]
    multi = {"type": "multi", "name": "m", "calculate_output": "a * b", "graders": {"a": GRADER, "b": PY}}
    for host, policy, runs in cases:
        app, client = make_app(dataclasses.replace(rl_cfg, host=host, python_graders=policy))
        fid = upload(client, RFT_TRAIN).json()["id"]
        for grader, param in ((PY, "method.reinforcement.grader.type"),
                              (multi, "method.reinforcement.grader.graders.b.type")):
            resp = client.post("/v1/fine_tuning/jobs", json=rl_body(fid, grader=grader))
            run = client.post("/v1/fine_tuning/alpha/graders/run",
                              json={"grader": grader, "model_sample": "yes", "item": {"label": "yes"}})
            if runs:
                assert resp.status_code == 200 and run.status_code == 200, (resp.text, run.text)
                assert run.json()["reward"] == 1.0
            else:
                fix = "python_graders: off" if policy == "off" else "python_graders: on"
                assert_error(resp, 400, param, "unsupported_value", fix)
                assert_error(run, 400, param.replace("method.reinforcement.", ""), "unsupported_value", fix)
        assert client.post("/v1/fine_tuning/jobs", json=rl_body(fid)).status_code == 200  # no python: always
        app.state.store.close()


# ----------------------------------------------------------------------------- validation and the training YAML


def validated(app, client, body: dict) -> dict:
    job = client.post("/v1/fine_tuning/jobs", json=body)
    assert job.status_code == 200, job.text
    app.state.worker.validate(app.state.store.get_job(job.json()["id"]))
    return app.state.store.get_job(job.json()["id"])


def test_files_are_checked_by_the_rft_rules_and_against_the_grader(rl):
    app, client = rl
    chat = upload(client, jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
                                for _ in range(12))).json()["id"]
    failed = validated(app, client, rl_body(chat))
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_training_file"
    assert "line 1 is a supervised (chat) example that ends with the assistant's answer" in failed["error"]["message"]
    assert "python -m data_prep.reinforcement" in failed["error"]["message"]
    rows = [rft("q", "yes")] * 11 + [{"messages": [{"role": "user", "content": "q"}], "answer": "yes"}]
    missing = validated(app, client, rl_body(upload(client, jsonl(rows)).json()["id"]))
    assert missing["error"]["message"] == (
        "The job failed due to an invalid training file. Invalid file format: line 12: missing_item_field: the "
        "grader reads {{ item.label }} and this line has no such field (its fields: answer); every line needs the "
        "fields the grader reads")
    big = upload(client, jsonl(rft("q", "no") for _ in range(1001)), name="valid.jsonl").json()["id"]
    job = validated(app, client, {**rl_body(upload(client, RFT_TRAIN).json()["id"]), "validation_file": big})
    assert (job["error"]["code"], job["error"]["param"]) == ("invalid_n_examples", "validation_file")
    assert job["error"]["message"] == ("Validation file has 1001 example(s), but must have at most 1,000 examples "
                                       "for reinforcement fine-tuning")
    # and an RFT file on a supervised job names the method to use
    sft = validated(app, client, {"model": "tiny-llama", "training_file": upload(client, RFT_TRAIN).json()["id"]})
    assert "line 1 is a reinforcement example" in sft["error"]["message"]


def test_each_hyperparameter_means_a_grpo_setting(rl, schemas):
    app, client = rl
    store, worker = app.state.store, app.state.worker
    app.state.service.cfg.python_graders = "on"
    valid = upload(client, jsonl(rft("q", "yes") for _ in range(40)), name="valid.jsonl").json()["id"]
    body = {**rl_body(upload(client, RFT_TRAIN).json()["id"], {"batch_size": 3, "compute_multiplier": 0.5,
                                                              "reasoning_effort": "medium"},
                      response_format={"type": "json_object"}), "validation_file": valid, "seed": 5}
    job = validated(app, client, body)
    # 12 prompts: n_epochs 100 // 12 = 8, multiplier 1.8; eval_interval/eval_samples wait for the profile
    assert job["status"] == "queued" and job["method"]["reinforcement"]["hyperparameters"] == {
        "n_epochs": 8, "batch_size": 3, "learning_rate_multiplier": 1.8, "compute_multiplier": 0.5,
        "eval_interval": "auto", "eval_samples": "auto", "reasoning_effort": "medium"}
    check_schema(schemas, "FineTuningJob", client.get(f"/v1/fine_tuning/jobs/{job['id']}").json())
    run_dir = Path(app.state.service.data_dir) / "runs" / job["id"]
    run_dir.parent.mkdir(parents=True)
    path, info = worker.job_config(job, run_dir)
    config = yaml.safe_load(path.read_text())
    # G = 8 x 0.5 = 4 completions per prompt; 3 prompts = 12 completions, split 12 x 1 (the profile's 16 per
    # device); 4 steps an epoch; eval batch 16 (a multiple of num_generations_eval 4)
    assert {k: config[k] for k in ("method", "num_generations", "per_device_train_batch_size",
                                   "gradient_accumulation_steps", "max_steps", "num_train_epochs", "eval_steps",
                                   "max_eval_examples", "per_device_eval_batch_size", "seed", "learning_rate")} == {
        "method": "reinforcement", "num_generations": 4, "per_device_train_batch_size": 12,
        "gradient_accumulation_steps": 1, "max_steps": 32, "num_train_epochs": 8, "eval_steps": 30,
        "max_eval_examples": 32, "per_device_eval_batch_size": 16, "seed": 5, "learning_rate": 0.000122474}
    assert config["grader"] == GRADER and config["valid_file"] == store.get_file(valid)[1]
    assert "max_length" not in config and "shared_prefix" not in config  # SFT's keys, which GRPO refuses
    assert info["hyperparameters"] == {**job["method"]["reinforcement"]["hyperparameters"], "eval_interval": 30,
                                       "eval_samples": 32}  # the job shows them from its start
    assert info["env"]["TUNEKIT_PYTHON_GRADERS"] == "on"
    messages = [m for _, m in info["events"]]
    assert messages[0].startswith(f"Training tiny-llama with {app.state.service.cfg.rl_config}: reinforcement "
                                  "(GRPO); n_epochs 8, batch_size 3 prompts x 4 completions (12 per step x 1 "
                                  "accumulated), compute_multiplier 0.5 -> num_generations 4 (the profile's 8 x 0.5)")
    assert "evaluation every 30 steps on 32 validation prompts; 32 steps" in messages[0]
    assert any("reasoning_effort 'medium' is recorded; it has no effect here" in m for m in messages)
    assert any(m.startswith("response_format is recorded and not enforced") for m in messages)
    from serve.finetune_api.hyperparameters import plan, resolve

    hp = resolve({"compute_multiplier": 100 / 8, "batch_size": 1}, 12, "o4-mini-2025-04-16", "reinforcement")
    assert plan({"num_generations": 8, "per_device_train_batch_size": 8}, hp, 12, "m")["num_generations"] == 64
    tiny = resolve({"compute_multiplier": 0.001}, 12, "m", "reinforcement")
    assert plan({"num_generations": 8}, tiny, 12, "m")["num_generations"] == 2  # GRPO needs a group


# ----------------------------------------------------------------------------- train/grpo.py's metrics


def test_grpo_metrics_as_openai_rft_events(tmp_path):
    from serve.finetune_api.metrics import metrics_data, metrics_message, results_csv, step_metrics

    records = [{"step": 2, "loss": 0.01, "reward": 0.25, "reward_std": 0.4, "rewards/grader/mean": 0.25,
                "sub_rewards/label": 0.5, "sub_rewards/close": 0.0, "grader_error_rate": 0.125,
                "completions/mean_length": 7.5, "num_tokens": 300},
               {"step": 2, "eval_loss": 0.0, "eval_reward": 0.675, "eval_reward_std": 0.1,
                "eval_sub_rewards/label": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train, valid = metrics_data(records[0], 4), metrics_data(records[1], 4)
    assert train == {"step": 2, "total_steps": 4, "train_loss": 0.01, "train_mean_reward": 0.25,
                     "scores": {"train_reward_mean": 0.25, "graders": [{"name": "close", "train_reward_mean": 0.0},
                                                                       {"name": "label", "train_reward_mean": 0.5}]},
                     "train_reward_std": 0.4, "train_grader_error_rate": 0.125, "completion_tokens_mean": 7.5}
    assert valid["full_valid_mean_reward"] == 0.675 and valid["valid_loss"] == 0.0
    assert valid["scores"] == {"valid_reward_mean": 0.675, "graders": [{"name": "label", "valid_reward_mean": 0.7}]}
    assert metrics_message(train) == "Step 2/4 , train mean reward=0.25"  # OpenAI's wording, space and all
    assert metrics_message(valid) == "Step 2/4 , full validation mean reward=0.68"
    assert step_metrics(tmp_path, 2) == {"step": 2, "train_loss": 0.01, "train_mean_reward": 0.25, "valid_loss": 0.0,
                                         "full_valid_mean_reward": 0.675}
    assert results_csv(tmp_path).decode() == (
        "step,train_reward_mean,train_reward_std,valid_reward_mean,valid_reward_std,train_grader_error_rate,"
        "train_loss,valid_loss\n2,0.25,0.4,0.675,0.1,0.125,0.01,0.0\n")


# ----------------------------------------------------------------------------- OpenAI's guide, end to end

GUIDE = """
import base64, json, time
from openai import OpenAI

client = OpenAI()
training_file = client.files.create(file=open(TRAIN, "rb"), purpose="fine-tune")
validation_file = client.files.create(file=open(VALID, "rb"), purpose="fine-tune")
grader = GRADER
client.fine_tuning.alpha.graders.validate(grader=grader)
run = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="yes", item={"label": "yes"})
print("grader run:", run.reward)
job = client.fine_tuning.jobs.create(
    model="o4-mini-2025-04-16",
    training_file=training_file.id,
    validation_file=validation_file.id,
    suffix="rft",
    seed=7,
    method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
        "n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5, "eval_interval": 3, "eval_samples": 4,
        "reasoning_effort": "medium"}}},
)
while job.status not in ("succeeded", "failed", "cancelled"):
    time.sleep(1)
    job = client.fine_tuning.jobs.retrieve(job.id)
print(json.dumps(job.model_dump()))
for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):
    print("event:", event.message, "|", json.dumps(event.data))
for ckpt in client.fine_tuning.jobs.checkpoints.list(job.id).data:
    print("checkpoint:", ckpt.fine_tuned_model_checkpoint, ckpt.step_number, json.dumps(ckpt.metrics.model_dump()))
print(base64.b64decode(client.files.content(job.result_files[0]).text).decode())
reply = client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "w1 w2"}])
print("chat:", reply.choices[0].message.content)
"""


@pytest.fixture(scope="module")
def fake_vllm():
    from test_finetune_api_chat import FakeVLLM

    fake = FakeVLLM()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory, ft_model_dir, fake_vllm):
    """The API as a process, training the tiny Llama; reinforcement jobs on configs/banking77/grpo_cpu.yaml with the
    same overrides (the model among them), short completions; adapters go to the stand-in vLLM server."""
    from test_finetune_api_chat import VKEY

    s = Server(tmp_path_factory.mktemp("ftapi_rl"), ft_model_dir, max_steps=None, vllm_url=fake_vllm.url,
               vllm_api_key_env="TEST_VLLM_KEY", python_graders="on")
    s.env["TEST_VLLM_KEY"] = VKEY
    yield s.start()
    s.stop()


@pytest.mark.slow
def test_rft_guide_script(api, fake_vllm, tmp_path, openapi_schemas):  # noqa: F811
    (tmp_path / "train.jsonl").write_bytes(jsonl(rft(f"w{i} w{i + 1}", LABELS[i % 2]) for i in range(10)))
    (tmp_path / "valid.jsonl").write_bytes(jsonl(rft(f"v{i}", LABELS[i % 2]) for i in range(6)))
    script = tmp_path / "guide.py"
    script.write_text(f"TRAIN = {str(tmp_path / 'train.jsonl')!r}\nVALID = {str(tmp_path / 'valid.jsonl')!r}\n"
                      f"GRADER = {PY!r}\n" + GUIDE)
    env = {**os.environ, "OPENAI_BASE_URL": api.base_url, "OPENAI_API_KEY": SERVER_KEY}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + (api.root / "server.log").read_text()[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "grader run: 1.0"
    job = json.loads(lines[1])
    assert job["status"] == "succeeded", job["error"]
    name = f"ft:o4-mini-2025-04-16:personal:rft:{job['id'].removeprefix('ftjob-')}"
    assert job["fine_tuned_model"] == name and job["trained_tokens"] > 0
    # 10 prompts, 2 a step: 5 steps; shown as numbers
    retrieved = api.http("GET", f"/fine_tuning/jobs/{job['id']}").json()
    check_schema(openapi_schemas, "FineTuningJob", retrieved)
    assert retrieved["method"]["reinforcement"] == {"grader": PY, "hyperparameters": {
        "n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.8, "compute_multiplier": 0.5,
        "eval_interval": 3, "eval_samples": 4, "reasoning_effort": "medium"}}
    events = [line.removeprefix("event: ").split(" | ") for line in lines if line.startswith("event: ")]
    messages = [m for m, _ in events]
    profile = yaml.safe_load((ROOT / "configs/banking77/grpo_cpu.yaml").read_text())
    gens = max(2, round(profile["num_generations"] * 0.5))  # compute_multiplier 0.5
    expected = [f"Created fine-tuning job: {job['id']}", "Validating training file: ",
                "Files validated, moving job to queued state", "Fine-tuning job started",
                "Training tiny-llama with configs/banking77/grpo_cpu.yaml: reinforcement (GRPO); n_epochs 1, "
                f"batch_size 2 prompts x {gens} completions", "reasoning_effort 'medium' is recorded",
                "Step 1/5 , train mean reward=", "Step 3/5 , full validation mean reward=", "Step 5/5 , train mean",
                f"New fine-tuned model created: {name}", "The job has successfully completed"]
    found = iter(messages)
    for want in expected:
        assert any(m.startswith(want) for m in found), f"{want!r} missing or out of order in:\n" + "\n".join(messages)
    data = {m: json.loads(d) for m, d in events}
    train = [d for m, d in data.items() if "train mean reward" in m]
    assert len(train) == 5 and all(0.0 <= d["train_mean_reward"] <= 1.0 for d in train)
    assert all(d["scores"]["train_reward_mean"] == d["train_mean_reward"] and d["total_steps"] == 5 for d in train)
    valid = [d for m, d in data.items() if "full validation" in m]
    assert [d["step"] for d in valid] == [3, 5]  # every eval_interval steps, and at the end
    assert all(0.0 <= d["full_valid_mean_reward"] <= 1.0 for d in valid)
    ckpts = [line.split() for line in lines if line.startswith("checkpoint: ")]
    assert ckpts and all(c[1].startswith(f"{name}:ckpt-step-") for c in ckpts)
    assert "train_mean_reward" in json.loads(" ".join(ckpts[0][3:]))
    header = "step,train_reward_mean,train_reward_std,valid_reward_mean,valid_reward_std,train_grader_error_rate," \
             "train_loss,valid_loss"
    rows = lines[lines.index(header) + 1:lines.index(next(line for line in lines if line.startswith("chat: ")))]
    assert [r.split(",")[0] for r in rows if r] == ["1", "2", "3", "4", "5"]
    # chat: the adapter was handed to the vLLM server as every job's is, and the ft: name answers
    assert fake_vllm.adapters[name] == str(api.data_dir.resolve() / "runs" / job["id"])
    assert (api.data_dir / "runs" / job["id"] / "adapter_config.json").is_file()
    assert lines[-1] == "chat: ALPHA"
    config = yaml.safe_load((api.data_dir / "runs" / f"{job['id']}.yaml").read_text())
    assert (config["method"], config["num_generations"], config["grader"]) == ("reinforcement", gens, PY)


@pytest.mark.slow
def test_a_paused_reinforcement_job_resumes_to_its_last_step(api, tmp_path):
    """Pause and resume, as for the other methods: GRPO stops at a new checkpoint, the job reads paused, and
    resumed it trains on from that checkpoint to the planned last step, each step reported once."""
    import time

    from test_finetune_api import training_pids, wait_status

    c = api.client()
    (tmp_path / "train.jsonl").write_bytes(jsonl(rft(f"w{i} w{i + 1}", LABELS[i % 2]) for i in range(40)))
    f = c.files.create(file=open(tmp_path / "train.jsonl", "rb"), purpose="fine-tune")
    # 40 prompts, 2 a step, 3 epochs: 60 steps; the pause lands after the first ones
    job = c.fine_tuning.jobs.create(model="o4-mini-2025-04-16", training_file=f.id, suffix="pause", method={
        "type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
            "n_epochs": 3, "batch_size": 2, "compute_multiplier": 0.5}}})
    run_dir = api.data_dir / "runs" / job.id
    deadline = time.time() + 120
    while not [e for e in c.fine_tuning.jobs.list_events(job.id, limit=5).data if e.type == "metrics"]:
        assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status in (
            "validating_files", "queued", "running")
        time.sleep(0.1)
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"
    deadline = time.time() + 90
    while not any(e.message.startswith("Fine-tuning job paused at step")
                  for e in c.fine_tuning.jobs.list_events(job.id, limit=20).data):
        assert time.time() < deadline, "no pause event"
        time.sleep(0.3)
    assert not training_pids(run_dir) and not (run_dir / "summary.json").exists()
    paused = json.loads((run_dir / "paused.json").read_text())
    step = paused["step"]
    assert 0 < step < 60 and Path(paused["checkpoint"]).name == f"checkpoint-{step}"
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_status(c, job.id, ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{step}") and summary["steps"] == 60
    steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data
             if e.type == "metrics" and "train_mean_reward" in e.data]
    assert sorted(steps) == list(range(1, 61))  # each step reported once across the pause
