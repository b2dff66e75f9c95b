"""Ask one question from the shell, on either backend.

    python -m serve.chat "Where is my card?"
    python -m serve.chat --config configs/banking77/serve.yaml --backend local --model finetuned --stream "..."
    LLM_BACKEND=openai python -m serve.chat --model finetuned "..."

--model takes an alias (base, finetuned, an adapter name) or a model id. The system message is the
config's ``system`` (the one the model was trained with); ``--system`` replaces it. Prints the answer, then latency and tokens on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from tunekit.errors import run_main

from .client import load_backend


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", help="the user message")
    p.add_argument("--config", help="serve.yaml (backend, server, openai and sampling sections)")
    p.add_argument("--backend", choices=["local", "openai"], help="overrides the config and LLM_BACKEND")
    p.add_argument("--model", default="finetuned", help="alias or model id (default: finetuned)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, help="overrides sampling.max_tokens")
    p.add_argument("--temperature", type=float, help="overrides sampling.temperature")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    args = p.parse_args(argv)

    backend = load_backend(args.config, args.backend)
    model = backend.resolve(args.model)
    system = args.system if args.system is not None else backend.settings.system
    messages = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": args.text}]
    kwargs = backend.sampling_kwargs(max_tokens=args.max_tokens, temperature=args.temperature)
    client = backend.client()
    t0 = time.perf_counter()
    try:
        if args.stream:
            usage = None
            stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, **kwargs)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    sys.stdout.write(chunk.choices[0].delta.content)
                    sys.stdout.flush()
                usage = chunk.usage or usage
            print()
        else:
            reply = client.chat.completions.create(model=model, messages=messages, **kwargs)
            print(reply.choices[0].message.content)
            usage = reply.usage
    except Exception as e:  # noqa: BLE001 - every API error becomes one line naming the fix
        raise backend.explain(e, model) from None
    tokens = f", {usage.prompt_tokens} in / {usage.completion_tokens} out tokens" if usage else ""
    print(f"[{backend.name} {model}: {time.perf_counter() - t0:.2f} s{tokens}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
