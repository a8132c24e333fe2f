"""One MoE layer's tokens grouped by expert, and the experts' outputs combined whatever order they ran in.

    [router] -> group the (token, k) slots by expert -> each expert on its slots, in any order -> combine

Strategies run a layer's experts in orders of their own (resident ones first, the most-copied next), and
the runtime must still give full_gpu's output bit for bit, in any dtype. So each expert writes its
weighted output into its own (token, k) rows of one buffer, in the dtype the weighting makes (float32
for a bfloat16 model with float32 router weights), and the rows are summed over k in one fixed order at
the end, then cast once: transformers' own grouped and batched experts combine the same way.

Legend: T tokens, K experts per token, H hidden size, n tokens of one expert.
"""

import torch


class Dispatch:
    def __init__(self, chosen: list[int], hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor):
        """`chosen`: top_k_index flattened, as the host read it (the grouping's spans come from it, so
        grouping the device's copy costs no further sync); hidden [T, H], top_k_index / top_k_weights [T, K]."""
        tokens, k = top_k_index.shape
        self.hidden, self.k = hidden, k
        counts: dict[int, int] = {}
        for expert in chosen:
            counts[expert] = counts.get(expert, 0) + 1
        self._spans: dict[int, tuple[int, int]] = {}  # expert -> (start, end) of its rows in `slots`
        start = 0
        for expert in sorted(counts):  # the order a stable sort by expert id puts them in
            self._spans[expert] = (start, start + counts[expert])
            start += counts[expert]
        self.slots = top_k_index.flatten().argsort(stable=True)  # [T*K]: (token, k) slots by expert
        self._tokens = self.slots // k if tokens > 1 else None  # [T*K]: each slot's token
        self._weights = top_k_weights.flatten()[self.slots, None]  # [T*K, 1]
        dtype = torch.result_type(hidden, top_k_weights)
        self._out = torch.empty(tokens * k, hidden.shape[-1], dtype=dtype, device=hidden.device)  # [T*K, H]

    def inputs(self, expert: int) -> torch.Tensor:
        """The hidden states of the tokens that chose `expert`: [n, H]."""
        if self._tokens is None:  # one token: it chose every expert of the layer once
            return self.hidden
        start, end = self._spans[expert]
        return self.hidden.index_select(0, self._tokens[start:end])

    def add(self, expert: int, out: torch.Tensor) -> None:
        """`expert`'s output for its tokens [n, H], in the order `inputs` gave them."""
        start, end = self._spans[expert]
        self._out.index_copy_(0, self.slots[start:end], out * self._weights[start:end])

    def combine(self) -> torch.Tensor:
        """[T, H]: each token's K weighted outputs summed in k order, in the dtype of the hidden states."""
        return self._out.view(-1, self.k, self._out.shape[-1]).sum(dim=1).to(self.hidden.dtype)
