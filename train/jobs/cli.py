"""The command line: one subcommand per job command (``tunekit jobs`` and ``python -m train.jobs`` run main)."""

from __future__ import annotations

import argparse

import train.jobs
from train.jobs import migrate
from train.jobs.client import BACKENDS
from train.jobs.create import OpenAIJobConfig, cmd_create
from train.jobs.follow import cmd_follow
from train.jobs.results import cmd_cancel, cmd_checkpoints, cmd_list, cmd_results, cmd_status
from tunekit.config import add_dataclass_flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunekit jobs", description=train.jobs.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="openai (api.openai.com, OPENAI_API_KEY) or local (serve.finetune_api, TUNEKIT_API_KEY)"
                             "; default: the one the job was created with")
        sp.add_argument("--base-url", dest="base_url", help="API address, e.g. http://127.0.0.1:8100/v1")
        sp.add_argument("--jobs-dir", dest="jobs_dir", help="job records (default runs/openai_jobs)")
        sp.add_argument("--max-retries", dest="max_retries", type=int, default=5,
                        help="retries per request on 429/5xx/timeouts (default 5)")
        sp.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")

    c = sub.add_parser("create", help="validate, estimate the cost, upload the files and create the job",
                       description="Keys of the YAML mirror the flags (n_epochs for --n-epochs); flags override it.")
    c.add_argument("--config", help="configs/<use_case>/openai.yaml")
    flags = add_dataclass_flags(c, OpenAIJobConfig, exclude=("assume_yes",), metavars={
        "train_file": "FILE.jsonl", "valid_file": "FILE.jsonl", "seed": "N", "n_epochs": "N|auto",
        "batch_size": "N|auto", "learning_rate_multiplier": "X|auto", "base_url": "URL", "jobs_dir": "DIR",
        "max_retries": "N", "timeout_s": "S", "poll_interval_s": "S"})
    # assume_yes's flag keeps its short spelling, --yes (--assume-yes too); not given = the config decides
    c.add_argument("--yes", "--assume-yes", "--assume_yes", dest="assume_yes", action="store_const", const=True,
                   default=None, help="create a paid OpenAI job without asking (config key assume_yes)")
    c.set_defaults(config_flags=[*flags, "assume_yes"])
    c.set_defaults(fn=cmd_create)

    f = sub.add_parser("follow", help="events and metrics until the job ends (Ctrl-C detaches)")
    f.add_argument("job_id")
    common(f)
    f.add_argument("--interval", type=float, help="seconds between polls (default: the config's poll_interval_s, 10)")
    f.add_argument("--max-failures", dest="max_failures", type=int, default=20,
                   help="consecutive failed polls before giving up (default 20)")
    f.set_defaults(fn=cmd_follow)

    ls = sub.add_parser("list", help="recent fine-tuning jobs")
    common(ls)
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(fn=cmd_list)

    for name, fn, help_ in (("status", cmd_status, "a job's status, hyperparameters and files"),
                            ("cancel", cmd_cancel, "cancel a job"),
                            ("checkpoints", cmd_checkpoints, "a job's checkpoints and their metrics")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("job_id")
        common(sp)
        sp.set_defaults(fn=fn)

    r = sub.add_parser("results", help="download the result CSV and plot loss and accuracy (train vs valid)")
    r.add_argument("job_id")
    common(r)
    r.add_argument("--out", help="folder for results.csv and results.png (default runs/openai_jobs/JOB_ID)")
    r.set_defaults(fn=cmd_results)

    m = sub.add_parser("migrate", help="re-create OpenAI fine-tuning jobs on the local fine-tuning API",
                       description=migrate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    migrate.add_flags(m)
    m.set_defaults(fn=migrate.cmd_migrate)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.fn(args)
