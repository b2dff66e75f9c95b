"""A batch's shared prompt prefix computed once instead of once per example (``shared_prefix: true``).

Every example of a data_prep build starts with the same system message, so a padded training batch
begins with the same tokens in every row (``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n``).
Under causal attention those positions do not depend on anything after them: their hidden states and
keys/values are the same in every row. The decoder's forward is wrapped so that it runs them for one
row, repeats their keys/values across the batch as a cache, runs the rest of every row against that
cache, and returns the hidden states the plain forward would (the prefix's repeated, the rest's as
computed). Gradients flow through the repeated keys/values back into the one prefix pass, so the
loss and the gradients are the plain batch's (a test checks both); the prefix's share of a step's
work is paid once instead of ``batch`` times.

It steps aside (the plain forward runs) for anything but a training-style forward of a padded batch:
generation (a cache or ``use_cache``), a caller's own positions (padding-free batches), a batch of
one, gradient checkpointing (it refuses caches), left padding, or a shared prefix shorter than
``min_tokens``.
"""

from __future__ import annotations


def shared_prefix_length(input_ids, attention_mask) -> int:
    """Leading positions whose token is the same, and real (not padding), in every row; at least one
    real position of the shortest row is left after it."""
    import torch

    same = (input_ids == input_ids[:1]).all(0)
    real = input_ids.shape[1]
    if attention_mask is not None:
        same &= attention_mask.bool().all(0)
        real = int(attention_mask.sum(1).min())
    n = int(torch.cumprod(same.long(), 0).sum())
    return max(0, min(n, real - 1))


def enable(decoder, min_tokens: int = 8) -> None:
    """Wrap ``decoder.forward`` (a transformers decoder: LlamaModel, Qwen2Model, ..., the module that
    returns ``last_hidden_state``) so that a batch's shared prefix is computed once."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPast

    plain = decoder.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        steps_aside = (input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] < 2
                       or past_key_values is not None or use_cache or position_ids is not None
                       or inputs_embeds is not None
                       or (decoder.training and getattr(decoder, "gradient_checkpointing", False)))
        n = 0 if steps_aside else shared_prefix_length(input_ids, attention_mask)
        decoder.shared_prefix_tokens = n if n >= min_tokens else 0  # what the last batch shared (tests, logs)
        if not decoder.shared_prefix_tokens:
            return plain(**call, **kwargs)
        rows, width = input_ids.shape
        head = plain(input_ids=input_ids[:1, :n], use_cache=True, **kwargs)
        cache = head.past_key_values
        cache.batch_repeat_interleave(rows)  # differentiable: gradients of every row flow back to the one pass
        positions = torch.arange(n, width, device=input_ids.device).unsqueeze(0).expand(rows, -1)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        tail = plain(input_ids=input_ids[:, n:], attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, **kwargs)
        hidden = torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail.last_hidden_state], dim=1)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    decoder.forward = forward
