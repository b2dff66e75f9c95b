"""notebooks/colab_t4.ipynb, executed end to end on the CPU with a tiny profile.

The notebook's `parameters` cell holds the T4 values; like papermill, the test inserts a cell after
it with CPU values (SmolLM2-135M-Instruct from `make model`, 2 training steps on 200 card queries,
the vLLM CPU server on a free port, 10 held-out queries) and runs every cell in a real kernel
(nbclient). When a cell fails, the cells tagged `cleanup` still run, and the test then stops any
process group the notebook recorded, so nothing outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SMOL, free_port

NOTEBOOK = ROOT / "notebooks/colab_t4.ipynb"


def cells_with_tag(nb, tag: str) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]


def test_notebook_is_committed_clean_and_tagged():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    params = cells_with_tag(nb, "parameters")
    assert len(params) == 1 and 'PROFILE = "t4"' in nb.cells[params[0]].source
    assert cells_with_tag(nb, "cleanup") == [len(nb.cells) - 1], "the last cell stops what the notebook started"
    text = "\n".join(c.source for c in nb.cells)
    for command in ('pip install -q -c requirements/constraints.txt -e ".[gpu]"', "python -m train.hardware --require-cuda",
                    "python -m data_prep build",
                    "python -m data_prep stats", "accelerate launch", "serve.vllm_server", "python -m serve.compare",
                    "serve.ui"):
        assert command in text, command
    assert nb.metadata["colab"]["gpuType"] == "T4"


def test_helpers_fail_loudly_and_stop_whole_process_groups(tmp_path, capsys):
    """The helpers cell on its own: `sh` raises on a failing command; `stop_all` ends a recorded
    process and its children (one process group), then forgets it."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    helpers = next(c.source for c in nb.cells if c.cell_type == "code" and "def stop_all" in c.source)
    ns = {"WORK_DIR": str(tmp_path)}
    exec(compile(helpers, "helpers", "exec"), ns)
    ns["sh"]("echo hello")
    assert "hello" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="exit status 3"):
        ns["sh"]("exit 3")
    log = tmp_path / "bg.out"
    proc = ns["start"]("sleeper", ["sh", "-c", "sleep 300 & echo started; wait"], log)
    ns["wait_for"](proc, log, "started", timeout=30)
    ns["stop_all"](grace=10)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    assert not (tmp_path / "pids.txt").exists() and "stopped sleeper" in capsys.readouterr().out


def cpu_parameters(tmp: Path, server_port: int, ui_port: int) -> str:
    values = {
        "PROFILE": "cpu",
        "REPO_DIR": str(ROOT),
        "BUILD_CONFIG": "configs/banking77/build_cards.yaml",
        "BUILD_ARGS": "--sample 200",
        "DATA_DIR": str(tmp / "data"),
        "TEST_DIR": str(tmp / "test"),
        "SFT_CONFIG": "configs/banking77/sft_cpu.yaml",
        "MODEL": str(SMOL),
        "MAX_STEPS": 2,
        "ACCELERATE_ARGS": "--quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no",
        # no evaluation pass: on 2 busy cores it costs more than the two training steps
        "SFT_ARGS": "--per_device_train_batch_size 4 --max_length 128 --warmup_steps 0 --logging_steps 1 "
                    "--save_steps 2 --eval_strategy no",
        "RUN_DIR": str(tmp / "sft"),
        "SERVE_CONFIG": "configs/banking77/serve_cards.yaml",
        "COMPARE_CONFIG": "configs/banking77/compare_cards.yaml",
        "COMPARE_DIR": str(tmp / "compare"),
        "LIMIT": 10,
        "SERVER_PORT": server_port,
        "UI_PORT": ui_port,
        "WORK_DIR": str(tmp / "work"),
    }
    return "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())


def kill_leftovers(work: Path, ports: tuple[int, ...]) -> list[str]:
    """SIGKILL what the notebook left: the process groups in WORK_DIR/pids.txt and anything holding
    `--port P` for the test's own free ports (vLLM runs in its own session). Returns what was killed."""
    killed = []
    pids = work / "pids.txt"
    if pids.exists():
        for line in pids.read_text().splitlines():
            pid = int(line.split()[0])
            try:
                os.killpg(pid, signal.SIGKILL)
                killed.append(line)
            except ProcessLookupError:
                pass
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(args[i:i + 2] == [b"--port", str(p).encode()] for p in ports for i in range(len(args))):
            try:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
                killed.append(b" ".join(args[:4]).decode(errors="replace"))
            except ProcessLookupError:
                pass
    return killed


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        for mime in ("text/markdown", "text/plain"):
            if mime in out.get("data", {}):
                parts.append(out["data"][mime])
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    assert (SMOL / "config.json").is_file(), f"{SMOL} missing: run `make model` (make test does)"
    server_port, ui_port = free_port(), free_port()
    while ui_port == server_port:
        ui_port = free_port()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = cells_with_tag(nb, "parameters")[0] + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(cpu_parameters(tmp_path, server_port, ui_port),
                                                  metadata={"tags": ["injected-parameters"]}))
    cleanup = set(cells_with_tag(nb, "cleanup"))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TUNEKIT_API_KEY", None)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", coalesce_streams=True,
                            resources={"metadata": {"path": str(ROOT)}})
    client.reset_execution_trackers()
    failure, t0 = None, time.monotonic()
    try:
        with client.setup_kernel(env=env, cwd=str(ROOT)):
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code" or (failure and i not in cleanup):
                    continue
                try:
                    client.execute_cell(cell, i, execution_count=client.code_cells_executed + 1)
                except CellExecutionError as e:
                    if failure or i in cleanup:
                        raise
                    failure = e
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure
        leftovers = kill_leftovers(tmp_path / "work", (server_port, ui_port))
    elapsed = time.monotonic() - t0
    if failure:
        raise failure
    assert not leftovers, f"the last cell left processes running: {leftovers}"
    for port in (server_port, ui_port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # raises if something still listens

    # Every step left its files, with the paths the parameters gave.
    assert (tmp_path / "data/train.jsonl").is_file() and (tmp_path / "test/train.jsonl").is_file()
    assert (tmp_path / "sft/adapter_config.json").is_file() and (tmp_path / "sft/loss.png").is_file()
    metrics = json.loads((tmp_path / "compare/metrics.json").read_text())
    by = {m["alias"]: m for m in metrics["models"]}
    assert {"base", "finetuned", "tfidf-logreg"} <= set(by)
    for alias in ("base", "finetuned"):
        assert by[alias]["n"] == 10 and by[alias]["answered"] == 10 and not by[alias]["failed"], by[alias]

    # The outputs show what a user looks at: the server's ready line, the report table, the plots, the UI.
    text = {i: outputs_text(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    everything = "\n".join(text.values())
    assert "ready in" in everything and "models: SmolLM2-135M-Instruct, finetuned" in everything
    report = [c for c in nb.cells if any("text/markdown" in o.get("data", {}) for o in c.get("outputs", []))]
    assert report and "| finetuned (`finetuned`) |" in outputs_text(report[0])
    assert "| base (`SmolLM2-135M-Instruct`) |" in outputs_text(report[0])
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 4  # token histogram, loss curve, comparison plots
    assert everything.count("$ python -m serve.chat") == 2  # one question to each model
    assert "GET / -> HTTP 200" in everything
    assert "stopped vllm_server" in everything and "stopped ui" in everything
    print(f"notebook executed in {elapsed:.0f} s")
