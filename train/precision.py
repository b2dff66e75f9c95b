"""Precision on a GPU: what the device can compute, and the dtypes QLoRA must train in.

Three facts these helpers encode (each read from the pinned libraries' source):

- ``torch.cuda.is_bf16_supported()`` counts emulation (``including_emulation=True`` by default) and
  answers True on a T4 (Turing, compute capability 7.5), where bf16 runs emulated or not at all.
  bf16 needs compute capability 8.0 (Ampere) or newer: ``gpu_has_bf16`` checks that.
- TRL 1.16's ``SFTTrainer.__init__`` casts every trainable parameter of a quantized model to
  bfloat16. Under fp16 mixed precision the GradScaler then fails at the first optimizer step
  (``"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16'``), and fp16
  master weights would lose small updates anyway: ``keep_trainable_fp32`` puts them back in fp32,
  after the trainer is built and before its optimizer exists.
- A loss (or the logits' entropy) that is NaN or infinite in the first logging steps means the run is wasted (fp16 overflow,
  a learning rate far too high): ``FiniteLossGuard`` stops it with the likely cause and the fix.
"""

from __future__ import annotations

import math
import sys

from transformers import TrainerCallback

from tunekit.errors import UserError

BF16_MIN_CAPABILITY = (8, 0)


def gpu_capability(device: int = 0) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def gpu_has_bf16(device: int = 0) -> bool:
    """True where the GPU computes bf16 natively (compute capability >= 8.0), never by emulation."""
    cap = gpu_capability(device)
    return cap is not None and cap >= BF16_MIN_CAPABILITY


def gpu_description(device: int = 0) -> str:
    import torch

    cap = gpu_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})" if cap else "no CUDA GPU"


def precision_problems(training, model_args) -> list[str]:
    """Precision settings this machine cannot run, each naming the config key and the fix."""
    import torch

    problems = []
    cuda = torch.cuda.is_available()
    if training.fp16 and training.bf16:
        problems.append("fp16/bf16: choose one (a T4 has fp16 only)")
    if cuda and not gpu_has_bf16():
        gpu = gpu_description()
        if training.bf16:
            problems.append(f"bf16: {gpu} has no bf16 (it needs compute capability 8.0, Ampere or newer); "
                            "set bf16: false and fp16: true")
        if model_args.dtype == "bfloat16":
            problems.append(f"dtype: {gpu} has no bf16; set dtype: float16")
        if getattr(model_args, "bnb_4bit_compute_dtype", None) == "bfloat16" and model_args.load_in_4bit:
            problems.append(f"bnb_4bit_compute_dtype: {gpu} has no bf16; set bnb_4bit_compute_dtype: float16")
    if training.fp16 and not cuda:
        problems.append("fp16: mixed precision fp16 needs a CUDA GPU; on CPU set fp16: false "
                        "(and use_cpu: true)")
    return problems


def keep_trainable_fp32(model) -> int:
    """Cast every trainable parameter that is not fp32 to fp32; returns how many were cast.

    Call it after ``SFTTrainer(...)`` and before ``trainer.train()`` when fp16 mixed precision is on
    (the optimizer is created in ``train()``, so it then holds the fp32 parameters).
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


class FiniteLossGuard(TrainerCallback):
    """Stops the run when a logged training loss in the first ``first_logs`` logging steps is not finite."""

    def __init__(self, precision: str, first_logs: int = 3):
        self.precision = precision
        self.first_logs = first_logs
        self.seen = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.seen >= self.first_logs:
            return
        self.seen += 1
        # NaN logits can show as a loss of 0.0 with a NaN entropy (TRL logs the entropy of the logits);
        # a NaN grad_norm alone is not enough under fp16, where the GradScaler skips overflowing steps.
        bad = {k: logs[k] for k in ("loss", "entropy")
               if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])}
        if bad:
            loss = logs["loss"] if "loss" in bad else f"{logs['loss']} with a non-finite entropy of the logits"
            cause = ("fp16 overflow (Qwen2-family models are known to overflow in fp16)" if self.precision == "fp16"
                     else "a learning rate far too high or broken data")
            fix = ("lower learning_rate, or train in fp32 on this GPU (fp16: false, dtype: float32)"
                   if self.precision == "fp16" else "lower learning_rate and check the data with "
                   "`tunekit validate`")
            print(file=sys.stderr)  # end the progress bar's line: the error is a line of its own
            raise UserError(f"training loss is {loss} at step {state.global_step} (learning_rate "
                            f"{args.learning_rate}, {self.precision}): likely {cause}; {fix}")
