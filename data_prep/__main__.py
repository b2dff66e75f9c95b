"""data_prep: CSV / JSONL / Parquet in, validated chat (or DPO preference) JSONL out.

    python -m data_prep build --config configs/banking77/build.yaml
    python -m data_prep validate runs/demo/data/train.jsonl runs/demo/data/valid.jsonl
    python -m data_prep validate prefs.jsonl --method dpo
    python -m data_prep stats runs/demo/data/train.jsonl --epochs 3

Run ``python -m data_prep COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.errors import run_main



def cmd_build(args) -> int:
    from tunekit.config import flag_overrides, load_config

    from .build import BuildConfig, build

    cfg = load_config(BuildConfig, args.config, flag_overrides(args, args.config_flags))
    report = build(cfg, progress=not args.quiet)
    out = Path(cfg.out)
    ro, tk = report["rows_out"], report["tokens"]
    print(f"{report['input']}: {report['rows_in']:,} rows in -> train {ro['train']:,}, valid {ro['valid']:,}")
    for reason, n in report["rows_dropped"].items():
        print(f"  dropped {n:,} ({reason})")
    if tk["train"]["examples"]:
        t = tk["train"]
        print(f"  train tokens ({tk['model']}): {t['total']:,} total, mean {t['mean']}, max {t['max']}")
    print(f"wrote {out / 'train.jsonl'}, {out / 'valid.jsonl'}, {out / 'report.json'}")
    return 0


def _method_of(path: str, method: str) -> str | None:
    """The format to check ``path`` as; None when it cannot be read (validate_file says why)."""
    from tunekit.errors import UserError

    from .validate import detect_method

    if method != "auto":
        return method
    try:
        return detect_method(path)
    except UserError:
        return None


def cmd_validate(args) -> int:
    from .validate import validate_file

    from .stats import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    bad = 0
    for f in args.files:
        method = _method_of(f, args.method)
        n, problems = validate_file(f, args.model, tokenizer, args.max_length, method=method)
        for p in problems:
            print(p)
        bad += bool(problems)
        checked = {"supervised": " (supervised format)", "dpo": " (DPO format)",
                   "reinforcement": " (reinforcement format)"}.get(method, "")
        print(f"{f}: {n} examples{checked}, {len(problems)} problem(s)" + ("" if problems else ": valid"),
              file=sys.stderr)
    return 1 if bad else 0


def cmd_stats(args) -> int:
    from .stats import PRICES_FILE, compute, format_text, histogram

    results = []
    for f in args.files:
        path = Path(f)
        s = compute(path, args.model, args.tokenizer, args.epochs, Path(args.prices or PRICES_FILE))
        if not args.no_plot:
            plot = Path(args.plot) if args.plot and len(args.files) == 1 else path.with_name(path.stem + "_tokens.png")
            s["plot"] = str(histogram(s["counts"], plot, f"{path.name}: tokens per example ({s['tokenizer']})",
                                      s["limit"]))
        s.pop("counts")
        results.append(s)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        print("\n".join(format_text(s) for s in results))
    return 0


def parser() -> argparse.ArgumentParser:
    from tunekit.config import add_dataclass_flags

    from .build import BuildConfig

    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="CSV/JSONL/Parquet -> train.jsonl, valid.jsonl, report.json",
                       description="Build chat fine-tuning files. Config keys mirror the flags "
                                   "(valid_fraction for --valid-fraction); flags override the config.",
                       )
    b.add_argument("--config", default=None, help="YAML file whose keys mirror these flags")
    flags = add_dataclass_flags(b, BuildConfig, metavars={"derive": "COL=TEMPLATE", "dropna": "COL",
                                                          "fillna": "COL=VALUE", "sample": "N",
                                                          "valid_fraction": "F", "stratify": "COL", "max_tokens": "N"})
    b.add_argument("-q", "--quiet", action="store_true", default=False, help="no progress bar")
    b.set_defaults(func=cmd_build, config_flags=flags)

    v = sub.add_parser("validate", help="check chat or DPO JSONL against OpenAI's rules (and a local model's)",
                       description="Exit status 0 when every file is valid, 1 when not. "
                                   "Problems print as FILE:LINE: code: message (line 0: the whole file).")
    v.add_argument("files", nargs="+", metavar="FILE.jsonl")
    v.add_argument("--model", default=DEFAULT_OPENAI_MODEL, help="OpenAI model (token limit, tokenizer)")
    v.add_argument("--tokenizer", help="local model/tokenizer folder: also check its chat template renders")
    v.add_argument("--max-length", dest="max_length", type=int, help="with --tokenizer: longest allowed example")
    v.add_argument("--method", choices=("auto", "supervised", "dpo", "reinforcement"), default="auto",
                   help="file format: supervised ({messages}), dpo ({input, preferred_output, "
                        "non_preferred_output}), reinforcement ({messages ending with the user's turn, <item "
                        "fields>}), or auto: from the first JSON object (default)")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("stats", help="token counts, epochs and the OpenAI training-cost estimate",
                       description="Token statistics per example, the default-epochs heuristic, the "
                                   "estimated training cost and a histogram PNG. A DPO file is "
                                   "recognised by its keys: prompt, preferred and non-preferred tokens.")
    s.add_argument("files", nargs="+", metavar="FILE.jsonl")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--model", default=DEFAULT_OPENAI_MODEL, help=f"OpenAI model (default {DEFAULT_OPENAI_MODEL})")
    g.add_argument("--tokenizer", help="count with a local tokenizer's chat template instead")
    s.add_argument("--epochs", type=int, help="epochs to price (default: OpenAI's heuristic)")
    s.add_argument("--prices", help="prices YAML (default tunekit/prices.yaml)")
    s.add_argument("--plot", help="histogram PNG path (default FILE_tokens.png beside the file)")
    s.add_argument("--no-plot", action="store_true")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    def run(argv):
        args = parser().parse_args(argv)
        return args.func(args)

    # outputs are written atomically at the end, so an interrupted command leaves nothing half-written
    return run_main(run, argv, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
