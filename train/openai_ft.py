"""Compatibility module: the job client lives in train/jobs/ (``tunekit jobs``, ``python -m train.jobs``).

``python -m train.openai_ft ...`` and ``from train.openai_ft import NAME`` keep working. To patch a
name in a test, patch it on the train.jobs module that looks it up (train.jobs.client.make_client,
...): rebinding the re-export here does not reach the code in train/jobs/.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for `python train/openai_ft.py`
    sys.path.insert(0, str(ROOT))

from train.jobs.cli import main, parser  # noqa: E402
from train.jobs.client import (BACKENDS, JOBS_DIR, TERMINAL, api_call, backend_flags, client_for,  # noqa: E402
                               explain, jobs_dir, make_client, read_record, server_url, transient, write_record)
from train.jobs.create import (OpenAIJobConfig, check_files, cmd_create, cost_lines, job_kwargs,  # noqa: E402
                               sha256, upload)
from train.jobs.follow import DeferredInterrupt, cmd_follow, finish, format_event, new_events  # noqa: E402
from train.jobs.results import (cmd_cancel, cmd_checkpoints, cmd_list, cmd_results, cmd_status,  # noqa: E402
                                decode_result, job_line, plot_results)

__all__ = [
    "BACKENDS", "JOBS_DIR", "TERMINAL", "api_call", "backend_flags", "client_for", "explain", "jobs_dir",
    "make_client", "read_record", "server_url", "transient", "write_record",
    "OpenAIJobConfig", "check_files", "cmd_create", "cost_lines", "job_kwargs", "sha256", "upload",
    "DeferredInterrupt", "cmd_follow", "finish", "format_event", "new_events",
    "cmd_cancel", "cmd_checkpoints", "cmd_list", "cmd_results", "cmd_status", "decode_result", "job_line",
    "plot_results", "main", "parser",
]

if __name__ == "__main__":
    from tunekit.errors import run_main

    sys.exit(run_main(main))
