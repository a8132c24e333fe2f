import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from promoe_bench.errors import UsageError
from promoe_bench.routing_import import import_jsonl
from promoe_bench.routing_log import FORMAT_VERSION, RoutingLog, RoutingLogBuilder
from promoe_bench.routing_synthetic import synthetic_log

# A real, public Mixtral routing log shipped in traces/ (its README.md says where it comes from).
MIXTRAL_LOG = Path(__file__).resolve().parents[1] / "traces" / "mixtral-8x7b-humaneval-0.jsonl"


def hand_made_log(**meta) -> RoutingLog:
    """Two layers, top-2 of 4 experts. Forward 0 (prefill, 2 tokens): layer 0 rows [3, 1], [1, 0]; layer 1 row
    [2, -1]. Forward 1 (decode step 1): layer 0 row [0, 2]; layer 1 no rows (a gap)."""
    experts = [[3, 1], [1, 0], [2, -1], [0, 2]]
    weights = [[0.75, 0.25], [0.5, 0.5], [1.0, 0.0], [0.625, 0.375]]
    return RoutingLog({"format": FORMAT_VERSION, "source": "recorded", "workload": None,
                       "model": {"num_layers": 2, "num_experts": 4, "top_k": 2}, **meta},
                      [0, 0], [0, 1], [[2, 1], [1, 0]], experts, weights)


def assert_same_log(a: RoutingLog, b: RoutingLog) -> None:
    assert a.meta == b.meta
    for name in ("forward_batch", "forward_step", "counts", "experts", "weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.predictions.keys() == b.predictions.keys()
    for key, (picks, probs) in a.predictions.items():
        assert np.array_equal(picks, b.predictions[key][0]) and np.array_equal(probs, b.predictions[key][1]), key


def test_builder_orders_rows_by_layer_and_round_trips_through_a_file(tmp_path):
    builder = RoutingLogBuilder(3, 6, 2, {"workload": {"name": "w"}, "batches": {0: ["r0", "r1"]}})
    builder.add_forward(0, 0)
    builder.add_prediction("gate", 1, 0, [[4, 5], [1, 2]], [[0.5, 0.25], [0.125, 0.0625]])  # before layer 0's router
    builder.add_layer(1, [[5, 4], [3, 2]], [[0.6, 0.4], [0.7, 0.3]])  # layers out of order
    builder.add_layer(0, [[0, 1], [2, 3]], [[0.9, 0.1], [0.8, 0.2]])
    bfloat16 = torch.tensor([[0.5, 0.5], [0.55, 0.45]], dtype=torch.bfloat16)  # what a router in bfloat16 gives
    builder.add_layer(2, torch.tensor([[1, 0], [1, 5]]), bfloat16)
    builder.add_forward(0, 1)
    builder.add_layer(0, [[2, 1]], [[0.6, 0.4]])
    builder.add_prediction("gate", 2, 0, [[5, 5]], [[1.0, 0.0]])
    log = builder.build()

    assert log.counts.tolist() == [[2, 2, 2], [1, 0, 0]]
    assert log.experts[:6].tolist() == [[0, 1], [2, 3], [5, 4], [3, 2], [1, 0], [1, 5]]
    assert log.weights[4:6].tolist() == bfloat16.float().tolist()  # bfloat16 values fit float16 exactly
    assert log.meta["source"] == "recorded" and log.meta["predictors"] == {"gate": [1, 2]}
    assert log.meta["batches"] == {"0": ["r0", "r1"]}  # JSON form, as it reads back from disk
    gate1, probs1 = log.predictions[("gate", 1)]
    assert gate1.tolist() == [[4, 5], [1, 2]] + [[-1, -1]] * 5  # rows where it did not run: -1 / 0
    assert probs1[2:].tolist() == [[0, 0]] * 5 and probs1.dtype == np.float16
    assert log.predictions[("gate", 2)][0][-1].tolist() == [5, 5]

    path = tmp_path / "routing.safetensors"
    log.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    assert_same_log(RoutingLog.load(path), log)


def test_builder_refuses_predictions_that_do_not_line_up():
    builder = RoutingLogBuilder(3, 6, 2, {})
    builder.add_forward(0, 0)
    with pytest.raises(ValueError, match="no later layer"):
        builder.add_prediction("gate", 1, 2, [[1, 2]], [[0.5, 0.5]])
    builder.add_layer(0, [[0, 1]], [[0.5, 0.5]])
    builder.add_prediction("gate", 1, 0, [[1, 2], [3, 4]], [[0.5, 0.5]] * 2)  # two rows for a one-row layer
    with pytest.raises(ValueError, match="predictor gate d=1 has 2 rows, the routing 1"):
        builder.build()


def test_rows_routed_and_tokens_per_expert_follow_row_major_first_appearance():
    log = hand_made_log()
    assert log.offsets().tolist() == [[0, 2, 3], [3, 4, 4]]
    assert log.rows(0, 0) == slice(0, 2) and log.rows(1, 1) == slice(4, 4)
    assert log.routed(0, 0) == [3, 1, 0]  # row [3, 1] then [1, 0]: 1 is not repeated
    assert log.routed(0, 1) == [2]  # -1 is no expert
    assert log.routed(1, 1) == []
    assert log.tokens_per_expert(0, 0) == {3: 1, 1: 2, 0: 1}
    assert list(log.tokens_per_expert(0, 0)) == log.routed(0, 0)
    assert log.weights.dtype == np.float32 and log.weights[0].tolist() == [0.75, 0.25]


def test_computed_gaps_name_layers_without_rows_and_short_layers():
    gaps = hand_made_log().gaps()
    assert gaps["missing_layer_steps"] == 1
    assert gaps["missing_layer_examples"] == [{"forward": 1, "batch": 0, "step": 1, "layer": 1}]
    assert gaps["short_layer_steps"] == 1
    assert gaps["short_layers"] == [{"forward": 0, "batch": 0, "step": 0, "layer": 1, "rows": 1, "expected": 2}]
    assert gaps["missing_rows"] == 2


@pytest.mark.parametrize("log", [hand_made_log(), synthetic_log(3, 8, 2, 5, 6, batches=2)], ids=["hand", "synthetic"])
def test_routing_trace_positions_are_the_forwards_in_order(log):
    trace = log.routing_trace()
    assert trace.num_layers == log.num_layers and trace.length == len(log.counts)
    for f in range(len(log.counts)):
        for layer in range(log.num_layers):
            assert trace.at(layer, f) == tuple(log.routed(f, layer))


@pytest.fixture(scope="module")
def mixtral():
    return import_jsonl(MIXTRAL_LOG)


def test_mixtral_log_imports_without_inventing_routing(mixtral):
    lines = MIXTRAL_LOG.read_text().splitlines()
    first = json.loads(lines[0])
    assert (mixtral.num_layers, mixtral.num_experts, mixtral.top_k) == (32, 8, 2)
    assert len(mixtral.experts) == mixtral.meta["imported"]["records"] == len(lines)  # one row per record
    assert mixtral.experts[0].tolist() == first["experts"]
    assert mixtral.weights[0].tolist() == np.float16(first["gating_probs"]).astype(np.float32).tolist()
    assert mixtral.meta["source"] == "imported"
    assert mixtral.meta["imported"]["batches"] == [{"dataset": "humaneval", "problem_id": 0}]
    assert mixtral.meta["imported"]["num_experts_from"] == "largest expert id + 1"

    prefill = mixtral.counts[0]  # 135 prompt positions (0..134), some lost per layer
    assert mixtral.forward_step[0] == 0 and prefill.max() == 135 and prefill.min() >= 120
    decode = mixtral.counts[1:]
    assert mixtral.forward_step.tolist() == list(range(len(mixtral.counts))) and (mixtral.forward_batch == 0).all()
    assert len(decode) == 83  # one decode step per wrap back to a lower layer
    assert decode.max() == 1  # a decode step is one token per layer
    assert decode[0].sum() == 31 and decode[0, 2] == 0  # the first decode step skips layer 2


def test_mixtral_log_gaps_are_reported(mixtral, tmp_path):
    gaps = mixtral.gaps()
    layer25 = [s for s in gaps["short_layers"] if (s["forward"], s["layer"]) == (0, 25)]
    assert layer25 and 87 in layer25[0]["missing_positions"] and layer25[0]["rows"] == mixtral.counts[0, 25]
    assert gaps["missing_layer_steps"] == int((mixtral.counts[1:] == 0).sum()) > 0
    assert {"forward": 1, "batch": 0, "step": 1, "layer": 2} in gaps["missing_layer_examples"]
    assert gaps["missing_rows"] == 135 * 32 + 83 * 32 - mixtral.meta["imported"]["records"]
    path = tmp_path / "mixtral.safetensors"
    mixtral.save(path)
    assert RoutingLog.load(path).gaps() == gaps


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def record(layer, pos, experts=(0, 1), probs=(0.5, 0.5), **other):
    return {"layer": layer, "token_pos": pos, "experts": list(experts), "gating_probs": list(probs), **other}


def test_import_splits_forwards_at_wraps_and_batches_at_other_keys(tmp_path):
    path = write_lines(tmp_path / "log.jsonl", [
        record(0, 0, problem_id=7), record(0, 1, problem_id=7), record(1, 0, problem_id=7),  # prefill lost (1, 1)
        record(0, 0, problem_id=7), record(1, 0, (2, 3), problem_id=7),  # decode step 1
        record(1, 0, problem_id=7),  # decode step 2 lost layer 0
        record(0, 0, problem_id=8), record(1, 0, problem_id=8),  # another problem: its prefill
    ])
    log = import_jsonl(path, num_experts=16)
    assert log.counts.tolist() == [[2, 1], [1, 1], [0, 1], [1, 1]]
    assert log.forward_batch.tolist() == [0, 0, 0, 1] and log.forward_step.tolist() == [0, 1, 2, 0]
    assert log.routed(1, 1) == [2, 3]
    assert log.num_experts == 16 and log.meta["imported"]["num_experts_from"] == "argument"
    assert log.meta["imported"]["batches"] == [{"problem_id": 7}, {"problem_id": 8}]
    gaps = log.gaps()
    assert gaps["short_layers"] == [{"forward": 0, "batch": 0, "step": 0, "layer": 1, "rows": 1, "expected": 2,
                                     "missing_positions": [1]}]
    assert gaps["missing_layer_examples"] == [{"forward": 2, "batch": 0, "step": 2, "layer": 0}]
    with pytest.raises(UsageError, match=r"log.jsonl:5: field 'experts' holds id 3, beyond num_experts = 3"):
        import_jsonl(path, num_experts=3)


@pytest.mark.parametrize(("bad", "message"), [
    ('{"layer": 0, "token_pos": 1,', "not JSON"),
    ('[1, 2]', "not a JSON object"),
    (json.dumps({"layer": 0, "token_pos": 1, "gating_probs": [0.5, 0.5]}), "missing field 'experts'"),
    (json.dumps(record("1", 1)), "field 'layer' must be a non-negative integer"),
    (json.dumps(record(0, 1, experts=(0, "x"))), "field 'experts' must be a non-empty list of expert ids"),
    (json.dumps(record(0, 1, probs=(1.0,))), "field 'gating_probs' must be a list of 2 numbers"),
    (json.dumps(record(0, 1, experts=(0, 1, 2), probs=(0.5, 0.25, 0.25))), "has 3 ids, line 1 has 2"),
])
def test_malformed_jsonl_names_the_file_line_and_field(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [record(0, 0), bad, record(1, 0)])
    with pytest.raises(UsageError, match=f"bad.jsonl:2: .*{message}"):
        import_jsonl(path)


def test_import_refuses_a_missing_or_empty_file(tmp_path):
    with pytest.raises(UsageError, match="no such routing log file"):
        import_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(UsageError, match="no routing records"):
        import_jsonl(write_lines(tmp_path / "empty.jsonl", []))


def broken(tmp_path, change) -> Path:
    """A saved hand-made log after `change(log)`, made past the checks a RoutingLog does on construction."""
    log = hand_made_log()
    change(log)
    path = tmp_path / "broken.safetensors"
    log.save(path)
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda log: log.meta.update(format=2), "routing log format 2; this promoe-bench reads format 1"),
    (lambda log: setattr(log, "counts", log.counts + 1), r"experts \[4, 2\] .* must be \[8, 2\]: rows = sum of counts"),
    (lambda log: setattr(log, "counts", log.counts[:, :1]), r"counts is \[2, 1\], expected \[2, 2\]"),
    (lambda log: log.experts.__setitem__((0, 0), 9), "expert ids -1..9, outside 0..3"),
    (lambda log: log.meta["model"].update(top_k="2"), "meta\\['model'\\] needs positive integers"),
])
def test_load_refuses_inconsistent_logs_naming_the_file(tmp_path, change, message):
    with pytest.raises(UsageError, match=f"broken.safetensors: .*{message}"):
        RoutingLog.load(broken(tmp_path, change))


def test_load_refuses_what_is_not_a_routing_log(tmp_path):
    with pytest.raises(UsageError, match="absent.safetensors: no such routing log file"):
        RoutingLog.load(tmp_path / "absent.safetensors")
    text = tmp_path / "text.safetensors"
    text.write_text("routing, but as prose\n")
    with pytest.raises(UsageError, match="text.safetensors: not a readable safetensors file"):
        RoutingLog.load(text)
    whole = tmp_path / "whole.safetensors"
    hand_made_log().save(whole)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[:-5])
    with pytest.raises(UsageError, match="truncated.safetensors: not a readable safetensors file"):
        RoutingLog.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(UsageError, match="foreign.safetensors: no 'promoe_routing_log' header"):
        RoutingLog.load(foreign)


def test_synthetic_log_is_deterministic_and_marked(tmp_path):
    args = dict(num_layers=4, num_experts=8, top_k=2, prompt_tokens=12, decode_steps=9, batches=2, skew=1.5,
                repeat=0.25, cross_layer=0.75, seed=3)
    paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "other")]
    synthetic_log(**args).save(paths[0])
    synthetic_log(**args).save(paths[1])
    synthetic_log(**args | {"seed": 4}).save(paths[2])
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()
    log = RoutingLog.load(paths[0])
    assert log.meta["source"] == "synthetic" and log.meta["synthetic"] == args
    assert log.counts.tolist() == ([[12] * 4] + [[1] * 4] * 9) * 2
    assert log.forward_batch.tolist() == [0] * 10 + [1] * 10 and log.forward_step.tolist() == list(range(10)) * 2
    assert np.allclose(log.weights.sum(1), 1, atol=2e-3) and (log.weights[:, 0] >= log.weights[:, 1]).all()
    assert all(len(set(row)) == 2 for row in log.experts.tolist())  # top-k picks are distinct


def top_share(log: RoutingLog, layer: int) -> float:
    """The most routed expert's share of the layer's token rows, over the whole log."""
    picks = np.concatenate([log.experts[log.rows(f, layer)] for f in range(len(log.counts))])
    return np.bincount(picks.ravel()).max() / len(picks)


def test_synthetic_skew_concentrates_routing_on_the_top_expert():
    flat, skewed = (synthetic_log(2, 16, 2, 400, 0, skew=skew, repeat=0, cross_layer=0) for skew in (0.0, 2.0))
    assert top_share(flat, 0) < 0.25  # even: 2 / 16 = 0.125 expected
    assert top_share(skewed, 0) > 0.6


@pytest.mark.parametrize("repeat", [0.0, 1.0])
def test_synthetic_repeat_one_makes_consecutive_decode_steps_identical(repeat):
    log = synthetic_log(3, 16, 2, 4, 20, repeat=repeat, cross_layer=0)
    for layer in range(3):
        steps = [log.experts[log.rows(f, layer)].tolist() for f in range(1, 21)]
        assert (steps == [steps[0]] * 20) == (repeat == 1.0)


def follows_a_map(log: RoutingLog, layer: int) -> bool:
    """Whether each pick at layer + 1 is a function of the same token's same pick at `layer`."""
    seen: dict[int, int] = {}
    for f in range(len(log.counts)):
        here, there = log.experts[log.rows(f, layer)].ravel(), log.experts[log.rows(f, layer + 1)].ravel()
        for a, b in zip(here.tolist(), there.tolist(), strict=True):
            if seen.setdefault(a, b) != b:
                return False
    return True


@pytest.mark.parametrize("cross_layer", [0.0, 1.0])
def test_synthetic_cross_layer_one_makes_the_next_layer_a_function_of_this_one(cross_layer):
    log = synthetic_log(4, 8, 2, 64, 10, repeat=0, cross_layer=cross_layer, seed=1)
    assert all(follows_a_map(log, layer) for layer in range(3)) == (cross_layer == 1.0)


def test_a_100k_row_log_with_two_predictors_at_three_distances_stays_under_20_mb(tmp_path):
    rows, top_k, width, distances = 100_000, 8, 8, (1, 2, 3)
    forwards, layers = 125, 32  # 25 token rows per (forward, layer)
    rng = np.random.default_rng(0)
    ids = lambda: rng.integers(0, 64, (rows, width))  # noqa: E731
    predictions = {(name, d): (ids(), rng.random((rows, width))) for name in ("learned", "gate") for d in distances}
    log = RoutingLog({"format": FORMAT_VERSION, "source": "recorded", "workload": None,
                      "model": {"num_layers": layers, "num_experts": 64, "top_k": top_k}},
                     np.zeros(forwards), np.arange(forwards), np.full((forwards, layers), 25),
                     rng.integers(0, 64, (rows, top_k)), rng.random((rows, top_k)), predictions)
    path = tmp_path / "big.safetensors"
    log.save(path)
    per_row = 3 * top_k + len(predictions) * 3 * width  # uint8 id + float16 value per pick
    assert per_row == 168
    size = path.stat().st_size
    assert rows * per_row <= size < rows * per_row + 64_000  # the arrays, a header and the counts
    assert size < 18_000_000  # 10% under the 20 MB bound
