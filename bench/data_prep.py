"""Benchmark: data_prep build and token counting against the pandas / cookbook way.

    python bench/data_prep.py [--rows 3400000] [--out bench/results/data_prep.json]

In one run it
  1. generates (once, cached at bench/.cache/spotify_<rows>.csv) a deterministic CSV shaped like
     Kaggle's "3.4 Million Spotify Google Store Reviews" (~650 MB at 3.4M rows): empty review
     texts and app versions, quoted multi-line texts, commas, doubled quotes, emoji, non-ASCII;
  2. times, each in its own subprocess (wall time and peak RSS from os.wait4), with the file in
     the page cache: (a) the pandas notebook way (read_csv, dropna, fillna, sample 1000, 70/30
     split, json.dumps per row) with object strings, as pandas 2.x ran it when the write-up was
     made, and again with pandas 3's default Arrow-backed strings (faster, shown beside it),
     (b) ``python -m data_prep build`` with the same settings,
     (c) the same build with ``--stratify review_rating``; checks their outputs and row accounting;
  3. times token statistics over 100,000 chat examples: OpenAI cookbook's
     ``num_tokens_from_messages`` (tiktoken o200k_base) against ``data_prep.tokens.MessageCounter``,
     checking the counts agree;
  4. writes every figure to the --out JSON.
Targets: build wall time <= 0.25x and peak RSS <= 0.10x of the pandas (object strings) run; token counting >= 4x.
The table also shows, per run, the distinct user texts among the 1000 examples and the share of
them that are one of the 30 stock short reviews ("Good", "👍", ...), ~21% of the non-empty rows: a
uniform sample of rows shows about that share.
Exit status 1 when an output or a row count is wrong (targets missed alone do not fail it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path and would shadow the data_prep package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
HEADER = ",review_id,pseudo_author_id,author_name,review_text,review_rating,review_likes,author_app_version,review_timestamp\n"
SEED = 20240601
CHUNK = 100_000
SYSTEM = "You label Spotify app reviews from the Google Play Store as positive, neutral or negative."
LABELS = {"1": "negative", "2": "negative", "3": "neutral", "4": "positive", "5": "positive"}
ASSISTANT = ("{{ review_rating | lookup({'1':'negative','2':'negative','3':'neutral',"
             "'4':'positive','5':'positive'}, 'neutral') }}")
TIME_TARGET, MEM_TARGET, TOKEN_TARGET = 0.25, 0.10, 4.0

# ---------------------------------------------------------------------------------------------
# 1. The synthetic Spotify reviews CSV

SUBJECTS = ["The app", "Spotify", "Shuffle", "The new update", "Premium", "Offline mode", "The lyrics feature",
            "Podcasts", "Search", "My library", "The widget", "Downloads", "Playback", "The free version",
            "Smart shuffle", "The AI DJ", "Car mode", "The home screen", "Discover Weekly", "Spotify Connect"]
PREDICATES = [
    "keeps crashing when I open it", "stops playing after a few seconds", "works perfectly on my phone",
    "is way better than before", "is full of ads, 6 ads in a row", 'says "something went wrong" every time',
    "won't let me pick the song I want", "drains my battery like crazy", "is the best thing about this app",
    "logs me out every other day", "skips songs on its own", "has every song I could ask for",
    "takes forever to load, even on wifi", "is honestly worth the money", "plays the same 20 songs over and over",
    "disappeared after the last update", "lags on my Samsung", "won't sync with my smartwatch",
    "is so easy to use", "keeps recommending songs I hate", "needs a dark mode toggle",
    "shows lyrics out of sync", "is great for discovering new artists", "freezes when the screen turns off",
    'has a "premium only" popup on every tap', "downloads songs that then vanish", "sounds amazing with my headphones",
    "randomly pauses in the middle of a song", "got worse, bring back the old layout", "is 10/10, no complaints",
    "eats 2GB of storage", "doesn't show my playlists anymore", "has way too many podcasts pushed at me",
    "just works, every single day", "is unusable without premium", "cuts out over Bluetooth",
]
SHORT = ["Good", "Nice", "Great app!", "Love it", "Best app ever", "👍", "Love it ❤️", "Excelente", "Muy buena app",
         "Très bien", "很好用", "Ótimo app 😍", "Bagus", "Sehr gut", "Awesome", "ok", "Nice app 👌", "Worst app",
         "Too many ads", "Perfect", "I love Spotify 💚", "Ganz okay", "Очень хорошо", "最高", "good music",
         "بسیار عالی", "Mantap 🔥", "Fix shuffle!!", "meh", "5 stars ⭐⭐⭐⭐⭐"]
OPENERS = ["", "", "", "Honestly, ", "Update: ", "I've been a premium user for 5 years. ", "Ugh. ",
           "Edit: still broken. ", "First of all, ", "Love the app but ", "Why?? ", "Been using this since 2015, "]
ENDINGS = [".", ".", ".", "!", "!!", " 😡", " 😍", " ❤️", " 🎶", ". Please fix!", "", " 🙏", "...", ". 5 stars."]
FIRST = ["Ana", "John", "Siti", "Mohammed", "Maria", "Wei", "Priya", "Lucas", "Emma", "Kofi", "José", "Aylin",
         "Nguyễn", "Olga", "Hiro", "Fatima", "Liam", "Chloé", "Mateus", "Zoë"]
LAST = ["Smith", "García", "Rahman", "Silva", "Müller", "Kim", "Okafor", "Nguyen", "Rossi", "Kowalski", "O'Brien",
        "Haddad", "Tanaka", "Johnson", "Dubois", "Santos", "Patel", "Ivanova", "Lee", "Brown"]
RATINGS = "5" * 46 + "1" * 24 + "4" * 12 + "3" * 9 + "2" * 9  # roughly the real star mix


@lru_cache(maxsize=1)
def pools() -> dict:
    rng = random.Random(SEED)
    phrases = [f"{s} {p}" for s in SUBJECTS for p in PREDICATES]
    phrases += [f"{s.lower()} {p}" for s in SUBJECTS[:6] for p in PREDICATES[::3]]
    names = [f"{f} {l}" for f in FIRST for l in LAST] + ["A Google user"] * 40
    versions = [f"8.{rng.randint(4, 9)}.{rng.randint(0, 99)}.{rng.randint(100, 999)}" for _ in range(400)]
    start = dt.date(2014, 5, 27).toordinal()
    days = [dt.date.fromordinal(start + d).isoformat() for d in range(3650)]
    clock = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400)]
    likes = [0] * 80 + [1] * 8 + [2] * 4 + [3, 4, 5, 7, 9, 12, 20, 41]
    return {"phrases": phrases, "names": names, "versions": versions, "days": days, "clock": clock,
            "likes": [str(n) for n in likes]}


def review_text(rng: random.Random, p: dict) -> str:
    r = rng.random()
    if r < 0.05:
        return ""
    if r < 0.25:
        return SHORT[int(rng.random() * len(SHORT))]
    phrases = p["phrases"]
    k = 1 + int(rng.random() ** 1.5 * 3.6)  # 1..4 phrases, skewed short: ~650 MB at 3.4M rows
    parts = [phrases[int(rng.random() * len(phrases))] for _ in range(k)]
    sep = "\n" if rng.random() < 0.03 else (". " if rng.random() < 0.7 else ", ")
    return OPENERS[int(rng.random() * len(OPENERS))] + sep.join(parts) + ENDINGS[int(rng.random() * len(ENDINGS))]


def quote(s: str) -> str:
    if '"' in s or "," in s or "\n" in s or "\r" in s:
        return '"' + s.replace('"', '""') + '"'
    return s


def gen_chunk(index: int, start: int, n: int) -> bytes:
    rng = random.Random(SEED * 1_000_003 + index)
    p = pools()
    names, versions, days, clock, likes = p["names"], p["versions"], p["days"], p["clock"], p["likes"]
    rand, bits = rng.random, rng.getrandbits
    out = []
    for i in range(start, start + n):
        h = "%032x" % bits(128)
        version = "" if rand() < 0.25 else versions[int(rand() * len(versions))]
        out.append(f"{i},{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]},{10**20 + bits(66)},"
                   f"{quote(names[int(rand() * len(names))])},{quote(review_text(rng, p))},"
                   f"{RATINGS[int(rand() * 100)]},{likes[int(rand() * len(likes))]},{version},"
                   f"{days[int(rand() * 3650)]} {clock[int(rand() * 86400)]}\n")
    return "".join(out).encode("utf-8")


def generate(path: Path, rows: int) -> dict:
    """Write the CSV to a temporary name, then rename it into place (deterministic for any pool size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    t0 = time.perf_counter()
    pools()  # built before the fork, so workers inherit them
    jobs = [(i, s, min(CHUNK, rows - s)) for i, s in enumerate(range(0, rows, CHUNK))]
    try:
        with open(tmp, "wb", buffering=16 << 20) as f, ProcessPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
            f.write(HEADER.encode())
            for blob in ex.map(gen_chunk, *zip(*jobs)):
                f.write(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"generated": True, "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# 2. Timed subprocess runs

BASELINE = r"""
import json, sys
import pandas as pd
path, out, system, strings = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if strings == 'object':   # pandas 2.x behaviour, which the 2024 write-up ran on
    pd.set_option('future.infer_string', False)
label = {1: 'negative', 2: 'negative', 3: 'neutral', 4: 'positive', 5: 'positive'}
df = pd.read_csv(path)
rows_in = len(df)
df = df.dropna(subset=['review_text'])
rows_text = len(df)
df = df.fillna('')
df = df.sample(n=1000, random_state=42)
train = df.sample(frac=0.7, random_state=42)
valid = df.drop(train.index)
for name, part in (('train.jsonl', train), ('valid.jsonl', valid)):
    with open(f'{out}/{name}', 'w', encoding='utf-8') as f:
        for _, row in part.iterrows():
            messages = [{'role': 'system', 'content': system},
                        {'role': 'user', 'content': str(row['review_text'])},
                        {'role': 'assistant', 'content': label.get(int(row['review_rating']), 'neutral')}]
            f.write(json.dumps({'messages': messages}) + '\n')
print(json.dumps({'rows_in': rows_in, 'empty_review_text': rows_in - rows_text, 'pandas': pd.__version__}))
"""


def timed(cmd: list[str], cwd: Path) -> dict:
    """Run cmd; wall seconds and the child's peak RSS (ru_maxrss, KiB on Linux)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "rc": proc.returncode,
                "stdout": out.read().decode(errors="replace")[-2000:],
                "stderr": err.read().decode(errors="replace")[-2000:]}


def outputs(out: str) -> dict:
    """Lines per file, and how clumped the sample is: distinct user texts, the largest group of copies."""
    res, users = {"rows_out": {}}, []
    for name in ("train", "valid"):
        with open(Path(out, f"{name}.jsonl"), encoding="utf-8") as f:
            lines = f.readlines()
        res["rows_out"][name] = len(lines)
        users += [next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user") for line in lines]
    res["distinct_user_texts"] = len(set(users))
    res["largest_duplicate_group"] = max(Counter(users).values(), default=0)
    res["short_review_share"] = round(sum(u in SHORT for u in users) / max(1, len(users)), 3)
    return res


def run_baseline(csv_path: Path, strings: str = "object") -> dict:
    """The write-up's pandas code; strings='object' as pandas 2.x ran it, 'arrow' pandas 3's default."""
    with tempfile.TemporaryDirectory() as out:
        r = timed([sys.executable, "-c", BASELINE, str(csv_path), out, SYSTEM, strings], ROOT)
        if r["rc"] == 0:
            r["info"] = json.loads(r["stdout"].strip().splitlines()[-1])
            r.update(outputs(out))
    return r


def run_build(csv_path: Path, stratify: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "data_prep", "build", "--input", str(csv_path), "--out", out,
               "--system", SYSTEM, "--user", "{{ review_text }}", "--assistant", ASSISTANT,
               "--dropna", "review_text", "--sample", "1000", "--valid-fraction", "0.3", "--seed", "42", "-q"]
        r = timed(cmd + (["--stratify", "review_rating"] if stratify else []), ROOT)
        if r["rc"] == 0:
            rep = json.loads(Path(out, "report.json").read_text())
            r.update(outputs(out))
            r["report"] = {k: rep.get(k) for k in ("rows_in", "rows_out", "rows_dropped", "labels", "elapsed_s")}
    return r


def check(name: str, r: dict, rows: int, empty_text: int | None) -> list[str]:
    """Problems with one run's outputs (an empty list when all is well)."""
    if r["rc"] != 0:
        return [f"{name}: exit {r['rc']}: {r['stderr'].strip()[-500:]}"]
    problems = []
    ro = r["rows_out"]
    # data_prep keeps identical examples on one side of the split, so it may miss 700/300 by a group's size
    if sum(ro.values()) != 1000 or abs(ro["valid"] - 300) > 10:
        problems.append(f"{name}: train/valid lines {ro['train']}/{ro['valid']}, expected ~700/300")
    rep = r.get("report")
    if rep:
        accounted = sum(rep["rows_out"].values()) + sum(rep["rows_dropped"].values())
        if rep["rows_in"] != accounted or rep["rows_in"] != rows:
            problems.append(f"{name}: rows_in {rep['rows_in']:,}, accounted {accounted:,}, file has {rows:,}")
        if rep["rows_out"] != ro:
            problems.append(f"{name}: report rows_out {rep['rows_out']} but files hold {ro}")
        if empty_text is not None and rep["rows_dropped"].get("empty:review_text") != empty_text:
            problems.append(f"{name}: dropped {rep['rows_dropped'].get('empty:review_text')} empty texts, "
                            f"pandas found {empty_text}")
    elif r["info"]["rows_in"] != rows:
        problems.append(f"{name}: pandas read {r['info']['rows_in']:,} rows, file has {rows:,}")
    return problems


# ---------------------------------------------------------------------------------------------
# 3. Token counting

def num_tokens_from_messages(messages, encoding, tokens_per_message=3, tokens_per_name=1):
    """OpenAI cookbook (How to format inputs to ChatGPT models / fine-tuning data prep)."""
    num_tokens = 0
    for message in messages:
        num_tokens += tokens_per_message
        for key, value in message.items():
            num_tokens += len(encoding.encode(value))
            if key == "name":
                num_tokens += tokens_per_name
    num_tokens += 3
    return num_tokens


def token_bench(csv_path: Path, n: int, repeat: int = 3) -> dict:
    import tiktoken
    from data_prep.tokens import MessageCounter, ensure_o200k_cached

    ensure_o200k_cached()
    with open(csv_path, encoding="utf-8", newline="") as f:
        texts = itertools.islice((row[4] for row in csv.reader(itertools.islice(f, 1, None)) if row[4].strip()), n)
        examples = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t},
                     {"role": "assistant", "content": LABELS[str(i % 5 + 1)]}] for i, t in enumerate(texts)]
    encoding = tiktoken.get_encoding("o200k_base")
    num_tokens_from_messages(examples[0], encoding)  # warm both up (lazy loading, regex compile)
    # the counter `data_prep stats` builds for a file of this many examples
    make_counter = lambda: MessageCounter("gpt-4o-mini-2024-07-18", expected_examples=len(examples))  # noqa: E731
    make_counter().messages(examples[0])

    t_cookbook = t_ours = float("inf")
    for _ in range(repeat):  # best of `repeat`, alternating, each MessageCounter fresh (empty cache)
        t0 = time.perf_counter()
        cookbook = [num_tokens_from_messages(ex, encoding) for ex in examples]
        t_cookbook = min(t_cookbook, time.perf_counter() - t0)
        counter = make_counter()
        t0 = time.perf_counter()
        ours = [counter.messages(ex) for ex in examples]
        t_ours = min(t_ours, time.perf_counter() - t0)
    mismatches = sum(a != b for a, b in zip(cookbook, ours))
    return {"examples": len(examples), "repeat": repeat, "distinct_user_texts": len({ex[1]["content"] for ex in examples}),
            "total_tokens": sum(ours), "mismatches": mismatches,
            "cookbook_s": round(t_cookbook, 3), "cookbook_examples_per_s": round(len(examples) / t_cookbook),
            "message_counter_s": round(t_ours, 3), "message_counter_examples_per_s": round(len(examples) / t_ours),
            "speedup": round(t_cookbook / t_ours, 2), "target_speedup": TOKEN_TARGET,
            "pass": mismatches == 0 and t_cookbook / t_ours >= TOKEN_TARGET}


# ---------------------------------------------------------------------------------------------

def warm(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_400_000, help="rows in the generated CSV (default 3,400,000)")
    ap.add_argument("--out", default="bench/results/data_prep.json", help="results JSON (default %(default)s)")
    ap.add_argument("--token-examples", type=int, default=100_000, help="chat examples to count (default 100,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command; the median is reported")
    args = ap.parse_args(argv)

    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "processor": platform.processor() or platform.machine()}
    print(f"machine: {machine['cpu_count']} CPUs, {machine['platform']}, Python {machine['python']}")
    results: dict = {"machine": machine, "rows": args.rows}

    csv_path = ROOT / "bench" / ".cache" / f"spotify_{args.rows}.csv"
    gen = generate(csv_path, args.rows) if not csv_path.exists() else {"generated": False, "seconds": 0.0}
    gen["bytes"] = csv_path.stat().st_size
    gen["path"] = str(csv_path)
    results["generation"] = gen
    print(f"data: {csv_path} ({gen['bytes'] / 1e6:,.0f} MB, {args.rows:,} rows) "
          + (f"generated in {gen['seconds']:.1f} s" if gen["generated"] else "cached"))
    results["page_cache_read_s"] = round(warm(csv_path), 2)
    print(f"read once into the page cache: {results['page_cache_read_s']:.2f} s")

    runs = {}
    for name, fn in (("pandas baseline", lambda: run_baseline(csv_path, "object")),
                     ("pandas 3 Arrow strings", lambda: run_baseline(csv_path, "arrow")),
                     ("data_prep build", lambda: run_build(csv_path, False)),
                     ("data_prep build --stratify", lambda: run_build(csv_path, True))):
        print(f"running {name} (median of {args.repeat}) ...", flush=True)
        tries = sorted((fn() for _ in range(args.repeat)), key=lambda r: r["wall_s"])
        runs[name] = {**tries[len(tries) // 2], "wall_s_all": [r["wall_s"] for r in tries]}
    base = runs["pandas baseline"]
    empty_text = base.get("info", {}).get("empty_review_text")
    problems = [p for name, r in runs.items() for p in check(name, r, args.rows, empty_text)]
    notes = [f"{name}: {r['distinct_user_texts']} distinct user texts in 1000, {r['short_review_share']:.1%} "
             f"short reviews (pandas' uniform sample: {base['distinct_user_texts']}, {base['short_review_share']:.1%}):"
             " the sample is not uniform over rows"
             for name, r in runs.items() if r is not base and r["rc"] == 0 and base["rc"] == 0
             and (r["distinct_user_texts"] < 0.95 * base["distinct_user_texts"]
                  or abs(r["short_review_share"] - base["short_review_share"]) > 0.06)]

    print(f"\n{'run':<28} {'train/valid':>11} {'distinct':>8} {'short %':>7} {'wall s':>7} {'peak RSS MB':>11} "
          f"{'time x':>7} {'mem x':>7}  targets (time <= {TIME_TARGET}x, mem <= {MEM_TARGET}x)")
    for name, r in runs.items():
        split = f"{r['rows_out']['train']}/{r['rows_out']['valid']}" if r["rc"] == 0 else f"exit {r['rc']}"
        line = (f"{name:<28} {split:>11} {r.get('distinct_user_texts', 0):>8} {r.get('short_review_share', 0) * 100:>7.1f} "
                f"{r['wall_s']:>7.2f} {r['peak_rss_mb']:>11.1f}")
        if name.startswith("data_prep") and base["rc"] == 0:
            arrow = runs["pandas 3 Arrow strings"]
            r["time_ratio_vs_pandas3_arrow"] = round(r["wall_s"] / arrow["wall_s"], 3)
            r["mem_ratio_vs_pandas3_arrow"] = round(r["peak_rss_mb"] / arrow["peak_rss_mb"], 3)
            r["time_ratio"] = round(r["wall_s"] / base["wall_s"], 3)
            r["mem_ratio"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
            r["time_pass"] = r["time_ratio"] <= TIME_TARGET and r["rc"] == 0
            r["mem_pass"] = r["mem_ratio"] <= MEM_TARGET and r["rc"] == 0
            line += (f" {r['time_ratio']:>6.3f}x {r['mem_ratio']:>6.3f}x  time {'PASS' if r['time_pass'] else 'FAIL'},"
                     f" mem {'PASS' if r['mem_pass'] else 'FAIL'}   (vs pandas 3 Arrow strings: time "
                     f"{r['time_ratio_vs_pandas3_arrow']:.3f}x, mem {r['mem_ratio_vs_pandas3_arrow']:.3f}x)")
        print(line)
    results["runs"] = runs

    print(f"\ntoken counting over {args.token_examples:,} chat examples (best of 3) ...", flush=True)
    tok = token_bench(csv_path, args.token_examples)
    results["tokens"] = tok
    print(f"{'cookbook num_tokens_from_messages':<36} {tok['cookbook_examples_per_s']:>10,} examples/s")
    print(f"{'data_prep MessageCounter.messages':<36} {tok['message_counter_examples_per_s']:>10,} examples/s")
    print(f"speed-up {tok['speedup']:.2f}x (target >= {TOKEN_TARGET}x): {'PASS' if tok['pass'] else 'FAIL'}; "
          f"count mismatches: {tok['mismatches']}")
    if tok["mismatches"]:
        problems.append(f"tokens: {tok['mismatches']} examples counted differently")

    results["problems"], results["notes"] = problems, notes
    for p in notes:
        print(f"NOTE: {p}")
    for p in problems:
        print(f"PROBLEM: {p}")
    out = Path(args.out)
    out = out if out.is_absolute() else Path.cwd() / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
