"""Benchmark: output tokens/s through the fine-tuning API with one and with two vLLM servers behind it.

    python bench/serve_multi.py                      # CPU: starts the servers itself (~6 min on 2 cores)
    python bench/serve_multi.py --requests 128 --concurrency 16 --max-tokens 32
    python bench/serve_multi.py --layouts one two two-shared one-core --policies least_outstanding round_robin

Every run sends the same ``--requests`` chat requests to the base model through the API
(``serve.finetune_api``'s app with ``vllm_urls`` = the servers, served by uvicorn in this process),
``--concurrency`` in flight: fixed prompts, temperature 0, ``max_tokens`` = ``min_tokens`` =
``--max-tokens`` with ``ignore_eos`` (every answer has the same length). Figures: output tokens/s,
requests/s, latency p50 / p95, errors, and how many requests each server answered (its /metrics).

Layouts (their servers started, sent every prompt once, measured, then stopped, so no two layouts share
the CPU; without that warm-up whichever run came first filled vLLM's prefix cache for the others):
  one         one vLLM CPU server computing on every core (serve.vllm_server's default); also measured
              straight, without the API (``direct``), for the API's own cost
  two         two vLLM CPU servers, each computing on its share of the cores (VLLM_CPU_OMP_THREADS_BIND):
              the same cores as ``one``, split
  two-shared  two servers, each computing on every core (they compete for them)
  one-core    one server computing on the first share of the cores only (what each server of ``two`` has)
Two-server layouts run once per ``--policies`` entry (pool.Pool.policy: least_outstanding, the API's,
or round_robin). Output: stdout and bench/results/serve_multi.json (with the load average before and
after: on a shared machine other work skews every figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import load  # noqa: E402

SYSTEM = "You are a bank's support assistant. Answer in one short sentence."
PROMPTS = ["My card hasn't arrived yet.", "How do I top up with a bank transfer?", "Why was my payment declined?",
           "Can I change my PIN at an ATM?", "I was charged twice for one purchase.", "How long does a transfer take?",
           "My card is about to expire.", "Which currencies can I hold?", "I forgot my passcode.",
           "The exchange rate looks wrong.", "Can I get a refund for a cancelled order?",
           "How do I close my account?", "Is there a fee for ATM withdrawals?", "My top-up is still pending.",
           "Someone used my card without permission.", "How do I verify my identity?"]
KEY = "bench-multi-key"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def start_server(model: str, cores: list[int] | None, log_dir: Path):
    """A vLLM CPU server of ``model`` (served as smol-base), computing on ``cores`` (None: every core)."""
    from serve.client import Settings
    from serve.vllm_server import VLLMServer
    from tunekit.net import free_port

    s = Settings()
    s.server.model, s.server.served_model_name, s.server.port = model, "smol-base", free_port()
    s.server.max_model_len, s.server.smoke_test, s.server.adapters = 512, False, {}
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if cores is not None:  # serve.vllm_server only sets it where the environment has not
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    try:
        t0 = time.perf_counter()
        server = VLLMServer(s, api_key=KEY, log_path=log_dir / f"vllm-{s.server.port}.log").start()
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    print(f"  vLLM on {server.base_url} (cores {cores or 'all'}) ready in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return server


def answered(url: str) -> float:
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


class API:
    """The fine-tuning API's app over ``urls``, served by uvicorn in a thread of this process."""

    def __init__(self, urls: list[str], model: str, policy: str, data_dir: str):
        import uvicorn

        from serve.finetune_api import FinetuneAPIConfig, create_app
        from serve.finetune_api.proxy import Upstream
        from tunekit.net import free_port

        os.environ["BENCH_VLLM_KEY"] = KEY
        cfg = FinetuneAPIConfig(data_dir=data_dir, sft_config=str(ROOT / "configs/banking77/sft_cpu.yaml"),
                                base_model="smol-base", sft_overrides={"model_name_or_path": model},
                                vllm_urls=urls, vllm_api_key_env="BENCH_VLLM_KEY", log_level="warning")
        self.app = create_app(cfg, KEY, run_worker=False, upstream=Upstream.of(cfg))
        self.app.state.proxy.pool.policy = policy
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=free_port(), log_config=None,
                                                    access_log=False, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.config.port}/v1"

    def __enter__(self) -> "API":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.app.state.store.close()


def run(name: str, url: str, servers: list, msgs: list, args) -> dict:
    before = [answered(s.base_url) for s in servers]
    result = asyncio.run(load(url, KEY, "smol-base", msgs, args.concurrency, args.max_tokens))
    time.sleep(1)  # the servers' counters trail their answers
    result["answered_per_server"] = [int(answered(s.base_url) - b) for s, b in zip(servers, before)]
    result["answered_per_server"][0] -= 1  # load()'s warm-up request
    result["run"] = name
    print(f"{name:<40} {result['output_tokens_per_s']:>7} tok/s  {result['requests_per_s']:>5} req/s  "
          f"p50 {result['latency_p50_s']} s  p95 {result['latency_p95_s']} s  errors {result['errors']}  "
          f"per server {result['answered_per_server']}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct"))
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--layouts", nargs="+", default=["one", "two"], choices=["one", "two", "two-shared", "one-core"])
    p.add_argument("--policies", nargs="+", default=["least_outstanding", "round_robin"],
                   choices=["least_outstanding", "round_robin"])
    p.add_argument("--out", default=str(ROOT / "bench/results/serve_multi.json"))
    args = p.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"{args.model} not found: run `make model` (or pass --model a model folder)")

    msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            for i in range(args.requests)]
    cores = sorted(os.sched_getaffinity(0))
    halves = [cores[: len(cores) // 2] or cores, cores[len(cores) // 2:] or cores]
    result = {"machine": {"cpu": cpu_name(), "cores": len(cores), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average_before": os.getloadavg()},
              "model": args.model, "requests": args.requests, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="serve_multi-"))
    for layout in args.layouts:
        placement = {"one": [None], "two": halves, "two-shared": [None, None], "one-core": halves[:1]}[layout]
        servers = []
        try:
            for i, bind in enumerate(placement):
                servers.append(start_server(args.model, bind, tmp))
            for s in servers:  # every prompt once, straight to each server: all runs find them in its prefix cache
                asyncio.run(load(s.base_url, KEY, "smol-base", msgs[:len(PROMPTS)], 4, args.max_tokens))
            if layout == "one":
                result["runs"].append(run("one server, straight (no API)", servers[0].base_url, servers, msgs, args))
            for policy in args.policies if len(servers) > 1 else ["least_outstanding"]:
                with API([s.base_url for s in servers], args.model, policy, str(tmp / f"api-{layout}-{policy}")) as api:
                    name = f"{layout}: {len(servers)} server(s) via the API" + (f", {policy}" if len(servers) > 1 else "")
                    result["runs"].append(run(name, api.url, servers, msgs, args) | {"layout": layout,
                                                                                   "policy": policy})
        finally:
            for s in servers:
                s.stop()
    result["machine"]["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average before {result['machine']['load_average_before']}, after "
          f"{result['machine']['load_average_after']}; wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
