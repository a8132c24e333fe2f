"""What a run folder measures besides timings: hardware counters per phase, their samples, statistics
over repeats, and the environment; on the CPU, what it cannot measure is missing with a reason."""

import json

import pandas as pd
import pytest

from promoe_bench.results import load_run

from .test_cli import run_cli

GEN_LEN, BATCH, REQUESTS, PROMPT = 4, 2, 4, 5


@pytest.fixture(scope="module")
def run_folder(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("measure") / "run"
    tiny = ["--device", "cpu", "--prompt-len", str(PROMPT), "--gen-len", str(GEN_LEN), "--repeats", "2",
            "--warmup", "1", "--batch-size", str(BATCH), "--num-requests", str(REQUESTS), "--link-gbps", "0.2"]
    result = run_cli(checkpoints["mixtral"], out, "--strategy", "full_gpu,lru,promoe[predictor=gate]", tiny=tiny)
    assert result.exit_code == 0, result.output
    return out


def test_phases_have_one_row_per_batch_and_phase_with_their_tokens(run_folder):
    _, tables = load_run(run_folder)
    phases = tables["phases"]
    assert len(phases) == 3 * 3 * (REQUESTS // BATCH) * 2  # strategies x repeats x batches x phases
    prefill, decode = phases[phases["phase"] == "prefill"], phases[phases["phase"] == "decode"]
    assert (prefill["tokens"] == BATCH * PROMPT).all()
    assert (decode["tokens"] == BATCH * (GEN_LEN - 1)).all()
    assert (phases["seconds"] > 0).all() and (phases["peak_rss_bytes"] > 0).all()


def test_on_the_cpu_gpu_counters_are_missing_with_a_reason_never_zero(run_folder):
    meta, tables = load_run(run_folder)
    phases = tables["phases"]
    gpu_only = ["pcie_h2d_bytes", "pcie_h2d_gbps", "nvml_peak_memory_bytes", "torch_max_allocated_bytes",
                "energy_j", "energy_per_token_j"]
    assert phases[gpu_only].isna().all().all()
    for strategy in meta["strategies"].values():
        assert set(gpu_only) <= set(strategy["unmeasured"])
        assert all("CPU" in reason for reason in strategy["unmeasured"].values())
    assert meta["environment"]["gpu"] == {"missing": {"gpu": "the device is the CPU"}}


def test_the_links_bytes_per_phase_are_the_bytes_lru_copied(run_folder):
    _, tables = load_run(run_folder)
    phases, layers = tables["phases"], tables["layers"]
    for strategy in ("lru", "full_gpu"):  # lru copies only while compute waits, so within its steps
        by_phase = phases[phases["strategy"] == strategy].groupby(["repeat", "batch", "phase"])["link_bytes"].sum()
        copied = layers[layers["strategy"] == strategy].groupby(["repeat", "batch", "phase"])["bytes"].sum()
        assert by_phase.sort_index().tolist() == copied.sort_index().tolist()
    assert phases.loc[phases["strategy"] == "lru", "link_bytes"].sum() > 0


def test_samples_are_on_each_strategys_timeline_clock(run_folder):
    _, tables = load_run(run_folder)
    samples = tables["samples"]
    assert list(dict.fromkeys(samples["strategy"])) == ["full_gpu", "lru", "promoe[predictor=gate]"]
    assert {"t_s", "rss_bytes", "link_bytes"} <= set(samples.columns)
    for _, own in samples.groupby("strategy"):
        assert own["t_s"].is_monotonic_increasing and (own["t_s"] > 0).all()
        assert own["link_bytes"].is_monotonic_increasing  # a cumulative counter


def test_statistics_cover_measured_batches_only(run_folder):
    _, tables = load_run(run_folder)
    stats = tables["statistics"]
    assert len(stats) == 3 * 4
    assert (stats["n"] == 2 * (REQUESTS // BATCH)).all()  # two measured repeats of two batches; warm-up left out
    assert (stats["ci_low"] <= stats["median"]).all() and (stats["median"] <= stats["ci_high"]).all()
    assert (stats["min"] <= stats["median"]).all() and (stats["median"] <= stats["max"]).all()
    requests = tables["requests"]
    measured = requests[(~requests["warmup"]) & (requests["strategy"] == "lru")]
    lru_ttft = stats[(stats["strategy"] == "lru") & (stats["metric"] == "ttft_ms")].iloc[0]
    assert lru_ttft["max"] == pytest.approx(measured["ttft_s"].max() * 1e3)


def test_environment_records_versions_command_and_config(run_folder):
    meta = json.loads((run_folder / "run.json").read_text())
    environment = meta["environment"]
    assert {"torch", "transformers", "safetensors", "promoe-bench"} <= set(environment["versions"])
    assert environment["cpu_cores"] >= 1 and environment["ram_bytes"] > 0
    assert "git_commit" in environment and "git_dirty" in environment and environment["command"]
    assert meta["config"]["workload"]["output_tokens"] == GEN_LEN


def test_summary_reduces_the_phases_per_strategy(run_folder):
    _, tables = load_run(run_folder)
    summary, phases = tables["summary"].set_index("strategy"), tables["phases"]
    lru = phases[(phases["strategy"] == "lru") & (~phases["warmup"]) & (phases["phase"] == "decode")]
    assert summary.loc["lru", "decode_link_gbps"] == pytest.approx(lru["link_bytes"].sum() / lru["seconds"].sum() / 1e9)
    assert summary.loc["full_gpu", "decode_link_gbps"] == 0  # measured: nothing crossed the link
    assert summary[["decode_pcie_gbps", "prefill_energy_per_token_j", "nvml_peak_memory_bytes"]].isna().all().all()
    assert (summary["peak_rss_bytes"] > 0).all()


def test_hardware_figures_are_missing_when_any_phase_lacks_the_counter():
    from promoe_bench.summary import hardware

    phases = pd.DataFrame({
        "strategy": ["lru"] * 3, "warmup": [True, False, False], "phase": ["decode"] * 3, "tokens": [9, 4, 4],
        "seconds": [9.0, 1.0, 3.0], "pcie_h2d_bytes": [1e12, 2e9, 6e9], "link_bytes": [0, 1e9, float("nan")],
        "energy_j": [1.0, 2.0, 6.0], "nvml_peak_memory_bytes": [9e9, 1e9, 2e9],
        "torch_max_allocated_bytes": [float("nan")] * 3, "torch_max_reserved_bytes": [float("nan")] * 3,
        "peak_rss_bytes": [1, 5, 3]})
    row = hardware(phases).iloc[0]
    assert row["decode_pcie_gbps"] == pytest.approx(8e9 / 4 / 1e9)  # the warm-up's bytes left out
    assert pd.isna(row["decode_link_gbps"])  # one phase unmeasured: no figure rather than a low one
    assert row["decode_energy_per_token_j"] == pytest.approx(1.0)
    assert row["nvml_peak_memory_bytes"] == 2e9 and row["peak_rss_bytes"] == 5
    assert pd.isna(row["torch_max_allocated_bytes"])
