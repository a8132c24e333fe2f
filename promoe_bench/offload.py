"""The offload runtime: runs a loaded model with its experts served from a device cache under a strategy.

Two attachment points into transformers, both public: a forward pre-hook on each MoE block (the
layer's input is ready: the moment to predict and prefetch) and an experts implementation registered
with transformers' ExpertsInterface (the router has chosen: request, order, wait, compute).
"""

import contextlib
import time
from collections import Counter

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface

from .cache import ExpertCache
from .checkpoint import LoadedModel
from .copy_engine import CopyEngine, Priority
from .dispatch import Dispatch
from .environment import ModelShape
from .metrics import Clock, StepRecorder
from .predictors import FROM_TRACE, GatePredictor, rank, trace_guess
from .routing_log import RoutingLogBuilder
from .slot_pool import SlotPool
from .trace import RoutingTrace

IMPLEMENTATION = "promoe_offload"
LOGGED_DISTANCE = 3  # a routing log holds predictions up to this many layers ahead


def offloaded_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Registered with transformers: every experts module of the model calls this."""
    runtime, layer = self._promoe_offload
    return runtime.forward_experts(layer, self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, offloaded_experts_forward)


class DispatchTime:
    """The host time an experts call adds to the experts' own math on the hit path (every routed expert
    resident, so no wait for a copy counts), per phase: after the routing read, what the runtime does
    around the experts (strategy, cache, grouping, combining), not inside their matmuls and gate."""

    def __init__(self):
        self.ns: dict[str, int] = {}
        self.layers: dict[str, int] = {}

    def add(self, phase: str, ns: int) -> None:
        self.ns[phase] = self.ns.get(phase, 0) + ns
        self.layers[phase] = self.layers.get(phase, 0) + 1

    def per_layer_us(self) -> dict[str, float]:
        """Phase -> mean microseconds per MoE layer, for the phases that had a layer on the hit path."""
        return {phase: self.ns[phase] / layers * 1e-3 for phase, layers in self.layers.items()}


class OffloadRuntime:
    """Implements the strategies' Environment on a real model; one instance per strategy run."""

    def __init__(self, loaded: LoadedModel, strategy, capacity: int, link, device: torch.device,
                 predictors: dict | None = None, trace: RoutingTrace | None = None, detail: bool = True,
                 routing_log: RoutingLogBuilder | None = None):
        """`predictors`: name -> predictor beyond `gate` (e.g. `learned`); `trace`: the workload's
        recorded routing, for the oracle predictor and policies that read the future; `detail`: time
        layers, experts, predictions and copies (the timeline), not just steps; `routing_log`: record
        every forward's routing, and each predictor's guesses for every later layer it can reach."""
        self.loaded = loaded
        self.strategy = strategy
        store = loaded.store
        self.shape = ModelShape(store.num_layers, store.num_experts, loaded.top_k, store.layout.nbytes, capacity)
        self.trace = trace
        self.predictors = {"gate": GatePredictor(loaded.layers), **(predictors or {})}
        self._positions = [0] * store.num_layers  # forwards routed so far, per layer
        self._inputs: list = [None] * store.num_layers  # each layer's input while its block runs
        cuda = device.type == "cuda"
        self._compute_stream = torch.cuda.current_stream(device) if cuda else None
        self._predict_stream = torch.cuda.Stream(device) if cuda else None
        chunk_bytes = tuple(store.layout.chunk_numel(c) * store.layout.dtype.itemsize for c in range(3))
        self.cache = ExpertCache(store.num_layers, capacity, strategy.eviction_policy(self), chunk_bytes)
        self.pool = SlotPool(store.num_layers * capacity, store.layout, device)
        self.engine = CopyEngine(store, self.pool, self.cache, link, record_chunks=detail)
        self.link = link
        self.recorder = StepRecorder(Clock(device), store.num_layers, detail)
        self.routing_log = routing_log
        self.dispatch = DispatchTime()
        self._phase = "decode"  # of the step under way
        self._hooks = []
        for layer in loaded.layers:
            layer.experts._promoe_offload = (self, layer.index)
            self._hooks.append(layer.block.register_forward_pre_hook(self._block_pre_hook(layer.index)))
            self._hooks.append(layer.block.register_forward_hook(self._block_hook(layer.index)))
        loaded.model.set_experts_implementation(IMPLEMENTATION)
        strategy.setup(self)
        self.engine.idle()
        self.engine.take_counters()  # copies made while setting up belong to no step

    # -- Environment -----------------------------------------------------------------------------

    def is_resident(self, layer: int, expert: int) -> bool:
        return self.chunks_ready(layer, expert) == 3

    def chunks_ready(self, layer: int, expert: int) -> int:
        entry = self.cache.lookup(layer, expert)
        return entry.chunks_ready if entry is not None else 0

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        self.engine.request(layer, expert, priority, chunked)

    def drop_pending(self, layer: int) -> int:
        return self.engine.drop_low(layer)

    def evict(self, layer: int, expert: int) -> None:
        self.engine.evict(layer, expert)

    def _off_compute_stream(self):
        """CUDA: the predictor's own stream, after the layer's input is computed (the host still waits
        for the result, to queue the copies). CPU: nothing to move off."""
        if self._predict_stream is None:
            return contextlib.nullcontext()
        self._predict_stream.wait_stream(self._compute_stream)
        return torch.cuda.stream(self._predict_stream)

    def position(self, layer: int) -> int:
        return self._positions[layer]

    def predict(self, layer: int, target: int, predictor: str, min_prob: float = 0.0,
                recall: float = 1.0) -> list[int]:
        start = time.perf_counter()
        if predictor in FROM_TRACE:
            if self.trace is None:
                raise RuntimeError(f"the {predictor} predictor needs the workload's recorded routing")
            stamps = (self.recorder.stamp(),)
            ranked = trace_guess(self.trace, target, self._positions[target], predictor, recall, self.shape)
            stamps += (self.recorder.stamp(),)
        else:
            with self._off_compute_stream():  # stamped on the predictor's stream
                stamps = (self.recorder.stamp(self._predict_stream),)
                picks, probs = self.predictors[predictor](layer, target, self._inputs[layer])
                stamps += (self.recorder.stamp(self._predict_stream),)
                # host sync, one per prediction: the host queues the copies of the experts it names
                ranked = rank(picks, probs, self.shape.num_experts, min_prob)
        self.recorder.predicted(layer, target, ranked, time.perf_counter() - start, *stamps)
        return ranked

    # -- hooks ---------------------------------------------------------------------------------

    def begin_step(self, **context) -> None:
        self._phase = context.get("phase", "decode")
        self.recorder.begin_step(**context)
        if self.routing_log is not None:
            self.routing_log.add_forward(context["batch"], context["step"])

    def _block_pre_hook(self, layer: int):
        def hook(module, args):
            self.recorder.block_start(layer)
            self._inputs[layer] = args[0]
            if self.routing_log is not None:
                self._log_predictions(layer)
            self.strategy.on_layer_input(self, layer)

        return hook

    def _log_predictions(self, layer: int) -> None:
        """Every predictor's guesses from this layer's input for each later layer it can reach (the gate:
        up to LOGGED_DISTANCE layers ahead; learned predictors: the pairs they were trained for)."""
        for name, predictor in self.predictors.items():
            for distance in range(1, min(LOGGED_DISTANCE, self.shape.num_layers - 1 - layer) + 1):
                if name == "gate" or (layer, distance) in predictor.mlps:
                    picks, probs = predictor(layer, layer + distance, self._inputs[layer])
                    self.routing_log.add_prediction(name, distance, layer, picks, probs)

    def _block_hook(self, layer: int):
        def hook(module, args, output):
            self.recorder.block_end(layer)
            self._inputs[layer] = None  # its predictions are made: T x H of activations less to hold

        return hook

    def forward_experts(self, layer, module, hidden_states, top_k_index, top_k_weights):
        # hidden_states [T, H], top_k_index / top_k_weights [T, K]
        # host sync, the one of the layer: the host must know the routed experts to copy the missing ones
        chosen = top_k_index.flatten().tolist()  # [T*K]
        routed_ns = time.perf_counter_ns()  # the device caught up with the host: dispatch's own time from here
        routed = list(dict.fromkeys(chosen))
        tokens = Counter(chosen) if len(top_k_index) > 1 else None  # how many tokens chose each expert
        if self.routing_log is not None:
            self.routing_log.add_layer(layer, top_k_index, top_k_weights)
        self._positions[layer] += 1
        # the routed experts are this forward's before the strategy requests any copy: a copy that starts
        # at once must not evict one of them to make room
        hits = self.engine.begin_forward(layer, routed, tokens)
        self.recorder.router_end(layer, routed, hits)
        order = self.strategy.on_router(self, layer, routed)
        if order is not routed:  # reordered: the order only, nothing movable changes
            assert sorted(order) == sorted(routed), f"{self.strategy.name} must run each routed expert once"
            self.engine.reorder(layer, order)
        dispatch = Dispatch(chosen, hidden_states, top_k_index, top_k_weights)
        math_ns = None  # host time in the experts' own math, on the hit path
        if hits == len(routed):  # the hit path: no waits, no engine call per expert
            entries, slots, math_ns = self.cache.entries(layer), [], 0
            start = self.recorder.stamp()
            for expert in order:
                slots.append(entries[expert].slot)
                x = dispatch.inputs(expert)
                began = time.perf_counter_ns()
                out = self._expert(slots[-1], module, x)
                math_ns += time.perf_counter_ns() - began
                dispatch.add(expert, out)
                start = self.recorder.expert(layer, expert, start)
            self.pool.mark_released(slots)
            self.engine.computed(layer, order)
        else:
            for expert in order:
                entry = self._wait(layer, expert, 2)  # gate and up landed; down may still be copying
                start = self.recorder.stamp()
                gate_up = self._gate_up(entry.slot, module, dispatch.inputs(expert))  # [n, 2I]
                self._wait(layer, expert, 3)
                dispatch.add(expert, self._down(entry.slot, module, gate_up))
                self.recorder.expert(layer, expert, start)
                self.pool.mark_released((entry.slot,))
                self.engine.release(layer, expert)
        self.strategy.after_layer(self, layer, order)
        self.recorder.experts_end(layer, self.cache.occupied_slots() * self.shape.expert_bytes)
        output = dispatch.combine()
        if math_ns is not None:
            self.dispatch.add(self._phase, time.perf_counter_ns() - routed_ns - math_ns)
        return output

    def _expert(self, slot, module, x):
        """One expert's output for `x` [n, H]: [n, H]."""
        return self._down(slot, module, self._gate_up(slot, module, x))

    def _gate_up(self, slot, module, x):
        """Gate and up projections of `x` [n, H] laid out as the family's `_apply_gate` expects."""
        fused = self.pool.fused_gate_up(slot)
        if fused is not None and module.is_concatenated:
            return F.linear(x, fused)
        (gate, gate_bias), (up, up_bias) = self.pool.views(slot)[:2]
        projections = []
        for weight, bias in ((gate, gate_bias), (up, up_bias)):
            y = x @ weight if module.is_transposed else F.linear(x, weight)
            projections.append(y + bias if bias is not None else y)
        if module.is_concatenated:
            return torch.cat(projections, dim=-1)
        return torch.stack(projections, dim=-1).flatten(-2)  # interleaved: g0 u0 g1 u1 ...

    def _down(self, slot, module, gate_up):
        """The gate applied to `gate_up` [n, 2I], then the down projection: [n, H]."""
        down, down_bias = self.pool.views(slot)[2]
        hidden = module._apply_gate(gate_up)  # [n, I]
        out = hidden @ down if module.is_transposed else F.linear(hidden, down)
        return out + down_bias if down_bias is not None else out

    def _wait(self, layer, expert, chunks):
        """The expert's entry once compute may use `chunks` of its chunks, each wait for a copy recorded."""
        if self.link.device_waits:  # compute queues behind the chunk's copy on the device; the host goes on
            entry, landed = self.engine.wait(layer, expert, chunks)
            if not landed:
                transfer = entry.events[chunks - 1]
                start = self.recorder.clock.stamp()
                self._compute_stream.wait_event(transfer.landed)
                self.recorder.waited(layer, expert, start, transfer.end)
            return entry
        start = time.perf_counter_ns()
        entry, landed = self.engine.wait(layer, expert, chunks)  # the host waits until they have landed
        if not landed:
            self.recorder.waited(layer, expert, start, time.perf_counter_ns())
        return entry

    # -- steps -----------------------------------------------------------------------------------

    def finish_step(self) -> float:
        """Close the step's records; copies are attributed to the step in which they landed."""
        return self.recorder.finish_step(*self.engine.take_counters())

    def close(self) -> None:
        self.engine.close()
        for hook in self._hooks:
            hook.remove()
        for layer in self.loaded.layers:
            del layer.experts._promoe_offload
