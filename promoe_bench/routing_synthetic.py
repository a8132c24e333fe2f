"""Made-up routing with stated structure (popularity skew, token-to-token repeats, cross-layer correlation),
marked synthetic wherever it goes."""

import numpy as np

from .errors import UsageError
from .routing_log import RoutingLog, RoutingLogBuilder


def synthetic_log(num_layers: int, num_experts: int, top_k: int, prompt_tokens: int, decode_steps: int,
                  batches: int = 1, skew: float = 1.0, repeat: float = 0.3, cross_layer: float = 0.5,
                  seed: int = 0) -> RoutingLog:
    """Made-up routing with tunable structure, marked meta["source"] = "synthetic" with every parameter.

    Each batch is one request: a prefill of `prompt_tokens` rows, then `decode_steps` forwards of one row.
    Per token and layer, in this order of precedence:
    - `repeat`: probability that the token reuses the previous token's experts at this layer (for the first
      decode step, the prompt's last token);
    - `cross_layer`: per pick, probability that it follows a fixed map of the same pick at the layer before
      (the expert of equal popularity rank; a bijection, so picks stay distinct): what makes predictors useful;
    - otherwise a draw without replacement from the layer's popularity, Zipf-like: the expert of rank r
      (a seeded permutation per layer) has weight 1 / (r + 1) ** skew.
    Weights: a softmax of random logits over the k picks, largest first. No predictions."""
    params = {"num_layers": num_layers, "num_experts": num_experts, "top_k": top_k, "prompt_tokens": prompt_tokens,
              "decode_steps": decode_steps, "batches": batches, "skew": skew, "repeat": repeat,
              "cross_layer": cross_layer, "seed": seed}
    if (min(num_layers, num_experts, top_k, prompt_tokens, batches) < 1 or decode_steps < 0
            or not top_k <= num_experts <= np.iinfo(np.int16).max):
        raise UsageError(f"synthetic log: sizes must be positive, decode_steps >= 0, top_k <= num_experts <= 32767; "
                         f"got {params}")
    if skew < 0 or not 0 <= repeat <= 1 or not 0 <= cross_layer <= 1:
        raise UsageError(f"synthetic log: skew must be >= 0, repeat and cross_layer in [0, 1]; got {params}")
    rng = np.random.default_rng(seed)
    by_rank = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])  # [L, E]: rank -> expert
    rank = np.argsort(by_rank, axis=1)  # [L, E]: expert -> rank
    log_popularity = np.empty((num_layers, num_experts))
    np.put_along_axis(log_popularity, by_rank, -skew * np.log(np.arange(1, num_experts + 1)), axis=1)
    meta = {"source": "synthetic", "synthetic": params, "model": {"name": "synthetic"},
            "batches": {str(b): [f"synthetic-{b}"] for b in range(batches)}}
    builder = RoutingLogBuilder(num_layers, num_experts, top_k, meta)
    for batch in range(batches):
        previous: list[np.ndarray | None] = [None] * num_layers  # the previous token's picks per layer
        for step in range(decode_steps + 1):
            tokens = prompt_tokens if step == 0 else 1
            chosen = np.empty((num_layers, tokens, top_k), np.int16)
            for t in range(tokens):
                for layer in range(num_layers):
                    if previous[layer] is not None and rng.random() < repeat:
                        picks = previous[layer]
                    else:
                        picks = np.full(top_k, -1)
                        if layer > 0:
                            follow = rng.random(top_k) < cross_layer
                            picks[follow] = by_rank[layer, rank[layer - 1, chosen[layer - 1, t, follow]]]
                        # Gumbel top-k: a draw without replacement proportional to popularity
                        keys = log_popularity[layer] + rng.gumbel(size=num_experts)
                        keys[picks[picks >= 0]] = -np.inf
                        free = picks < 0
                        picks[free] = np.argsort(-keys, kind="stable")[:free.sum()]
                    chosen[layer, t] = previous[layer] = picks
            builder.add_forward(batch, step)
            for layer in range(num_layers):
                logits = rng.normal(size=(tokens, top_k))
                weights = np.exp(logits - logits.max(1, keepdims=True))
                builder.add_layer(layer, chosen[layer], -np.sort(-weights / weights.sum(1, keepdims=True), axis=1))
    return builder.build()
