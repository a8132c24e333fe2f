"""What each piece of a replayed forward costs the simulator, from one of two sources:

- `ProfileCosts`: a hardware profile and a model profile through `CostModel`'s roofline, to project a
  routing log onto a GPU and model the user does not have;
- `MeasuredCosts`: the compute a real run measured, forward by forward and expert by expert, with its
  link's settings: replaying a run's own log with these checks the simulator against the run.

Both give `forward(repeat, f)`, the costs of forward f of the log in that repeat, `copy_s(bytes)`, and
`wake_s`: how long compute takes to resume after the copy it waited for lands.
"""

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UsageError
from .profiles import Hardware, ModelProfile, check_precision
from .results import load_run, load_timeline
from .routing_log import RoutingLog

PREDICTOR_WIDTH = 1024  # ProMoE's predictor: hidden -> 1024 -> experts
# Rough count of eager transformers' kernels per decoder layer outside the routed experts: 2 norms, q/k/v/o
# projections, rotary, attention, 2 residual adds, router matmul and top-k; an estimate, not a measurement.
KERNELS_PER_LAYER = 12
ROUTER_KERNELS = 2  # the router's matmul, then softmax + top-k


class CostModel:
    """Seconds for the pieces of an offloaded MoE forward on `hardware`, for `model` with experts in `precision`.

    Every cost is launches x launch_us + max(FLOPs / peak, bytes / device bandwidth): decode, a few tokens against
    a whole weight matrix, is bandwidth-bound; a long prefill is compute-bound. Constants are computed once here,
    so each call is a few float operations (a simulator calls these millions of times).
    """

    def __init__(self, hardware: Hardware, model: ModelProfile, precision: str = "fp16"):
        check_precision(precision)
        self.hardware, self.model, self.precision = hardware, model, precision
        self.expert_bytes = model.expert_bytes(precision)
        self._h2d = hardware.h2d_gbps * 1e9  # B/s
        self._copy_latency = hardware.copy_latency_us * 1e-6
        self._peak = hardware.fp16_tflops * 1e12  # FLOP/s
        self._hbm = hardware.hbm_gbps * 1e9  # B/s
        self._launch = hardware.launch_us * 1e-6
        layers = model.moe_layers
        # one MoE layer's share of the non-expert forward; +3 kernels: embedding, final norm, LM head
        self._layer_kernel_s = self._launch * (KERNELS_PER_LAYER * model.layers + 3) / layers
        self._layer_weight_bytes = 2.0 * model.matmul_params / layers
        self._router_params = model.hidden * model.experts
        self._expert_fixed_s = 3 * self._launch  # gate, up and down matmuls (activation fused or negligible)

    def copy_s(self, nbytes: float) -> float:
        """One host-to-device copy of `nbytes` (an expert: `self.expert_bytes`; a chunk: a third of it)."""
        return self._copy_latency + nbytes / self._h2d

    def expert_s(self, tokens: int) -> float:
        """One routed expert on `tokens` tokens, its weights read once from device memory."""
        return self._expert_fixed_s + max(self.model.expert_flops(tokens) / self._peak, self.expert_bytes / self._hbm)

    def non_expert_s(self, tokens: int, context: int, sequences: int = 1) -> float:
        """One MoE layer's share (1 / moe_layers) of the forward's non-expert work for `tokens` new tokens, each
        attending to `context` tokens on average (decode: the cache length; a prefill of T: about T / 2), across
        `sequences` sequences: the non-expert weights and each sequence's KV cache are read once. Includes the
        router (`router_s` gives its part alone; do not add it again)."""
        flops = tokens * self.model.flops_per_token(context) / self.model.moe_layers
        nbytes = self._layer_weight_bytes + sequences * self.model.kv_bytes(context) / self.model.moe_layers
        return self._layer_kernel_s + max(flops / self._peak, nbytes / self._hbm)

    def router_s(self, tokens: int) -> float:
        """One MoE layer's router (gate matmul, softmax and top-k) on `tokens` tokens."""
        flops = 2.0 * self._router_params * tokens
        return ROUTER_KERNELS * self._launch + max(flops / self._peak, 2.0 * self._router_params / self._hbm)

    def predictor_s(self, tokens: int, width: int = PREDICTOR_WIDTH) -> float:
        """ProMoE's predictor for one target layer on `tokens` tokens: hidden -> width -> experts, fp16 weights,
        three kernels (two matmuls and the ReLU)."""
        params = (self.model.hidden + 1) * width + (width + 1) * self.model.experts
        return 3 * self._launch + max(2.0 * params * tokens / self._peak, 2.0 * params / self._hbm)


def forward_shapes(log: RoutingLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per forward: tokens (rows; a gap does not make the forward cheaper, so the most over layers),
    sequences in the batch, and the average context a token attends to."""
    tokens = log.counts.max(axis=1)
    batches = log.meta.get("batches") or {}
    sequences = np.array([max(1, len(batches.get(str(b), [None]))) for b in log.forward_batch])
    prompt = {}  # batch -> tokens per sequence of its prefill
    for f in np.flatnonzero(log.forward_step == 0):
        prompt[int(log.forward_batch[f])] = tokens[f] / sequences[f]
    context = np.array([prompt.get(int(b), 0) / 2 if s == 0 else prompt.get(int(b), 0) + s
                        for b, s in zip(log.forward_batch, log.forward_step, strict=True)])
    return tokens, sequences, context


class ProfiledForward:
    """One forward's costs from the cost model, worked out once: every MoE layer gets the same share."""

    def __init__(self, model: CostModel, expert_cost, tokens: int, sequences: int, context: float):
        self.expert_cost = expert_cost  # tokens -> seconds of one expert, memoised (decode asks a few sizes)
        self.router = model.router_s(tokens)
        # the cost model's non-expert share includes the router, which the simulator places on its own
        self.non_expert = model.non_expert_s(tokens, context, sequences) - self.router
        self.predict = model.predictor_s(tokens)

    def non_expert_s(self, layer: int) -> float:
        return self.non_expert

    def router_s(self, layer: int) -> float:
        return self.router

    def expert_s(self, layer: int, expert: int, tokens: int) -> float:
        return self.expert_cost(tokens)

    def predict_s(self, layer: int) -> float:
        return self.predict

    def head_s(self) -> float:
        return 0.0  # in the non-expert shares


class ProfileCosts:
    def __init__(self, model: CostModel, log: RoutingLog):
        self.model = model
        expert_cost = functools.cache(model.expert_s)
        self._forwards = [ProfiledForward(model, expert_cost, int(t), int(s), float(c))
                          for t, s, c in zip(*forward_shapes(log), strict=True)]
        self.expert_bytes = model.expert_bytes
        self.wake_s = 0.0  # compute waits on a CUDA event: the device resumes by itself

    def forward(self, repeat: int, f: int) -> ProfiledForward:
        return self._forwards[f]

    def copy_s(self, nbytes: int) -> float:
        return self.model.copy_s(nbytes)

    def describe(self) -> dict:
        return {"kind": "profile", "hardware": self.model.hardware.name, "model_profile": self.model.model.name,
                "precision": self.model.precision}


@dataclass
class MeasuredForward:
    layers: dict  # layer -> (non_expert_s, router_s, predict_s per prediction)
    experts: dict  # (layer, expert) -> compute seconds, waits for copies taken out, overheads shared out
    head: float

    def non_expert_s(self, layer: int) -> float:
        return self.layers[layer][0]

    def router_s(self, layer: int) -> float:
        return self.layers[layer][1]

    def expert_s(self, layer: int, expert: int, tokens: int) -> float:
        return self.experts[(layer, expert)]

    def predict_s(self, layer: int) -> float:
        return self.layers[layer][2]

    def head_s(self) -> float:
        return self.head


class MeasuredCosts:
    """The compute of strategy `label` in run `folder`, forward by forward; its link from run.json."""

    def __init__(self, folder: Path, label: str, log: RoutingLog):
        meta, tables = load_run(folder)
        if label not in meta.get("strategies", {}):
            raise UsageError(f"{folder} has no strategy {label}; it ran {', '.join(meta.get('strategies', {}))}")
        link = meta["strategies"][label]["link"]
        if link.get("kind") != "emulated":
            raise UsageError(f"{folder}: measured costs come from a CPU run's emulated link, this one is {link}")
        self.folder, self.label, self.compute_of = folder, label, label
        self._latency, self._bytes_per_s = link["latency_us"] * 1e-6, link["gbps"] * 1e9
        layers = tables["layers"][tables["layers"]["strategy"] == label]
        timeline = load_timeline(folder)
        timeline = timeline[timeline["strategy"] == label]
        key = ["repeat", "batch", "step"]
        predictions = timeline[timeline["kind"] == "predict"].groupby([*key, "layer"]).size()
        spans = timeline.assign(seconds=timeline["end_s"] - timeline["start_s"])
        heads = spans[spans["kind"] == "head"].set_index(key)["seconds"]
        blocks = spans[spans["kind"] == "moe"].set_index([*key, "layer"])["seconds"]
        experts = _expert_shares(timeline)
        self._forwards: dict[tuple[int, int, int], MeasuredForward] = {}
        for (repeat, batch, step), rows in layers.groupby(key):
            per_layer, per_expert = {}, {}
            for row in rows.itertuples(index=False):
                where = (repeat, batch, step, row.layer)
                calls = predictions.get(where, 0)
                # the router's column holds the predictions made at the layer's input; the simulator adds those
                per_layer[row.layer] = (row.non_expert_s, row.router_s - row.predict_s,
                                        row.predict_s / calls if calls else 0.0)
                # all of the block after the router but the waits: each expert's share by its compute slice
                budget = blocks[where] - row.router_s - row.stall_s
                for expert, share in experts.get(where, {}).items():
                    per_expert[(row.layer, expert)] = budget * share
            self._forwards[(repeat, batch, step)] = MeasuredForward(per_layer, per_expert,
                                                                    float(heads.get((repeat, batch, step), 0.0)))
        self._repeats = sorted({k[0] for k in self._forwards})
        self._log = log
        measured = {(batch, step) for _, batch, step in self._forwards}
        unmeasured = [(int(b), int(s)) for b, s in zip(log.forward_batch, log.forward_step, strict=True)
                      if (int(b), int(s)) not in measured]
        if unmeasured:
            raise UsageError(f"{folder} measured no forward (batch, step) {unmeasured[0]} of {label} that the log "
                             f"holds: replay a run's own log (`run --record-trace`) with --measured")
        self.dispatch_s, self.wake_s = _thread_overheads(timeline, self._nominal_s)

    def forward(self, repeat: int, f: int) -> MeasuredForward:
        repeat = min(repeat, self._repeats[-1])  # more simulated repeats than measured: the last one again
        key = (repeat, int(self._log.forward_batch[f]), int(self._log.forward_step[f]))
        if key not in self._forwards:
            raise UsageError(f"{self.folder} measured no forward {key} (repeat, batch, step) of {self.label}; "
                             f"was the log recorded from this run?")
        return self._forwards[key]

    def copy_s(self, nbytes: int) -> float:
        return self.dispatch_s + self._nominal_s(nbytes)

    def _nominal_s(self, nbytes):
        """What the link's settings alone make a copy of `nbytes` take (also for an array of sizes)."""
        return self._latency + nbytes / self._bytes_per_s

    def describe(self) -> dict:
        return {"kind": "measured", "run": str(self.folder), "strategy": self.label,
                "compute_of": self.compute_of, "dispatch_us": round(self.dispatch_s * 1e6, 1),
                "wake_us": round(self.wake_s * 1e6, 1)}

    def with_compute_of(self, other: "MeasuredCosts") -> "MeasuredCosts":
        """These costs with `other`'s compute (attention, router, experts, head) in place of this strategy's
        own, keeping its own predictions and copy-worker overheads: e.g. full_gpu's, which no copy shared
        the machine with, to see what each strategy's mechanism does when copying costs compute nothing,
        as with a GPU's copy engine."""
        if missing := sorted(set(self._forwards) - set(other._forwards)):
            raise UsageError(f"{other.folder}: {other.label} measured no forward {missing[0]} (repeat, batch, step) "
                             f"that {self.label} ran")
        borrowed = copy.copy(self)
        borrowed.compute_of = other.label
        borrowed._forwards = {key: MeasuredForward({layer: (*other._forwards[key].layers[layer][:2], predict)
                                                    for layer, (_, _, predict) in own.layers.items()},
                                                   other._forwards[key].experts, other._forwards[key].head)
                              for key, own in self._forwards.items()}
        return borrowed


def _thread_overheads(timeline: pd.DataFrame, nominal_s) -> tuple[float, float]:
    """The runtime's threads at work, measured: how much later than its nominal time (`nominal_s(bytes)`) a
    chunk lands after the previous chunk of the same copy (the copy worker's turnaround: lock, pick, waking
    on a busy machine, as far as the link does not pay it back; such a chunk never waits for a slot, which
    the simulator models itself), and the time from the last chunk landing to compute resuming after a
    stall. Means, as they add up over a run."""
    copies = timeline[timeline["kind"] == "chunk"].sort_values("start_s")
    if len(copies) < 2:
        return 0.0, 0.0
    end, nbytes, layer, expert = (copies[c].to_numpy() for c in ("end_s", "bytes", "layer", "expert"))
    same_copy = (layer[1:] == layer[:-1]) & (expert[1:] == expert[:-1])
    late = end[1:] - end[:-1] - nominal_s(nbytes[1:].astype(float))
    dispatch = max(0.0, float(late[same_copy].mean())) if same_copy.any() else 0.0
    stalls = timeline[timeline["kind"] == "stall"]["end_s"].to_numpy()
    landed = np.sort(end)
    before = np.searchsorted(landed, stalls) - 1  # the last chunk landed before compute resumed
    wake = stalls[before >= 0] - landed[before[before >= 0]]
    return dispatch, float(wake.mean()) if len(wake) else 0.0


def _expert_shares(timeline: pd.DataFrame) -> dict:
    """(repeat, batch, step, layer) -> {expert: its share of the layer's expert compute}, from each expert's
    compute slice minus the waits for copies inside it (the down chunk, which compute may wait for)."""
    key = ["repeat", "batch", "step", "layer"]
    experts = timeline[timeline["kind"] == "expert"].sort_values([*key, "start_s"])
    stalls = timeline[timeline["kind"] == "stall"]
    seconds = (experts["end_s"] - experts["start_s"]).to_numpy()
    if not stalls.empty:  # a stall inside an expert's slice is the wait for its down chunk
        slices = experts[[*key, "start_s", "end_s"]].assign(index=np.arange(len(experts))).sort_values("start_s")
        waits = stalls[[*key, "start_s", "end_s"]].rename(columns={"end_s": "stall_end"}).sort_values("start_s")
        inside = pd.merge_asof(waits, slices, on="start_s", by=key, direction="backward").dropna(subset=["index"])
        inside = inside[inside["stall_end"] <= inside["end_s"]]
        np.subtract.at(seconds, inside["index"].to_numpy(dtype=int),
                       (inside["stall_end"] - inside["start_s"]).to_numpy())
    out: dict = {}
    for row, spent in zip(experts[[*key, "expert"]].itertuples(index=False), seconds, strict=True):
        out.setdefault((row.repeat, row.batch, row.step, row.layer), {})[row.expert] = float(spent)
    for shares in out.values():
        total = sum(shares.values()) or 1.0
        for expert in shares:
            shares[expert] /= total
    return out
