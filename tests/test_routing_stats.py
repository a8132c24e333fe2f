"""Routing statistics: exact values on hand-made routing, and the command on the built-in model."""

import math

import pytest
import torch
from click.testing import CliRunner

from promoe_bench.cli import main
from promoe_bench.routing_stats import _lru_hits, statistics


def test_lru_hits_count_decode_tokens_only_against_a_half_cache():
    # capacity 2: prompt {0,1} warms; decode {0,2} hits 0, evicts 1; {1,2} hits 2 only; {2,3} hits 2
    sequence = [{0, 1}, {0, 2}, {1, 2}, {2, 3}]
    assert _lru_hits(sequence, capacity=2, count_from=1) == (3, 6)


def test_statistics_on_hand_made_routing():
    # 2 layers, 4 experts, top-2; one request: 1 prompt token then 2 decode tokens
    chosen = [torch.tensor([[0, 1], [0, 2], [0, 2]]), torch.tensor([[3, 2], [3, 2], [1, 0]])]
    guessed = [torch.tensor([[3, 1], [2, 3], [1, 2]])]  # layer 0's guess of layer 1's picks
    similarity = [torch.tensor([0.5, 1.0]), torch.tensor([0.2, 0.4])]  # token t's input against t-1's
    table = statistics([(chosen, guessed, 1, similarity)], num_experts=4, top_k=2)
    layer0, layer1 = table.iloc[0], table.iloc[1]
    # layer 0 assignments: expert 0 x3, 1 x1, 2 x2, 3 x0
    shares = [3 / 6, 1 / 6, 2 / 6]
    assert layer0["usage_entropy"] == pytest.approx(-sum(p * math.log(p) for p in shares) / math.log(4))
    assert layer0["dead_experts"] == 1 and layer0["top_share"] == pytest.approx(0.5)
    # decode tokens vs previous: {0,2}&{0,1} -> 1/2; {0,2}&{0,2} -> 2/2
    assert layer0["repeat_share"] == pytest.approx(0.75)
    # popularity alone: decode tokens of layer 0 always chose {0,2} (expected repeat 1), of layer 1 once
    # {3,2} and once {1,0} (each expert chosen by half of them: 4 x 0.5^2 / 2)
    assert layer0["repeat_by_popularity"] == pytest.approx(1.0)
    assert layer1["repeat_by_popularity"] == pytest.approx(0.5)
    assert layer0["neighbour_similarity"] == pytest.approx(0.75)
    assert layer1["neighbour_similarity"] == pytest.approx(0.3)
    # guesses vs layer 1's truth: {3,1}&{3,2} 1/2, {2,3}&{3,2} 2/2, {1,2}&{1,0} 1/2
    assert layer0["gate_recall"] == pytest.approx(2 / 3)
    assert math.isnan(layer1["gate_recall"])
    assert table.iloc[-1]["layer"] == "all" and table.iloc[-1]["dead_experts"] == 1


def test_routing_stats_command_compares_with_a_random_model_on_the_builtin():
    result = CliRunner().invoke(main, ["routing-stats", "--num-requests", "2", "--gen-len", "8", "--compare-random"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert {"usage_entropy", "repeat_share", "repeat_by_popularity", "neighbour_similarity", "gate_recall",
            "lru_half_hit_rate", "repeat_share_random"} <= set(header)
    assert len(lines) == 2 + 6 + 1  # header, rule, six layers, 'all'
