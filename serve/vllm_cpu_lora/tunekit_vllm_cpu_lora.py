"""vLLM plugin: faster LoRA on the CPU (installed into .venv-vllm by `make serve-setup`).

vLLM's CPU LoRA ops (vllm.lora.ops.torch_ops) gather a full copy of the adapter's weights for
every token (``weights[token_indices]``, then a batched einsum): for a prompt of 2,000 tokens that
is hundreds of MB per layer, and it made serving an adapter on 2 cores many times slower than
the base model. These replacements run one matmul per adapter present in the batch instead, and
give tokens without an adapter (index -1) no LoRA term, as vLLM's GPU kernels do. Results are the
same up to float rounding. vLLM loads general plugins in every process (API server, engine core,
workers), so the patch reaches the processes that run the model. GPUs are untouched.
"""

from __future__ import annotations

import torch


def lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t]; zeros where indices[t] < 0. weights: [L, (1,) out, in]."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    present = torch.unique(indices).tolist()
    if len(present) == 1 and present[0] >= 0:  # the common case: one adapter for the whole batch
        return inputs @ weights[present[0]].to(dtype).t()
    out = inputs.new_zeros((inputs.shape[0], weights.shape[1]))
    for lora in present:
        if lora >= 0:
            rows = (indices == lora).nonzero().squeeze(1)
            out[rows] = inputs[rows] @ weights[lora].to(dtype).t()
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def register() -> None:
    """Entry point (group vllm.general_plugins): swap the ops where the CPU punica wrapper finds them."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for module in (ops, torch_ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice
