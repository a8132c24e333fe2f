"""Prefill, then greedy decoding with a KV cache: the loop every strategy is timed on.

Step 0 is the prefill (its end is the first token), steps 1.. are decode steps of one token each.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] generated token ids, N = gen_len
    step_seconds: list[float]  # [N]: prefill, then one entry per decode step
    logits: torch.Tensor | None  # [B, N, V] of each generated position, when asked for


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, gen_len: int, runtime, keep_logits: bool = False, **context) -> Generation:
    """Greedy-decode `gen_len` tokens after `input_ids` [B, P]; `runtime` records every step."""
    cache = DynamicCache(config=model.config)
    tokens, logits, seconds = [], [], []
    next_input = input_ids
    for step in range(gen_len):
        runtime.recorder.begin_step(**context, phase="prefill" if step == 0 else "decode", step=step)
        out = model(input_ids=next_input, cache=cache, use_cache=True)
        step_logits = out.logits[:, -1, :]  # [B, V]
        next_token = step_logits.argmax(dim=-1, keepdim=True)  # [B, 1]
        seconds.append(runtime.finish_step())
        tokens.append(next_token)
        if keep_logits:
            logits.append(step_logits.float().cpu())
        next_input = next_token
    return Generation(
        torch.cat(tokens, dim=1).cpu(), seconds, torch.stack(logits, dim=1) if keep_logits else None
    )
