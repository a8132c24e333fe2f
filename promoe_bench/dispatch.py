"""One MoE layer's tokens grouped by expert, and the experts' outputs combined whatever order they ran in.

    [router] -> group the (token, k) slots by expert -> each expert on its slots, in any order -> combine

Strategies run a layer's experts in orders of their own (resident ones first, the most-copied next), and
the runtime must still give full_gpu's output bit for bit, in any dtype. So no expert adds into the
output: each one's output is kept, and at the end they are put in (token, k) order, weighted in the dtype
the weighting makes (float32 for a bfloat16 model with float32 router weights) and summed over k in one
fixed order, then cast once: transformers' own grouped and batched experts combine the same way.

Legend: T tokens, K experts per token, H hidden size, n tokens of one expert.
"""

import torch


class Dispatch:
    def __init__(self, chosen: list[int], hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor):
        """`chosen`: top_k_index flattened, as the host read it (the grouping's spans come from it, so
        grouping the device's copy costs no further sync); hidden [T, H], top_k_index / top_k_weights [T, K]."""
        tokens, self.k = top_k_index.shape
        self.hidden, self.weights, self.chosen = hidden, top_k_weights, chosen
        self._outputs: dict[int, torch.Tensor] = {}  # expert -> its output for its tokens [n, H]
        self._tokens = self.slots = None
        if tokens == 1:  # a decode step of one sequence: its token chose each expert once, in k order
            return
        counts: dict[int, int] = {}
        for expert in chosen:
            counts[expert] = counts.get(expert, 0) + 1
        self._spans: dict[int, tuple[int, int]] = {}  # expert -> (start, end) of its rows in `slots`
        start = 0
        for expert in sorted(counts):  # the order a stable sort by expert id puts them in
            self._spans[expert] = (start, start + counts[expert])
            start += counts[expert]
        self.slots = top_k_index.flatten().argsort(stable=True)  # [T*K]: (token, k) slots by expert
        self._tokens = self.slots // self.k  # [T*K]: each slot's token

    def inputs(self, expert: int) -> torch.Tensor:
        """The hidden states of the tokens that chose `expert`: [n, H]."""
        if self._tokens is None:
            return self.hidden
        start, end = self._spans[expert]
        return self.hidden.index_select(0, self._tokens[start:end])

    def add(self, expert: int, out: torch.Tensor) -> None:
        """`expert`'s output for its tokens [n, H], in the order `inputs` gave them."""
        self._outputs[expert] = out

    def combine(self) -> torch.Tensor:
        """[T, H]: each token's K outputs weighted (in the dtype that makes) and summed in k order, then cast to
        the dtype of the hidden states."""
        if self.slots is None:  # one token: its outputs in k order are its rows
            rows = torch.cat([self._outputs[expert] for expert in self.chosen])  # [K, H]
        else:
            grouped = torch.cat([self._outputs[expert] for expert in self._spans])  # [T*K, H] by expert
            rows = torch.empty_like(grouped).index_copy_(0, self.slots, grouped)  # [T*K, H] by (token, k)
        weighted = rows * self.weights.reshape(-1, 1)  # [T*K, H]
        return weighted.view(-1, self.k, rows.shape[-1]).sum(dim=1).to(self.hidden.dtype)
