"""``tunekit jobs migrate``: OpenAI's jobs re-created on the local fine-tuning API.

Two real ``python -m serve.finetune_api`` servers: the source stands in for OpenAI, the target is the
local API. The command runs as a user runs it (a subprocess, keys in the environment); a real HTTP
proxy in front of the source refuses file downloads with a 400, as OpenAI may for purpose fine-tune.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob

from conftest import ROOT
from test_finetune_api import KEY, Server, ft_model_dir, toy_files, wait_status  # noqa: F401 (fixtures)
from train.jobs.migrate import Files, Row, hyperparameters_of, job_request, local_files, match_file, order, plan
from tunekit.errors import UserError

TUNEKIT = Path(sys.executable).parent / "tunekit"


def migrate(*args: str, cwd: Path, keys: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "TUNEKIT_API_KEY")}
    env.update(PYTHONPATH=str(ROOT), TUNEKIT_REGISTRY=str(cwd / "registry.json"), HF_HUB_OFFLINE="1")
    if keys:
        env.update(OPENAI_API_KEY=KEY, TUNEKIT_API_KEY=KEY)
    cmd = [str(TUNEKIT)] if TUNEKIT.exists() else [sys.executable, "-m", "tunekit.cli"]
    return subprocess.run([*cmd, "jobs", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, ft_model_dir):  # noqa: F811
    """(source, target): the same config (tiny-llama, 2 steps a job), each with its own data folder."""
    both = [Server(tmp_path_factory.mktemp(name), ft_model_dir, max_steps=2) for name in ("source", "target")]
    try:
        yield tuple(s.start() for s in both)
    finally:
        for s in both:
            s.stop()


class RefusingProxy:
    """A real HTTP proxy to ``upstream`` that answers every file download with OpenAI's 400."""

    def __init__(self, upstream: str):
        self.refused = []
        proxy, upstream = self, upstream.rstrip("/")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and self.path.split("?")[0].endswith("/content"):
                    proxy.refused.append(self.path)
                    status, payload = 400, json.dumps({"error": {
                        "message": "Not allowed to download files of purpose: fine-tune",
                        "type": "invalid_request_error", "param": None, "code": None}}).encode()
                    headers = {"Content-Type": "application/json"}
                else:
                    r = httpx.request(self.command, upstream + self.path, content=body, timeout=60, headers={
                        k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")})
                    status, payload = r.status_code, r.content
                    headers = {k: v for k, v in r.headers.items() if k.lower() not in (
                        "content-length", "transfer-encoding", "connection", "content-encoding")}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def content(client, file_id: str) -> bytes:
    return client.files.content(file_id).content


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_migrate_recreates_the_jobs_and_a_second_run_creates_nothing(servers, toy_files, tmp_path):  # noqa: F811
    source, target = servers
    src, dst = source.client(), target.client()
    train = src.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
    valid = src.files.create(file=open(toy_files / "valid.jsonl", "rb"), purpose="fine-tune")
    a = src.fine_tuning.jobs.create(model="tiny-llama", training_file=train.id, validation_file=valid.id,
                                    suffix="alpha", seed=7, metadata={"team": "search"}, method={
                                        "type": "supervised", "supervised": {"hyperparameters": {
                                            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}})
    b = src.fine_tuning.jobs.create(model="tiny-llama", training_file=valid.id)  # every hyperparameter auto
    old = {j.id: wait_status(src, j.id, ("succeeded", "failed"), timeout=300) for j in (a, b)}
    assert all(j.status == "succeeded" for j in old.values()), [j.error for j in old.values()]
    flags = ["--from-base-url", source.base_url, "--to-base-url", target.base_url, "--jobs-dir", str(tmp_path / "jobs")]

    plan = migrate("migrate", *flags, "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "dry run: nothing created" in plan.stdout and plan.stdout.count("would create") == 2, plan.stdout
    assert not dst.fine_tuning.jobs.list().data and not dst.files.list().data

    run = migrate("migrate", *flags, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert KEY not in out + run.stderr
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("OLD JOB"))
    assert lines[header].split() == ["OLD", "JOB", "MODEL", "SUFFIX", "STATUS", "NEW", "JOB", "STATUS"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 3]}
    assert rows[a.id][:5] == [a.id, "tiny-llama", "alpha", "succeeded", "->"]
    assert rows[b.id][:5] == [b.id, "tiny-llama", "-", "succeeded", "->"]
    assert out.count("downloaded file-") == 2 and "created 2 job(s)" in out

    new = {j.metadata["migrated_from"]: j for j in dst.fine_tuning.jobs.list(limit=100).data}
    assert set(new) == {a.id, b.id} and {rows[i][5] for i in new} == {j.id for j in new.values()}
    for old_id, job in new.items():
        was = old[old_id]
        assert job.model == was.model and job.seed == was.seed
        assert job.user_provided_suffix == was.user_provided_suffix
        assert job.metadata == {**(was.metadata or {}), "migrated_from": old_id}
        assert hyperparameters_of(dst.fine_tuning.jobs.retrieve(job.id)) == hyperparameters_of(was) != {}
        assert content(dst, job.training_file) == content(src, was.training_file)
        assert (job.validation_file is None) == (was.validation_file is None)
        if was.validation_file:
            assert content(dst, job.validation_file) == content(src, was.validation_file)
        record = json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())
        assert record["backend"] == "local" and record["base_url"] == target.base_url
        assert record["migrated_from"]["job_id"] == old_id
    # Only a's copy is followed to the end below; b's was created first (newest first) and would train first,
    # one job at a time: cancelled, a's trains at once (a training run is ~25 s of imports on this machine).
    assert dst.fine_tuning.jobs.cancel(new[b.id].id).status == "cancelled"
    assert new[a.id].seed == 7 and new[a.id].user_provided_suffix == "alpha"
    assert hyperparameters_of(old[a.id]) == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert len(dst.files.list().data) == 2  # valid.jsonl is a's validation file and b's training file: one upload

    again = migrate("migrate", *flags, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("was migrated before") == 2 and "created" not in again.stdout, again.stdout
    fresh = migrate("migrate", *flags[:-1], str(tmp_path / "other_jobs"), cwd=tmp_path)  # no records: metadata
    assert fresh.returncode == 0 and fresh.stdout.count("was migrated before") == 2, fresh.stdout + fresh.stderr
    assert len(dst.fine_tuning.jobs.list(limit=100).data) == 2 and len(dst.files.list().data) == 2

    follow = migrate("follow", new[a.id].id, "--jobs-dir", str(tmp_path / "jobs"), "--interval", "0.5", cwd=tmp_path)
    done = dst.fine_tuning.jobs.retrieve(new[a.id].id)  # the record is all follow needs to find the job
    assert follow.returncode == 0 and done.status == "succeeded", follow.stdout[-2000:] + follow.stderr[-2000:]
    assert f"succeeded: {done.fine_tuned_model}" in follow.stdout and ":alpha:" in done.fine_tuned_model


@pytest.mark.slow
def test_a_refused_download_falls_back_to_the_matching_file(servers, toy_files, tmp_path):  # noqa: F811
    source, target = servers
    src, dst = source.client(), target.client()
    data = tmp_path / "data"
    data.mkdir()
    mine = data / "extra.jsonl"
    mine.write_text("".join(reversed((toy_files / "valid.jsonl").read_text().splitlines(keepends=True))))  # new
    other = data / "same_size.jsonl"  # the same size, another name and content: the name decides
    other.write_text(mine.read_text().replace('"yes"', '"xyz"'))
    assert other.stat().st_size == mine.stat().st_size and other.read_bytes() != mine.read_bytes()
    f = src.files.create(file=open(mine, "rb"), purpose="fine-tune")
    job = src.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, suffix="fallback")
    src.fine_tuning.jobs.cancel(job.id)  # --job picks it whatever its status
    proxy = RefusingProxy(source.base_url.removesuffix("/v1"))
    try:
        flags = ["--from-base-url", proxy.base_url, "--to-base-url", target.base_url, "--job", job.id,
                 "--jobs-dir", str(tmp_path / "jobs")]
        refused = migrate("migrate", *flags, cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        problem = refused.stderr.splitlines()[-1]
        assert f"{f.id} (extra.jsonl, {f.bytes:,} bytes)" in problem and "--file PATH" in problem, refused.stderr
        assert "400 Not allowed to download" in problem and "nothing was created" in refused.stderr
        assert proxy.refused and job.id not in json.dumps([j.metadata for j in dst.fine_tuning.jobs.list().data])

        ok = migrate("migrate", *flags, "--file", str(other), "--file", str(mine), cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "downloaded" not in ok.stdout and f"uploaded {mine} as file-" in ok.stdout, ok.stdout
        new = next(j for j in dst.fine_tuning.jobs.list(limit=100).data if j.metadata["migrated_from"] == job.id)
        assert content(dst, new.training_file) == mine.read_bytes() == content(src, f.id)
        assert new.user_provided_suffix == "fallback" and job.id in ok.stdout and new.id in ok.stdout
        dst.fine_tuning.jobs.cancel(new.id)  # nothing to learn from its training
    finally:
        proxy.close()


# ----------------------------------------------------------------------------- units and refusals


def file_object(file_id: str, filename: str, size: int) -> FileObject:
    return FileObject(id=file_id, filename=filename, bytes=size, created_at=0, object="file", purpose="fine-tune",
                      status="processed")


def test_match_file_by_size_then_name(tmp_path):
    def put(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    train, renamed, same_size, twin = put("train.jsonl", "aaaa\n"), put("t.jsonl", "bbbbbbb\n"), \
        put("x.jsonl", "cccc\n"), put("y.jsonl", "cccc\n")
    assert match_file(file_object("file-1", "train.jsonl", 5), [same_size, train]) == train  # the name decides
    assert match_file(file_object("file-2", "orig.jsonl", 8), [train, renamed]) == renamed  # the only size
    assert match_file(file_object("file-3", "orig.jsonl", 5), [same_size, twin]) == same_size  # same content
    with pytest.raises(UserError, match=r"file-4 \(orig\.jsonl, 5 bytes\).*2 different --file.*--file file-4=PATH"):
        match_file(file_object("file-4", "orig.jsonl", 5), [train, same_size])
    with pytest.raises(UserError, match=r"file-5 \(big\.jsonl, 1,234 bytes\).*no --file has its size.*--file PATH"):
        match_file(file_object("file-5", "big.jsonl", 1234), [train, renamed])
    with pytest.raises(UserError, match="no --file has its size"):
        match_file(file_object("file-6", "train.jsonl", 5), [])
    assert local_files([str(train), f"file-abc={renamed}"]) == ([train], {"file-abc": renamed})
    with pytest.raises(UserError, match="--file nope.jsonl: no such file"):
        local_files(["nope.jsonl"])


def test_the_request_keeps_the_jobs_settings():
    job = FineTuningJob.model_validate({
        "id": "ftjob-old", "object": "fine_tuning.job", "model": "gpt-4o-mini-2024-07-18", "created_at": 0,
        "status": "succeeded", "training_file": "file-t", "validation_file": None, "seed": 3, "result_files": [],
        "organization_id": "org", "fine_tuned_model": "ft:x", "finished_at": 1, "trained_tokens": 10, "error": None,
        "user_provided_suffix": "s1", "metadata": {"team": "a"},
        "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}}}})
    assert job_request(job, {"training_file": "file-new"}) == {
        "model": "gpt-4o-mini-2024-07-18", "training_file": "file-new", "suffix": "s1", "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}}},
        "metadata": {"team": "a", "migrated_from": "ftjob-old"}}
    legacy = job.model_copy(update={"method": None})  # an older job: only the top-level hyperparameters
    assert hyperparameters_of(legacy) == {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}


def test_refusals_before_any_request(tmp_path):
    proc = migrate("migrate", "--dry-run", cwd=tmp_path, keys=False)
    assert proc.returncode == 2 and "OPENAI_API_KEY is not set" in proc.stderr
    url = "http://127.0.0.1:9/v1"
    proc = migrate("migrate", "--from-base-url", url, "--to-base-url", url, cwd=tmp_path)
    assert proc.returncode == 2 and "are the same API" in proc.stderr
    proc = migrate("migrate", "--file", "missing.jsonl", cwd=tmp_path)
    assert proc.returncode == 2 and "--file missing.jsonl: no such file" in proc.stderr
    proc = migrate("migrate", "--from-base-url", url, "--max-retries", "0", cwd=tmp_path)
    assert proc.returncode == 2 and f"cannot reach {url}" in proc.stderr and "Traceback" not in proc.stderr


def source_job(job_id: str, model: str = "gpt-4o-mini-2024-07-18", fine_tuned: str | None = None,
               method: dict | None = None) -> FineTuningJob:
    return FineTuningJob.model_validate({
        "id": job_id, "object": "fine_tuning.job", "model": model, "created_at": 0, "status": "succeeded",
        "training_file": f"file-{job_id}", "validation_file": None, "seed": 3, "result_files": [],
        "organization_id": "org", "fine_tuned_model": fine_tuned, "finished_at": 1, "trained_tokens": 10,
        "error": None, "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8},
        "method": method or {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}}}})


DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4,
                                                  "learning_rate_multiplier": 0.5}}}


def test_a_dpo_job_keeps_its_method_and_beta():
    job = source_job("ftjob-dpo", method=DPO)
    request = job_request(job, {"training_file": "file-new"})
    assert request["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.2, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}}
    assert request["model"] == "gpt-4o-mini-2024-07-18"


RFT_HP = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "compute_multiplier": 1.5,
          "eval_interval": 5, "eval_samples": 10, "reasoning_effort": "medium"}
MULTI = {"type": "multi", "name": "security", "calculate_output": "0.5 * compliant + 0.5 * close", "graders": {
    "compliant": {"type": "string_check", "name": "compliant", "input": "{{sample.output_json.compliant}}",
                  "reference": "{{item.compliant}}", "operation": "eq"},
    "close": {"type": "text_similarity", "name": "close", "input": "{{sample.output_json.explanation}}",
              "reference": "{{item.explanation}}", "evaluation_metric": "fuzzy_match"}}}


def test_a_reinforcement_job_keeps_its_grader_and_hyperparameters():
    """OpenAI's RFT guide's job (a multi grader as a {name: grader} map, a response_format), as the SDK parses it
    from the source: the local request has the same grader, response_format and resolved hyperparameters, and
    the local API's own checks accept it."""
    from openai._models import construct_type

    from serve.finetune_api import checks

    fmt = {"type": "json_schema", "json_schema": {"name": "security_assistant", "strict": True, "schema": {
        "type": "object", "properties": {"compliant": {"type": "string"}}}}}
    data = source_job("ftjob-rft", model="o4-mini-2025-04-16").model_dump()
    data["method"] = {"type": "reinforcement", "reinforcement": {"grader": MULTI, "response_format": fmt,
                                                                 "hyperparameters": RFT_HP}}
    job = construct_type(value=data, type_=FineTuningJob)  # as the SDK builds a response
    request = job_request(job, {"training_file": "file-new", "validation_file": "file-valid"})
    assert request["method"] == {"type": "reinforcement", "reinforcement": {
        "grader": MULTI, "response_format": fmt, "hyperparameters": RFT_HP}}
    assert (request["model"], request["validation_file"]) == ("o4-mini-2025-04-16", "file-valid")
    assert checks.method(request)["reinforcement"] == request["method"]["reinforcement"]
    simple = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    data["method"]["reinforcement"] = {"grader": simple, "hyperparameters": {**RFT_HP, "eval_samples": None}}
    request = job_request(construct_type(value=data, type_=FineTuningJob), {"training_file": "f"})
    assert request["method"]["reinforcement"] == {"grader": simple, "hyperparameters": {
        k: v for k, v in RFT_HP.items() if k != "eval_samples"}}  # a value the source left out stays out


def test_a_job_on_an_ft_model_comes_after_its_parent_and_trains_on_the_migrated_model(tmp_path):
    """A DPO job on top of a supervised fine-tune: ordered after the job that made its base; created only once
    that job has succeeded on the target, then on the model the target made; a reinforcement job is migrated
    too (test_a_reinforcement_job_keeps_its_grader_and_hyperparameters)."""
    sft = source_job("ftjob-sft", fine_tuned="ft:gpt-4o-mini-2024-07-18:org:a:111")
    dpo = source_job("ftjob-dpo", model="ft:gpt-4o-mini-2024-07-18:org:a:111:ckpt-step-40", method=DPO)
    rl = source_job("ftjob-rl", model="o4-mini-2025-04-16", method={"type": "reinforcement"})
    assert [j.id for j in order([dpo, rl, sft])] == ["ftjob-sft", "ftjob-dpo", "ftjob-rl"]

    class NoFiles(Files):
        def get(self, file_id):
            return tmp_path / file_id, "downloaded"

    files = NoFiles(None, tmp_path, [], {}, dry_run=True)
    rows = [Row(j) for j in order([dpo, rl, sft])]
    plan(rows, {}, files)
    assert [(r.action, r.new_status) for r in rows] == [("create", "would create"), ("skip", "waits"),
                                                        ("create", "would create")]
    assert "run migrate again when that job has succeeded here" in rows[1].note

    done = {"ftjob-sft": FineTuningJob.model_validate({**sft.model_dump(), "id": "ftjob-new",
                                                       "fine_tuned_model": "ft:gpt-4o-mini-2024-07-18:personal::new"})}
    rows = [Row(j) for j in order([dpo, sft])]
    plan(rows, done, files)
    assert [r.action for r in rows] == ["skip", "create"]
    assert rows[1].model == "ft:gpt-4o-mini-2024-07-18:personal::new" and "checkpoint" in rows[1].note
    assert job_request(dpo, {"training_file": "f"}, rows[1].model)["model"] == rows[1].model


@pytest.mark.slow
def test_a_dpo_job_on_a_fine_tune_migrates_after_its_parent(servers, toy_files, tmp_path):  # noqa: F811
    """The DPO guide's shape on the source (a supervised job, then DPO on its ft: model); migrate re-creates the
    supervised job, lists the DPO job as waiting for it, and once the copy has succeeded re-creates the DPO job
    on the copy's model with its method and beta."""
    from test_finetune_api_dpo import DPO_TRAIN

    source, target = servers
    src, dst = source.client(), target.client()
    chat = src.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
    pairs = src.files.create(file=("pairs.jsonl", DPO_TRAIN), purpose="fine-tune")
    sft = wait_status(src, src.fine_tuning.jobs.create(model="tiny-llama", training_file=chat.id, seed=1).id,
                      ("succeeded", "failed"), timeout=300)
    assert sft.status == "succeeded", sft.error
    dpo_method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1, "batch_size": 4}}}
    dpo = wait_status(src, src.fine_tuning.jobs.create(model=sft.fine_tuned_model, training_file=pairs.id, seed=2,
                                                       method=dpo_method).id, ("succeeded", "failed"), timeout=300)
    assert dpo.status == "succeeded", dpo.error
    flags = ["--from-base-url", source.base_url, "--to-base-url", target.base_url, "--jobs-dir", str(tmp_path / "j"),
             "--job", dpo.id, "--job", sft.id]

    first = migrate("migrate", *flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "created 1 job(s)" in first.stdout and f"note: {dpo.id} trains on {sft.fine_tuned_model}" in first.stdout
    copy = next(j for j in dst.fine_tuning.jobs.list(limit=100).data if j.metadata["migrated_from"] == sft.id)
    copy = wait_status(dst, copy.id, ("succeeded", "failed"), timeout=300)
    assert copy.status == "succeeded", copy.error

    second = migrate("migrate", *flags, cwd=tmp_path)
    assert second.returncode == 0 and "created 1 job(s)" in second.stdout, second.stdout + second.stderr[-2000:]
    new = next(j for j in dst.fine_tuning.jobs.list(limit=100).data if j.metadata["migrated_from"] == dpo.id)
    assert new.model == copy.fine_tuned_model and new.method.type == "dpo"
    done = wait_status(dst, new.id, ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    assert hyperparameters_of(done) == hyperparameters_of(dpo) and hyperparameters_of(done)["beta"] == 0.25
