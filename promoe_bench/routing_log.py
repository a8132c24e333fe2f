"""The routing log of a workload on disk: what the router did per forward, MoE layer and token, and what each
predictor guessed, from a layer's input, for later layers. The simulator replays it; `routing_trace()` gives
the in-memory view the oracle predictor and Belady read.

A forward is one model call: a batch's prefill (step 0) or one of its decode steps (1, 2, ...). Token rows are
ordered by (forward, layer, token) and `counts[f, l]` says how many (f, l) has, so a gap in a real log is
fewer rows, or none: routing is never invented. Three sources, named in meta["source"]:
- "recorded": `RoutingLogBuilder`, fed forward by forward by the runtime's recorder;
- "imported": `routing_import.import_jsonl`, public JSON-lines routing logs; gaps in meta["imported"]["gaps"];
- "synthetic": `routing_synthetic.synthetic_log`, with every parameter in meta["synthetic"].

On disk: one safetensors file; meta as JSON in its metadata under "promoe_routing_log". Tensors:
  forward_batch [F] int32, forward_step [F] int32, counts [F, L] int32,
  experts [N, K] uint8 (255 = none) when num_experts <= 255, else int16 (-1 = none), weights [N, K] float16,
  predictions/<name>/<d>/picks [N, P] ids like experts, predictions/<name>/<d>/probs [N, P] float16.
Bytes per token row: 3 K for the routing plus 3 P per (predictor, distance); 4 instead of 3 with more than 255
experts. K = 8 with two predictors x three distances of P = 8: 24 + 144 = 168 bytes, 16.8 MB per 100k rows.
"""

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from .errors import UsageError
from .trace import RoutingTrace

FORMAT_VERSION = 1
HEADER_KEY = "promoe_routing_log"
SMALL_IDS = 255  # up to this many experts, ids are stored as uint8 with 255 meaning "no expert"
MAX_EXAMPLES = 200  # gap examples kept in meta (about 100 bytes each); the counts are complete


@dataclass(eq=False)  # arrays do not compare with ==; compare field by field
class RoutingLog:
    meta: dict  # JSON-able header; meta["predictors"] is derived from `predictions`
    forward_batch: np.ndarray  # [F] int32
    forward_step: np.ndarray  # [F] int32: 0 = the batch's prefill, 1.. its decode steps
    counts: np.ndarray  # [F, L] int32: token rows of forward f at MoE layer l
    experts: np.ndarray  # [N, K] int16: routed expert ids (-1 = none), rows ordered by (forward, layer, token)
    weights: np.ndarray  # [N, K] float32 holding float16 values: the router's weights of those experts
    predictions: dict = field(default_factory=dict)  # (name, d) -> (picks [N, P] int16, probs [N, P] float16)

    def __post_init__(self):
        # One canonical form (JSON meta, fixed dtypes, float16 precision), so a log equals itself after save + load.
        self.meta = json.loads(json.dumps(self.meta))
        self.forward_batch = np.ascontiguousarray(self.forward_batch, np.int32)
        self.forward_step = np.ascontiguousarray(self.forward_step, np.int32)
        self.counts = np.ascontiguousarray(self.counts, np.int32)
        self.experts = np.ascontiguousarray(self.experts, np.int16)
        self.weights = np.asarray(self.weights, np.float16).astype(np.float32)
        self.predictions = {(str(name), int(d)): (np.ascontiguousarray(picks, np.int16),
                                                  np.ascontiguousarray(probs, np.float16))
                            for (name, d), (picks, probs) in sorted(self.predictions.items())}
        distances: dict[str, list[int]] = {}
        for name, d in self.predictions:
            distances.setdefault(name, []).append(d)
        self.meta["predictors"] = distances
        self._check()
        flat = np.concatenate([[0], np.cumsum(self.counts.ravel(), dtype=np.int64)])
        forwards, layers = self.counts.shape
        self._offsets = flat[np.arange(forwards)[:, None] * layers + np.arange(layers + 1)]  # [F, L+1]

    def _check(self) -> None:
        """ValueError saying what is inconsistent (load turns it into a UsageError naming the file)."""
        model = self.meta.get("model")
        if (not isinstance(model, dict) or not all(isinstance(model.get(k), int) and model[k] > 0
                                                   for k in ("num_layers", "num_experts", "top_k"))
                or model["num_experts"] > np.iinfo(np.int16).max):
            raise ValueError(f"meta['model'] needs positive integers num_layers, num_experts (at most 32767: ids are "
                             f"int16), top_k; got {model!r}")
        forwards = len(self.forward_batch)
        if self.forward_batch.shape != (forwards,) or self.forward_step.shape != (forwards,):
            raise ValueError(f"forward_batch {self.forward_batch.shape} and forward_step {self.forward_step.shape} "
                             "must both be [F]")
        if self.counts.shape != (forwards, self.num_layers):
            raise ValueError(f"counts is {list(self.counts.shape)}, expected [{forwards}, {self.num_layers}] "
                             "(forwards, layers)")
        if (self.counts < 0).any():
            raise ValueError("counts has negative entries")
        rows = int(self.counts.sum())
        if self.experts.shape != (rows, self.top_k) or self.weights.shape != self.experts.shape:
            raise ValueError(f"experts {list(self.experts.shape)} and weights {list(self.weights.shape)} must be "
                             f"[{rows}, {self.top_k}]: rows = sum of counts, columns = top_k")
        tables = {"experts": self.experts} | {f"predictor {n} d={d} picks": p for (n, d), (p, _) in
                                              self.predictions.items()}
        for (name, d), (picks, probs) in self.predictions.items():
            if d < 1 or picks.ndim != 2 or picks.shape[0] != rows or probs.shape != picks.shape:
                raise ValueError(f"predictor {name} d={d}: picks {list(picks.shape)} and probs {list(probs.shape)} "
                                 f"must both be [{rows}, P] with d >= 1")
        for what, ids in tables.items():
            if ids.size and (ids.min() < -1 or ids.max() >= self.num_experts):
                raise ValueError(f"{what} holds expert ids {int(ids.min())}..{int(ids.max())}, outside "
                                 f"0..{self.num_experts - 1} (-1 = none)")

    @property
    def num_layers(self) -> int:
        return self.meta["model"]["num_layers"]

    @property
    def num_experts(self) -> int:
        return self.meta["model"]["num_experts"]

    @property
    def top_k(self) -> int:
        return self.meta["model"]["top_k"]

    def offsets(self) -> np.ndarray:
        """[F, L+1]: the rows of (f, l) are offsets[f, l]:offsets[f, l+1] (global row indices)."""
        return self._offsets

    def rows(self, f: int, l: int) -> slice:  # noqa: E741 (f, l: forward, layer, the agreed signature)
        return slice(int(self._offsets[f, l]), int(self._offsets[f, l + 1]))

    def routed(self, f: int, l: int) -> list[int]:  # noqa: E741
        """Distinct experts in order of first appearance, row-major (token, then k): the runtime's routing order."""
        return list(self.layer_routing[f][l])

    def tokens_per_expert(self, f: int, l: int) -> dict[int, int]:  # noqa: E741
        """Expert -> token rows routed to it, in routing order (top-k picks are distinct within a row)."""
        return dict(self.layer_routing[f][l])

    def digest(self) -> str:
        """A hash of the routing alone (not where the log came from): two logs of the same routing match."""
        h = hashlib.sha256()
        for array in (self.forward_batch, self.forward_step, self.counts, self.experts):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    @functools.cached_property
    def layer_routing(self) -> list[list[dict[int, int]]]:
        """[f][l]: expert -> token rows routed to it, in routing order; worked out once (a simulator reads
        every (f, l) in every repeat of every strategy)."""
        ids = self.experts.tolist()
        offsets = self._offsets.tolist()
        out = []
        for f in range(len(self.counts)):
            layers = []
            for layer in range(self.num_layers):
                uses: dict[int, int] = {}
                for row in ids[offsets[f][layer]:offsets[f][layer + 1]]:
                    for expert in row:
                        if expert >= 0:
                            uses[expert] = uses.get(expert, 0) + 1
                layers.append(uses)
            out.append(layers)
        return out

    def routing_trace(self) -> RoutingTrace:
        """Per layer, one position per forward in order; a forward without rows at a layer is an empty position."""
        return RoutingTrace([[tuple(self.routed(f, layer)) for f in range(len(self.counts))]
                             for layer in range(self.num_layers)])

    def gaps(self) -> dict:
        """Missing routing: an imported log's own account, else (f, l) pairs with fewer rows than f's fullest layer."""
        imported = self.meta.get("imported")
        if imported and "gaps" in imported:
            return imported["gaps"]
        return _layer_gaps(self.counts, self.forward_batch, self.forward_step)

    def save(self, path) -> None:
        """Atomically (a temporary file, then a rename): an interrupted save leaves the old file or none."""
        path = Path(path)
        tensors = {"forward_batch": self.forward_batch, "forward_step": self.forward_step, "counts": self.counts,
                   "experts": _ids_to_disk(self.experts, self.num_experts),
                   "weights": self.weights.astype(np.float16)}
        for (name, d), (picks, probs) in self.predictions.items():
            tensors[f"predictions/{name}/{d}/picks"] = _ids_to_disk(picks, self.num_experts)
            tensors[f"predictions/{name}/{d}/probs"] = probs
        data = safetensors_bytes(tensors, metadata={HEADER_KEY: json.dumps(self.meta, sort_keys=True)})
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path) -> "RoutingLog":
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"{path}: no such routing log file")
        try:
            with safe_open(str(path), "np") as file:
                header = (file.metadata() or {}).get(HEADER_KEY)
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except SafetensorError as error:
            raise UsageError(f"{path}: not a readable safetensors file ({error})") from None
        if header is None:
            raise UsageError(f"{path}: no '{HEADER_KEY}' header in the safetensors metadata; not a routing log")
        try:
            meta = json.loads(header)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}: the routing log header is not JSON ({error})") from None
        version = meta.get("format") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise UsageError(f"{path}: routing log format {version!r}; this promoe-bench reads format "
                             f"{FORMAT_VERSION}, record or import the log again")

        def tensor(name: str) -> np.ndarray:
            if name not in tensors:
                raise UsageError(f"{path}: the routing log lacks the tensor '{name}'")
            return tensors[name]

        try:
            predictions = {(name, d): (_ids_from_disk(tensor(f"predictions/{name}/{d}/picks")),
                                       tensor(f"predictions/{name}/{d}/probs"))
                           for name, distances in meta.get("predictors", {}).items() for d in distances}
            return cls(meta, tensor("forward_batch"), tensor("forward_step"), tensor("counts"),
                       _ids_from_disk(tensor("experts")), tensor("weights"), predictions)
        except (ValueError, TypeError, AttributeError) as error:
            raise UsageError(f"{path}: inconsistent routing log: {error}") from None


def _ids_to_disk(ids: np.ndarray, num_experts: int) -> np.ndarray:
    return np.where(ids < 0, SMALL_IDS, ids).astype(np.uint8) if num_experts <= SMALL_IDS else ids


def _ids_from_disk(ids: np.ndarray) -> np.ndarray:
    if ids.dtype == np.uint8:
        ids = ids.astype(np.int16)
        ids[ids == SMALL_IDS] = -1
    return ids


def _layer_gaps(counts: np.ndarray, batch: np.ndarray, step: np.ndarray, expected: np.ndarray | None = None) -> dict:
    """(forward, layer) pairs missing all rows, or some, while the forward has rows at other layers.

    `expected` [F]: the rows each forward should have at every layer (default: its fullest layer's)."""
    expected = counts.max(axis=1) if expected is None else np.asarray(expected)
    missing = np.argwhere((counts == 0) & (expected[:, None] > 0))
    short = np.argwhere((counts > 0) & (counts < expected[:, None]))

    def where(f: int, layer: int) -> dict:
        return {"forward": int(f), "batch": int(batch[f]), "step": int(step[f]), "layer": int(layer)}

    return {"missing_layer_steps": len(missing),
            "missing_layer_examples": [where(f, layer) for f, layer in missing[:MAX_EXAMPLES]],
            "short_layer_steps": len(short),
            "short_layers": [where(f, layer) | {"rows": int(counts[f, layer]), "expected": int(expected[f])}
                             for f, layer in short[:MAX_EXAMPLES]],
            "missing_rows": int(np.clip(expected[:, None] - counts, 0, None).sum())}


class RoutingLogBuilder:
    """Collects routing forward by forward, then `build()`s the log. Inputs are numpy arrays or torch tensors.

    Within a forward, layers and predictions come in any order (a predictor runs on a layer's input, before
    that layer's router); rows end up ordered by layer. Rows of a predictor that never ran are -1 / 0."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, meta: dict | None = None):
        meta = dict(meta or {})
        model = {**meta.get("model", {}), "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k}
        self.meta = {"source": "recorded", "workload": None, **meta, "format": FORMAT_VERSION, "model": model}
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self._forwards: list[tuple[int, int]] = []  # (batch, step)
        self._layers: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []  # per forward: layer -> rows
        self._predictions: list[dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]]] = []  # (name, d, layer)
        self._widths: dict[tuple[str, int], int] = {}  # (name, d) -> P

    def add_forward(self, batch: int, step: int) -> None:
        self._forwards.append((int(batch), int(step)))
        self._layers.append({})
        self._predictions.append({})

    def add_layer(self, layer: int, experts, weights) -> None:
        experts, weights = _numpy(experts), _numpy(weights)  # [T, K] each
        self._check_layer(layer)
        if layer in self._layers[-1]:
            raise ValueError(f"layer {layer} added twice to forward {len(self._forwards) - 1}")
        if experts.ndim != 2 or experts.shape[1] != self.top_k or weights.shape != experts.shape:
            raise ValueError(f"layer {layer}: experts {list(experts.shape)} and weights {list(weights.shape)} "
                             f"must both be [T, {self.top_k}]")
        self._layers[-1][layer] = (experts, weights)

    def add_prediction(self, name: str, distance: int, layer: int, picks, probs) -> None:
        picks, probs = _numpy(picks), _numpy(probs)  # [T, P] each
        self._check_layer(layer)
        if not name or distance < 1 or layer + distance >= self.num_layers:
            raise ValueError(f"predictor {name!r}: layer {layer} + distance {distance} is no later layer of "
                             f"{self.num_layers}")
        width = self._widths.setdefault((name, distance), picks.shape[-1] if picks.ndim == 2 else -1)
        if picks.ndim != 2 or picks.shape[1] != width or probs.shape != picks.shape:
            raise ValueError(f"predictor {name} d={distance} layer {layer}: picks {list(picks.shape)} and probs "
                             f"{list(probs.shape)} must both be [T, {width}]")
        key = (name, distance, layer)
        if key in self._predictions[-1]:
            raise ValueError(f"predictor {name} d={distance} layer {layer} added twice to one forward")
        self._predictions[-1][key] = (picks, probs)

    def _check_layer(self, layer: int) -> None:
        if not self._forwards:
            raise ValueError("add_forward() first")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not one of 0..{self.num_layers - 1}")

    def build(self) -> RoutingLog:
        empty = (np.zeros((0, self.top_k), np.int16), np.zeros((0, self.top_k), np.float32))
        counts = np.zeros((len(self._forwards), self.num_layers), np.int32)
        experts, weights = [], []
        predicted = {key: ([], []) for key in self._widths}
        for f, (layers, guesses) in enumerate(zip(self._layers, self._predictions, strict=True)):
            for layer in range(self.num_layers):
                chosen, chosen_weights = layers.get(layer, empty)
                counts[f, layer] = len(chosen)
                experts.append(chosen)
                weights.append(chosen_weights)
                for (name, d), (picks, probs) in predicted.items():
                    width = self._widths[(name, d)]
                    guess = guesses.get((name, d, layer))
                    if guess is None:  # the predictor did not run here, e.g. l + d is past the last layer
                        guess = (np.full((len(chosen), width), -1), np.zeros((len(chosen), width)))
                    if len(guess[0]) != len(chosen):
                        raise ValueError(f"forward {f} layer {layer}: predictor {name} d={d} has {len(guess[0])} rows, "
                                         f"the routing {len(chosen)}")
                    picks.append(guess[0])
                    probs.append(guess[1])
        batch, step = np.array(self._forwards, np.int32).reshape(-1, 2).T
        predictions = {key: (np.concatenate(picks), np.concatenate(probs)) for key, (picks, probs) in predicted.items()}
        return RoutingLog(self.meta, batch, step, counts, np.concatenate(experts or [empty[0]]),
                          np.concatenate(weights or [empty[1]]), predictions)


def _numpy(values) -> np.ndarray:
    """A numpy array of a list, an array or a torch tensor on any device (bfloat16 has no numpy twin: float32)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)
