"""Benchmark: does a long CPU training run slow down or grow? Step time and memory per window of steps.

    python bench/long_run.py                                   # 640 steps of the card demo (~12-15 min on 2 cores)
    python bench/long_run.py --steps 200 --window 25           # a shorter look
    python bench/long_run.py --env MALLOC_ARENA_MAX=2 --name arenas2      # under an allocator setting
    python bench/long_run.py --name no-prefix -- --shared_prefix false    # after --: train/sft.py flags

It trains the demo model (``.cache/models/SmolLM2-135M-Instruct``) with the card demo's profile
(``configs/banking77/sft_cpu.yaml`` on ``runs/demo/data``, built by the demo's own build command when
missing) for ``--steps`` steps, checkpoints every 50 as the demo does, no evaluation, through
``train/sft.py``'s ``main`` in a child process (so that ``--env`` reaches the allocator before it
starts). A callback records every step: wall time, the process's CPU time (all threads; less
sensitive than wall time to other work on the machine), the batch's tokens (real and padded),
the resident set size (RSS, now, from /proc) and glibc's malloc counters (``mallinfo2``: bytes in
use, and bytes malloc holds free, which is fragmentation when it grows).

Printed: one row per ``--window`` steps (mean wall and CPU seconds per step, CPU ms per 1,000 padded
tokens, RSS and malloc's free bytes at the window's end), then the first 100 steps against the last
100 (wall, CPU, CPU per 1,000 tokens) and RSS growth after warm-up (RSS at the end minus RSS at
step ``--warmup``, default 50). Written to ``bench/results/long_run[_NAME].json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROFILE = "configs/banking77/sft_cpu.yaml"
DATA = "runs/demo/data"
PAGE = os.sysconf("SC_PAGE_SIZE")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_counters() -> dict:
    """glibc's mallinfo2 (MB): in use (uordblks + hblkhd) and held free (fordblks); {} off glibc."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = Mallinfo2
    m = fn()
    return {"malloc_used_mb": round((m.uordblks + m.hblkhd) / 2**20, 1), "malloc_free_mb": round(m.fordblks / 2**20, 1)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * PAGE / 2**20, 1)


def meter(path: Path):
    """A TrainerCallback that appends one JSON line per training step to ``path``."""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.tokens = [0, 0]  # real, padded tokens of the step's training forwards
            self.t = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def count(module, a, kw):
                mask = kw.get("attention_mask")
                ids = kw.get("input_ids", a[0] if a else None)
                if module.training and ids is not None:
                    self.tokens[0] += int(mask.sum()) if mask is not None else ids.numel()
                    self.tokens[1] += ids.numel()

            model.register_forward_pre_hook(count, with_kwargs=True)
            path.write_text("")

        def on_step_begin(self, args, state, control, **kwargs):
            self.tokens = [0, 0]
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            wall, cpu = time.perf_counter() - self.t[0], time.process_time() - self.t[1]
            rec = {"step": state.global_step, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                   "tokens": self.tokens[0], "padded_tokens": self.tokens[1], "rss_mb": rss_mb(),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   **malloc_counters()}
            with path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    return StepMeter()


def trimmer(every: int):
    """A TrainerCallback that calls glibc's malloc_trim(0) every ``every`` steps (after the meter's record)."""
    from transformers import TrainerCallback

    trim = ctypes.CDLL("libc.so.6").malloc_trim

    class Trim(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                trim(0)

    return Trim()


def ensure_data() -> None:
    if Path(DATA, "train.jsonl").is_file():
        return
    from tunekit.demo import steps

    build = dict(steps(1))["build"]
    subprocess.run(build, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def child(steps: int, records: Path, out_dir: str, flags: list[str], trim: int | None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train/sft.py sets it when run as a script
    from train import sft

    argv = ["--config", PROFILE, "--train_file", f"{DATA}/train.jsonl", "--valid_file", f"{DATA}/valid.jsonl",
            "--output_dir", out_dir, "--max_steps", str(steps), "--eval_strategy", "no", "--save_steps", "50",
            "--plots", "false", *flags]
    return sft.main(argv, callbacks=[meter(records), *([trimmer(trim)] if trim else [])])


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(recs: list[dict], window: int, warmup: int) -> dict:
    def part(rs):
        return {"wall_s": round(mean(r["wall_s"] for r in rs), 3), "cpu_s": round(mean(r["cpu_s"] for r in rs), 3),
                "cpu_ms_per_1k_tokens": round(1000 * sum(r["cpu_s"] for r in rs)
                                              / max(1, sum(r["padded_tokens"] for r in rs)) * 1000, 1),
                "padded_tokens": round(mean(r["padded_tokens"] for r in rs), 1)}

    windows = []
    for start in range(0, len(recs), window):
        rs = recs[start:start + window]
        windows.append({"steps": f"{rs[0]['step']}-{rs[-1]['step']}", **part(rs), "rss_mb": rs[-1]["rss_mb"],
                        "malloc_free_mb": rs[-1].get("malloc_free_mb")})
    edge = min(100, len(recs) // 2)
    at_warm = next((r for r in recs if r["step"] >= warmup), recs[0])
    return {"windows": windows, "first": {"steps": edge, **part(recs[:edge])},
            "last": {"steps": edge, **part(recs[-edge:])},
            "rss_warm_mb": at_warm["rss_mb"], "rss_end_mb": recs[-1]["rss_mb"],
            "rss_growth_after_warmup_mb": round(recs[-1]["rss_mb"] - at_warm["rss_mb"], 1),
            "peak_rss_mb": recs[-1]["peak_rss_mb"], "malloc_free_end_mb": recs[-1].get("malloc_free_mb"),
            "malloc_used_end_mb": recs[-1].get("malloc_used_mb")}


def report(name: str, s: dict, warmup: int) -> None:
    print(f"\n{name}: | steps | wall s/step | CPU s/step | CPU ms / 1k padded tokens | padded tokens/step | RSS MB | "
          "malloc free MB |\n|---|---|---|---|---|---|---|")
    for w in s["windows"]:
        print(f"| {w['steps']} | {w['wall_s']:.2f} | {w['cpu_s']:.2f} | {w['cpu_ms_per_1k_tokens']:.0f} | "
              f"{w['padded_tokens']:.0f} | {w['rss_mb']:.0f} | {w['malloc_free_mb']} |")
    f, la = s["first"], s["last"]
    print(f"first {f['steps']} steps: {f['wall_s']:.2f} s wall, {f['cpu_s']:.2f} s CPU, "
          f"{f['cpu_ms_per_1k_tokens']:.0f} CPU ms/1k tokens; last {la['steps']}: {la['wall_s']:.2f} s wall, "
          f"{la['cpu_s']:.2f} s CPU, {la['cpu_ms_per_1k_tokens']:.0f} CPU ms/1k tokens")
    print(f"RSS {s['rss_warm_mb']:.0f} MB at step {warmup} -> {s['rss_end_mb']:.0f} MB at the end "
          f"({s['rss_growth_after_warmup_mb']:+.0f} MB); peak {s['peak_rss_mb']:.0f} MB; malloc holds "
          f"{s['malloc_free_end_mb']} MB free, {s['malloc_used_end_mb']} MB in use")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=640)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=50, help="RSS growth is counted from this step")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the run")
    ap.add_argument("--name", default="", help="a name for this variant (results file long_run_NAME.json)")
    ap.add_argument("--trim-every", type=int, metavar="N", help="malloc_trim(0) every N steps (glibc)")
    ap.add_argument("--child", metavar="RECORDS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    os.chdir(ROOT)
    run_dir = f"runs/long_run/{args.name or 'default'}"
    if args.child:
        return child(args.steps, Path(args.child), run_dir, flags, args.trim_every)

    ensure_data()
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)  # sft.py resumes or refuses an existing run
    records = Path(run_dir + ".steps.jsonl")
    records.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **dict(e.partition("=")[::2] for e in args.env)}
    cmd = [sys.executable, __file__, "--child", str(records), "--steps", str(args.steps), "--name",
           args.name or "default", *(["--trim-every", str(args.trim_every)] if args.trim_every else []), "--", *flags]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env).returncode
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"train/sft.py failed ({rc})")
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    summary = {"name": args.name or "default", "steps": args.steps, "env": args.env, "flags": flags,
               "profile": PROFILE, "wall_s": round(wall, 1), "load_avg": os.getloadavg(),
               **summarise(recs, args.window, args.warmup)}
    out = Path("bench/results", f"long_run{'_' + args.name if args.name else ''}.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    report(summary["name"], summary, args.warmup)
    print(f"whole run {wall:.0f} s; load average at the end {summary['load_avg'][0]:.1f}; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
