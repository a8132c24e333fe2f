"""Loading never holds two copies of the experts: peak extra RSS stays under 1.5x the checkpoint."""

import json
import subprocess
import sys

import pytest

from .checkpoints import write_checkpoint

MEASURE = """
import json, sys, torch
from promoe_bench.checkpoint import load_checkpoint
# a tiny one first: the code transformers imports on first use is not checkpoint memory
load_checkpoint(sys.argv[2], torch.device("cpu"))
report = load_checkpoint(sys.argv[1], torch.device("cpu")).report
print(json.dumps({"ratio": report.peak_over_checkpoint, "bytes": report.checkpoint_bytes}))
"""


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # per-expert tensors, and fused interleaved ones
def test_loading_peak_memory_stays_under_one_and_a_half_checkpoints(tmp_path, family):
    layers = {"mixtral": {}, "gpt_oss": {"layer_types": ["full_attention"] * 4}}[family]
    folder = write_checkpoint(tmp_path / family, family, hidden_size=256, intermediate_size=1024,
                              moe_intermediate_size=1024, num_hidden_layers=4, num_local_experts=16, head_dim=64,
                              **layers)
    # a fresh process, so the peak is the load's own
    tiny = write_checkpoint(tmp_path / "tiny", family, **layers)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(tiny)],
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["bytes"] > 100e6, "the checkpoint must dwarf interpreter noise for the ratio to mean much"
    assert measured["ratio"] < 1.5, f"loading peaked at {measured['ratio']:.2f}x the checkpoint"
