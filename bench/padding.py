"""Benchmark: how much of a padded training batch is padding, with and without length grouping.

    python bench/padding.py                                    # the full task's train split, batch 8
    python bench/padding.py --data runs/demo/data/train.jsonl --batch 16

Tokenises every example of ``--data`` with the model's chat template (the text train/sft.py trains
on) and walks one epoch the way the trainer does: with ``train_sampling_strategy: group_by_length``
(transformers' LengthGroupedSampler, what the CPU profile sets) and in random batches (the default
sampler). Printed for each: real tokens, padding tokens and padding's share of what a step computes,
the most that padding-free batches (``padding_free: true``) could save. No training, seconds to run.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def padding(lengths: list[int], order: list[int], batch: int) -> tuple[int, int]:
    real = pad = 0
    for i in range(0, len(order), batch):
        chunk = [lengths[j] for j in order[i:i + batch]]
        real += sum(chunk)
        pad += max(chunk) * len(chunk) - sum(chunk)
    return real, pad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="runs/banking77/data/train.jsonl", help="chat JSONL (data_prep build)")
    ap.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct", help="tokenizer and chat template")
    ap.add_argument("--batch", type=int, default=8, help="per-device train batch size")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from train.chat_data import load_chat_jsonl, resolve_chat_template
    from tunekit.errors import UserError

    path = ROOT / args.data if not Path(args.data).is_absolute() else Path(args.data)
    if not path.is_file():
        raise SystemExit(f"error: --data {args.data} not found; build it first (make demo-full builds "
                         "runs/banking77/data)")
    try:
        rows = load_chat_jsonl(str(path), "--data")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    tok = AutoTokenizer.from_pretrained(ROOT / args.model if (ROOT / args.model).exists() else args.model)
    template = resolve_chat_template(tok, None)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, chat_template=template) for r in rows]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    g = torch.Generator()
    g.manual_seed(args.seed)
    grouped = list(LengthGroupedSampler(args.batch, lengths=lengths, generator=g))
    shuffled = list(range(len(lengths)))
    random.Random(args.seed).shuffle(shuffled)
    print(f"{args.data}: {len(lengths)} examples, batch {args.batch}")
    for name, order in (("group_by_length", grouped), ("random", shuffled)):
        real, pad = padding(lengths, order, args.batch)
        print(f"  {name:>15}: {real:,} real tokens, {pad:,} padding ({pad / (real + pad):.1%} of what is computed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
