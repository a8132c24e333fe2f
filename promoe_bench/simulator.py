"""The simulator: a routing log replayed through the strategies in simulated time, on a model of the hardware.

It runs the runtime's own pieces: the strategy modules (through the Environment, as in the runtime),
the expert cache and its eviction policies, the copy scheduler (priorities, chunking, preemption) and
the step recorder, so a simulated run has the real one's rows and timeline. Only time is modelled:
compute advances a clock by what a cost model says (`costs.py`), and one host-to-device link moves
each chunk in `copy_s(bytes)`, the next chunk starting the moment the previous lands, as the copy
worker does.

Everything is deterministic: no threads, no wall clock, the noisy predictor seeded by layer and
position; the same inputs give the same outputs, byte for byte.
"""

from .cache import NUM_CHUNKS, ExpertCache
from .copy_scheduler import CopyScheduler, Priority
from .environment import ModelShape
from .links import Transfer
from .metrics import StepRecorder
from .predictors import FROM_TRACE, rank, trace_guess
from .routing_log import RoutingLog


class SimClock:
    """The recorder's clock in simulated seconds: a stamp is the simulated time it was taken at."""

    cuda = False
    host_origin_ns = 0

    def __init__(self):
        self.now = 0.0

    def stamp(self, stream=None) -> float:
        return self.now

    begin_step = stamp

    def end_step(self, end: float) -> None:
        pass

    def at(self, stamp: float) -> float:
        return stamp

    def host_at(self, ns: int) -> float:
        return ns * 1e-9


class _Copy:
    """What is on the link: a chunk, or an unchunked task's remaining chunks back to back (the copy worker
    moves those without picking in between, so they are one event here, landing chunk by chunk)."""

    __slots__ = ("task", "pieces", "next", "end", "finish")

    def __init__(self, task, pieces: list[Transfer]):
        self.task, self.pieces, self.next = task, pieces, 0
        self.end = pieces[0].end  # when the next chunk lands
        self.finish = pieces[-1].end  # when the last one lands: nothing else can land before it


class SimulatedLink:
    """The copy scheduler driven in simulated time over one link. Lazy: before compute does anything at
    time t, `advance(t)` lands every chunk that ends by t, starting each next chunk at the moment the
    previous one landed, so the scheduler sees the cache as compute left it at that moment."""

    def __init__(self, scheduler: CopyScheduler, chunk_bytes: tuple[int, ...], copy_s, clock: SimClock):
        self.scheduler, self.chunk_bytes, self.clock = scheduler, chunk_bytes, clock
        self.chunk_s = tuple(copy_s(nbytes) for nbytes in chunk_bytes)  # a copy's time depends on its bytes alone
        self.inflight: _Copy | None = None
        self.bytes = 0

    def _start(self, at: float) -> None:
        pick = self.scheduler.next_chunk()
        if pick is None:
            return
        task, first = pick
        pieces = []
        for chunk in range(first, first + 1 if task.chunked else NUM_CHUNKS):
            pieces.append(Transfer(None, at, at + self.chunk_s[chunk], self.chunk_bytes[chunk]))
            self.scheduler.issued(task, pieces[-1])
            at = pieces[-1].end
        self.inflight = _Copy(task, pieces)

    def advance(self, now: float) -> None:
        inflight = self.inflight
        if inflight is not None and inflight.end > now:
            return  # the common case, kept cheap: the link is busy past now
        while inflight is not None and inflight.end <= now:
            piece = inflight.pieces[inflight.next]
            inflight.next += 1
            self.bytes += piece.nbytes
            self.scheduler.landed(inflight.task, piece)
            if inflight.next == len(inflight.pieces):
                self.inflight = None
                self._start(piece.end)
                inflight = self.inflight
            else:
                inflight.end = inflight.pieces[inflight.next].end
        if inflight is None and self.scheduler.busy:
            self._start(now)  # compute may have made something movable

    def wait(self, layer: int, expert: int, chunks: int) -> bool:
        """Compute needs `chunks` chunks of the expert: move the clock to when they have landed. Whether
        compute had to wait."""
        self.advance(self.clock.now)
        stalled = False
        while self.scheduler.need(layer, expert, chunks) is None:
            stalled = True
            self.advance(self.clock.now)  # a refetch the need queued may start now
            if self.inflight is None:
                raise RuntimeError(f"simulation stuck: expert {expert} of layer {layer} can never be copied")
            # a chunked copy lands chunk by chunk; an unchunked one shows compute nothing before its end
            self.clock.now = self.inflight.end if self.inflight.task.chunked else self.inflight.finish
            self.advance(self.clock.now)
        return stalled

    def drain(self) -> None:
        """Land every queued copy (after setup, as the runtime's engine.idle does)."""
        while self.scheduler.busy:
            self.advance(self.clock.now)
            if self.inflight is None:
                break  # the rest cannot claim a slot
            self.clock.now = self.inflight.finish
        self.advance(self.clock.now)


class Simulation:
    """Implements the strategies' Environment in simulated time; one instance per strategy, like the
    runtime's OffloadRuntime, and the same `recorder` and `finish_step` for the records."""

    def __init__(self, log: RoutingLog, strategy, capacity: int, costs, chunk_bytes: tuple[int, ...],
                 detail: bool = True):
        self.log, self.strategy, self.costs = log, strategy, costs
        layers = log.num_layers
        self.shape = ModelShape(layers, log.num_experts, log.top_k, sum(chunk_bytes), capacity)
        self.trace = log.routing_trace() if strategy.needs_trace else None
        self.clock = SimClock()
        self.recorder = StepRecorder(self.clock, layers, detail)
        self.cache = ExpertCache(layers, capacity, strategy.eviction_policy(self), chunk_bytes)
        self.scheduler = CopyScheduler(self.cache, layers, now_ns=lambda: round(self.clock.now * 1e9),
                                       record_chunks=detail)
        self.link = SimulatedLink(self.scheduler, chunk_bytes, costs.copy_s, self.clock)
        self._positions = [0] * layers
        self._token_rows = log.counts.tolist()  # [f][l]: token rows routed (a list: read at every layer)
        self._forward = 0
        strategy.setup(self)
        self.link.drain()
        self.scheduler.take_counters()  # copies made while setting up belong to no step

    # -- Environment -----------------------------------------------------------------------------

    def is_resident(self, layer: int, expert: int) -> bool:
        self.link.advance(self.clock.now)
        entry = self.cache.lookup(layer, expert)
        return entry is not None and entry.chunks_ready == 3

    def chunks_ready(self, layer: int, expert: int) -> int:
        self.link.advance(self.clock.now)
        entry = self.cache.lookup(layer, expert)
        return entry.chunks_ready if entry is not None else 0

    def request(self, layer: int, expert: int, priority: Priority, chunked: bool = True) -> None:
        self.link.advance(self.clock.now)
        self.scheduler.request(layer, expert, priority, chunked)
        self.link.advance(self.clock.now)

    def drop_pending(self, layer: int) -> int:
        self.link.advance(self.clock.now)
        dropped = self.scheduler.drop_low(layer)
        self.link.advance(self.clock.now)
        return dropped

    def evict(self, layer: int, expert: int) -> None:
        self.link.advance(self.clock.now)
        self.scheduler.evict(layer, expert)
        self.link.advance(self.clock.now)

    def position(self, layer: int) -> int:
        return self._positions[layer]

    def predict(self, layer: int, target: int, predictor: str, min_prob: float = 0.0,
                recall: float = 1.0) -> list[int]:
        start = self.clock.now
        if predictor in FROM_TRACE:
            ranked = trace_guess(self.trace, target, self._positions[target], predictor, recall, self.shape)
        else:
            self.clock.now += self._costs.predict_s(layer)
            picks, probs = self.log.predictions[(predictor, target - layer)]
            rows = self.log.rows(self._forward, layer)
            ranked = rank(picks[rows], probs[rows], self.shape.num_experts, min_prob)
        self.recorder.predicted(layer, target, ranked, self.clock.now - start, start, self.clock.now)
        return ranked

    # -- a forward -------------------------------------------------------------------------------

    def _wait(self, layer: int, expert: int, chunks: int) -> None:
        start = self.clock.now
        if self.link.wait(layer, expert, chunks):
            self.clock.now += self.costs.wake_s
            self.recorder.waited(layer, expert, start, self.clock.now)

    def forward(self, f: int, **context) -> float:
        """Replay forward `f` of the log (`context` holds the repeat, which measured costs depend on);
        returns its simulated seconds."""
        log, clock, recorder, strategy = self.log, self.clock, self.recorder, self.strategy
        costs = self._costs = self.costs.forward(context["repeat"], f)
        self._forward = f
        token_rows = self._token_rows[f]
        recorder.begin_step(**context)
        for layer in range(log.num_layers):
            clock.now += costs.non_expert_s(layer)
            recorder.block_start(layer)
            strategy.on_layer_input(self, layer)
            clock.now += costs.router_s(layer)
            tokens = log.layer_routing[f][layer]
            routed = list(tokens)
            self.link.advance(clock.now)
            entries = self.cache.entries(layer)
            hits = 0
            for expert in routed:
                entry = entries.get(expert)
                hits += entry is not None and entry.chunks_ready == 3
            recorder.router_end(layer, routed, hits)
            self._positions[layer] += 1
            chose = tokens if token_rows[layer] > 1 else None  # as the runtime: counts of a batched forward
            self.cache.begin_forward(layer, routed, chose)  # as the runtime: pending before any copy is requested
            order = strategy.on_router(self, layer, routed)
            if order is not routed:  # reordered: the order only, nothing movable changes
                assert len(order) == len(routed) and set(order) == tokens.keys(), \
                    f"{strategy.name} must run each routed expert once"
                self.cache.reorder(layer, order)
            for expert in order:
                seconds = costs.expert_s(layer, expert, tokens[expert])
                # the fast path of most accesses: a resident expert, and a link that stays quiet while it
                # computes (idle with nothing queued, or landing its chunk after): nothing can happen meanwhile
                entry, inflight = entries.get(expert), self.link.inflight
                if entry is not None and entry.chunks_ready == 3 and (
                        inflight.end > clock.now + seconds if inflight is not None else not self.scheduler.busy):
                    start = clock.now
                    clock.now += seconds
                    if recorder.detail:
                        recorder.expert(layer, expert, start)
                    self.cache.computed(layer, expert)
                    continue
                self._wait(layer, expert, 2)  # gate and up landed; down may still be copying
                start = recorder.stamp()
                clock.now += seconds * 2 / 3  # gate and up: two of the three matrices
                self._wait(layer, expert, 3)
                clock.now += seconds / 3
                recorder.expert(layer, expert, start)
                self.link.advance(clock.now)
                self.scheduler.release(layer, expert)
                self.link.advance(clock.now)  # the freed slot may let a waiting copy start now
            strategy.after_layer(self, layer, order)
            recorder.experts_end(layer, self.cache.occupied_slots() * self.shape.expert_bytes)
            recorder.block_end(layer)
        clock.now += costs.head_s()
        self.link.advance(clock.now)
        return recorder.finish_step(*self.scheduler.take_counters())
