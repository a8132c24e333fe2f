"""The device expert cache: which expert of which layer sits in which slot, and how far it is copied.

Pure bookkeeping, called with the copy engine's lock held. Each layer owns a fixed set of slots
(per-layer replacement, as in ProMoE). The eviction policy ranks candidates; this class alone decides
who may be a candidate:
- never an expert being copied, computed with, or awaited by compute;
- an expert routed in the layer's current forward and not yet computed ("pending") only as a last
  resort, when compute is blocked on a copy that has no other slot; then the pending expert that runs
  last gives way, so the outcome does not depend on thread timing.
"""

from .policies import EvictionPolicy

NUM_CHUNKS = 3  # gate, up, down


class Entry:
    """A slot's expert (a plain slotted class: the runtime and the simulator make one per copy)."""

    __slots__ = ("slot", "chunks_ready", "copying", "events", "prefetched", "used")

    def __init__(self, slot: int, prefetched: bool = False):
        self.slot = slot  # index into the device slot pool
        self.chunks_ready = 0
        self.copying = True  # a copy task owns the slot until every chunk has landed
        self.events: list = []  # per chunk on the link, its Transfer: what compute on a device waits on
        self.prefetched = prefetched  # brought in by a speculative (LOW) copy
        self.used = False  # computed with since it arrived

    @property
    def ready(self) -> bool:
        return self.chunks_ready == NUM_CHUNKS


class Candidates:
    """The experts of a layer that may be evicted now: resident or arriving, not being copied, computed
    with or awaited, and not pending in the current forward. Tested lazily: a policy that ranks by age
    usually needs only the first it meets, and a layer holds many."""

    def __init__(self, entries: dict[int, Entry], in_use: set[int], pending: set[int]):
        self._entries, self._in_use, self._pending = entries, in_use, pending

    def __contains__(self, expert: int) -> bool:
        entry = self._entries.get(expert)
        return entry is not None and not entry.copying and expert not in self._in_use and expert not in self._pending

    def __iter__(self):
        return (expert for expert in self._entries if expert in self)


class ExpertCache:
    def __init__(self, num_layers: int, capacity: int, policy: EvictionPolicy, chunk_bytes: tuple[int, ...]):
        self.capacity = capacity  # slots per layer
        self.chunk_bytes = chunk_bytes
        self.policy = policy
        self._entries: list[dict[int, Entry]] = [{} for _ in range(num_layers)]
        self._occupied = 0  # entries over all layers, kept as they come and go (read after every layer)
        self._free = [list(range(layer * capacity, (layer + 1) * capacity))[::-1] for layer in range(num_layers)]
        self._pending: list[list[int]] = [[] for _ in range(num_layers)]  # execution order of the current forward
        self._pending_sets: list[set[int]] = [set() for _ in range(num_layers)]  # the same, to test membership
        self.in_use: set[tuple[int, int]] = set()  # (layer, expert) computed with or awaited right now
        self.evictions = [0] * num_layers
        self.wasted_bytes = [0] * num_layers  # prefetched, then evicted or dropped before any use

    def lookup(self, layer: int, expert: int) -> Entry | None:
        return self._entries[layer].get(expert)

    def entries(self, layer: int) -> dict[int, Entry]:
        """The layer's entries by expert, to read (a simulator looks up many experts of one layer)."""
        return self._entries[layer]

    def residents(self, layer: int) -> list[int]:
        return list(self._entries[layer])

    def occupied_slots(self) -> int:
        """Slots holding an expert or receiving one, over all layers."""
        return self._occupied

    def begin_forward(self, layer: int, order: list[int], tokens: dict[int, int] | None = None) -> None:
        """The layer's routed experts in the order they will run; `tokens`: how many tokens chose each (None
        in a forward of one token), for the policy."""
        self._pending[layer] = list(order)
        self._pending_sets[layer] = set(order)
        self.policy.begin_forward(layer, tokens)

    def reorder(self, layer: int, order: list[int]) -> None:
        """The current forward's experts will run in `order` instead (the same experts: nothing else changes)."""
        self._pending[layer] = list(order)

    def computed(self, layer: int, expert: int) -> None:
        """`expert` finished its work in the current forward of `layer`."""
        self._pending[layer].remove(expert)
        self._pending_sets[layer].discard(expert)
        self._entries[layer][expert].used = True
        self.policy.computed(layer, expert)

    def claim(self, layer: int, expert: int, last_resort: bool, prefetch: bool = False) -> Entry | None:
        """A slot for `expert`, evicting if needed; None when no slot may be taken now."""
        assert expert not in self._entries[layer], f"expert {expert} of layer {layer} is already cached"
        if not self._free[layer]:
            victim = self._victim(layer, last_resort)
            if victim is None:
                return None
            self.remove(layer, victim)
            self.evictions[layer] += 1
        entry = Entry(self._free[layer].pop(), prefetched=prefetch)
        self._entries[layer][expert] = entry
        self._occupied += 1
        self.policy.touch(layer, expert)  # arriving is a use: never-used newcomers are not the oldest
        return entry

    def remove(self, layer: int, expert: int) -> Entry:
        entry = self._entries[layer].pop(expert)
        self._occupied -= 1
        self._free[layer].append(entry.slot)
        if entry.prefetched and not entry.used:
            self.wasted_bytes[layer] += sum(self.chunk_bytes[: entry.chunks_ready])
        self.policy.forget(layer, expert)
        return entry

    def _victim(self, layer: int, last_resort: bool) -> int | None:
        in_use = {expert for used_layer, expert in self.in_use if used_layer == layer}
        candidates = Candidates(self._entries[layer], in_use, self._pending_sets[layer])
        victim = self.policy.victim(layer, candidates)
        if victim is not None:
            return victim
        if last_resort:
            movable = Candidates(self._entries[layer], in_use, set())
            for expert in reversed(self._pending[layer]):
                if expert in movable:
                    return expert
        return None
