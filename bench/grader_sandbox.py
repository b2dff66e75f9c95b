"""What a python grader's sandbox costs: one grade in serve/graders/sandbox.py against a bare interpreter start.

    .venv/bin/python bench/grader_sandbox.py [--n 40]

Times, per grade of a trivial grader, sequentially: ``python -I -c pass`` (the floor: an interpreter's start)
and a grade in the sandbox with every layer this OS grants (user, network and PID namespaces, Landlock, the
seccomp filter, the limits: the difference is the runner and its layers); then grades 8 at once on 8 threads
(how train/grpo.py and compare grade). Prints the figures and writes bench/results/grader_sandbox.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SOURCE = "def grade(sample, item):\n    return 1.0 if sample['output_text'] == item['label'] else 0.0\n"


def timed(fn, n: int) -> list[float]:
    fn()  # warm the page cache
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    from serve.graders.sandbox import isolation, run_python_grader

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="grades per measurement")
    args = p.parse_args()
    iso = isolation()

    def bare():
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)

    def sandboxed():
        res = run_python_grader(SOURCE, {"output_text": "a"}, {"label": "a"}, timeout_s=30)
        assert res.ok and res.reward == 1.0, res

    floor = timed(bare, args.n)
    grade = timed(sandboxed, args.n)
    with ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda _: sandboxed(), range(args.n)))
        parallel = (time.perf_counter() - t0) / args.n
    ms = lambda xs: round(1000 * statistics.median(xs), 1)  # noqa: E731
    result = {"machine": f"{platform.machine()}, Python {platform.python_version()}, {platform.release()}",
              "isolation": iso.describe(), "n": args.n, "interpreter_start_ms": ms(floor),
              "sandboxed_grade_ms": ms(grade), "sandbox_overhead_ms": round(ms(grade) - ms(floor), 1),
              "grades_on_8_threads_ms_each": round(1000 * parallel, 1)}
    print(f"{result['isolation']}\n"
          f"python -I start:            {result['interpreter_start_ms']} ms (median of {args.n})\n"
          f"one sandboxed grade:        {result['sandboxed_grade_ms']} ms (the runner and its layers: "
          f"+{result['sandbox_overhead_ms']} ms)\n"
          f"8 threads grading at once:  {result['grades_on_8_threads_ms_each']} ms per grade")
    out = ROOT / "bench" / "results" / "grader_sandbox.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
