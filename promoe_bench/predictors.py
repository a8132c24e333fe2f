"""Expert predictors: from the input hidden state of MoE layer l, guess the experts of layer l+d.

A predictor maps (source layer, target layer, hidden [..., H]) to per-token guesses [T, K] with their
probabilities [T, K]; the runtime turns those into one ranked list for the batch, leaving out guesses
below a strategy's minimum probability. Two work on hidden states:
- `gate`: layer l+d's own router applied to layer l's input (mixtral-offloading's skip-gate heuristic);
- `learned`: ProMoE's two-layer MLP per (l, d), trained offline by `promoe-bench train-predictor`.
Two need no hidden state: they read the recorded routing (promoe_bench.trace). `oracle` knows it;
`noisy` knows each routed expert with a set probability (its recall) and guesses wrong ones to make up
the number, so a sweep of recall shows what predictor quality is worth.

Learned predictors are saved as `predictors.safetensors` beside `predictors.json` (model fingerprint,
distances, sizes, per-pair eval recall), and refuse to load for another model.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .errors import UsageError
from .families import MoELayer, router_of

WEIGHTS = "predictors.safetensors"
METADATA = "predictors.json"
PREDICTOR_NAMES = ("learned", "gate", "oracle", "noisy")
FROM_TRACE = ("oracle", "noisy")  # predictors that read the recorded routing
FINGERPRINT_WEIGHTS = 64  # per router tensor


class GatePredictor:
    def __init__(self, layers: list[MoELayer]):
        self.layers = layers

    @torch.no_grad()
    def __call__(self, source: int, target: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, picks = router_of(self.layers[target])(hidden)
        picks = picks.reshape(-1, picks.shape[-1])  # [T, K]
        probs = logits.reshape(len(picks), -1).float().softmax(-1).gather(1, picks)
        return picks, probs


class PredictorMLP(nn.Module):
    """ProMoE's predictor: hidden state -> scores over the target layer's experts."""

    def __init__(self, hidden_size: int, width: int, num_experts: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(width, num_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


def model_fingerprint(config, layers: list[MoELayer]) -> str:
    """Identifies a model's routing: its shape and the signs of each router's first weights. Signs, not
    values: the same checkpoint run in bfloat16 or float16 must keep its fingerprint (rounding never
    flips a sign), while another training or seed flips half of them."""
    digest = hashlib.sha256()
    shape = {"model_type": config.model_type, "hidden_size": config.hidden_size, "moe_layers": len(layers),
             "experts": layers[0].experts.num_experts, "top_k": int(config.num_experts_per_tok)}
    digest.update(json.dumps(shape, sort_keys=True).encode())
    for layer in layers:
        for name, tensor in sorted(router_of(layer).state_dict().items()):
            digest.update(name.encode())
            signs = tensor.detach().flatten()[:FINGERPRINT_WEIGHTS].sign().to("cpu", torch.int8)
            digest.update(signs.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class LearnedPredictors:
    mlps: dict[tuple[int, int], PredictorMLP]  # (source layer, distance) -> MLP
    top_k: int
    meta: dict  # what predictors.json holds

    @property
    def distances(self) -> list[int]:
        return sorted({d for _, d in self.mlps})

    def to(self, device: torch.device) -> "LearnedPredictors":
        for mlp in self.mlps.values():
            mlp.to(device).eval()
        return self

    @torch.no_grad()
    def __call__(self, source: int, target: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the MLP's layers applied directly: at batch 1 the four module calls cost three times the math,
        # and this runs on the critical path (dropout is the identity in eval)
        first, _, _, last = self.mlps[(source, target - source)].net
        flat = hidden.reshape(-1, hidden.shape[-1]).to(first.weight.dtype)
        scores = F.linear(F.linear(flat, first.weight, first.bias).relu_(), last.weight, last.bias)
        top = scores.softmax(-1).topk(self.top_k, dim=-1)
        return top.indices, top.values  # [T, K] each

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"l{src}_d{d}.{name}": t.detach().cpu().contiguous()
                   for (src, d), mlp in self.mlps.items() for name, t in mlp.state_dict().items()}
        save_file(tensors, folder / WEIGHTS)
        (folder / METADATA).write_text(json.dumps(self.meta, indent=2) + "\n")


def load_predictors(folder: Path, fingerprint: str) -> LearnedPredictors:
    """The learned predictors in `folder`, refused unless they were trained for the model `fingerprint`."""
    weights, meta_path = folder / WEIGHTS, folder / METADATA
    if not weights.is_file() or not meta_path.is_file():
        raise UsageError(f"{folder} holds no trained predictors ({WEIGHTS} and {METADATA}); "
                         f"make them with `promoe-bench train-predictor --out {folder}`")
    try:
        meta = json.loads(meta_path.read_text())
        made_for, sizes = meta["fingerprint"], meta["sizes"]
        hidden, width, experts = sizes["hidden_size"], sizes["width"], sizes["num_experts"]
        pairs = [(int(src), int(d)) for src, d in meta["pairs"]]
        top_k = int(meta["top_k"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{meta_path}: not a predictors file of promoe-bench "
                         f"({type(error).__name__}: {error})") from None
    if made_for != fingerprint:
        raise UsageError(f"predictors in {folder} were trained for another model (fingerprint {made_for}, this "
                         f"model is {fingerprint}); train new ones with `promoe-bench train-predictor`")
    state = load_file(weights)
    mlps = {}
    for src, d in pairs:
        mlp = PredictorMLP(hidden, width, experts)
        prefix = f"l{src}_d{d}."
        try:
            mlp.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        except RuntimeError as error:
            raise UsageError(f"{weights}: predictor l{src}->l{src + d} does not match {METADATA}: "
                             f"{str(error).splitlines()[0]}") from None
        mlps[(src, d)] = mlp.eval()
    return LearnedPredictors(mlps, top_k, meta)


def rank(picks, probs, num_experts: int, min_prob: float = 0.0) -> list[int]:
    """Per-token guesses [T, K] and their probabilities (torch or numpy; a pick of -1 is no guess) -> the
    experts guessed for the batch with at least `min_prob`, most votes first, then the most probable (for
    one token, whose guesses all have one vote: the surest first, so the likeliest copy starts first)."""
    if isinstance(picks, torch.Tensor):  # one copy to the host: expert ids are exact as float32 (below 2**24)
        both = torch.cat([picks.float(), probs.float()], dim=-1).cpu().numpy()  # [T, 2K]
        picks, probs = both[:, : picks.shape[-1]].astype(numpy.int64), both[:, picks.shape[-1] :]
    if len(picks) == 1:  # a decode step: sorting its few guesses beats counting votes over every expert
        guesses = zip(probs[0].tolist(), picks[0].tolist(), strict=True)
        return [e for p, e in sorted(guesses, key=lambda pe: (-pe[0], pe[1])) if e >= 0 and p >= min_prob]
    keep = (probs >= min_prob) & (picks >= 0)
    chosen = picks[keep].astype(numpy.int64)
    votes = numpy.bincount(chosen, minlength=num_experts).tolist()
    mass = numpy.bincount(chosen, weights=probs[keep], minlength=num_experts).tolist()
    return sorted((e for e in range(num_experts) if votes[e]), key=lambda e: (-votes[e], -mass[e]))


def trace_guess(trace, target: int, position: int, predictor: str, recall: float, shape) -> list[int]:
    """What `oracle` or `noisy` guesses for forward `position` of layer `target` of a RoutingTrace."""
    routed = trace.at(target, position)
    if predictor == "oracle":
        return list(routed)
    return noisy_guess(routed, shape.num_experts, recall, (target, position))


def noisy_guess(routed: tuple[int, ...], num_experts: int, recall: float, seed: tuple[int, ...]) -> list[int]:
    """A guess of `routed` that holds each routed expert with probability `recall`, made up to the same
    number with experts not routed; in random order, so that order tells nothing. `seed` (e.g. target
    layer and position) makes it the same in every strategy, run and simulation."""
    rng = numpy.random.default_rng(seed)
    kept = [e for e in routed if rng.random() < recall]
    others = numpy.setdiff1d(numpy.arange(num_experts), routed)
    wrong = rng.choice(others, size=min(len(routed) - len(kept), len(others)), replace=False).tolist()
    guess = kept + wrong
    rng.shuffle(guess)
    return guess
