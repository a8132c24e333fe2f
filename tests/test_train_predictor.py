"""`promoe-bench train-predictor` and the learned predictors in `run`: the files and what they hold, the
model fingerprint, one-line errors that leave nothing behind, and what a predictor can learn."""

import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import promoe_bench.predictor_training as training
from promoe_bench.checkpoint import load_checkpoint
from promoe_bench.errors import UsageError
from promoe_bench.families import find_moe_layers
from promoe_bench.predictor_training import parse_distances, train_pair
from promoe_bench.predictors import METADATA, WEIGHTS, LearnedPredictors, load_predictors, model_fingerprint
from promoe_bench.workloads import build_requests, load_workload

from .checkpoints import COMMON, write_checkpoint
from .conftest import MIXTRAL_PREDICTOR_DISTANCES, one_torch_thread
from .test_cli import assert_nothing_written, assert_usage_error, invoke, leftovers, run_cli, snapshot

EXPERTS, TOP_K, MOE_LAYERS, HIDDEN = 8, 2, COMMON["num_hidden_layers"], COMMON["hidden_size"]  # tiny mixtral
TRAIN_REQUESTS, TRAIN_GEN_LEN = 10, 4  # conftest.MIXTRAL_PREDICTOR_TRAINING
FAST_LINK = ["--device", "cpu", "--link-gbps", "50", "--link-latency-us", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def mixtral(checkpoints, mixtral_predictors):
    """The tiny mixtral checkpoint, with learned predictors (distances 1..2) in its default place."""
    return checkpoints["mixtral"]


@pytest.fixture
def meta(mixtral_predictors):
    return json.loads((mixtral_predictors / METADATA).read_text())


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def fingerprint_of(folder) -> str:
    """The fingerprint `run` computes: the model as promoe-bench loads it."""
    loaded = load_checkpoint(str(folder), torch.device("cpu"))
    return model_fingerprint(loaded.config, loaded.layers)


def train_cli(model, out, *extra):
    return invoke("train-predictor", "--model", model, "--workload", "synthetic", "--num-requests", 3,
                  "--gen-len", 2, "--device", "cpu", "--out", out, *extra)


@pytest.fixture(scope="module")
def other_mixtral(tmp_path_factory):
    """A tiny mixtral of the same shape as the session's, from another seed: other routers."""
    return write_checkpoint(tmp_path_factory.mktemp("other") / "mixtral_seed1", "mixtral", seed=1)


@pytest.fixture(scope="module")
def four_layers(checkpoints, mixtral_predictors, tmp_path_factory):
    """A 4-MoE-layer tiny mixtral, and predictors for distances 1..2 trained on it by the CLI with
    --overwrite into a folder that held the 3-layer model's predictors."""
    root = tmp_path_factory.mktemp("four_layers")
    model = write_checkpoint(root / "mixtral4", "mixtral", num_hidden_layers=4)
    folder = root / "predictors"
    shutil.copytree(mixtral_predictors, folder)
    result = train_cli(model, folder, "--distance", "1..2", "--seed", "1", "--overwrite")
    return model, folder, result


# -- what train-predictor writes ---------------------------------------------------------------------


def test_train_predictor_writes_the_weights_and_the_metadata_and_reports_each_pair(mixtral_predictor_training):
    result, folder = mixtral_predictor_training.result, mixtral_predictor_training.folder
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, METADATA])
    assert leftovers(folder) == []
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("trained 3 predictors on ") and f"({TRAIN_REQUESTS - 1} requests)" in lines[0]
    assert "eval recall@2" in lines[0] and "1 held-out requests" in lines[0]
    assert lines[1].split() == ["source", "target", "learned", "gate"]
    rows = [line.split() for line in lines[2:-1]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(0, 1), (1, 2), (0, 2)]
    assert all(0 <= float(r[2]) <= 1 and 0 <= float(r[3]) <= 1 for r in rows)
    assert lines[-1] == f"wrote {folder}"


def test_metadata_names_the_model_workload_and_sizes(meta, checkpoints):
    assert meta["model"] == str(checkpoints["mixtral"]) and meta["family"] == "mixtral"
    assert meta["workload"] == "synthetic" and meta["seed"] == 0
    assert meta["top_k"] == TOP_K
    assert meta["sizes"] == {"hidden_size": HIDDEN, "width": 2 * HIDDEN, "num_experts": EXPERTS}  # default width
    assert meta["seconds"] >= 0


def test_metadata_has_a_pair_per_source_layer_for_each_distance(meta):
    assert meta["distances"] == MIXTRAL_PREDICTOR_DISTANCES
    expected = [[source, d] for d in MIXTRAL_PREDICTOR_DISTANCES for source in range(MOE_LAYERS - d)]
    assert meta["pairs"] == expected == [[0, 1], [1, 1], [0, 2]]


def test_metadata_evaluates_every_pair_with_recall_between_0_and_1(meta):
    evaluation = meta["eval"]
    assert [(row["source"], row["distance"]) for row in evaluation] == [tuple(p) for p in meta["pairs"]]
    for row in evaluation:
        assert row["target"] == row["source"] + row["distance"]
        assert 0 <= row["recall"] <= 1 and 0 <= row["gate_recall"] <= 1, row
        assert 1 <= row["epochs"] <= training.MAX_EPOCHS
        # the routing of a later layer is learnable from an earlier layer's input: better than chance
        assert row["recall"] > TOP_K / EXPERTS, row


def test_metadata_counts_requests_and_tokens_per_split(meta, checkpoints):
    assert meta["requests"] == {"eval": 1, "train": TRAIN_REQUESTS - 1}  # 9:1 by request
    workload = load_workload("synthetic").with_overrides(num_requests=TRAIN_REQUESTS)
    prompts = build_requests(workload, None, COMMON["vocab_size"])
    total = sum(len(p) for p in prompts) + TRAIN_REQUESTS * TRAIN_GEN_LEN  # prompt + greedy continuation
    assert meta["tokens"]["eval"] + meta["tokens"]["train"] == total
    assert meta["tokens"]["eval"] in {len(p) + TRAIN_GEN_LEN for p in prompts}


def test_metadata_fingerprint_is_the_models_whichever_loader_reads_it(meta, checkpoints):
    assert meta["fingerprint"] == fingerprint_of(checkpoints["mixtral"])
    model = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"], dtype="auto")
    assert meta["fingerprint"] == model_fingerprint(model.config, find_moe_layers(model))


def test_weights_hold_one_two_layer_mlp_per_pair(meta, mixtral_predictors):
    state = load_file(mixtral_predictors / WEIGHTS)
    width = meta["sizes"]["width"]
    expected = {}
    for source, d in meta["pairs"]:
        prefix = f"l{source}_d{d}.net."
        expected.update({prefix + "0.weight": (width, HIDDEN), prefix + "0.bias": (width,),
                         prefix + "3.weight": (EXPERTS, width), prefix + "3.bias": (EXPERTS,)})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_load_predictors_gives_each_pair_and_top_k_guesses_per_token(meta, mixtral_predictors):
    predictors = load_predictors(mixtral_predictors, meta["fingerprint"])
    assert sorted(predictors.mlps) == sorted(tuple(p) for p in meta["pairs"])
    assert predictors.distances == MIXTRAL_PREDICTOR_DISTANCES and predictors.top_k == TOP_K
    hidden = torch.randn(1, 5, HIDDEN)
    for source, d in predictors.mlps:
        picks, probs = predictors(source, source + d, hidden)
        assert picks.shape == probs.shape == (5, TOP_K)
        assert ((0 <= picks) & (picks < EXPERTS)).all()
        assert all(len(set(row.tolist())) == TOP_K for row in picks)  # k distinct experts per token
        assert (probs > 0).all() and (probs.sum(-1) <= 1 + 1e-6).all()  # softmax probabilities, surest first
        assert (probs[:, :-1] >= probs[:, 1:]).all()
        want = predictors.mlps[(source, d)](hidden[0]).softmax(-1).topk(TOP_K)  # the module trained
        assert torch.equal(picks, want.indices) and torch.allclose(probs, want.values)


def test_saved_predictors_load_back_unchanged(meta, mixtral_predictors, tmp_path):
    original = load_predictors(mixtral_predictors, meta["fingerprint"])
    copy = tmp_path / "copy"
    LearnedPredictors(original.mlps, original.top_k, original.meta).save(copy)
    again = load_predictors(copy, meta["fingerprint"])
    assert json.loads((copy / METADATA).read_text()) == meta
    for pair, mlp in original.mlps.items():
        for name, tensor in mlp.state_dict().items():
            assert torch.equal(again.mlps[pair].state_dict()[name], tensor), (pair, name)


# -- another model: refused by fingerprint ------------------------------------------------------------


def test_another_checkpoint_of_the_same_shape_has_another_fingerprint(meta, other_mixtral):
    assert fingerprint_of(other_mixtral) != meta["fingerprint"]


def test_load_predictors_refuses_another_models_fingerprint(meta, mixtral_predictors, other_mixtral):
    theirs = fingerprint_of(other_mixtral)
    with pytest.raises(UsageError) as error:
        load_predictors(mixtral_predictors, theirs)
    assert meta["fingerprint"] in str(error.value) and theirs in str(error.value)


def test_run_refuses_predictors_given_for_another_model(meta, mixtral_predictors, other_mixtral, out):
    result = run_cli(other_mixtral, out, "--strategy", "promoe", "--predictors", mixtral_predictors)
    assert_usage_error(result, "another model", meta["fingerprint"], fingerprint_of(other_mixtral),
                       "train-predictor")
    assert_nothing_written(out)


def test_run_refuses_another_models_predictors_in_the_default_place(meta, mixtral_predictors, tmp_path, out):
    model = write_checkpoint(tmp_path / "mixtral_seed2", "mixtral", seed=2)
    shutil.copytree(mixtral_predictors, model / "promoe_predictors")
    result = run_cli(model, out, "--strategy", "promoe")
    assert_usage_error(result, "another model", meta["fingerprint"], fingerprint_of(model))
    assert_nothing_written(out)


# -- train-predictor's bad input: one line, exit 2, nothing written -------------------------------------


@pytest.mark.parametrize("text, expected", [("2", [2]), ("1..3", [1, 2, 3]), ("3,1,3", [1, 3]),
                                            (" 1 .. 2 ", [1, 2])])
def test_parse_distances_reads_a_number_a_range_or_a_list(text, expected):
    assert parse_distances(text) == expected


@pytest.mark.parametrize("text", ["0", "abc", "3..1", "", "1..", "-1..2", "1..2..3", "1,,2", "0,1"])
def test_parse_distances_refuses_what_is_not_distances_of_at_least_1(text):
    with pytest.raises(UsageError, match="--distance"):
        parse_distances(text)


@pytest.mark.parametrize("text, fragment", [("0", "at least 1"), ("abc", "expected N, A..B or A,B"),
                                            ("3..1", "--distance '3..1'")])
def test_bad_distance_is_a_one_line_error(checkpoints, out, text, fragment):
    result = train_cli(checkpoints["mixtral"], out, "--distance", text)
    assert_usage_error(result, f"--distance {text!r}", fragment)
    assert_nothing_written(out)


@pytest.mark.parametrize("text", ["3", "2..3"])
def test_distance_reaching_past_the_models_layers_is_a_one_line_error(checkpoints, out, text):
    result = train_cli(checkpoints["mixtral"], out, "--distance", text)
    assert_usage_error(result, "--distance 3", f"past the model's {MOE_LAYERS} MoE layers")
    assert_nothing_written(out)


def test_zero_width_is_a_one_line_error(checkpoints, out):
    result = train_cli(checkpoints["mixtral"], out, "--distance", "1", "--width", "0")
    assert_usage_error(result, "--width must be at least 1")
    assert_nothing_written(out)


def test_excluding_every_prompt_leaves_too_few_requests_to_train_on(checkpoints, out):
    # the 3 requests asked for are the first of the synthetic workload, which --exclude-workload leaves out
    result = train_cli(checkpoints["mixtral"], out, "--distance", "1", "--exclude-workload", "synthetic")
    assert_usage_error(result, "leaves 0 request(s)")
    assert_nothing_written(out)


@pytest.mark.parametrize("held", [[WEIGHTS, METADATA], [METADATA], [WEIGHTS]], ids=["both", "json", "weights"])
def test_out_holding_predictors_is_refused_without_overwrite_and_left_untouched(
        checkpoints, mixtral_predictors, tmp_path, held):
    out = tmp_path / "predictors"
    out.mkdir()
    for name in held:
        shutil.copy(mixtral_predictors / name, out / name)
    before = snapshot(out)
    result = train_cli(checkpoints["mixtral"], out, "--distance", "1")
    assert_usage_error(result, str(out), "already holds predictors", "--overwrite")
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused_and_left_alone(checkpoints, tmp_path):
    out = tmp_path / "predictors"
    out.write_text("not a folder")
    result = train_cli(checkpoints["mixtral"], out, "--distance", "1")
    assert_usage_error(result, "is a file")
    assert out.read_text() == "not a folder"


def test_overwrite_replaces_predictors_of_another_model(four_layers, meta):
    model, folder, result = four_layers
    assert result.exit_code == 0, (result.output, result.exc_info)
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, METADATA])
    replaced = json.loads((folder / METADATA).read_text())
    assert replaced["fingerprint"] == fingerprint_of(model) != meta["fingerprint"]
    assert replaced["pairs"] == [[0, 1], [1, 1], [2, 1], [0, 2], [1, 2]]  # 4 MoE layers, distances 1..2
    assert replaced["requests"] == {"eval": 1, "train": 2} and replaced["seed"] == 1
    assert set(load_file(folder / WEIGHTS)) == {f"l{s}_d{d}.net.{i}.{kind}" for s, d in replaced["pairs"]
                                               for i in (0, 3) for kind in ("weight", "bias")}


# -- run: which strategies need learned predictors ------------------------------------------------------


@pytest.mark.parametrize("strategy", ["promoe", "all", "lru,promoe[chunked=0]"])
def test_learned_predictor_on_a_model_without_predictors_is_a_one_line_error(checkpoints, out, strategy):
    model = checkpoints["olmoe"]  # no predictors anywhere near it
    result = run_cli(model, out, "--strategy", strategy)
    line = assert_usage_error(result, "learned predictors", str(model / "promoe_predictors"),
                              "promoe-bench train-predictor", "predictor=gate")
    assert "promoe" in line.split("error: ")[1].split()[0]  # names the strategy that needs them
    assert_nothing_written(out)


def test_missing_predictors_folder_is_a_one_line_error(checkpoints, tmp_path, out):
    missing = tmp_path / "no_predictors_here"
    result = run_cli(checkpoints["mixtral"], out, "--strategy", "promoe", "--predictors", missing)
    assert_usage_error(result, str(missing), "train-predictor")
    assert_nothing_written(out)


def test_distance_beyond_the_trained_ones_is_a_one_line_error(four_layers, out):
    model, folder, _ = four_layers
    result = run_cli(model, out, "--strategy", "promoe[distance=3]", "--predictors", folder)
    assert_usage_error(result, "promoe[distance=3]", "from layer 0 to layer 3", "trained distances: [1, 2]",
                       "--distance 1..3")
    assert_nothing_written(out)


def test_gate_predictor_runs_without_learned_predictors(checkpoints, out):
    result = run_cli(checkpoints["olmoe"], out, "--strategy", "promoe[predictor=gate],skip_gate,lru")
    assert result.exit_code == 0, (result.output, result.exc_info)
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert list(summary.index) == ["promoe[predictor=gate]", "skip_gate", "lru"]
    assert summary["tokens_match"].all()
    for name in ("promoe[predictor=gate]", "skip_gate"):
        assert 0 <= summary.loc[name, "recall"] <= 1 and 0 <= summary.loc[name, "good_pred"] <= 1
    assert "trace" not in json.loads((out / "run.json").read_text())  # nothing read the routing


def test_summary_has_prediction_figures_for_promoe_and_none_for_lru(mixtral, out):
    result = run_cli(mixtral, out, "--strategy", "promoe,lru")
    assert result.exit_code == 0, (result.output, result.exc_info)
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert summary["tokens_match"].all()
    promoe, lru = summary.loc["promoe"], summary.loc["lru"]
    for column in ("recall", "good_pred", "fetch_rate", "ready_rate"):
        assert 0 <= promoe[column] <= 1, (column, promoe[column])
    assert promoe["good_pred"] <= promoe["recall"] + 1e-12
    assert promoe["predict_ms_per_step"] > 0
    for column in ("recall", "good_pred", "fetch_rate"):
        assert pd.isna(lru[column]), (column, lru[column])  # no prediction: missing, not 0
    raw = pd.read_csv(out / "summary.csv", dtype=str, keep_default_na=False).set_index("strategy")
    assert raw.loc["lru", "recall"] == "" and raw.loc["lru", "good_pred"] == ""
    layers = pd.read_csv(out / "layers.csv")
    guessed = layers[(layers["strategy"] == "promoe") & layers["predicted"].notna()]
    assert len(guessed) > 0 and layers.loc[layers["strategy"] == "lru", "predicted"].isna().all()


# -- run: the recorded routing without full_gpu in the list ---------------------------------------------


def test_oracle_without_full_gpu_reads_an_unreported_full_gpu_pass(checkpoints, out):
    # 2 batches, 1 warm-up + 2 measured repeats: the oracle reads the trace at every position of each
    several = ["--workload", "synthetic", "--num-requests", "3", "--batch-size", "2", "--prompt-len", "16",
               "--gen-len", "3", "--repeats", "2", "--warmup", "1"]
    result = run_cli(checkpoints["olmoe"], out, "--strategy", "oracle,lru", tiny=[*FAST_LINK, *several])
    assert result.exit_code == 0, (result.output, result.exc_info)
    assert "different tokens" not in result.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["trace"] == "recorded by an unreported full_gpu pass"
    assert list(meta["strategies"]) == ["oracle", "lru"]
    for table in ("summary", "requests", "steps", "layers"):  # the recording pass is not reported
        assert "full_gpu" not in set(pd.read_csv(out / f"{table}.csv")["strategy"]), table
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert list(summary.index) == ["oracle", "lru"]
    assert summary["tokens_match"].all()
    # the trace is right over both batches and all 3 repeats: the oracle guessed every routed expert
    assert summary.loc["oracle", "recall"] == 1.0
    assert pd.isna(summary.loc["lru", "recall"])


def test_full_gpu_listed_after_oracle_runs_first_and_its_routing_is_the_trace(checkpoints, out):
    result = run_cli(checkpoints["olmoe"], out, "--strategy", "static,oracle,full_gpu")
    assert result.exit_code == 0, (result.output, result.exc_info)
    meta = json.loads((out / "run.json").read_text())
    assert list(meta["strategies"]) == ["full_gpu", "static", "oracle"]
    assert meta["trace"] == "recorded by the full_gpu run"
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert summary["tokens_match"].all() and summary.loc["oracle", "recall"] == 1.0


def test_predictors_of_a_model_are_accepted_when_it_runs_in_another_dtype(mixtral, out):
    result = run_cli(mixtral, out, "--strategy", "promoe", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr


# -- what a learned predictor can learn ---------------------------------------------------------------


def clustered(seed: int, n: int, hidden: int = 16, clusters: int = 8, experts: int = 8, top_k: int = 2):
    """Inputs around `clusters` centres; each centre routes to a fixed pair of experts, every expert
    used by exactly two centres (so a constant guess is no better than chance)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, hidden, generator=g) * 2
    experts_of = torch.tensor([[c % experts, (c + 3) % experts] for c in range(clusters)])[:, :top_k]
    which = torch.randint(0, clusters, (n,), generator=g)
    return centres[which] + 0.3 * torch.randn(n, hidden, generator=g), experts_of[which], g


def test_learned_predictor_learns_a_deterministic_routing():
    x, y, _ = clustered(seed=0, n=1000)
    mlp, recall, epochs = train_pair(x[:800], y[:800], x[800:], y[800:], num_experts=8, width=32, seed=0)
    assert recall >= 0.95, recall
    assert 1 <= epochs <= training.MAX_EPOCHS
    # and it predicts fresh inputs of the same routing, in eval mode, on the CPU
    fresh_x, fresh_y, _ = clustered(seed=0, n=1300)
    assert not mlp.training and next(mlp.parameters()).device.type == "cpu"
    with torch.no_grad():
        picks = mlp(fresh_x[1000:]).topk(2, dim=-1).indices
    assert training._recall(picks, fresh_y[1000:]) >= 0.95


def test_learned_predictor_stays_near_chance_when_the_routing_is_unrelated_to_the_input():
    x, y, g = clustered(seed=0, n=1000)
    shuffled = y[torch.randperm(len(y), generator=g)]
    _, recall, _ = train_pair(x[:800], shuffled[:800], x[800:], shuffled[800:], num_experts=8, width=32, seed=0)
    chance = 2 / 8
    assert recall < chance + 0.15, recall


def test_recall_counts_the_share_of_true_experts_found():
    truth = torch.tensor([[0, 1], [2, 3]])
    assert training._recall(torch.tensor([[1, 0], [3, 2]]), truth) == 1.0
    assert training._recall(torch.tensor([[0, 5], [6, 7]]), truth) == 0.25
    assert training._recall(torch.tensor([[4, 5], [6, 7]]), truth) == 0.0
