"""Routing statistics of a model on a workload: how much structure there is for caching and prediction.

Generates each request's greedy continuation (batch 1) with transformers' own experts, then records,
per token and MoE layer, the experts the router chose, and what layer l+1's router would choose on
layer l's input (the "next layer's gate" guess of mixtral-offloading). From these, per layer:
- usage entropy: entropy of the expert-assignment shares over log(E) (1 = perfectly even); dead experts;
- top share: the most popular expert's share of assignments (1/E when even);
- repeat share: of a decode token's experts, the share its previous token also used (same layer);
- repeat by popularity: the repeat share decode tokens would show if each chose independently with
  the layer's measured popularity (sum over experts of p_e^2 / k, p_e the share of decode tokens that
  chose e), so that locality can be told apart from a few experts taking most tokens;
- neighbour similarity: cosine similarity of a decode token's MoE input with its previous token's (how
  alike neighbours look to the router);
- gate recall: of layer l+1's experts, the share the next-layer-gate guess from layer l finds;
- LRU hit rate: a per-layer LRU cache of half the layer's experts, fed token by token, on decode tokens.
"""

import math
from collections import OrderedDict

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from .checkpoint import load_tokenizer, resolve_checkpoint
from .errors import UsageError
from .families import MoELayer, find_moe_layers, router_of
from .predictor_training import capture, generate_sequences
from .workloads import build_requests


@torch.no_grad()
def collect(model, layers: list[MoELayer], sequences: list[tuple[list[int], int]]):
    """Per sequence: (chosen, guessed, n_prompt, similarity); chosen[l] [T, K], guessed[l] [T, K] for
    l < L-1, similarity[l] [T-1] the cosine of token t's input of layer l with token t-1's.

    Teacher-forced over each whole sequence (see predictor_training.capture), so any model can be
    measured on the same tokens (a random model's own greedy output would be one token repeated,
    which says nothing about its routing)."""
    results = []
    for hidden, chosen, n_prompt in capture(model, layers, sequences):
        guessed = [router_of(layers[i + 1])(hidden[i])[-1] for i in range(len(layers) - 1)]
        similarity = [torch.nn.functional.cosine_similarity(h[1:], h[:-1], dim=-1) for h in hidden]
        results.append((chosen, guessed, n_prompt, similarity))
    return results


def _lru_hits(sequence: list[set], capacity: int, count_from: int) -> tuple[int, int]:
    cache: OrderedDict = OrderedDict()
    hits = total = 0
    for position, experts in enumerate(sequence):
        for expert in experts:
            if position >= count_from:
                total += 1
                hits += expert in cache
        for expert in experts:
            if expert not in cache and len(cache) == capacity:
                victim = next(e for e in cache if e not in experts)
                del cache[victim]
            cache[expert] = None
            cache.move_to_end(expert)
    return hits, total


def statistics(results, num_experts: int, top_k: int) -> pd.DataFrame:
    """One row per MoE layer, plus a final 'all' row averaging the layers."""
    num_layers = len(results[0][0])
    rows = []
    for layer in range(num_layers):
        counts = torch.zeros(num_experts)
        decode_counts = torch.zeros(num_experts)
        decode_tokens = repeat = recall = recall_n = hits = total = similar = 0
        for chosen, guessed, n_prompt, similarity in results:
            picks = chosen[layer]  # [T, K]
            first = max(n_prompt, 1)  # the first decode token that has a previous token
            similar += float(similarity[layer][first - 1:].sum())  # decode tokens vs previous
            counts += torch.bincount(picks.flatten(), minlength=num_experts).float()
            decode = picks[first:]
            decode_counts += torch.bincount(decode.flatten(), minlength=num_experts).float()
            decode_tokens += len(decode)
            sets = [set(row.tolist()) for row in picks]
            repeat += sum(len(sets[t] & sets[t - 1]) for t in range(first, len(sets))) / top_k
            if layer + 1 < num_layers:
                truth = chosen[layer + 1]
                for guess_row, true_row in zip(guessed[layer], truth, strict=True):
                    recall += len(set(guess_row.tolist()) & set(true_row.tolist())) / top_k
                    recall_n += 1
            h, n = _lru_hits(sets, num_experts // 2, n_prompt)
            hits, total = hits + h, total + n
        shares = counts / counts.sum()
        nonzero = shares[shares > 0]
        rows.append({
            "layer": layer,
            "usage_entropy": float(-(nonzero * nonzero.log()).sum() / math.log(num_experts)),
            "dead_experts": int((counts == 0).sum()),
            "top_share": float(shares.max()),
            "repeat_share": repeat / decode_tokens if decode_tokens else float("nan"),
            "repeat_by_popularity": (float((decode_counts / decode_tokens).square().sum()) / top_k
                                     if decode_tokens else float("nan")),
            "neighbour_similarity": similar / decode_tokens if decode_tokens else float("nan"),
            "gate_recall": recall / recall_n if recall_n else float("nan"),
            "lru_half_hit_rate": hits / total if total else float("nan"),
        })
    table = pd.DataFrame(rows)
    mean = table.drop(columns="layer").mean(numeric_only=True)
    mean["dead_experts"] = table["dead_experts"].sum()
    return pd.concat([table, pd.DataFrame([{"layer": "all", **mean.to_dict()}])], ignore_index=True)


def _statistics(model, sequences) -> pd.DataFrame:
    layers = find_moe_layers(model)
    results = collect(model, layers, sequences)
    return statistics(results, layers[0].experts.num_experts, int(model.config.num_experts_per_tok))


def routing_report(model: str, workload, compare_random: bool) -> pd.DataFrame:
    """The statistics table of `model` on `workload` (its greedy continuations of the workload's
    prompts); with `compare_random`, side by side with a randomly initialised model of the same
    config (seed 0) measured on the very same token sequences."""
    path = resolve_checkpoint(model)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise UsageError(f"{path} has no tokenizer: routing statistics need text prompts")
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = build_requests(workload, lambda text: tokenizer(text)["input_ids"], trained.config.vocab_size)
    sequences = generate_sequences(trained, prompts, workload.output_tokens)
    table = _statistics(trained, sequences)
    if not compare_random:
        return table
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(trained.config, dtype=torch.float32).eval()
    return table.merge(_statistics(random_model, sequences), on="layer", suffixes=("", "_random"))


def markdown_table(table: pd.DataFrame) -> str:
    """A Markdown table (for the model card), numbers to three decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
