"""serve.finetune_api with several devices: a job per device at once, each training process pinned to its own.

The real server process (tests/test_finetune_api.py's Server, no vLLM) with ``devices: ["0", "1"]``: on a
machine without those GPUs each job still trains, on the CPU (the profile's use_cpu), so the test runs
anywhere; what it checks is the scheduling and the CUDA_VISIBLE_DEVICES each training process gets.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from test_finetune_api import Server, ft_model_dir, toy_files, training_pids  # noqa: F401 (fixtures)

TERMINAL = ("succeeded", "failed", "cancelled")


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # it has just exited
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.slow
def test_two_jobs_train_at_once_one_per_device(tmp_path, ft_model_dir, toy_files):  # noqa: F811
    s = Server(tmp_path, ft_model_dir, max_steps=4, devices=["0", "1"]).start()
    try:
        c = s.client()
        f = c.files.create(file=open(toy_files / "train.jsonl", "rb"), purpose="fine-tune")
        hp = {"n_epochs": 1, "batch_size": 1}
        jobs = [c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", suffix=f"dev{i}", method={
            "type": "supervised", "supervised": {"hyperparameters": hp}}).id for i in range(2)]
        seen = {job: set() for job in jobs}  # job -> the CUDA_VISIBLE_DEVICES of its training processes
        together = False
        deadline = time.time() + 300
        while True:
            statuses = [c.fine_tuning.jobs.retrieve(job).status for job in jobs]
            together = together or statuses == ["running", "running"]
            for job in jobs:
                for pid in training_pids(s.data_dir / "runs" / job):  # accelerate launch and train/sft.py
                    env = environ(pid)
                    if env:
                        seen[job].add(env.get("CUDA_VISIBLE_DEVICES"))
            if all(st in TERMINAL for st in statuses):
                break
            assert time.time() < deadline and s.proc.poll() is None, f"jobs still {statuses} after 300 s"
            time.sleep(0.2)
        errors = [c.fine_tuning.jobs.retrieve(job).error for job in jobs]
        assert statuses == ["succeeded", "succeeded"], errors
        assert together, "the two jobs never trained at the same time"
        assert all(len(devices) == 1 for devices in seen.values()), seen  # each process on its device only
        assert {d for devices in seen.values() for d in devices} == {"0", "1"}, seen
        log = (tmp_path / "server.log").read_text()
        assert "job worker: up to 2 jobs at once on GPU 0, 1, queue order fifo" in log
        for job in jobs:
            (device,) = seen[job]
            assert f"job {job}: training started on GPU {device} (pid" in log
    finally:
        s.stop()
