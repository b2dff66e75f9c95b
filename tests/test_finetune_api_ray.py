"""serve.finetune_api with ``executor: ray``, against a real Ray cluster on this machine.

One cluster per test run (``ray_cluster``): ray.cluster_utils.Cluster, a head with its dashboard (Ray's Jobs API)
and 4 logical GPUs (they schedule; the training runs on the CPU), its temp dir and RAY_TMPDIR in a fresh folder;
at the end no process that carries that folder is left. The API is the real server process (test_finetune_api's
Server) started with ``executor: ray``:

- the seed write-up's script, unchanged, on a server with ``gpus_per_job: 2``: a 2-process job (DDP, gloo on the
  CPU) that reports its steps and checkpoints and succeeds, trained by both ranks into one adapter; meanwhile a
  second job cancelled mid-run: its Ray job stopped, its processes gone;
- a job pinned to a worker node (``accelerator_type``: only that node's resource is free): the API SIGKILLed and
  started again follows the same Ray job (no new submission, the same processes); the node removed mid-job, the
  job is submitted again, resumes on the head from its last checkpoint and ends at the same final step;
- start-up with no cluster at ``--ray-address``: one line naming the key and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, free_port
from test_finetune_api import (KEY, SEED_SCRIPT, Server, ft_model_dir, toy_files, training_pids,  # noqa: F401
                               wait_status)

pytest.importorskip("ray.job_submission", reason="the ray extra: pip install -e '.[ray]'")
PIN = "accelerator_type:pin"  # a resource the head and the worker node have one of (accelerator_type: pin)


def carrying(marker: str) -> list[psutil.Process]:
    """Live processes whose environment or command line names ``marker`` (the cluster's temp folder)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if marker in Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace") or \
                    marker in " ".join(proc.cmdline()):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


class RayCluster:
    def __init__(self, cluster, address: str, temp: str):
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.address, self.temp = cluster, address, temp
        self.client = JobSubmissionClient(address)
        self.head = cluster.head_node.node_id

    def wait_job(self, sid: str, statuses: tuple[str, ...], timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while (status := str(self.client.get_job_status(sid).value)) not in statuses:
            assert time.time() < deadline, f"Ray job {sid} still {status} after {timeout} s"
            time.sleep(0.3)
        return status


@pytest.fixture(scope="session")
def ray_cluster():
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="tkray", dir="/tmp")  # short: Ray's socket paths live under it
    (Path(temp) / "ray").mkdir()
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp  # every process of the cluster (and of its jobs) carries it
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port, "num_cpus": 4,
        "num_gpus": 4, "resources": {PIN: 1}, "temp_dir": str(Path(temp) / "ray")})
    try:
        yield RayCluster(cluster, f"http://127.0.0.1:{port}", temp)
    finally:
        cluster.shutdown()
        deadline = time.time() + 60
        while (left := carrying(temp)) and time.time() < deadline:
            time.sleep(0.5)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        names = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left]
        for proc in left:  # never left behind, even when the assertion below fails
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, "Ray processes left after the cluster's shutdown:\n" + "\n".join(names)


def ranks(data_dir: Path, seen: dict, stop: threading.Event) -> None:
    """Record the RANK / WORLD_SIZE / CUDA_VISIBLE_DEVICES of every train/sft.py process of ``data_dir``'s jobs."""
    while not stop.is_set():
        for pid in training_pids(data_dir / "runs"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().decode(
                    errors="replace").split("\0") if "=" in e)
            except OSError:
                continue
            if any(c.endswith("train/sft.py") for c in cmd) and "RANK" in env:
                job = Path(cmd[cmd.index("--config") + 1]).stem
                seen.setdefault(job, set()).add((env["RANK"], env.get("WORLD_SIZE"), env.get("CUDA_VISIBLE_DEVICES")))
        stop.wait(0.2)


@pytest.mark.slow
def test_seed_script_trains_a_two_process_job_and_a_cancel_stops_its_ray_job(ray_cluster, tmp_path,
                                                                             ft_model_dir, toy_files):  # noqa: F811
    s = Server(tmp_path, ft_model_dir, executor="ray", ray_address=ray_cluster.address, gpus_per_job=2).start()
    seen, stop = {}, threading.Event()
    watcher = threading.Thread(target=ranks, args=(s.data_dir, seen, stop), daemon=True)
    watcher.start()
    try:
        script = tmp_path / "seed.py"
        script.write_text(f"TRAIN = {str(toy_files / 'train.jsonl')!r}\nVALID = {str(toy_files / 'valid.jsonl')!r}\n"
                          + textwrap.dedent(SEED_SCRIPT))
        seed = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "OPENAI_BASE_URL": s.base_url,
                                                                   "OPENAI_API_KEY": KEY},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # meanwhile: a job cancelled once its training runs on the cluster
        c = s.client()
        f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
        doomed = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 2}}})
        wait_status(c, doomed.id, ("running",), timeout=120)
        deadline = time.time() + 120
        while not training_pids(s.data_dir / "runs" / doomed.id):
            assert time.time() < deadline, "the cancelled job's training never started"
            time.sleep(0.2)
        assert c.fine_tuning.jobs.cancel(doomed.id).status == "cancelled"
        assert ray_cluster.wait_job(doomed.id, ("STOPPED",), timeout=60) == "STOPPED"
        deadline = time.time() + 30
        while training_pids(s.data_dir / "runs" / doomed.id):
            assert time.time() < deadline, "training still running after cancel"
            time.sleep(0.3)
        out, err = seed.communicate(timeout=300)
        cancelled = [e.message for e in c.fine_tuning.jobs.list_events(doomed.id, limit=100).data]
    finally:
        stop.set()
        s.stop()
    assert seed.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert "succeeded" in lines, out[-3000:]
    name = next(line for line in lines if line.startswith("ft:"))
    job_id = "ftjob-" + name.rsplit(":", 1)[1]
    messages = lines[lines.index(name) + 1:]
    expected = ["Fine-tuning job started", "Training tiny-llama with configs/banking77/sft_cpu.yaml: n_epochs 5, "
                "batch_size 8", "Training on 2 processes (gpus_per_job 2, data parallel): 4 examples per process x 1 "
                "accumulated x 2 processes a step = batch_size 8", "Step 2/20: training loss=", "Step 20/20: training "
                "loss=", f"Checkpoint created at step 20 with Snapshot ID: {name}:ckpt-step-20",
                f"New fine-tuned model created: {name}", "The job has successfully completed"]
    found = iter(messages)
    for want in expected:
        assert any(m.startswith(want) for m in found), f"{want!r} missing or out of order in:\n" + "\n".join(messages)
    assert f"{name}:ckpt-step-20 20 " in out

    # both ranks trained (one world of 2, on the 2 GPUs Ray gave the job), into one adapter
    assert {(r, w) for r, w, _ in seen[job_id]} == {("0", "2"), ("1", "2")}, seen
    assert all(len(cuda.split(",")) == 2 for _r, _w, cuda in seen[job_id]), seen
    run_dir = s.data_dir / "runs" / job_id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["effective_batch_size"] == 8
    assert [p.name for p in run_dir.glob("*.safetensors")] == ["adapter_model.safetensors"]
    log = (s.data_dir / "runs" / f"{job_id}.log").read_text()
    assert f"--- Ray job {job_id} (its driver log" in log and "x 2 process(es)" in log

    # what Ray ran: the job's id, accelerate's 2 processes (on the 2 GPUs it gave: above), the job's variables only
    info = ray_cluster.client.get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED" and "ddp_jobs.yaml --num_processes 2 " in info.entrypoint
    assert info.metadata["tunekit_job"] == job_id and info.metadata["run_dir"] == str(run_dir)
    env = info.runtime_env["env_vars"]
    assert env["TUNEKIT_RUN_DIR"] == str(run_dir) and "TUNEKIT_API_KEY" not in env and "PATH" not in env
    assert "Training process stopped" in cancelled and not (s.data_dir / "runs" / doomed.id / "summary.json").exists()
    assert "job worker: up to 2 jobs at once on the Ray cluster at " in (tmp_path / "server.log").read_text()


@pytest.mark.slow
def test_restart_follows_the_ray_job_and_a_lost_node_resumes_on_the_head(ray_cluster, tmp_path,
                                                                        ft_model_dir, toy_files):  # noqa: F811
    rc = ray_cluster
    blocker = f"blocker-{uuid.uuid4().hex[:8]}"  # holds the head's pin: the job can only start on the worker node
    rc.client.submit_job(entrypoint="sleep 600", submission_id=blocker, entrypoint_resources={PIN: 1})
    s = worker = None
    try:
        s = Server(tmp_path, ft_model_dir, max_steps=480, executor="ray", ray_address=rc.address, gpus_per_job=0,
                   accelerator_type="pin", sft={"save_steps": 16}).start()
        rc.wait_job(blocker, ("RUNNING",))
        assert rc.client.get_job_info(blocker).driver_node_id == rc.head
        c = s.client()  # the job waits in Ray (pending) until the node that can take it joins
        f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", suffix="lost", method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 15, "batch_size": 1}}})
        worker = rc.cluster.add_node(num_cpus=2, resources={PIN: 1})
        run_dir = s.data_dir / "runs" / job.id
        deadline = time.time() + 180
        while not list(run_dir.glob("checkpoint-*/trainer_state.json")):
            assert time.time() < deadline and s.proc.poll() is None
            time.sleep(0.2)
        assert rc.client.get_job_info(job.id).driver_node_id == worker.node_id
        before = set(training_pids(run_dir))

        s.kill()  # SIGKILL: the API is gone, the Ray job trains on
        s.start()
        wait_for_event = time.time() + 60
        while not any("it follows its Ray job " + job.id + " again" in m for m in events(c, job.id)):
            assert time.time() < wait_for_event, events(c, job.id)
            time.sleep(0.3)
        assert before & set(training_pids(run_dir)), "the restart started the training again"
        assert str(rc.client.get_job_status(job.id).value) == "RUNNING"
        assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
        assert not (run_dir / "summary.json").exists(), "the job ended before its node could be lost: train longer"

        rc.cluster.remove_node(worker)  # the worker node leaves mid-job
        rc.client.stop_job(blocker)  # the head's pin is free again
        done = wait_status(c, job.id, ("succeeded", "failed"), timeout=240)
        assert done.status == "succeeded", done.error
        messages = events(c, job.id)
        steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data
                 if e.type == "metrics" and "train_loss" in e.data]
    finally:
        if s:
            s.stop()
        rc.client.stop_job(blocker)
        if worker in rc.cluster.worker_nodes:
            rc.cluster.remove_node(worker)
    lost = [m for m in messages if "node lost; submitted again" in m]
    assert len(lost) == 1 and lost[0].startswith(f"Ray job {job.id}: node lost; submitted again (attempt 2 of 3), "
                                                 "resuming from checkpoint-"), messages
    ckpt = lost[0].rsplit(" ", 1)[1]
    assert "Fine-tuning job started (attempt 2)" in messages
    second = rc.client.get_job_info(f"{job.id}-attempt-2")
    assert str(second.status.value) == "SUCCEEDED" and second.driver_node_id == rc.head
    assert {j.submission_id for j in rc.client.list_jobs() if (j.metadata or {}).get("tunekit_job") == job.id} == {
        job.id, f"{job.id}-attempt-2"}  # the restart submitted nothing
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 480 and summary["resumed_from"].endswith(ckpt)  # the same final step, from there
    assert sorted(steps) == list(range(2, 481, 2))  # each step reported once across the restart and the loss
    made = [m for m in messages if m.startswith("Checkpoint created at step ")]
    assert len(made) == len(set(made))
    assert not training_pids(run_dir)


def events(c, job_id: str) -> list[str]:
    return [e.message for e in reversed(c.fine_tuning.jobs.list_events(job_id, limit=1000).data)]


@pytest.mark.slow
def test_no_cluster_at_the_address_is_one_line_at_start_up(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "tunekit.cli", "api", "--executor", "ray", "--ray-address", address,
                           "--data-dir", str(tmp_path), "--no-start-vllm"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: ray_address: no Ray cluster answers at {address} ")
    assert "ray start --head" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- fast: the rules, no cluster


def test_gpus_per_job_groups_the_devices_and_splits_each_step_between_the_processes(tmp_path, caplog):
    import yaml

    from serve.finetune_api.config import FinetuneAPIConfig
    from serve.finetune_api.executors import LocalExecutor, spread_batch
    from serve.finetune_api.ray_executor import RayExecutor
    from serve.finetune_api.slots import job_devices
    from tunekit.errors import UserError

    two = FinetuneAPIConfig(gpus_per_job=2)
    assert job_devices(two, ["0", "1", "2", "3"]) == ["0,1", "2,3"] and job_devices(two, ["cpu"]) == ["cpu"]
    assert job_devices(two, ["0", "1", "2"]) == ["0,1"] and "GPU 2 left unused" in caplog.text
    with pytest.raises(UserError, match="gpus_per_job: 3, but jobs may train on 2 GPUs"):
        job_devices(FinetuneAPIConfig(gpus_per_job=3), ["0", "1"])
    with pytest.raises(UserError, match="gpus_per_job: 0;"):
        LocalExecutor(FinetuneAPIConfig(gpus_per_job=0))
    for address, fix in ((None, "ray_address: unset"), ("127.0.0.1:6379", "ray_address: '127.0.0.1:6379'; give the "
                                                                            "dashboard's HTTP address")):
        with pytest.raises(UserError, match=fix):
            RayExecutor(FinetuneAPIConfig(executor="ray", ray_address=address))

    config = tmp_path / "job.yaml"
    for batch, processes, per_device, note in ((8, 2, (4, 1), "= batch_size 8"), (16, 2, (8, 1), "= batch_size 16"),
                                               (3, 2, (2, 1), "= 4, batch_size 3 rounded up to a multiple of 2"),
                                               (8, 1, (8, 1), None)):
        config.write_text(yaml.safe_dump({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                          "max_steps": 20}))
        said = spread_batch(config, batch, processes)
        data = yaml.safe_load(config.read_text())
        assert (data["per_device_train_batch_size"], data["gradient_accumulation_steps"]) == per_device
        assert data["max_steps"] == 20 and (said is None if note is None else said.endswith(note)), said
    config.write_text(yaml.safe_dump({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}))
    assert spread_batch(config, 16, 2).startswith("Training on 2 processes (gpus_per_job 2, data parallel): 2 examples "
                                                  "per process x 4 accumulated x 2 processes a step")
