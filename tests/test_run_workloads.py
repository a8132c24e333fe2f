"""`promoe-bench run --workload`: every strategy of a comparison gets exactly the same requests."""

import json

import pandas as pd
from click.testing import CliRunner

from promoe_bench.cli import main

ALL_STRATEGIES = 7  # `--strategy all`: the built-ins, promoe (learned predictors) and oracle included
FAST = ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--link-gbps", "50", "--link-latency-us", "0"]


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args), *FAST])


def test_every_strategy_gets_the_same_requests_in_the_same_batches(checkpoints, mixtral_predictors, tmp_path):
    # the tiny mixtral has learned predictors (trained on synthetic prompts), so `all` includes promoe
    out = tmp_path / "run"
    result = run("--model", checkpoints["mixtral"], "--workload", "synthetic", "--num-requests", 5, "--batch-size", 2,
                 "--gen-len", 3, "--out", out)
    assert result.exit_code == 0, result.output
    requests = pd.read_csv(out / "requests.csv")
    per_strategy = [group[["request", "batch", "prompt_tokens"]].reset_index(drop=True)
                    for _, group in requests.groupby("strategy", sort=False)]
    assert len(per_strategy) == ALL_STRATEGIES and all(frame.equals(per_strategy[0]) for frame in per_strategy)
    assert per_strategy[0]["batch"].tolist() == [0, 0, 1, 1, 2]
    assert per_strategy[0]["prompt_tokens"].between(32, 256).all()
    assert per_strategy[0]["prompt_tokens"].nunique() > 1  # random lengths, so batches are padded
    assert pd.read_csv(out / "summary.csv")["tokens_match"].all()
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["workload"]["name"] == "synthetic" and config["workload"]["num_requests"] == 5


def test_text_workload_on_a_model_without_tokenizer_is_one_clear_line(checkpoints, mixtral_predictors, tmp_path):
    # every strategy (`all`) can run on the tiny mixtral, so the only problem left is the missing tokenizer
    result = run("--model", checkpoints["mixtral"], "--workload", "chat", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.startswith("promoe-bench: error: ") and "tokenizer" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the run nor a staging folder


def test_workload_file_needs_a_workload(checkpoints, tmp_path):
    data = tmp_path / "share.json"
    data.write_text("[]")
    result = run("--model", checkpoints["olmoe"], "--workload-file", data, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "--workload-file needs --workload" in result.stderr


def test_unknown_workload_is_one_clear_line(checkpoints, tmp_path):
    result = run("--model", checkpoints["olmoe"], "--workload", "no-such-workload", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "no-such-workload" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_sharegpt_workload_runs_the_users_file_on_the_builtin_model(tmp_path):
    data = tmp_path / "share.json"
    conversations = [{"conversations": [{"from": "human", "value": f"How do I sort a list of {thing} in Python?"},
                                        {"from": "gpt", "value": "Use sorted()."}]}
                     for thing in ("numbers", "strings", "tuples")]
    data.write_text(json.dumps(conversations))
    out = tmp_path / "run"
    result = run("--workload", "sharegpt", "--workload-file", data, "--num-requests", 3, "--gen-len", 4,
                 "--strategy", "full_gpu,lru", "--out", out)
    assert result.exit_code == 0, result.output
    requests = pd.read_csv(out / "requests.csv")
    assert sorted(requests["request"].unique()) == [0, 1, 2]
    assert (requests["prompt_tokens"] >= 8).all()


def test_workloads_lists_the_shipped_ones():
    result = CliRunner().invoke(main, ["workloads"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"chat", "prefill-long", "mixed", "sharegpt", "synthetic"} <= set(names)
