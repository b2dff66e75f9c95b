"""Benchmark: fine-tuning jobs through the local API with ``executor: local`` and ``executor: ray``.

    .venv/bin/python bench/ray_jobs.py                 # 4 jobs per batch, ~6 min on 2 cores
    .venv/bin/python bench/ray_jobs.py --jobs 2 --steps 10

What it measures, with a tiny random Llama (built here) on the toy yes/no task, through the openai SDK:

- **to first step**: seconds from ``fine_tuning.jobs.create`` to the job's first ``metrics`` event (step 1),
  seen by a client polling the events every 0.1 s: validation, the queue, the start (a Ray job's submission,
  its supervisor actor and runtime env), Python and torch imports, the model's load, the first step. One job
  alone, with ``local`` and with ``ray`` (a one-node cluster on this machine);
- **batch**: ``--jobs`` jobs created at once (``--steps`` steps each, one CPU each): the mean time to first
  step and the time until the last one succeeded, with ``local`` (``max_running`` 2: the CPU slot shared),
  ``ray`` on one node of 2 CPUs, and ``ray`` on two simulated nodes of 2 CPUs each (``ray.cluster_utils``:
  both on this machine, so they share its cores; the figure is the scheduling, not more compute).

Every layout gets its own API process and data folder; the Ray cluster (head with its dashboard, and the
second node for the last layout) is started here and stopped at the end. Output: stdout and
bench/results/ray_jobs.json, with the load average before and after: on a shared machine other work skews
every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-ray-key"
TOY = [("w1 w2", "yes"), ("w3 w4", "no"), ("w5 w6", "yes"), ("w7 w8", "no"), ("w9 w10", "yes"),
       ("w11 w12", "no"), ("w13 w14", "yes"), ("w15 w16", "no")]
CHATML = (ROOT / "train/templates/smollm2.jinja").read_text(encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(out: Path) -> Path:
    """A 2-layer random Llama with a word-level ChatML tokenizer (the tests' tiny model)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n"]
    words += [f"w{i}" for i in range(200)] + "the yes no".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token=None)
    fast.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


class API:
    """``python -m serve.finetune_api`` on a data folder of its own."""

    def __init__(self, root: Path, model: Path, steps: int, **extra):
        root.mkdir(parents=True)
        self.root, self.port = root, free_port()
        config = root / "api.yaml"
        config.write_text(yaml.safe_dump({
            "port": self.port, "data_dir": str(root / "data"), "sft_config": "configs/banking77/sft_cpu.yaml",
            "base_model": "tiny-llama", "max_steps": steps, "start_vllm": False,
            "sft_overrides": {"model_name_or_path": str(model), "max_length": 64, "num_threads": 1, "logging_steps": 1,
                              "save_steps": steps, "bf16": False, "warmup_steps": 0, "plots": False}, **extra}))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEKIT_API_KEY": KEY, "HF_HUB_OFFLINE": "1",
               "TUNEKIT_REGISTRY": str(root / "registry.json")}
        self.log = open(root / "api.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.finetune_api", "--config", str(config)], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        from openai import OpenAI

        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                self.client.models.list()
                break
            except Exception:  # noqa: BLE001 (still starting)
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the API did not start: {(root / 'api.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def batch(api: API, train: Path, jobs: int) -> dict:
    """Create ``jobs`` jobs at once; seconds to each one's first step, and until the last one succeeded."""
    c = api.client
    f = c.files.create(file=open(train, "rb"), purpose="fine-tune")
    t0 = time.monotonic()
    ids = [c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", hyperparameters={
        "n_epochs": 1, "batch_size": 1}).id for _ in range(jobs)]
    first, done = {}, {}
    while len(done) < jobs:
        for job_id in ids:
            if job_id not in first and any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job_id).data):
                first[job_id] = time.monotonic() - t0
            if job_id in first and job_id not in done:
                job = c.fine_tuning.jobs.retrieve(job_id)
                if job.status in ("failed", "cancelled"):
                    raise SystemExit(f"{job_id} {job.status}: {job.error}")
                if job.status == "succeeded":
                    done[job_id] = time.monotonic() - t0
        if time.monotonic() - t0 > 900:
            raise SystemExit("jobs still running after 900 s")
        time.sleep(0.1)
    firsts = [first.get(i, done[i]) for i in ids]
    return {"jobs": jobs, "first_step_s": [round(x, 1) for x in firsts],
            "mean_first_step_s": round(sum(firsts) / jobs, 1), "all_succeeded_s": round(max(done.values()), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=4, help="jobs per batch")
    p.add_argument("--steps", type=int, default=20, help="training steps per job")
    p.add_argument("--out", default=str(ROOT / "bench/results/ray_jobs.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tkbench"))
    os.environ["RAY_TMPDIR"] = str(work)  # short paths (Ray's sockets), removed at the end
    (work / "ray").mkdir()
    model = tiny_model(work / "tiny-llama")
    rows = [{"messages": [{"role": "system", "content": "the"}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in TOY]
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cores": os.cpu_count(), "load_average_before": os.getloadavg()},
              "jobs": args.jobs, "steps": args.steps, "layouts": {}}
    from ray.cluster_utils import Cluster

    cluster = None
    ray = {"executor": "ray", "gpus_per_job": 0, "cpus_per_job": 1}
    layouts = [("local, 1 job", 1, {"max_running": 2}), ("local", args.jobs, {"max_running": 2}),
               ("ray 1 node, 1 job", 1, ray), ("ray 1 node", args.jobs, ray), ("ray 2 nodes", args.jobs, ray)]
    try:
        for n, (name, jobs, extra) in enumerate(layouts):
            if extra is ray and cluster is None:  # after the local layouts: its processes idle meanwhile
                port, t = free_port(), time.monotonic()
                cluster = Cluster(initialize_head=True, head_node_args={
                    "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port, "num_cpus": 2,
                    "temp_dir": str(work / "ray")})
                result["ray_head_start_s"] = round(time.monotonic() - t, 1)
                ray["ray_address"] = f"http://127.0.0.1:{port}"
            if name == "ray 2 nodes":
                t = time.monotonic()
                cluster.add_node(num_cpus=2)
                result["ray_node_join_s"] = round(time.monotonic() - t, 1)
            api = API(work / f"api{n}", model, args.steps, **extra)
            try:
                result["layouts"][name] = batch(api, train, jobs)
            finally:
                api.stop()
            print(f"{name:20s} {json.dumps(result['layouts'][name])}", flush=True)
    finally:
        if cluster:
            cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average before {result['machine']['load_average_before']}, after "
          f"{result['machine']['load_average_after']}; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
