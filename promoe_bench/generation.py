"""Prefill, then greedy decoding with a KV cache: the loop every strategy is timed on.

Step 0 is the prefill (its end is the first token), steps 1.. are decode steps of one token each.
A meter, when given, measures each phase from outside its steps (promoe_bench/meter.py).
Prompts of different lengths are left-padded into one batch, with the attention mask and position
ids that transformers' own generate() would use, so padding never changes a request's output.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] generated token ids, N = gen_len
    step_seconds: list[float]  # [N]: prefill, then one entry per decode step
    logits: torch.Tensor | None  # [B, N, V] of each generated position, when asked for
    phases: list[dict]  # the meter's row per phase (prefill, decode), when one was given


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, P_max] with each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, gen_len: int, runtime, attention_mask: torch.Tensor | None = None,
             keep_logits: bool = False, meter=None, **context) -> Generation:
    """Greedy-decode `gen_len` tokens after `input_ids` [B, P]; `runtime` records every step."""
    cache = DynamicCache(config=model.config)
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
    # read on the host before the mask moves to the device, where reading it would wait for the device
    prompt_tokens, padded = int(attention_mask.sum()), not bool(attention_mask.all())
    mask = attention_mask.to(input_ids.device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [B, P]: padding does not count
    tokens, logits, seconds, phases = [], [], [], []
    next_input = input_ids
    for step in range(gen_len):
        if meter is not None and step <= 1:  # between steps: never inside a timed one
            if step == 1:
                phases.append(meter.end(prompt_tokens))
            meter.begin("prefill" if step == 0 else "decode")
        runtime.begin_step(**context, phase="prefill" if step == 0 else "decode", step=step)
        # without padding the mask says nothing: left out, transformers need not test it on the host each step
        out = model(input_ids=next_input, attention_mask=mask if padded else None, position_ids=positions,
                    cache=cache, use_cache=True)
        step_logits = out.logits[:, -1, :]  # [B, V]
        next_token = step_logits.argmax(dim=-1, keepdim=True)  # [B, 1]
        seconds.append(runtime.finish_step())
        tokens.append(next_token)
        if keep_logits:
            logits.append(step_logits.float().cpu())
        next_input = next_token
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=-1)
        positions = positions[:, -1:] + 1
    if meter is not None:
        phases.append(meter.end(prompt_tokens if gen_len == 1 else input_ids.shape[0] * (gen_len - 1)))
    return Generation(
        torch.cat(tokens, dim=1).cpu(), seconds, torch.stack(logits, dim=1) if keep_logits else None, phases
    )
