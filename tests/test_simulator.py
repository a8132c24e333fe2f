"""The simulator: a recorded routing log replayed with a run's own measured costs agrees with the run, a
projection onto profiles is deterministic and refuses shapes that do not match, and the noisy predictor
has the recall it is given."""

import json

import pandas as pd
import pytest

from promoe_bench.costs import _thread_overheads
from promoe_bench.results import load_run, load_timeline
from promoe_bench.routing_log import RoutingLog
from promoe_bench.strategies import parse
from promoe_bench.summary import hardware

from .test_cli import assert_usage_error, invoke, run_cli

GEN_LEN = 5
DETERMINISTIC = ["full_gpu", "on_demand", "lru", "static"]  # what they copy does not depend on timing
KEY = ["strategy", "repeat", "batch", "step", "layer"]


@pytest.fixture(scope="module")
def recorded(checkpoints, mixtral_predictors, tmp_path_factory):
    """A real CPU run of the tiny mixtral with its routing log, and the same log replayed with the run's
    measured costs."""
    root = tmp_path_factory.mktemp("agree")
    run, log, sim = root / "run", root / "routing.log", root / "sim"
    flags = ["--device", "cpu", "--workload", "synthetic", "--num-requests", "4", "--batch-size", "2",
             "--prompt-len", "6", "--gen-len", str(GEN_LEN), "--repeats", "2", "--warmup", "1",
             "--link-gbps", "0.05", "--link-latency-us", "20", "--cache-rate", "0.5"]
    result = run_cli(checkpoints["mixtral"], run, "--strategy", ",".join([*DETERMINISTIC, "promoe"]),
                     "--record-trace", log, tiny=flags)
    assert result.exit_code == 0, result.output
    result = invoke("simulate", "--trace", log, "--measured", run, "--strategy", ",".join([*DETERMINISTIC, "promoe"]),
                    "--repeats", "2", "--warmup", "1", "--out", sim)
    assert result.exit_code == 0, result.output
    return run, log, sim


def test_the_routing_log_is_the_runs_routing(recorded):
    run, log_path, _ = recorded
    log = RoutingLog.load(log_path)
    _, tables = load_run(run)
    layers = tables["layers"]
    full = layers[(layers["strategy"] == "full_gpu") & (layers["repeat"] == 1)].sort_values(["batch", "step", "layer"])
    assert len(log.counts) == 2 * GEN_LEN  # two batches of GEN_LEN forwards
    assert [log.routed(f, layer) for f in range(len(log.counts)) for layer in range(log.num_layers)] == \
        [[int(e) for e in str(r).split()] for r in full["routed"]]
    prefill = log.counts[log.forward_step == 0]
    assert (prefill == 2 * 6).all() and (log.counts[log.forward_step > 0] == 2).all()  # B x P, then B rows
    assert {name for name, _ in log.predictions} == {"gate", "learned"}
    assert log.meta["source"] == "recorded" and log.meta["batches"] == {"0": [0, 1], "1": [2, 3]}


def test_replaying_the_log_with_measured_costs_copies_what_the_run_copied(recorded):
    run, _, sim = recorded
    real, simulated = load_run(run)[1]["layers"], load_run(sim)[1]["layers"]
    for strategy in DETERMINISTIC:
        ours = simulated[simulated["strategy"] == strategy].set_index(KEY)
        theirs = real[real["strategy"] == strategy].set_index(KEY)
        for counter in ("hits", "misses", "copies", "bytes", "evictions"):
            assert ours[counter].equals(theirs[counter].loc[ours.index]), (strategy, counter)
    assert real.loc[real["strategy"] == "lru", "bytes"].sum() > 0


def test_compute_of_replays_every_strategy_on_one_strategys_compute(recorded, tmp_path):
    run, log, sim = recorded
    borrowed = tmp_path / "borrowed"
    result = invoke("simulate", "--trace", log, "--measured", run, "--compute-of", "full_gpu", "--strategy",
                    ",".join([*DETERMINISTIC, "promoe"]), "--repeats", "2", "--warmup", "1", "--out", borrowed)
    assert result.exit_code == 0, result.output
    assert "every strategy on full_gpu's measured compute" in result.output
    meta, tables = load_run(borrowed)
    layers = tables["layers"].set_index(KEY).sort_index()
    own = load_run(sim)[1]["layers"].set_index(KEY).sort_index()
    full = layers.loc["full_gpu"]
    for strategy in DETERMINISTIC:
        mine = layers.loc[strategy]
        for column in ("non_expert_s", "router_s"):  # full_gpu's, not the strategy's own (spans of clocks
            # that differ by strategy: equal up to rounding)
            assert mine[column].to_numpy() == pytest.approx(full[column].loc[mine.index].to_numpy(), rel=1e-6), \
                (strategy, column)
        for counter in ("hits", "misses", "bytes"):  # what moves does not depend on the compute's speed
            assert mine[counter].equals(own.loc[strategy][counter].loc[mine.index]), (strategy, counter)
        assert meta["strategies"][strategy]["link"]["costs"]["compute_of"] == "full_gpu"
    lru, lru_own = layers.loc["lru", "non_expert_s"], own.loc["lru", "non_expert_s"]
    assert lru.to_numpy() != pytest.approx(lru_own.loc[lru.index].to_numpy(), rel=1e-6)  # its own measurement differed
    assert (layers.loc["promoe", "predict_s"] > 0).any()  # its own prediction cost is kept


def test_compute_of_needs_measured_costs_and_a_measured_strategy(recorded, tmp_path):
    run, log, _ = recorded
    out = tmp_path / "s"
    assert_usage_error(invoke("simulate", "--trace", log, "--hardware", "rtx4090", "--model-profile", "mixtral-8x7b",
                              "--compute-of", "full_gpu", "--out", out), "--measured")
    assert_usage_error(invoke("simulate", "--trace", log, "--measured", run, "--compute-of", "oracle", "--strategy",
                              "lru", "--out", out), "oracle")
    assert not out.exists()


def test_replayed_predictions_are_the_runs(recorded):
    run, _, sim = recorded
    real, simulated = load_run(run)[1]["layers"], load_run(sim)[1]["layers"]
    ours = simulated[simulated["strategy"] == "promoe"].set_index(KEY)["predicted"].fillna("")
    theirs = real[real["strategy"] == "promoe"].set_index(KEY)["predicted"].fillna("")
    assert (ours != "").sum() > 0
    assert ours.equals(theirs.loc[ours.index])


def test_a_simulated_run_folder_has_the_runs_schema_and_says_what_it_stands_on(recorded):
    run, log_path, sim = recorded
    meta, tables = load_run(sim)
    real_meta, real_tables = load_run(run)
    assert meta["status"] == "complete" and meta["simulated"]["source"] == "recorded"
    assert meta["simulated"]["trace"] == str(log_path)
    assert meta["strategies"]["lru"]["link"]["kind"] == "simulated"
    assert meta["strategies"]["lru"]["link"]["costs"]["run"] == str(run)
    measured_only = set(hardware(real_tables["phases"]).columns) - {"strategy"}  # a simulation measures no phase
    for name in ("requests", "steps", "layers", "statistics", "summary"):
        assert set(real_tables[name].columns) - measured_only <= set(tables[name].columns), name
    assert not set(tables["summary"].columns) & measured_only
    timeline = load_timeline(sim)
    copies = timeline[(timeline["strategy"] == "lru") & (timeline["lane"] == "copy")]
    assert copies["bytes"].sum() == tables["layers"].query("strategy == 'lru'")["bytes"].sum()


def simulate(trace, model_profile, out, *extra):
    return invoke("simulate", "--trace", trace, "--hardware", "rtx4090", "--model-profile", model_profile,
                  "--out", out, *extra)


def test_the_same_inputs_give_byte_identical_outputs(synthetic, model_profile, tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        result = simulate(synthetic, model_profile, folder, "--strategy", "lru,promoe[predictor=noisy],oracle",
                          "--cache-rate", "0.25,0.5")
        assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*") if p.is_file())
    assert len(files) >= 8
    assert files == sorted(p.relative_to(folders[1]) for p in folders[1].rglob("*") if p.is_file())
    for name in files:
        ours, theirs = ((folder / name).read_bytes() for folder in folders)
        if name.name == "run.json":  # the only difference allowed: where each was asked to go
            ours, theirs = ours.replace(str(folders[0]).encode(), b""), theirs.replace(str(folders[1]).encode(), b"")
        assert ours == theirs, name


def test_synthetic_routing_is_marked_wherever_its_results_are(synthetic, model_profile, tmp_path):
    result = simulate(synthetic, model_profile, tmp_path / "s", "--strategy", "lru")
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output and "skew" in result.output
    meta, _ = load_run(tmp_path / "s")
    assert meta["simulated"]["source"] == "synthetic" and meta["simulated"]["synthetic"]["seed"] == 3


def test_cache_rates_each_get_their_own_strategies_and_baseline(synthetic, model_profile, tmp_path):
    result = simulate(synthetic, model_profile, tmp_path / "s", "--strategy", "lru,oracle", "--cache-rate", "0.25,0.75")
    assert result.exit_code == 0, result.output
    summary = load_run(tmp_path / "s")[1]["summary"].set_index("strategy")
    assert list(summary.index) == ["lru[cache_rate=0.25]", "oracle[cache_rate=0.25]", "lru[cache_rate=0.75]",
                                   "oracle[cache_rate=0.75]"]
    assert summary.loc["lru[cache_rate=0.75]", "speedup_tpot"] == pytest.approx(1.0)
    assert summary.loc["oracle[cache_rate=0.25]", "speedup_tpot"] == pytest.approx(
        summary.loc["lru[cache_rate=0.25]", "tpot_ms"] / summary.loc["oracle[cache_rate=0.25]", "tpot_ms"])
    assert summary.loc["lru[cache_rate=0.75]", "hit_rate"] > summary.loc["lru[cache_rate=0.25]", "hit_rate"]


@pytest.mark.parametrize("recall", [0.5, 1.0])
def test_the_noisy_predictor_has_the_recall_it_is_given(synthetic, model_profile, tmp_path, recall):
    spec = parse(f"promoe[predictor=noisy,recall={recall},distance=1]").label
    result = simulate(synthetic, model_profile, tmp_path / "s", "--strategy", f"{spec},oracle[distance=1]")
    assert result.exit_code == 0, result.output
    summary = load_run(tmp_path / "s")[1]["summary"].set_index("strategy")
    assert summary.loc[spec, "recall"] == pytest.approx(recall, abs=0.06)
    layers = load_run(tmp_path / "s")[1]["layers"]
    guessed = layers[(layers["strategy"] == spec) & (layers["phase"] == "decode")]["predicted"].dropna()
    sizes = guessed.map(lambda p: len(str(p).split()))
    routed = layers[(layers["strategy"] == spec) & (layers["phase"] == "decode")].loc[guessed.index, "routed"]
    assert (sizes == routed.map(lambda r: len(str(r).split()))).all()  # made up to the routed number


def test_a_log_without_predictor_guesses_runs_promoe_on_noisy_and_says_so(synthetic, model_profile, tmp_path):
    result = simulate(synthetic, model_profile, tmp_path / "s", "--strategy", "promoe")
    assert result.exit_code == 0, result.output
    assert "promoe runs as promoe[predictor=noisy]" in result.output
    assert list(load_run(tmp_path / "s")[1]["summary"]["strategy"]) == ["promoe[predictor=noisy]"]


def test_a_projection_needs_matching_experts_and_an_explicit_layer_map(synthetic, model_profile, tmp_path):
    out = tmp_path / "s"
    assert_usage_error(simulate(synthetic, "mixtral-8x7b", out), "16 experts top-2", "8 top-2")
    config = json.loads(model_profile.read_text())
    config["num_hidden_layers"] = 10
    model_profile.write_text(json.dumps(config))
    assert_usage_error(simulate(synthetic, model_profile, out), "--layer-map")
    assert not out.exists()
    result = simulate(synthetic, model_profile, out, "--layer-map", "cycle", "--strategy", "lru")
    assert result.exit_code == 0, result.output
    meta, tables = load_run(out)
    assert meta["simulated"]["layer_map"] == {"how": "cycle", "from_layers": 4, "to_layers": 10}
    assert tables["layers"]["layer"].max() == 9
    assert_usage_error(simulate(synthetic, model_profile, tmp_path / "t", "--layer-map", "truncate"), "truncate")


@pytest.mark.parametrize(("options", "fragment"), [
    (["--hardware", "rtx4090"], "--model-profile"),
    (["--hardware", "no-such-gpu", "--model-profile", "mixtral-8x7b"], "no-such-gpu"),
    (["--hardware", "rtx4090", "--model-profile", "mixtral-8x7b", "--cache-rate", "0.5,x"], "--cache-rate"),
    (["--hardware", "rtx4090", "--model-profile", "mixtral-8x7b", "--cache-rate", "1.5"], "--cache-rate"),
    (["--hardware", "rtx4090", "--model-profile", "mixtral-8x7b", "--measured", "x"], "one or the other"),
])
def test_bad_simulate_options_are_one_line_errors(synthetic, tmp_path, options, fragment):
    out = tmp_path / "s"
    assert_usage_error(invoke("simulate", "--trace", synthetic, "--out", out, *options), fragment)
    assert not out.exists()


def test_a_missing_or_broken_trace_is_refused(tmp_path):
    broken = tmp_path / "broken.log"
    broken.write_bytes(b"not safetensors")
    for trace in (tmp_path / "missing.log", broken):
        assert_usage_error(invoke("simulate", "--trace", trace, "--hardware", "rtx4090", "--model-profile",
                                  "mixtral-8x7b", "--out", tmp_path / "s"), trace.name)


def test_import_and_synth_trace_commands_write_logs(tmp_path):
    from pathlib import Path

    log = Path(__file__).resolve().parents[1] / "traces" / "mixtral-8x7b-humaneval-0.jsonl"
    result = invoke("import-trace", log, "--out", tmp_path / "mixtral.log")
    assert result.exit_code == 0, result.output
    assert "199 token-layers missing" in result.output
    assert RoutingLog.load(tmp_path / "mixtral.log").meta["source"] == "imported"
    result = invoke("synth-trace", "--layers", "3", "--experts", "8", "--top-k", "2", "--decode-steps", "4",
                    "--prompt-tokens", "5", "--out", tmp_path / "s.log")
    assert result.exit_code == 0 and "synthetic" in result.output
    assert pd.Series(RoutingLog.load(tmp_path / "s.log").counts.ravel()).tolist() == [5] * 3 + [1] * 12


def test_measured_costs_of_another_run_are_refused_before_anything_is_written(recorded, synthetic, tmp_path):
    run, _, _ = recorded
    out = tmp_path / "s"
    assert_usage_error(invoke("simulate", "--trace", synthetic, "--measured", run, "--strategy", "lru", "--out", out),
                       "replay a run's own log")
    assert not out.exists()


def chunk_rows(*chunks):
    """Timeline rows of landed chunks: (layer, expert, start_s, end_s), 1000 bytes each, queued at 0."""
    return pd.DataFrame([{"kind": "chunk", "layer": layer, "expert": expert, "start_s": start, "end_s": end,
                          "queued_s": 0.0, "bytes": 1000} for layer, expert, start, end in chunks])


def test_the_measured_dispatch_is_how_late_a_copys_next_chunk_lands_beyond_its_nominal_time():
    def nominal(nbytes):
        return nbytes * 1e-6  # 1 ms per chunk of 1000 bytes

    # expert 1's chunks land 1.2 and 1.1 ms apart: 0.2 and 0.1 ms late; then expert 2 starts 5 ms later (its
    # slot was busy: the simulator models that wait itself) and its next chunk lands on time
    timeline = chunk_rows((0, 1, 0.0, 0.001), (0, 1, 0.0011, 0.0022), (0, 1, 0.0023, 0.0033),
                          (0, 2, 0.0083, 0.0093), (0, 2, 0.0093, 0.0103))
    dispatch, wake = _thread_overheads(timeline, nominal)
    assert dispatch == pytest.approx((0.2e-3 + 0.1e-3 + 0.0) / 3)
    assert wake == 0.0  # no stall in this timeline
