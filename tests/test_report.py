"""`promoe-bench report`: every figure's numbers are the run folder's, the file is one self-contained page that
a real browser renders without an error, and bad input is one line that writes nothing."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from promoe_bench import report_across as across
from promoe_bench import report_data as data
from promoe_bench.report_figures import Styles, colour
from promoe_bench.routing_synthetic import synthetic_log

from .test_cli import assert_usage_error, invoke, run_cli

GEN_LEN = 5
REAL = ["--device", "cpu", "--prompt-len", "6", "--gen-len", str(GEN_LEN), "--repeats", "2", "--warmup", "1",
        "--link-gbps", "0.05", "--link-latency-us", "20", "--cache-rate", "0.5"]
STRATEGIES = "full_gpu,lru,promoe[predictor=gate],promoe[predictor=gate,distance=1]"
SECTIONS = ("What was run", "The verdict", "Latency", "Where the time goes", "Cache and prediction", "The link",
            "Timeline of one prefill and one decode step", "Sweeps", "Commits")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def real(checkpoints, tmp_path_factory):
    """A CPU run of the tiny mixtral made with `run --report`: (run folder, its report, the CLI result)."""
    root = tmp_path_factory.mktemp("report_real")
    result = run_cli(checkpoints["mixtral"], root / "run", "--strategy", STRATEGIES, "--report",
                     root / "run.html", tiny=REAL)
    assert result.exit_code == 0, result.output
    return root / "run", root / "run.html", result


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Simulated runs of a SYNTHETIC log: one at cache rates 0.25 and 0.5 together, and one per rate."""
    root = tmp_path_factory.mktemp("report_sim")
    log = root / "synthetic.log"
    synthetic_log(num_layers=4, num_experts=16, top_k=2, prompt_tokens=24, decode_steps=12, batches=1,
                  skew=1.0, repeat=0.3, cross_layer=0.5, seed=3).save(log)
    config = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "num_local_experts": 16,
              "num_experts_per_tok": 2, "tie_word_embeddings": False}
    (root / "config.json").write_text(json.dumps(config))
    folders = {}
    for name, rates in (("both", "0.25,0.5"), ("quarter", "0.25"), ("half", "0.5")):
        folders[name] = root / name
        result = invoke("simulate", "--trace", log, "--hardware", "rtx4090", "--model-profile", root / "config.json",
                        "--strategy", "lru,promoe[predictor=noisy],oracle", "--cache-rate", rates, "--out",
                        folders[name])
        assert result.exit_code == 0, result.output
    return folders


def measured(table: pd.DataFrame) -> pd.DataFrame:
    return table[~table["warmup"]]


# -- the numbers of each figure are the run folder's -------------------------------------------------------------


def test_the_verdict_holds_the_runs_summary_and_statistics(real):
    folder, _, _ = real
    runs = data.load_runs([folder])
    values, reasons = data.verdict(runs, None)
    summary = pd.read_csv(folder / "summary.csv").set_index("strategy")
    statistics = pd.read_csv(folder / "statistics.csv").set_index(["strategy", "metric"])
    assert list(values["strategy"]) == list(summary.index)
    for row in values.itertuples(index=False):
        for metric in data.WITH_CI:
            stats = statistics.loc[(row.strategy, metric)]
            assert (getattr(row, metric), getattr(row, f"{metric}_ci_low"), getattr(row, f"{metric}_ci_high")) == \
                (stats["median"], stats["ci_low"], stats["ci_high"])
        for column in ("hit_rate", "stall_share", "copied_mb_per_repeat", "peak_rss_bytes"):
            assert getattr(row, column) == pytest.approx(summary.at[row.strategy, column], rel=1e-12)
        assert row.speedup_tpot == pytest.approx(summary.at["lru", "tpot_ms"] / summary.at[row.strategy, "tpot_ms"])
    # measured on the CPU: no NVML, and the reason is run.json's, never a 0
    assert values["nvml_peak_memory_bytes"].isna().all()
    assert set(reasons["nvml_peak_memory_bytes"]) == {"the device is the CPU"}
    assert reasons.drop(columns="nvml_peak_memory_bytes").isna().all().all()


def test_the_verdict_table_bolds_the_best_offloading_strategy_and_says_why_a_cell_is_empty(real):
    _, page, _ = real
    text = page.read_text()
    values, _ = data.verdict(data.load_runs([real[0]]), None)
    contenders = values[values["strategy"] != "full_gpu"]
    assert f"<b>{contenders['tpot_ms'].min():.2f}" in text
    verdict = text[text.index("The verdict"):text.index("Latency")]
    full_gpu_row = re.search(r"<td>full_gpu</td>(.*?)</tr>", verdict, re.S).group(1)
    assert "<b>" not in full_gpu_row  # the ceiling is not ranked, even where noise puts it behind a contender
    assert "<span title='the device is the CPU'>—</span>" in text
    assert "— peak GPU memory MB (NVML): the device is the CPU (4 of 4)" in text


def test_inter_token_latencies_are_the_measured_decode_steps(real):
    folder, _, _ = real
    steps = measured(pd.read_csv(folder / "steps.csv"))
    itl = data.inter_token(data.load_runs([folder]))
    decode = steps[steps["phase"] == "decode"]
    assert len(itl) == len(decode) == 4 * 2 * (GEN_LEN - 1)  # strategies x repeats x decode steps
    assert itl["ms"].sum() == pytest.approx(decode["seconds"].sum() * 1e3)


def test_stacked_bars_sum_to_the_layers_columns(real):
    folder, _, _ = real
    bars = data.time_breakdown(data.load_runs([folder]))
    layers = measured(pd.read_csv(folder / "layers.csv"))
    parts = ["non_expert_s", "router_s", "expert_s", "stall_s", "predict_s"]
    expected = (layers[parts].sum(axis=1) * 1e3).groupby(
        [layers["strategy"], layers["phase"], layers["layer"]]).mean()
    stacked = bars.groupby(["series", "phase", "layer"])["ms"].sum()
    assert set(bars["component"]) == {"non-expert compute", "router", "expert compute", "stall", "predictor"}
    assert len(stacked) == len(expected) == 4 * 2 * 3  # strategies x phases x MoE layers
    for key, ms in expected.items():
        assert stacked[key] == pytest.approx(ms)
    assert bars.loc[bars["component"] == "stall", "ms"].sum() > 0  # the tiny link is slow enough to stall


def test_hit_rate_and_recall_per_layer_with_a_panel_per_distance(real):
    folder, _, _ = real
    runs = data.load_runs([folder])
    layers = measured(pd.read_csv(folder / "layers.csv"))
    hits = data.hit_rate_per_layer(runs).set_index(["series", "layer"])["hit_rate"]
    lru = layers[layers["strategy"] == "lru"].groupby("layer")[["hits", "misses"]].sum()
    assert hits.loc["lru"].to_dict() == (lru["hits"] / (lru["hits"] + lru["misses"])).to_dict()
    assert (hits.loc["full_gpu"] == 1).all()

    recall = data.recall_per_layer(runs)
    assert set(recall["series"]) == {"promoe[predictor=gate]", "promoe[predictor=gate,distance=1]"}
    assert dict(recall.drop_duplicates("series")[["series", "distance"]].values) == {
        "promoe[predictor=gate]": 2, "promoe[predictor=gate,distance=1]": 1}
    near = layers[(layers["strategy"] == "promoe[predictor=gate,distance=1]") & (layers["phase"] == "decode")
                  & layers["predicted_correct"].notna()].groupby("layer").sum(numeric_only=True)
    expected = near["predicted_correct"] / (near["hits"] + near["misses"])
    got = recall[recall["distance"] == 1].set_index("layer")["recall"]
    assert got.to_dict() == pytest.approx(expected.to_dict())
    assert "a panel per prediction distance" in real[1].read_text()


def test_prediction_quality_is_the_summarys_for_the_predicting_strategies(real):
    folder, _, _ = real
    quality = data.prediction_quality(data.load_runs([folder])).set_index("series")
    summary = pd.read_csv(folder / "summary.csv").set_index("strategy")
    assert list(quality.index) == ["promoe[predictor=gate]", "promoe[predictor=gate,distance=1]"]
    for column in ("recall", "fetch_rate", "good_pred", "wasted_mb_per_repeat"):
        assert quality[column].equals(summary.loc[quality.index, column])


def test_the_link_figures_are_bytes_over_time_against_the_emulated_peak(real):
    folder, _, _ = real
    runs = data.load_runs([folder])
    layers, steps = measured(pd.read_csv(folder / "layers.csv")), measured(pd.read_csv(folder / "steps.csv"))
    per_step = data.bytes_per_step(runs).set_index(["series", "step"])["mb"]
    lru = layers[layers["strategy"] == "lru"]
    assert per_step.loc[("lru", 0)] == pytest.approx(lru[lru["step"] == 0]["bytes"].sum() / 2 / 1e6)  # 2 repeats
    rates = data.link_rates(runs).set_index(["series", "phase"])
    decode = lru[lru["phase"] == "decode"]["bytes"].sum() / steps.query("strategy == 'lru' and phase == 'decode'")[
        "seconds"].sum() / 1e9
    assert rates.at[("lru", "decode"), "copied_gbps"] == pytest.approx(decode)
    assert (rates["peak_gbps"] == 0.05).all() and rates["pcie_gbps"].isna().all()
    sampled = data.samples_over_time(runs)
    assert set(sampled["counter"]) == {"link GB/s (its own count)", "process RSS GB"}  # no NVML on the CPU
    assert "NVML counters (PCIe throughput, GPU memory, power) were not measured: the device is the CPU" in \
        real[1].read_text()


def test_the_timeline_shows_one_prefill_and_the_middle_decode_step_of_each_strategy(real):
    folder, _, _ = real
    runs = data.load_runs([folder])
    shown = data.step_timeline(runs)
    middle = 1 + (GEN_LEN - 1) // 2
    assert set(shown.groupby("series")["shown_step"].unique().map(tuple)) == {
        ("prefill (step 0)", f"decode (step {middle})")}
    assert (shown["repeat"] == 1).all() and not shown["warmup"].any()  # the first measured repeat
    copies = shown[shown["lane"] == "copy"]
    assert set(copies["priority"]) <= {"HIGH", "LOW"} and "LOW" in set(copies["priority"])
    layers = pd.read_csv(folder / "layers.csv")
    step = layers[(layers["repeat"] == 1) & (layers["strategy"] == "lru") & (layers["step"] == middle)]
    assert copies[(copies["series"] == "lru") & (copies["step"] == middle)]["bytes"].sum() == step["bytes"].sum()
    compute = shown[shown["lane"] == "compute"]  # times are from each step's start, where layer 0 begins
    assert compute.groupby(["series", "step"])["start_ms"].min().to_numpy() == pytest.approx([0.0] * 8)


def test_sweep_x_values_are_the_cache_rates_within_a_run_and_across_runs(simulated):
    within = across.sweeps(data.load_runs([simulated["both"]]))
    assert set(within["parameter"]) == {"cache rate"}
    assert sorted(within["x"].unique()) == [0.25, 0.5]
    assert set(within["line"]) == {"lru", "promoe[predictor=noisy]", "oracle"}  # cache_rate taken out
    row = within[(within["series"] == "lru[cache_rate=0.25]") & (within["metric"] == "tpot_ms")].iloc[0]
    stats = pd.read_csv(simulated["both"] / "statistics.csv").set_index(["strategy", "metric"])
    assert row["median"] == stats.at[("lru[cache_rate=0.25]", "tpot_ms"), "median"]

    apart = across.sweeps(data.load_runs([simulated["quarter"], simulated["half"]]))
    assert sorted(apart["x"].unique()) == [0.25, 0.5]
    assert set(apart["series"]) == {f"{run} · {s}" for run in ("quarter", "half")
                                    for s in ("lru", "promoe[predictor=noisy]", "oracle")}
    assert across.sweeps(data.load_runs([simulated["half"]])).empty


def test_runs_of_one_setup_from_two_commits_are_compared_with_their_deltas(real, tmp_path):
    folder, _, _ = real
    later = tmp_path / "later"
    shutil.copytree(folder, later)
    meta = json.loads((later / "run.json").read_text())
    meta["environment"]["git_commit"], meta["environment"]["git_dirty"] = "f" * 40, False
    (later / "run.json").write_text(json.dumps(meta))
    summary = pd.read_csv(later / "summary.csv")
    summary["tpot_ms"] *= 1.1
    summary.to_csv(later / "summary.csv", index=False)

    table = across.commits(data.load_runs([folder, later]))
    delta = [c for c in table.columns if c.startswith("Δ")]
    assert len(delta) == 1 and "ffffffffff" in delta[0]
    tpot = table[table["metric"] == "tpot_ms"]
    assert tpot[delta[0]].to_numpy() == pytest.approx([10.0] * 4)
    assert table[table["metric"] == "ttft_ms"][delta[0]].abs().max() == 0
    assert across.commits(data.load_runs([folder])).empty


def test_one_colour_per_strategy_name_whatever_its_parameters_or_run(simulated):
    styles = Styles(data.series(data.load_runs([simulated["quarter"], simulated["both"]])))
    promoe = [s for s in styles.order if "promoe" in s]
    assert len(promoe) == 3 and {styles.colour(s) for s in promoe} == {colour("promoe")}
    assert len({styles.dash(s) for s in promoe}) == 3  # told apart by dash
    assert len({colour(name) for name in ("full_gpu", "on_demand", "lru", "static", "skip_gate", "promoe",
                                          "oracle")}) == 7


# -- the file ----------------------------------------------------------------------------------------------------


def test_run_report_writes_one_self_contained_file_with_every_section(real):
    _, page, result = real
    assert f"wrote {page} (" in result.output
    text = page.read_text()
    assert text.count("plotly.js v") == 1  # embedded once: opens offline
    assert not re.search(r"<script[^>]*\bsrc=", text)  # and fetches nothing
    headings = re.findall(r"<h2>(.*?)</h2><p class='guide'>.+?</p>", text)
    assert headings == list(SECTIONS)
    assert page.stat().st_size < 10e6


def test_a_simulated_synthetic_run_says_so_and_has_no_wall_clock_times(simulated, tmp_path):
    out = tmp_path / "sim.html"
    result = invoke("report", simulated["both"], "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "<p class='synthetic'>SYNTHETIC routing in both" in text
    assert "simulated: no wall-clock times" in text
    assert "SIMULATED on profile rtx4090" in text
    assert "speedups against each run&#x27;s own baseline (lru)" in text


def test_report_of_a_baseline_in_no_run_is_refused(real, tmp_path):
    out = tmp_path / "r.html"
    assert_usage_error(invoke("report", real[0], "--baseline", "static", "--out", out), "--baseline static",
                       "full_gpu, lru")
    assert not out.exists()


# -- bad input: one line, exit 2, nothing written, a good report left as it was -----------------------------------


@pytest.fixture
def bad_runs(real, tmp_path):
    folder = real[0]
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    old = tmp_path / "old_schema"
    shutil.copytree(folder, old)
    meta = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({**meta, "schema_version": 1}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({**meta, "status": "incomplete", "strategies": {}}))
    return {"not_a_run": (not_a_run, "no run.json"), "old_schema": (old, "schema version 1"),
            "empty": (empty, "no finished strategy")}


@pytest.mark.parametrize("case", ["not_a_run", "old_schema", "empty"])
def test_bad_input_is_one_line_and_writes_nothing(bad_runs, real, tmp_path, case):
    folder, fragment = bad_runs[case]
    fresh = tmp_path / "fresh.html"
    assert_usage_error(invoke("report", folder, "--out", fresh), str(folder), fragment)
    assert not fresh.exists()
    good = tmp_path / "good.html"
    shutil.copy(real[1], good)
    assert_usage_error(invoke("report", real[0], folder, "--out", good), fragment)
    assert good.read_bytes() == real[1].read_bytes()  # a failed report never replaces a good one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_out_that_is_a_folder_is_refused(real, tmp_path):
    assert_usage_error(invoke("report", real[0], "--out", tmp_path), "is a folder")


# -- in a real browser ---------------------------------------------------------------------------------------------


def chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page`, console messages on stderr; the background-networking flags keep it from
    dialling out (its connections are refused on a closed network)."""
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *flags,
         page.as_uri()], capture_output=True, text=True, timeout=180, check=False)


def console(stderr: str) -> list[str]:
    """Every page console message: Chromium logs them all (log, warn, error, uncaught) as CONSOLE lines, and a
    healthy report logs nothing, so each is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (.ci/run installs "
                                    "Debian's chromium where it runs as root)")


@needs_chromium
def test_the_console_check_sees_a_page_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('broken'); undefinedFunction();</script></body></html>")
    lines = console(chromium(page, tmp_path / "profile", "--dump-dom").stderr)
    assert len(lines) == 2 and "undefinedFunction" in lines[1]


@needs_chromium
def test_the_report_renders_every_figure_in_a_real_browser(real, simulated, tmp_path):
    folder, _, _ = real
    later = tmp_path / "later"  # one setup at two commits, and a simulated sweep: every section has content
    shutil.copytree(folder, later)
    meta = json.loads((later / "run.json").read_text())
    meta["environment"]["git_commit"] = "f" * 40
    (later / "run.json").write_text(json.dumps(meta))
    page, screenshot = tmp_path / "report.html", tmp_path / "report.png"
    result = invoke("report", folder, later, simulated["both"], "--out", page)
    assert result.exit_code == 0, result.output

    browser = chromium(page, tmp_path / "profile", "--dump-dom", f"--screenshot={screenshot}",
                       "--window-size=1400,6000")
    assert browser.returncode == 0, browser.stderr[-2000:]
    assert console(browser.stderr) == []
    figures = re.findall(r'id="(fig-[\w-]+)"', page.read_text())
    assert {"fig-latency", "fig-breakdown", "fig-recall", "fig-timeline", "fig-sweep-cache-rate",
            "fig-sweep-hardware"} <= set(figures)
    dom = browser.stdout
    for name, following in zip(figures, [*figures[1:], None], strict=True):
        start = dom.index(f'id="{name}"')
        end = dom.index(f'id="{following}"') if following else len(dom)
        assert 'class="main-svg"' in dom[start:end], f"{name} has no rendered plot"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000
