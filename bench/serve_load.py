"""Benchmark: the local vLLM server under load against what a notebook does (generate, one at a time).

    python bench/serve_load.py                       # CPU: starts the demo's server itself (~8 min on 2 cores)
    python bench/serve_load.py --requests 500 --concurrency 32 --baseline-prompts 48
    python bench/serve_load.py --config configs/banking77/serve_t4.yaml --model base   # on a GPU

Prompts: banking77's card test queries with the demo's system prompt, cycled to ``--requests``.
1. The server (``serve.vllm_server``, started and stopped here; ``--base-url`` uses a running one
   instead) gets ``--requests`` chat requests with ``--concurrency`` in flight, pinned sampling
   (temperature 0, ``--max-tokens``, the same ``min_tokens`` so every answer has the same length):
   errors, latency p50 / p95, output tokens/s over the whole run. One warm-up request first.
2. With the server stopped (so the two never share the CPU), plain transformers ``generate`` on the
   same model runs the first ``--baseline-prompts`` prompts one at a time, greedy, exactly
   ``--max-tokens`` new tokens each (``min_new_tokens``): output tokens/s.
3. The ratio of the two throughputs. Figures go to stdout and bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.sources import iter_jsonl  # noqa: E402
from serve.client import load_settings  # noqa: E402


def prompts(path: Path, system: str, n: int) -> list[list[dict]]:
    rows = [r["messages"] for _, r in iter_jsonl(path)]
    out = []
    while len(out) < n:
        for msgs in rows:
            user = next(m["content"] for m in msgs if m["role"] == "user")
            out.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
            if len(out) == n:
                break
    return out


async def load(base_url: str, key: str | None, model: str, msgs: list, concurrency: int, max_tokens: int) -> dict:
    import numpy as np
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=base_url, api_key=key or "no-key", max_retries=0, timeout=600)
    extra = {"min_tokens": max_tokens, "ignore_eos": True}
    await client.chat.completions.create(model=model, messages=msgs[0], max_tokens=4, temperature=0)  # warm-up
    sem = asyncio.Semaphore(concurrency)
    lat, toks, errors = [], [], []
    bar = tqdm(total=len(msgs), desc=f"load c={concurrency}", unit="req", file=sys.stderr)

    async def one(m):
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.chat.completions.create(model=model, messages=m, max_tokens=max_tokens,
                                                         temperature=0, extra_body=extra)
                lat.append(time.perf_counter() - t0)
                toks.append(r.usage.completion_tokens)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(type(e).__name__)
            bar.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in msgs))
    wall = time.perf_counter() - t0
    bar.close()
    await client.close()
    return {"requests": len(msgs), "concurrency": concurrency, "errors": len(errors),
            "error_kinds": sorted(set(errors)), "wall_s": round(wall, 2),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3) if lat else None,
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3) if lat else None,
            "output_tokens": int(sum(toks)), "output_tokens_per_s": round(sum(toks) / wall, 1),
            "requests_per_s": round(len(lat) / wall, 2)}


def sequential_generate(model_dir: str, msgs: list, max_tokens: int, threads: int) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    lat, toks = [], 0
    t_all = time.perf_counter()
    for m in tqdm(msgs, desc="generate, one at a time", unit="req", file=sys.stderr):
        ids = tok.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(model.device) for k, v in ids.items()}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        lat.append(time.perf_counter() - t0)
        toks += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - t_all
    import numpy as np

    return {"requests": len(msgs), "wall_s": round(wall, 2), "output_tokens": int(toks),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3),
            "output_tokens_per_s": round(toks / wall, 1), "device": "cuda" if cuda else "cpu", "threads": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/banking77/serve_cards.yaml"))
    p.add_argument("--data", default=str(ROOT / "runs/demo/test/train.jsonl"),
                   help="chat JSONL whose user messages are the prompts (make demo builds this one)")
    p.add_argument("--model", default="base", help="alias to load-test (base: no adapter needed)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--baseline-prompts", type=int, default=48, help="prompts for the sequential baseline")
    p.add_argument("--base-url", help="a running server instead of starting one")
    p.add_argument("--block-size", type=int, help="server.block_size for the started server (KV-cache block)")
    p.add_argument("--skip-baseline", action="store_true", help="only the server run (no ratio)")
    p.add_argument("--out", default=str(ROOT / "bench/results/serve_load.json"))
    args = p.parse_args(argv)

    settings = load_settings(args.config, backend="local")
    if args.model == "base":
        settings.server.adapters = {}
    if args.block_size:
        settings.server.block_size = args.block_size
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} not found: run `make demo` (or pass --data a chat JSONL)")
    msgs = prompts(Path(args.data), settings.system or "", args.requests)
    key = settings.local_api_key()
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()},
              "model": settings.server.model, "max_tokens": args.max_tokens,
              "block_size": settings.server.block_size}
    served = settings.served_base_name() if args.model == "base" else args.model
    if args.base_url:
        result["server"] = asyncio.run(load(args.base_url, key, served, msgs, args.concurrency, args.max_tokens))
    else:
        from serve.vllm_server import VLLMServer

        t0 = time.perf_counter()
        with VLLMServer(settings, api_key=key) as server:
            result["server_startup_s"] = round(time.perf_counter() - t0, 1)
            result["server"] = asyncio.run(load(server.base_url, key, served, msgs, args.concurrency,
                                                args.max_tokens))
    s = result["server"]
    print(f"\nvLLM server, {s['requests']} requests at concurrency {s['concurrency']}: {s['errors']} errors, "
          f"p50 {s['latency_p50_s']} s, p95 {s['latency_p95_s']} s, {s['output_tokens_per_s']} output tokens/s "
          f"({s['requests_per_s']} req/s)")
    if not args.skip_baseline:
        b = result["sequential"] = sequential_generate(settings.server.model, msgs[:args.baseline_prompts],
                                                       args.max_tokens, os.cpu_count() or 1)
        ratio = s["output_tokens_per_s"] / b["output_tokens_per_s"]
        result["throughput_ratio"] = round(ratio, 2)
        print(f"transformers generate, one at a time ({b['requests']} prompts): p50 {b['latency_p50_s']} s, "
              f"{b['output_tokens_per_s']} output tokens/s")
        print(f"throughput ratio: {ratio:.1f}x (target >= 10x with zero errors)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
