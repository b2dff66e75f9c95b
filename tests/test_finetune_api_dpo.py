# ruff: noqa: F811 (the fixtures of test_finetune_api*.py, imported, are taken by name as arguments)
"""serve.finetune_api: ``method.type: "dpo"`` jobs, jobs on the ft: models it made, pause and resume.

The request checks, the job objects, validation, the job's training config and the pause protocol run
without a server (FastAPI's TestClient, the worker driven step by step or with a stand-in for ``accelerate
launch`` that plays train/core.py's side of a pause: ``pause_requested`` -> a checkpoint, ``paused.json``,
exit 0). Then a real server process and real tiny runs (marked slow): a supervised run paused and resumed
through the openai SDK reaching the same final step as an unpaused one, OpenAI's DPO guide as a script,
and DPO on top of the supervised fine-tune.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_finetune_api import KEY as SERVER_KEY
from test_finetune_api import (RESULT_HEADER, Server, check_schema, ft_model_dir, openapi_schemas,  # noqa: F401
                               toy_files, training_pids, wait_status)
from test_finetune_api_units import KEY, TRAIN, app, assert_error, cfg, client, upload  # noqa: F401

OTHER = {"yes": "no", "no": "yes"}
PAIRS = [("w1 w2", "yes"), ("w3 w4", "no"), ("w5 w6", "yes"), ("w7 w8", "no"), ("w9 w10", "yes"),
         ("w11 w12", "no")]


def pair(q: str, a: str) -> dict:
    """One line of OpenAI's DPO format (the guide's: a prompt, the preferred and the other answer)."""
    return {"input": {"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": a}],
            "non_preferred_output": [{"role": "assistant", "content": OTHER[a]}]}


DPO_TRAIN = "".join(json.dumps(pair(q, a)) + "\n" for q, a in PAIRS * 2).encode()  # 12 pairs


@pytest.fixture(scope="session")
def schemas(request) -> dict:
    return request.getfixturevalue("openapi_schemas")


@pytest.fixture
def dpo_file(client) -> str:
    return upload(client, DPO_TRAIN, name="dpo.jsonl").json()["id"]


@pytest.fixture
def file_id(client) -> str:
    return upload(client).json()["id"]


def dpo(hp: dict | None = None, **method) -> dict:
    return {"method": {"type": "dpo", "dpo": {"hyperparameters": hp or {}}, **method}}


# ----------------------------------------------------------------------------- request checks

DPO_HP = "method.dpo.hyperparameters"
DPO_ERRORS = [  # (body changes, param, code, part of the message): the rules of FineTuneDPOHyperparameters
    (dpo({"beta": 0}), f"{DPO_HP}.beta", "decimal_below_min_value",
     f"Invalid '{DPO_HP}.beta': decimal below minimum value. Expected a value > 0, but got 0 instead."),
    (dpo({"beta": -0.5}), f"{DPO_HP}.beta", "decimal_below_min_value", "but got -0.5 instead"),
    (dpo({"beta": 2.5}), f"{DPO_HP}.beta", "decimal_above_max_value",
     f"Invalid '{DPO_HP}.beta': decimal above maximum value. Expected a value <= 2, but got 2.5 instead."),
    (dpo({"beta": "high"}), f"{DPO_HP}.beta", "invalid_type",
     f"Invalid type for '{DPO_HP}.beta': expected one of 'auto' or a number, but got a string instead."),
    (dpo({"beta": True}), f"{DPO_HP}.beta", "invalid_type", "but got a boolean instead"),
    (dpo({"beta": [0.1]}), f"{DPO_HP}.beta", "invalid_type", "but got an array instead"),
    (dpo({"n_epochs": 0}), f"{DPO_HP}.n_epochs", "integer_below_min_value", "Expected a value >= 1, but got 0"),
    (dpo({"n_epochs": 51}), f"{DPO_HP}.n_epochs", "integer_above_max_value", "Expected a value <= 50, but got 51"),
    (dpo({"n_epochs": 1.5}), f"{DPO_HP}.n_epochs", "invalid_type", "expected one of 'auto' or an integer"),
    (dpo({"batch_size": 0}), f"{DPO_HP}.batch_size", "integer_below_min_value", ">= 1, but got 0"),
    (dpo({"batch_size": 257}), f"{DPO_HP}.batch_size", "integer_above_max_value", "<= 256, but got 257"),
    (dpo({"learning_rate_multiplier": 0}), f"{DPO_HP}.learning_rate_multiplier", "decimal_below_min_value",
     "Expected a value > 0, but got 0"),
    (dpo({"learning_rate_multiplier": "fast"}), f"{DPO_HP}.learning_rate_multiplier", "invalid_type", "a string"),
    (dpo({"gamma": 1}), f"{DPO_HP}.gamma", "unknown_parameter", f"Unknown parameter: '{DPO_HP}.gamma'."),
    (dpo(None, extra=1), "method.extra", "unknown_parameter", "Unknown parameter: 'method.extra'."),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {}, "beta": 0.1}}}, "method.dpo.beta",
     "unknown_parameter", "Unknown parameter: 'method.dpo.beta'."),
    ({"method": {"type": "dpo", "dpo": "fast"}}, "method.dpo", "invalid_type", "expected an object, but got a string"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": [1]}}}, DPO_HP, "invalid_type", "but got an array"),
    # the object given must be the type's
    ({"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}}, "method.supervised",
     "invalid_value", "Invalid 'method.supervised': method.type is 'dpo'; give the hyperparameters as "
     "'method.dpo.hyperparameters'"),
    ({"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}}, "method.dpo", "invalid_value",
     "method.type is 'supervised'; give the hyperparameters as 'method.supervised.hyperparameters' (or set "
     "method.type to 'dpo')"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}},
     "method.supervised.hyperparameters.beta", "unknown_parameter", "Unknown parameter"),
    # the deprecated top-level hyperparameters are supervised-only, as on OpenAI
    ({**dpo({"beta": 0.2}), "hyperparameters": {"n_epochs": 2}}, "hyperparameters", "invalid_value",
     "the top-level hyperparameters are for supervised jobs only (and deprecated); give a DPO job's as "
     "'method.dpo.hyperparameters'"),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader", "missing_required_parameter",
     "Missing required parameter: 'method.reinforcement.grader'."),
]


@pytest.mark.parametrize("change,param,code,message", DPO_ERRORS, ids=[str(e[0])[:60] for e in DPO_ERRORS])
def test_dpo_request_errors_are_openai_400s(client, dpo_file, schemas, change, param, code, message):
    resp = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": dpo_file, **change})
    assert_error(resp, 400, param, code, message)
    check_schema(schemas, "ErrorResponse", resp.json())
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created


def test_dpo_jobs_show_their_hyperparameters_as_openai_does(client, dpo_file, schemas):
    cases = [({}, {"beta": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto"}),
             ({"beta": 2, "n_epochs": 1}, {"beta": 2.0, "batch_size": "auto", "learning_rate_multiplier": "auto",
                                           "n_epochs": 1}),  # beta's maximum is allowed
             ({"beta": 1e-4, "batch_size": 256, "learning_rate_multiplier": 0.5, "n_epochs": "auto"},
              {"beta": 1e-4, "batch_size": 256, "learning_rate_multiplier": 0.5, "n_epochs": "auto"})]
    for given, shown in cases:
        resp = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": dpo_file,
                                                         **dpo(given)})
        assert resp.status_code == 200, resp.text
        job = resp.json()
        check_schema(schemas, "FineTuningJob", job)
        check_schema(schemas, "FineTuneMethod", job["method"])
        check_schema(schemas, "FineTuneDPOMethod", job["method"]["dpo"])
        assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": shown}}
        assert job["hyperparameters"] == {}  # OpenAI's "only returned when running supervised jobs"
        assert job["model"] == "gpt-4o-mini-2024-07-18"
    no_hp = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": dpo_file,
                                                      "method": {"type": "dpo"}, "hyperparameters": None}).json()
    assert no_hp["method"]["dpo"]["hyperparameters"]["beta"] == "auto"


def test_dpo_is_refused_naming_the_key_without_a_dpo_profile_of_the_base(cfg, tmp_path):
    import dataclasses

    from fastapi.testclient import TestClient

    from serve.finetune_api import create_app
    from serve.finetune_api.config import DEFAULT_DPO_CONFIG
    from tunekit.errors import UserError

    other = tmp_path / "other.yaml"
    other.write_text("method: dpo\nmodel_name_or_path: Qwen/Qwen2.5-1.5B-Instruct\n")
    with pytest.raises(UserError, match=r"^dpo_config: .*other.yaml trains Qwen/Qwen2.5-1.5B-Instruct but sft_config"):
        create_app(dataclasses.replace(cfg, dpo_config=str(other)), KEY, run_worker=False)
    for dpo_config, why in ((str(tmp_path / "nope.yaml"), "nope.yaml) is not found"),
                            (DEFAULT_DPO_CONFIG, "not this server's base model")):  # another base: DPO off only
        app_ = create_app(dataclasses.replace(cfg, dpo_config=dpo_config), KEY, run_worker=False)
        c = TestClient(app_, headers={"Authorization": f"Bearer {KEY}"})
        fid = upload(c, DPO_TRAIN).json()["id"]
        resp = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": fid, **dpo()})
        assert_error(resp, 400, "method.type", "unsupported_value", why)
        assert "dpo_config" in resp.json()["error"]["message"]
        assert c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload(c).json()["id"]}
                      ).status_code == 200  # supervised jobs as before
        app_.state.store.close()


# ----------------------------------------------------------------------------- validation and the job's config


def test_a_dpo_job_with_a_supervised_file_fails_validation_saying_so(app, client, file_id, dpo_file):
    store, worker = app.state.store, app.state.worker
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **dpo()}).json()
    worker.validate(store.get_job(job["id"]))
    done = store.get_job(job["id"])
    assert done["status"] == "failed" and (done["error"]["code"], done["error"]["param"]) == (
        "invalid_training_file", "training_file")
    assert done["error"]["message"].startswith(
        "The job failed due to an invalid training file. Invalid file format: line 1 is a supervised (chat) example, "
        '{"messages": [...]}, and this is a DPO job (method.type \'dpo\'): each line of its files is a preference '
        'pair, {"input": {"messages": [...]}, "preferred_output": ')
    # and the other way round: preference pairs on a supervised job
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": dpo_file}).json()
    worker.validate(store.get_job(job["id"]))
    done = store.get_job(job["id"])
    assert done["error"]["code"] == "invalid_training_file" and "line 1 is a DPO example" in done["error"]["message"]
    assert 'method={"type": "dpo", ...}' in done["error"]["message"]
    # a DPO file with a broken pair: data_prep's DPO rules, with their line numbers
    bad = upload(client, DPO_TRAIN + json.dumps({**pair("w1", "yes"), "preferred_output": []}).encode() + b"\n",
                 name="bad.jsonl").json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": bad, **dpo()}).json()
    worker.validate(store.get_job(job["id"]))
    assert store.get_job(job["id"])["error"]["message"].startswith(
        "The job failed due to an invalid training file. Invalid file format: line 13: ")


def test_a_validated_dpo_job_resolves_beta_and_trains_with_the_dpo_profile(app, client, dpo_file, schemas):
    store, worker = app.state.store, app.state.worker
    app.state.service.cfg.sft_overrides = {"max_length": 64, "assistant_only_loss": True, "shared_prefix": True}
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": "gpt-4o-mini-2024-07-18", "training_file": dpo_file, "validation_file": dpo_file, "seed": 7,
        **dpo({"batch_size": 4})}).json()
    worker.validate(store.get_job(job["id"]))
    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    check_schema(schemas, "FineTuningJob", done)
    check_schema(schemas, "FineTuneDPOHyperparameters", done["method"]["dpo"]["hyperparameters"])
    # 12 pairs: n_epochs 100 // 12 = 8, beta "auto" = 0.1, the multiplier gpt-4o-mini's 1.8
    resolved = {"beta": 0.1, "n_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 1.8}
    assert done["status"] == "queued" and done["method"] == {"type": "dpo", "dpo": {"hyperparameters": resolved}}
    assert done["hyperparameters"] == {}
    run_dir = Path(app.state.service.data_dir) / "runs" / job["id"]
    run_dir.parent.mkdir(parents=True)
    path, info = worker.job_config(store.get_job(job["id"]), run_dir)
    config = yaml.safe_load(path.read_text())
    # the DPO profile (per-device 2, learning rate 0.0005): batch 4 -> 2 x 2, the rate x sqrt(4 / 2)
    assert {k: config[k] for k in ("method", "beta", "per_device_train_batch_size", "gradient_accumulation_steps",
                                   "learning_rate", "num_train_epochs", "max_steps", "seed", "report_to",
                                   "max_length")} == {
        "method": "dpo", "beta": 0.1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "learning_rate": 0.000707107, "num_train_epochs": 8, "max_steps": 24, "seed": 7, "report_to": "none",
        "max_length": 64}
    assert config["train_file"] == config["valid_file"] == store.get_file(dpo_file)[1]  # OpenAI's JSONL as uploaded
    assert config["output_dir"] == str(run_dir) and "init_adapter" not in config
    assert not {"assistant_only_loss", "shared_prefix"} & set(config)  # the SFT-only overrides are left out
    assert info["hyperparameters"] == resolved and info["total_steps"] == 24
    assert info["events"][0] == ("info", f"Training tiny-llama with {app.state.service.cfg.dpo_config}: DPO, beta "
                                 "0.1; n_epochs 8, batch_size 4 (2 per step x 2 accumulated), learning_rate_multiplier "
                                 "1.8 -> learning rate 0.000707107 (the profile's 0.0005 x 1.8 / 1.8, OpenAI's default, "
                                 "x 1.4142 for the batch size); 24 steps")
    from serve.finetune_api.hyperparameters import plan, resolve

    hp = resolve({"beta": "auto", "n_epochs": 2}, 12, "gpt-3.5-turbo-0125", "dpo")
    assert hp == {"beta": 0.1, "n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 2.0}
    assert plan({"per_device_train_batch_size": 1, "learning_rate": 1e-3}, {**hp, "beta": 0.3}, 12, "m")["beta"] == 0.3
    assert "beta" not in plan({}, {k: v for k, v in hp.items() if k != "beta"}, 12, "m")


# ----------------------------------------------------------------------------- jobs on the ft: models made here


def finished_job(app, client, file_id, tmp_path, steps=(4,)) -> dict:
    """A supervised job as a finished run leaves it: an adapter in its run folder and in checkpoint-N."""
    store, worker = app.state.store, app.state.worker
    job = client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini-2024-07-18", "training_file": file_id,
                                                    "suffix": "sft"}).json()
    worker.validate(store.get_job(job["id"]))
    run_dir = tmp_path / "runs" / job["id"]
    for folder in (run_dir, *(run_dir / f"checkpoint-{s}" for s in steps)):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "trainer_state.json").write_text("{}")
    store.update_job(job["id"], status="running", private={"run_dir": str(run_dir)})
    worker.collect(job["id"], run_dir, 4, {"lines": 0})
    worker.succeed(store.get_job(job["id"]), run_dir)
    return store.get_job(job["id"])


def test_a_job_on_an_ft_model_made_here_trains_on_from_its_adapter(app, client, file_id, dpo_file, tmp_path,
                                                                  monkeypatch, schemas):
    monkeypatch.setenv("TUNEKIT_REGISTRY", str(tmp_path / "registry.json"))
    store, worker = app.state.store, app.state.worker
    parent = finished_job(app, client, file_id, tmp_path)
    run_dir = Path(store.get_private(parent["id"])["run_dir"])
    sft_name = parent["fine_tuned_model"]
    assert sft_name.startswith("ft:gpt-4o-mini-2024-07-18:personal:sft:")
    for model, body, adapter in ((sft_name, dpo({"beta": 0.2}), run_dir),
                                 (f"{sft_name}:ckpt-step-4", {}, run_dir / "checkpoint-4")):
        job = client.post("/v1/fine_tuning/jobs", json={"model": model, "suffix": "next", **body,
                                                        "training_file": dpo_file if body else file_id}).json()
        assert job["model"] == model, job  # the job shows the ft: model it was asked for
        priv = store.get_private(job["id"])
        assert (priv["init_adapter"], priv["base_model"]) == (str(adapter), "gpt-4o-mini-2024-07-18")
        worker.validate(store.get_job(job["id"]))
        assert store.get_job(job["id"])["status"] == "queued"
        job_dir = tmp_path / "runs" / job["id"]
        job_dir.mkdir(parents=True)
        path, info = worker.job_config(store.get_job(job["id"]), job_dir)
        config = yaml.safe_load(path.read_text())
        assert config["init_adapter"] == str(adapter) and config.get("method") == ("dpo" if body else None)
        assert info["events"][0][1].startswith(f"Training tiny-llama with {priv['profile']} from {model}: ")
        # its own model is named after the base snapshot, as OpenAI names it
        (job_dir / "adapter_config.json").write_text("{}")
        store.update_job(job["id"], status="running", private={"run_dir": str(job_dir)})
        worker.succeed(store.get_job(job["id"]), job_dir)
        done = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        check_schema(schemas, "FineTuningJob", done)
        assert done["fine_tuned_model"] == f"ft:gpt-4o-mini-2024-07-18:personal:next:{job['id'][len('ftjob-'):]}"
        assert app.state.proxy.models.resolve(done["fine_tuned_model"]).folder == job_dir  # chat finds it
    for model, why in (("ft:gpt-4o-mini-2024-07-18:other-org::abc", "no job of this server made it"),
                       (f"{sft_name}:ckpt-step-8", "no job of this server made it"),
                       ("ft:gpt-4o-mini-2024-07-18:personal:sft", "no job of this server made it")):
        resp = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id})
        assert_error(resp, 400, "model", "model_not_available", why)
    import shutil

    shutil.rmtree(run_dir / "checkpoint-4")  # save_total_limit removed it
    resp = client.post("/v1/fine_tuning/jobs", json={"model": f"{sft_name}:ckpt-step-4", "training_file": file_id})
    assert_error(resp, 400, "model", "model_not_available", "is no longer on this server")


# ----------------------------------------------------------------------------- DPO's metrics


def test_dpo_metrics_in_openai_shapes(tmp_path):
    from serve.finetune_api.metrics import metrics_data, metrics_message, results_csv, step_metrics, trained_tokens

    records = [{"step": 2, "epoch": 0.5, "loss": 0.6931, "rewards/chosen": 0.01, "rewards/rejected": -0.02,
                "rewards/accuracies": 0.75, "rewards/margins": 0.03, "logps/chosen": -5.0, "logps/rejected": -6.0,
                "num_tokens": 120},
               {"step": 4, "epoch": 1.0, "eval_loss": 0.65, "eval_rewards/accuracies": 1.0,
                "eval_rewards/margins": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert metrics_data(records[0], 4) == {"step": 2, "total_steps": 4, "train_loss": 0.6931,
                                           "train_mean_token_accuracy": 0.75, "train_reward_margin": 0.03}
    assert metrics_data(records[1], 4) == {"step": 4, "total_steps": 4, "valid_loss": 0.65,
                                           "valid_mean_token_accuracy": 1.0, "valid_reward_margin": 0.1}
    assert metrics_message(metrics_data(records[0], 4)) == "Step 2/4: training loss=0.69"
    # checkpoint metrics keep OpenAI's fields only
    assert step_metrics(tmp_path, 4) == {"step": 4, "train_loss": 0.6931, "train_mean_token_accuracy": 0.75,
                                         "valid_loss": 0.65, "valid_mean_token_accuracy": 1.0}
    assert results_csv(tmp_path).decode() == ("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
                                              "2,0.6931,0.75,,\n4,,,0.65,1.0\n")
    assert trained_tokens(tmp_path) == 120


# ----------------------------------------------------------------------------- pause and resume: the requests


def test_pause_and_resume_requests(app, client, file_id, schemas):
    store = app.state.store
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}).json()
    paused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    check_schema(schemas, "FineTuningJob", paused.json())
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 400, "fine_tuning_job_id", "invalid_state",
                 "is already paused; resume it")
    assert client.get("/v1/fine_tuning/jobs").json()["data"][0]["status"] == "paused"  # the list's model takes it
    resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()
    assert resumed["status"] == "validating_files"  # its files were not validated yet: that comes first
    check_schema(schemas, "FineTuningJob", resumed)
    app.state.worker.validate(store.get_job(job["id"]))
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause").json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume"), 400, "fine_tuning_job_id", "invalid_state",
                 f"Job {job['id']} is queued, not paused, and cannot be resumed")
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]]
    assert messages[:3] == ["Fine-tuning job resumed", "Fine-tuning job paused before training started",
                            "Files validated, moving job to queued state"]
    # a paused job can be cancelled; a finished one cannot be paused (OpenAI's invalid_state, as cancel's)
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    for verb in ("pause", "resume"):
        resp = client.post(f"/v1/fine_tuning/jobs/{job['id']}/{verb}")
        assert_error(resp, 400, "fine_tuning_job_id", "invalid_state")
        check_schema(schemas, "ErrorResponse", resp.json())
    assert "has already been cancelled and cannot be paused" in client.post(
        f"/v1/fine_tuning/jobs/{job['id']}/pause").json()["error"]["message"]
    store.update_job(job["id"], status="succeeded")
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 400, "fine_tuning_job_id", "invalid_state",
                 "has already succeeded and cannot be paused")
    for verb in ("pause", "resume"):
        assert_error(client.post(f"/v1/fine_tuning/jobs/ftjob-nope/{verb}"), 404, "fine_tuning_job_id",
                     "fine_tune_not_found")
    assert {"/v1/fine_tuning/jobs/{job_id}/pause", "/v1/fine_tuning/jobs/{job_id}/resume"} <= set(app.openapi()["paths"])


def test_the_sdk_pauses_and_resumes(app, client, file_id):
    from openai import OpenAI

    sdk = OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
    job = sdk.fine_tuning.jobs.create(training_file=file_id, model="tiny-llama")
    assert sdk.fine_tuning.jobs.pause(job.id).status == "paused"
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert sdk.fine_tuning.jobs.resume(job.id).status == "validating_files"
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.resume(job.id)
    assert e.value.code == "invalid_state"


# ----------------------------------------------------------------------------- pause and resume: the worker

# A stand-in for `accelerate launch train/<method>.py` that plays train/core.py's part: 8 steps, one metrics
# line each; the first start holds at step 3 until a pause is asked, then (if it HONOURS it) saves
# checkpoint-3, writes paused.json and exits 0; a start after a resume goes on from the last checkpoint.
STAND_IN = """
import json, os, pathlib, sys, time
run = pathlib.Path(os.environ["TUNEKIT_RUN_DIR"]); run.mkdir(parents=True, exist_ok=True)
with open(run / "starts.txt", "a") as f:
    f.write(" ".join(sorted(p.name for p in run.iterdir())) + "\\n")
done = max([int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")], default=0)
if done == 0:
    (run / "checkpoint-1").mkdir(); (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
for step in range(max(done, 1) + 1, 9):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 1 / step, "num_tokens": 10 * step}) + "\\n")
    while step == 3 and done == 0 and not (run / "pause_requested").exists():
        time.sleep(0.05)
    if (run / "pause_requested").exists() and HONOURS:
        ckpt = run / f"checkpoint-{step}"; ckpt.mkdir(); (ckpt / "trainer_state.json").write_text("{}")
        (run / "paused.json").write_text(json.dumps({"step": step, "checkpoint": str(ckpt)}))
        sys.exit(0)
    while (run / "pause_requested").exists():  # one that does not honour it trains on, slowly
        time.sleep(0.05)
(run / "checkpoint-8").mkdir(); (run / "checkpoint-8" / "trainer_state.json").write_text("{}")
(run / "summary.json").write_text(json.dumps({"steps": 8, "train_tokens": 80}))
"""


def stand_in_app(cfg, monkeypatch, tmp_path, honours: bool):
    import dataclasses

    from fastapi.testclient import TestClient

    import serve.finetune_api.worker as worker_module
    from serve.finetune_api import create_app

    script = STAND_IN.replace("HONOURS", str(honours))
    monkeypatch.setattr(worker_module, "accelerate_command", lambda config: [sys.executable, "-c", script])
    monkeypatch.setenv("TUNEKIT_REGISTRY", str(tmp_path / "registry.json"))
    app_ = create_app(dataclasses.replace(cfg, pause_timeout_s=1.0), KEY, run_worker=False)
    c = TestClient(app_, headers={"Authorization": f"Bearer {KEY}"})
    job = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload(c).json()["id"]}).json()
    return app_, c, job["id"]


def wait_for(predicate, timeout: float = 30):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def events(c, job_id: str) -> list[str]:
    return [e["message"] for e in reversed(c.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                                 params={"limit": 100}).json()["data"])]


@pytest.mark.parametrize("honours", [True, False], ids=["stops-at-a-new-checkpoint", "killed-after-the-timeout"])
def test_a_running_job_pauses_at_a_checkpoint_and_resumes_to_the_end(cfg, monkeypatch, tmp_path, honours):
    from serve.finetune_api.worker import Worker, alive

    app_, c, job_id = stand_in_app(cfg, monkeypatch, tmp_path, honours)
    store, worker = app_.state.store, app_.state.worker
    run_dir = Path(app_.state.service.data_dir) / "runs" / job_id
    status = lambda: store.get_job(job_id)["status"]  # noqa: E731
    worker.start()
    try:
        wait_for(lambda: status() == "running" and (run_dir / "metrics.jsonl").exists()
                 and '"step": 3' in (run_dir / "metrics.jsonl").read_text())
        pid = store.get_private(job_id)["pid"]
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
        wait_for(lambda: any(m.startswith("Fine-tuning job paused at step") for m in events(c, job_id)))
        assert not alive(pid) and (run_dir / "pause_requested").exists() and status() == "paused"
        paused_at = 3 if honours else 1  # the new checkpoint, or the last complete one before the kill
        message = next(m for m in events(c, job_id) if m.startswith("Fine-tuning job paused at step"))
        assert message == f"Fine-tuning job paused at step {paused_at}" + (
            "" if honours else " (its last complete checkpoint: the training had not stopped 1 s after the request "
                               "and was killed)")
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["estimated_finish"] is None
        time.sleep(0.5)
        assert status() == "paused" and not worker.slots.jobs  # its slot is free; it is not started again
        Worker(store, worker.cfg, worker.data_dir).recover()  # a restart keeps it paused
        assert status() == "paused"
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
        wait_for(lambda: status() == "succeeded")
    finally:
        worker.shutdown()
    starts = (run_dir / "starts.txt").read_text().splitlines()
    assert len(starts) == 2 and "pause_requested" not in starts[1] and "paused.json" not in starts[1]
    messages = events(c, job_id)
    ckpts = [m.split(" with ")[0] for m in messages if m.startswith("Checkpoint created")]
    assert ckpts == [f"Checkpoint created at step {s}" for s in ((1, 3, 8) if honours else (1, 8))]
    tail = messages[messages.index("Pausing fine-tuning job: training stops at a checkpoint after its current step"):]
    assert [m for m in tail if not m.startswith(("Step ", "Checkpoint"))] == [
        "Pausing fine-tuning job: training stops at a checkpoint after its current step", message,
        "Fine-tuning job resumed", f"Fine-tuning job started again after its pause, from checkpoint-{paused_at}",
        f"New fine-tuned model created: {store.get_job(job_id)['fine_tuned_model']}",
        "The job has successfully completed"]
    steps = [e["data"]["step"] for e in c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}
                                              ).json()["data"] if e["type"] == "metrics"]
    assert sorted(steps) == list(range(2, 9))  # each step once across the pause
    assert len([m for m in messages if m.startswith("Training tiny-llama with ")]) == 1  # the plan, once
    assert store.get_private(job_id)["attempts"] == 1
    app_.state.store.close()


def test_a_job_paused_while_its_process_starts_is_not_trained(cfg, monkeypatch, tmp_path):
    app_, c, job_id = stand_in_app(cfg, monkeypatch, tmp_path, True)
    store, worker = app_.state.store, app_.state.worker
    worker.validate(store.get_job(job_id))
    real = worker.start_process

    def start_then_pause(*args):
        proc = real(*args)
        c.post(f"/v1/fine_tuning/jobs/{job_id}/pause")  # comes while the process starts
        return proc

    monkeypatch.setattr(worker, "start_process", start_then_pause)
    worker.run(store.get_job(job_id))
    assert store.get_job(job_id)["status"] == "paused" and not worker.procs
    assert "Fine-tuning job started" not in " ".join(events(c, job_id))
    app_.state.store.close()


# ----------------------------------------------------------------------------- a real server, real runs


@pytest.fixture(scope="module")
def api(tmp_path_factory, ft_model_dir):
    """The API as a process, training the tiny Llama; DPO jobs on configs/banking77/dpo_cpu.yaml with the same
    overrides (the model among them)."""
    s = Server(tmp_path_factory.mktemp("ftapi_dpo"), ft_model_dir, max_steps=None, pause_timeout_s=60).start()
    yield s
    s.stop()


def run_to_the_end(api, file_id: str, **create):
    c = api.client()
    job = c.fine_tuning.jobs.create(training_file=file_id, model="gpt-4o-mini-2024-07-18", seed=3, **create)
    return wait_status(c, job.id, ("succeeded", "failed"), timeout=300)


@pytest.mark.slow
def test_a_paused_run_resumes_to_the_same_final_step_as_an_unpaused_one(api, toy_files):
    import openai

    c = api.client()
    f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
    # 320 steps (32 examples, batch 1, 10 epochs; ~13 s): the pause lands mid-run (step ~60)
    hp = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 1}}}
    job = c.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini-2024-07-18", seed=3, method=hp,
                                    suffix="paused")
    run_dir = api.data_dir / "runs" / job.id
    deadline = time.time() + 120
    while not [e for e in c.fine_tuning.jobs.list_events(job.id, limit=5).data if e.type == "metrics"]:
        assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status in ("validating_files", "queued",
                                                                                       "running")
        time.sleep(0.2)
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"  # the SDK's own method
    deadline = time.time() + 90
    while not any(e.message.startswith("Fine-tuning job paused at step")
                  for e in c.fine_tuning.jobs.list_events(job.id, limit=20).data):
        assert time.time() < deadline, "no pause event"
        time.sleep(0.3)
    assert not training_pids(run_dir)
    paused = json.loads((run_dir / "paused.json").read_text())  # train/core.py stopped at a new checkpoint
    step = paused["step"]
    assert 0 < step < 320 and Path(paused["checkpoint"]).name == f"checkpoint-{step}"
    assert not (run_dir / "summary.json").exists()
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert f"Fine-tuning job paused at step {step}" in messages
    assert any(m.startswith(f"Checkpoint created at step {step} with Snapshot ID: ") for m in messages)
    time.sleep(1)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.pause(job.id)
    assert e.value.code == "invalid_state"
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_status(c, job.id, ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{step}")
    steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data
             if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(steps) == list(range(2, 321, 2))  # each step reported once across the pause
    # the same job unpaused ends at the same step with the same tokens
    plain = run_to_the_end(api, f.id, method=hp)
    plain_summary = json.loads((api.data_dir / "runs" / plain.id / "summary.json").read_text())
    assert summary["steps"] == plain_summary["steps"] == 320
    with pytest.raises(openai.BadRequestError) as e:  # a finished job cannot be paused
        c.fine_tuning.jobs.pause(job.id)
    assert e.value.code == "invalid_state" and "has already succeeded" in e.value.message
    # summary.json's train_tokens: TRL's count restarts at 0 in a resumed run; train/core.py carries it over
    assert done.trained_tokens == plain.trained_tokens


DPO_GUIDE = """
import base64, json, time
from openai import OpenAI

client = OpenAI()
file = client.files.create(file=open(DATA, "rb"), purpose="fine-tune")
job = client.fine_tuning.jobs.create(training_file=file.id, model=MODEL, suffix="dpo", method={
    "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 4}}})
while job.status not in ("succeeded", "failed", "cancelled"):
    time.sleep(1)
    job = client.fine_tuning.jobs.retrieve(job.id)
print(json.dumps(job.model_dump()))
for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):
    print("event:", event.message, "|", json.dumps(event.data))
for ckpt in client.fine_tuning.jobs.checkpoints.list(job.id).data:
    print("checkpoint:", ckpt.fine_tuned_model_checkpoint, ckpt.step_number, ckpt.metrics.train_loss)
print(base64.b64decode(client.files.content(job.result_files[0]).text).decode())
"""


def guide(api, tmp_path: Path, model: str) -> tuple[dict, list[str]]:
    """OpenAI's DPO guide as a script, only OPENAI_BASE_URL and OPENAI_API_KEY pointing here: (job, output)."""
    import os
    import subprocess

    (tmp_path / "dpo.jsonl").write_bytes(DPO_TRAIN)
    script = tmp_path / "guide.py"
    script.write_text(f"DATA = {str(tmp_path / 'dpo.jsonl')!r}\nMODEL = {model!r}\n" + DPO_GUIDE)
    env = {**os.environ, "OPENAI_BASE_URL": api.base_url, "OPENAI_API_KEY": SERVER_KEY}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return json.loads(lines[0]), lines[1:]


@pytest.mark.slow
def test_dpo_guide_script(api, tmp_path, openapi_schemas):  # noqa: F811
    job, lines = guide(api, tmp_path, "gpt-4o-mini-2024-07-18")
    assert job["status"] == "succeeded", job["error"]
    short = job["id"].removeprefix("ftjob-")
    name = f"ft:gpt-4o-mini-2024-07-18:personal:dpo:{short}"
    assert job["fine_tuned_model"] == name and job["trained_tokens"] > 0
    # 12 pairs, batch 4, one epoch: 3 steps; the job as OpenAI shows a DPO job
    assert (job["method"]["type"], job["method"]["dpo"]) == ("dpo", {"hyperparameters": {
        "beta": 0.1, "batch_size": 4, "learning_rate_multiplier": 1.8, "n_epochs": 1}})
    retrieved = api.http("GET", f"/fine_tuning/jobs/{job['id']}").json()
    check_schema(openapi_schemas, "FineTuningJob", retrieved)
    events = [line.removeprefix("event: ").split(" | ")[0] for line in lines if line.startswith("event: ")]
    expected = [f"Created fine-tuning job: {job['id']}", "Validating training file: ",
                "Files validated, moving job to queued state", "Fine-tuning job started",
                "Training tiny-llama with configs/banking77/dpo_cpu.yaml: DPO, beta 0.1; n_epochs 1, batch_size 4",
                "Step 2/3: training loss=", f"New fine-tuned model created: {name}", "The job has successfully completed"]
    found = iter(events)
    for want in expected:
        assert any(e.startswith(want) for e in found), f"{want!r} missing or out of order in:\n" + "\n".join(events)
    data = json.loads(next(line for line in lines if line.startswith("event: Step 2/3")).split(" | ")[1])
    assert {"train_loss", "train_mean_token_accuracy", "train_reward_margin"} <= set(data)  # rewards/accuracies
    assert any(line.startswith(f"checkpoint: {name}:ckpt-step-3 3 ") for line in lines)
    assert RESULT_HEADER in lines
    rows = lines[lines.index(RESULT_HEADER) + 1:]
    assert rows and rows[0].startswith("2,") and rows[0].split(",")[2] != ""  # the reward accuracy per step
    run_dir = api.data_dir / "runs" / job["id"]
    assert yaml.safe_load((api.data_dir / "runs" / f"{job['id']}.yaml").read_text())["method"] == "dpo"
    assert (run_dir / "adapter_config.json").is_file()


@pytest.mark.slow
def test_dpo_on_a_supervised_fine_tune(api, toy_files, tmp_path):
    c = api.client()
    f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
    sft = run_to_the_end(api, f.id, method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 1, "batch_size": 8}}})
    assert sft.status == "succeeded", sft.error
    job, _ = guide(api, tmp_path, sft.fine_tuned_model)
    assert job["status"] == "succeeded", job["error"]
    assert job["model"] == sft.fine_tuned_model
    assert job["fine_tuned_model"] == f"ft:gpt-4o-mini-2024-07-18:personal:dpo:{job['id'].removeprefix('ftjob-')}"
    summary = json.loads((api.data_dir / "runs" / job["id"] / "summary.json").read_text())
    assert summary["init_adapter"] == str(api.data_dir.resolve() / "runs" / sft.id)
