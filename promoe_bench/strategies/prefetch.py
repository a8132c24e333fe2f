from dataclasses import dataclass

from promoe_bench.environment import Priority
from promoe_bench.predictors import PREDICTOR_NAMES

from .base import Strategy


@dataclass
class Prefetching(Strategy):
    """The shared part of strategies that prefetch: at each layer's input, ask a predictor for a later
    layer's experts and queue LOW copies of them (a prefetch of a resident expert refreshes it)."""

    predictor: str = "learned"  # learned, gate, oracle or noisy
    distance: int = 2  # predict layer l + distance from layer l's input (clamped to the model)
    chunked: bool = True  # copy gate, up and down as separate chunks
    min_prob: float = 0.0  # prefetch only guesses at least this probable (a wrong one costs a copy)
    recall: float = 0.85  # predictor=noisy only: the share of routed experts it knows

    def __post_init__(self):
        super().__post_init__()
        if self.predictor not in PREDICTOR_NAMES:
            raise ValueError(f"predictor must be one of {', '.join(PREDICTOR_NAMES)}, got {self.predictor!r}")
        if self.distance < 1:
            raise ValueError(f"distance must be at least 1, got {self.distance}")
        if not 0 <= self.min_prob <= 1:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
        if not 0 <= self.recall <= 1:
            raise ValueError(f"recall must be in [0, 1], got {self.recall}")

    @property
    def predictors(self):
        return {self.predictor}

    def targets(self, layer: int, num_layers: int) -> list[int]:
        """The layers predicted from `layer`'s input: layer + distance, and from layer 0 also the
        layers before that, which no earlier input could predict."""
        d = min(self.distance, num_layers - 1)
        if layer == 0:
            return list(range(1, d + 1))
        return [layer + d] if layer + d < num_layers else []

    def on_layer_input(self, env, layer):
        for target in self.targets(layer, env.shape.num_layers):
            predicted = env.predict(layer, target, self.predictor, self.min_prob, self.recall)
            resident = [e for e in predicted if env.is_resident(target, e)]
            missing = [e for e in predicted if e not in resident]
            for expert in resident:  # refreshed first, so the copies below evict only unpredicted experts
                env.request(target, expert, Priority.LOW, self.chunked)
            # Copy only into slots no predicted expert holds: evicting one expert the layer will use to
            # make room for another (a prefill routes more experts than fit) adds a copy and saves none.
            for expert in missing[: env.shape.capacity - len(resident)]:
                env.request(target, expert, Priority.LOW, self.chunked)
