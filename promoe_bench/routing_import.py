"""Public JSON-lines routing logs ({layer, token_pos, experts, gating_probs} per token and layer) as a
RoutingLog, their gaps reported, never filled in."""

import json
from pathlib import Path

import numpy as np

from .errors import UsageError
from .routing_log import RoutingLog, RoutingLogBuilder, _layer_gaps

RECORD_FIELDS = ("layer", "token_pos", "experts", "gating_probs")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_record(where: str, line: str) -> tuple[int, int, list[int], list[float], dict]:
    """One JSON line -> (layer, position, experts, probabilities, the other keys); UsageError naming the field."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: not JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: not a JSON object")
    for key in RECORD_FIELDS:
        if key not in record:
            raise UsageError(f"{where}: missing field '{key}'")
    layer, position, experts, probs = (record.pop(key) for key in RECORD_FIELDS)
    for key, value in (("layer", layer), ("token_pos", position)):
        if not _is_count(value):
            raise UsageError(f"{where}: field '{key}' must be a non-negative integer, got {value!r}")
    if not isinstance(experts, list) or not experts or not all(map(_is_count, experts)):
        raise UsageError(f"{where}: field 'experts' must be a non-empty list of expert ids, got {experts!r}")
    if (not isinstance(probs, list) or len(probs) != len(experts)
            or not all(isinstance(p, int | float) and not isinstance(p, bool) for p in probs)):
        raise UsageError(f"{where}: field 'gating_probs' must be a list of {len(experts)} numbers, got {probs!r}")
    return layer, position, experts, probs, record


def import_jsonl(path, num_experts: int | None = None) -> RoutingLog:
    """A public JSON-lines routing log: one {layer, token_pos, experts, gating_probs} object per token and layer.

    Forwards are rebuilt from the order of the lines: (layer, token_pos) rises within a forward (a prefill
    grouped by layer, or a decode step's layers in order), so each step back to a lower (layer, token_pos)
    starts the next forward. A change of the other keys (dataset, problem_id, ...) starts another batch,
    whose first forward is its prefill; those keys are kept in meta["imported"]["batches"]. Missing records
    become missing rows, listed in meta["imported"]["gaps"]. Undetectable: a forward that lost its last layers
    followed by one that lost its first ones reads as one forward."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such routing log file")
    if num_experts is not None and num_experts < 1:
        raise UsageError(f"num_experts must be positive, got {num_experts}")
    forwards: list[tuple[int, int, dict[int, list]]] = []  # (batch, step, layer -> [(position, experts, probs)])
    batches: dict[str, int] = {}  # the other keys, as JSON -> batch
    steps: dict[int, int] = {}  # batch -> its next step
    previous = top_k = first_line = None
    records = largest = 0
    with path.open() as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            layer, position, experts, probs, other = _parse_record(f"{path}:{number}", line)
            if top_k is None:
                top_k, first_line = len(experts), number
            elif len(experts) != top_k:
                raise UsageError(f"{path}:{number}: field 'experts' has {len(experts)} ids, line {first_line} "
                                 f"has {top_k}")
            if num_experts is not None and max(experts) >= num_experts:
                raise UsageError(f"{path}:{number}: field 'experts' holds id {max(experts)}, beyond "
                                 f"num_experts = {num_experts}")
            key = json.dumps(other, sort_keys=True)
            if previous is None or key != previous[0] or (layer, position) <= previous[1]:
                batch = batches.setdefault(key, len(batches))
                steps[batch] = steps.get(batch, -1) + 1
                forwards.append((batch, steps[batch], {}))
            forwards[-1][2].setdefault(layer, []).append((position, experts, probs))
            previous = (key, (layer, position))
            records += 1
            largest = max(largest, *experts)
    if not records:
        raise UsageError(f"{path}: no routing records")

    imported = {"file": str(path), "records": records,
                "num_experts_from": "argument" if num_experts is not None else "largest expert id + 1",
                "batches": [json.loads(key) for key in batches]}
    num_layers = 1 + max(layer for *_, layers in forwards for layer in layers)
    builder = RoutingLogBuilder(num_layers, largest + 1 if num_experts is None else num_experts, top_k,
                                {"source": "imported", "imported": imported})
    expected, lost = [], {}  # per forward: its distinct positions; (forward, layer) -> positions it lacks
    for f, (batch, step, layers) in enumerate(forwards):
        builder.add_forward(batch, step)
        positions = set().union(*({p for p, _, _ in rows} for rows in layers.values()))
        expected.append(len(positions))
        for layer, rows in layers.items():
            builder.add_layer(layer, [e for _, e, _ in rows], [p for _, _, p in rows])
            lost[(f, layer)] = sorted(positions - {p for p, _, _ in rows})
    log = builder.build()
    gaps = _layer_gaps(log.counts, log.forward_batch, log.forward_step, np.array(expected))
    for short in gaps["short_layers"]:
        short["missing_positions"] = lost[(short["forward"], short["layer"])]
    log.meta["imported"]["gaps"] = gaps
    return log
