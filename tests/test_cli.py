"""The `promoe-bench` command line: one-line errors that leave nothing behind, and the run folder it writes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import promoe_bench.strategies as registry
from promoe_bench.cli import main
from promoe_bench.families import SUPPORTED_FAMILIES
from promoe_bench.results import SCHEMA_VERSION, TABLES, load_run
from promoe_bench.strategies import available

from .checkpoints import write_dense_checkpoint

TINY = ["--device", "cpu", "--prompt-len", "4", "--gen-len", "3", "--repeats", "1", "--warmup", "0",
        "--link-gbps", "50", "--link-latency-us", "0"]
BUILTIN_NAMES = ["full_gpu", "on_demand", "lru", "static", "skip_gate", "promoe", "oracle"]
PREDICTING = ["skip_gate", "promoe", "oracle"]  # strategies that guess later layers' experts
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
EXPERTS, TOP_K, MOE_LAYERS = 8, 2, 3  # the tiny mixtral checkpoint


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_cli(model, out, *extra, tiny=TINY):
    return invoke("run", "--model", model, *tiny, "--out", out, *extra)


def leftovers(out: Path) -> list[str]:
    """Hidden staging or replaced-run siblings of `out` that a run left behind."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.partial-", f".{out.name}.old-")))


def assert_usage_error(result, *fragments):
    """Exactly one stderr line `promoe-bench: error: ...` naming the problem, exit 2, no traceback."""
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("promoe-bench: error: "), lines[0]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


def assert_nothing_written(out: Path):
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert leftovers(out) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny(checkpoints, mixtral_predictors):
    """The tiny mixtral checkpoint, with learned predictors in its default place: `--strategy all`
    (the default, promoe included) runs on it."""
    return checkpoints["mixtral"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return write_dense_checkpoint(tmp_path_factory.mktemp("dense") / "llama")


@pytest.fixture
def out(tmp_path):
    return tmp_path / "runs" / "out"


# -- bad input: one line, exit 2, nothing written --------------------------------------------------


def test_missing_model_path_is_a_one_line_error(tmp_path, out):
    missing = tmp_path / "no_such_checkpoint"
    result = run_cli(missing, out)
    assert_usage_error(result, str(missing), "does not exist")
    assert_nothing_written(out)


def test_folder_without_config_json_is_a_one_line_error(tmp_path, out):
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    result = run_cli(folder, out)
    assert_usage_error(result, str(folder), "no config.json")
    assert_nothing_written(out)


def test_dense_checkpoint_is_refused_as_not_mixture_of_experts(dense, out):
    result = run_cli(dense, out)
    assert_usage_error(result, "not a Mixture-of-Experts model", "llama")
    assert_nothing_written(out)


@pytest.fixture
def unknown_family(tmp_path):
    folder = tmp_path / "odd_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "not_a_family"}))
    return folder


def test_unknown_model_family_is_a_one_line_error_naming_the_family(unknown_family, out):
    result = run_cli(unknown_family, out)
    assert_usage_error(result, "not_a_family")
    assert_nothing_written(out)


def test_unknown_model_family_message_says_unknown_family_and_lists_supported(unknown_family, out):
    result = run_cli(unknown_family, out)
    assert_usage_error(result, "unknown model family", "mixtral")


def test_cache_smaller_than_top_k_is_a_one_line_error(tiny, out):
    result = run_cli(tiny, out, "--cache-rate", "0.1")
    assert_usage_error(result, "cache too small", f"top-{TOP_K}")
    assert_nothing_written(out)


def test_strategy_level_cache_smaller_than_top_k_is_a_one_line_error(tiny, out):
    result = run_cli(tiny, out, "--strategy", "lru[cache_rate=0.1]")
    assert_usage_error(result, "cache too small")
    assert_nothing_written(out)


def test_gpu_memory_budget_below_top_k_experts_is_a_one_line_error(tiny, out):
    result = run_cli(tiny, out, "--gpu-memory", "1000")
    assert_usage_error(result, "cache too small", "--gpu-memory 1000")
    assert_nothing_written(out)


@pytest.mark.parametrize("spec, fragments", [
    ("nope", ["unknown strategy 'nope'", "full_gpu, on_demand, lru"]),
    ("lru[bogus=1]", ["no parameter 'bogus=1'", "cache_rate"]),
    ("lru[cache_rate=abc]", ["'abc' is not a valid float"]),
    ("lru[cache_rate=0.5", ["cannot parse strategy"]),
    ("lru,lru", ["listed twice"]),
], ids=["unknown_name", "unknown_parameter", "bad_value", "unclosed_bracket", "duplicate"])
def test_bad_strategy_spec_is_a_one_line_error(tiny, out, spec, fragments):
    result = run_cli(tiny, out, "--strategy", spec)
    assert_usage_error(result, *fragments)
    assert_nothing_written(out)


def test_bad_strategy_is_reported_before_the_model_is_loaded(tmp_path, out):
    result = run_cli(tmp_path / "no_such_checkpoint", out, "--strategy", "nope")
    assert_usage_error(result, "unknown strategy 'nope'")
    assert_nothing_written(out)


@pytest.mark.parametrize("option, value, fragment", [
    ("--cache-rate", "0", "--cache-rate must be in (0, 1]"),
    ("--cache-rate", "1.5", "--cache-rate must be in (0, 1]"),
    ("--gpu-memory", "0", "--gpu-memory must be a positive"),
    ("--repeats", "0", "--repeats must be at least 1"),
    ("--gen-len", "0", "--gen-len must be at least 1"),
    ("--dtype", "int8", "--dtype must be"),
    ("--device", "tpu", "--device must be auto, cpu or cuda"),
], ids=lambda v: str(v).lstrip("-"))
def test_out_of_range_option_is_a_one_line_error(tiny, out, option, value, fragment):
    result = run_cli(tiny, out, option, value)
    assert_usage_error(result, fragment)
    assert_nothing_written(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
def test_cuda_device_without_cuda_is_a_one_line_error(tiny, out):
    tiny_without_device = [a for a in TINY if a not in ("--device", "cpu")]
    result = run_cli(tiny, out, "--device", "cuda", tiny=tiny_without_device)
    assert_usage_error(result, "--device cuda", "no CUDA device")
    assert_nothing_written(out)


def test_out_that_is_a_file_is_refused_and_left_alone(tiny, out):
    out.parent.mkdir(parents=True)
    out.write_text("not a run")
    result = run_cli(tiny, out)
    assert_usage_error(result, "is a file")
    assert out.read_text() == "not a run"
    assert leftovers(out) == []


def test_console_script_prints_one_error_line_and_exits_2(tmp_path):
    script = Path(sys.executable).with_name("promoe-bench")
    if not script.exists():
        pytest.skip("promoe-bench console script is not installed next to this python")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(script), "run", "--model", str(tmp_path / "missing"), *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("promoe-bench: error: ")
    assert "Traceback" not in proc.stderr
    assert_nothing_written(out)


# -- an existing run folder -------------------------------------------------------------------------


def test_existing_run_is_refused_without_overwrite_and_left_byte_identical(tiny, out):
    first = run_cli(tiny, out, "--strategy", "lru")
    assert first.exit_code == 0, first.output
    before = snapshot(out)
    assert "run.json" in before

    result = run_cli(tiny, out, "--strategy", "on_demand")
    assert_usage_error(result, str(out), "--overwrite")
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_overwrite_replaces_the_previous_run(tiny, out):
    assert run_cli(tiny, out, "--strategy", "lru").exit_code == 0
    (out / "stray.txt").write_text("from before")

    result = run_cli(tiny, out, "--strategy", "on_demand", "--overwrite")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete"
    assert list(meta["strategies"]) == ["on_demand"]
    assert pd.read_csv(out / "summary.csv")["strategy"].tolist() == ["on_demand"]
    assert not (out / "stray.txt").exists()
    assert leftovers(out) == []


# -- the happy path ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_all(checkpoints, mixtral_predictors, tmp_path_factory):
    """One `run --strategy all` on the tiny mixtral checkpoint (with its learned predictors), shared by
    the tests below."""
    out = tmp_path_factory.mktemp("run_all") / "out"
    result = run_cli(checkpoints["mixtral"], out, "--strategy", "all")
    return result, out


@pytest.fixture(scope="module")
def run_tables(run_all):
    _, out = run_all
    return {name: pd.read_csv(out / f"{name}.csv") for name in TABLES}


def test_run_all_exits_zero_with_every_strategys_tokens_matching(run_all):
    result, _ = run_all
    assert result.exit_code == 0, (result.output, result.exc_info)
    assert result.exception is None
    assert "different tokens" not in result.stderr
    assert "Traceback" not in result.output


def test_run_all_prints_one_table_line_per_strategy_and_the_folder(run_all):
    result, out = run_all
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"wrote {out}"
    assert lines[0].startswith("device: cpu, emulated host-to-device link at 50.0 GB/s")
    header, rows = lines[1], lines[2:-1]
    assert header.split()[0] == "strategy"
    assert [row.split()[0] for row in rows] == BUILTIN_NAMES


def test_run_folder_has_a_complete_run_json_with_schema_version(run_all):
    _, out = run_all
    meta = json.loads((out / "run.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION == 2
    assert meta["status"] == "complete"
    assert "reason" not in meta
    assert list(meta["strategies"]) == BUILTIN_NAMES
    assert meta["model"]["family"] == "mixtral"
    assert (meta["model"]["experts_per_layer"], meta["model"]["top_k"]) == (EXPERTS, TOP_K)
    assert meta["config"]["out"] == str(out)
    assert meta["strategies"]["full_gpu"]["cache_slots_per_layer"] == EXPERTS
    for name in BUILTIN_NAMES[1:]:  # default --cache-rate 0.5
        assert meta["strategies"][name]["cache_slots_per_layer"] == EXPERTS // 2, name
    # full_gpu runs first, and its routing is what static and oracle read
    assert meta["trace"] == "recorded by the full_gpu run"
    assert leftovers(out) == []


def test_run_folder_holds_its_tables_readable_by_pandas_and_load_run(run_all, run_tables):
    _, out = run_all
    assert sorted(p.name for p in out.iterdir()) == sorted(["run.json", "timeline", *(f"{t}.csv" for t in TABLES)])
    assert sorted(p.name for p in (out / "timeline").iterdir()) == [f"{n}.csv.gz" for n in range(len(BUILTIN_NAMES))]
    for name, frame in run_tables.items():
        assert len(frame) > 0, name
    meta, tables = load_run(out)
    assert meta["status"] == "complete"
    assert set(tables) == set(TABLES)


def test_summary_has_one_row_per_strategy_and_every_strategy_matches_full_gpu_tokens(run_tables):
    summary = run_tables["summary"]
    assert summary["strategy"].tolist() == BUILTIN_NAMES
    assert summary["tokens_match"].astype(bool).all()


def test_full_gpu_copies_nothing_and_always_hits(run_tables):
    full = run_tables["summary"].set_index("strategy").loc["full_gpu"]
    assert full["copied_mb_per_repeat"] == 0
    assert full["hit_rate"] == 1.0
    assert full["evictions_per_repeat"] == 0
    layers = run_tables["layers"]
    full_layers = layers[layers["strategy"] == "full_gpu"]
    assert full_layers["bytes"].sum() == 0 and full_layers["misses"].sum() == 0


def test_on_demand_never_hits_and_copies_every_routed_expert(run_tables):
    summary = run_tables["summary"].set_index("strategy")
    assert summary.loc["on_demand", "hit_rate"] == 0.0
    assert summary.loc["on_demand", "copied_mb_per_repeat"] > 0
    layers = run_tables["layers"]
    on_demand = layers[layers["strategy"] == "on_demand"]
    assert on_demand["copies"].sum() == on_demand["misses"].sum()


def test_summary_has_the_prediction_columns_blank_for_strategies_that_predict_nothing(run_tables):
    summary = run_tables["summary"].set_index("strategy")
    for column in ("ready_rate", "recall", "fetch_rate", "good_pred", "wasted_mb_per_repeat",
                   "predict_ms_per_step"):
        assert column in summary.columns, column
    for name in BUILTIN_NAMES:
        row = summary.loc[name]
        assert 0 <= row["ready_rate"] <= 1, name
        assert row["wasted_mb_per_repeat"] >= 0 and row["predict_ms_per_step"] >= 0, name
        if name in PREDICTING:
            for column in ("recall", "fetch_rate", "good_pred"):
                assert 0 <= row[column] <= 1, (name, column, row[column])
            assert row["good_pred"] <= row["recall"] + 1e-12, name  # good_pred = recall x fetch rate
        else:  # nothing predicted: no figure, rather than a misleading 0
            for column in ("recall", "fetch_rate", "good_pred"):
                assert pd.isna(row[column]), (name, column, row[column])
            assert row["wasted_mb_per_repeat"] == 0 and row["predict_ms_per_step"] == 0, name
    assert summary.loc["full_gpu", "ready_rate"] == 1.0
    # the oracle reads the recorded routing: every routed expert was guessed
    assert summary.loc["oracle", "recall"] == 1.0


def test_summary_recall_is_the_layers_guessed_routed_experts_over_routed_in_decode(run_tables):
    layers, summary = run_tables["layers"], run_tables["summary"].set_index("strategy")
    for name in PREDICTING:
        own = layers[(layers["strategy"] == name) & (layers["phase"] == "decode") & layers["predicted"].notna()]
        assert len(own) > 0, name
        routed = (own["hits"] + own["misses"]).sum()
        assert summary.loc[name, "recall"] == pytest.approx(own["predicted_correct"].sum() / routed)
        assert summary.loc[name, "good_pred"] == pytest.approx(own["predicted_ready"].sum() / routed)


def test_layers_prediction_columns_are_consistent(run_tables):
    layers = run_tables["layers"]
    for column in ("ready", "predicted", "predicted_correct", "predicted_ready", "predict_s", "wasted_bytes"):
        assert column in layers.columns, column
    accessed = layers["hits"] + layers["misses"]
    assert layers["ready"].between(0, accessed).all()
    assert (layers[["predict_s", "wasted_bytes"]] >= 0).all().all()
    guessed = layers[layers["predicted"].notna()]
    assert set(guessed["strategy"]) == set(PREDICTING)
    assert (guessed["predicted_correct"] <= guessed["hits"] + guessed["misses"]).all()
    assert (guessed["predicted_ready"] <= guessed["predicted_correct"]).all()
    for predicted, routed, correct in zip(guessed["predicted"], guessed["routed"], guessed["predicted_correct"],
                                          strict=True):
        assert len(set(str(predicted).split()) & set(str(routed).split())) == correct
    blank = layers[layers["predicted"].isna()]
    assert blank["predicted_correct"].isna().all() and blank["predicted_ready"].isna().all()
    # predict_s is the time spent predicting from a layer's input: none for strategies that do not predict
    assert (layers.loc[~layers["strategy"].isin(PREDICTING), "predict_s"] == 0).all()
    assert (layers.loc[layers["strategy"].isin(["promoe", "skip_gate"]), "predict_s"] > 0).any()


def test_requests_and_steps_cover_every_strategy_repeat_and_step(run_tables):
    requests, steps = run_tables["requests"], run_tables["steps"]
    assert requests["strategy"].tolist() == BUILTIN_NAMES  # one request, one repeat each
    assert (requests["prompt_tokens"] == 4).all() and (requests["output_tokens"] == 3).all()
    assert (~requests["warmup"].astype(bool)).all()
    for name in BUILTIN_NAMES:
        own = steps[steps["strategy"] == name]
        assert own["step"].tolist() == [0, 1, 2]
        assert own["phase"].tolist() == ["prefill", "decode", "decode"]


def test_layers_hits_and_misses_are_consistent_with_requests(run_tables):
    layers, requests, summary = run_tables["layers"], run_tables["requests"], run_tables["summary"]
    batch, prompt_len = 1, int(requests["prompt_tokens"].iloc[0])
    accessed = layers["hits"] + layers["misses"]
    assert (accessed > 0).all()
    assert (layers[["hits", "misses", "copies", "bytes", "evictions"]] >= 0).all().all()
    # every generated token visits every MoE layer once per step
    per_step = layers.groupby(["strategy", "repeat", "step"]).size()
    assert (per_step == MOE_LAYERS).all()
    assert len(per_step) == len(run_tables["steps"])
    # a decode step of one request routes one token to exactly top-k distinct experts
    assert (accessed[layers["phase"] == "decode"] == batch * TOP_K).all()
    prefill = accessed[layers["phase"] == "prefill"]
    assert prefill.between(TOP_K, min(EXPERTS, batch * prompt_len * TOP_K)).all()
    # the summary's hit rate is the layers' hits over accesses
    for name, group in layers.groupby("strategy"):
        hits, total = group["hits"].sum(), group["hits"].sum() + group["misses"].sum()
        assert summary.set_index("strategy").loc[name, "hit_rate"] == pytest.approx(hits / total)


# -- strategy lists and per-strategy cache rates ----------------------------------------------------


def test_run_parses_a_bracketed_spec_and_a_plain_one_and_strategy_cache_rate_overrides_the_runs(tiny, out):
    result = run_cli(tiny, out, "--cache-rate", "1.0", "--strategy", "lru[cache_rate=0.25],on_demand")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    assert list(meta["strategies"]) == ["lru[cache_rate=0.25]", "on_demand"]
    assert meta["strategies"]["lru[cache_rate=0.25]"]["cache_slots_per_layer"] == 2  # 0.25 * 8
    assert meta["strategies"]["on_demand"]["cache_slots_per_layer"] == EXPERTS  # the run's 1.0
    assert pd.read_csv(out / "summary.csv")["strategy"].tolist() == ["lru[cache_rate=0.25]", "on_demand"]
    rows = result.stdout.strip().splitlines()[2:-1]
    assert [row.split()[0] for row in rows] == ["lru[cache_rate=0.25]", "on_demand"]


def test_strategy_gpu_memory_overrides_the_runs_cache_rate(tiny, out):
    expert_bytes = 3 * 48 * 32 * 4  # tiny mixtral: gate, up, down of 48 x 32, float32 (checked against run.json)
    result = run_cli(tiny, out, "--strategy", f"lru[gpu_memory={3 * MOE_LAYERS * expert_bytes}]")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"]["expert_bytes"] == expert_bytes
    assert meta["strategies"][f"lru[gpu_memory={3 * MOE_LAYERS * expert_bytes}]"]["cache_slots_per_layer"] == 3


def test_strategy_cache_rate_of_zero_is_refused(tiny, out):
    result = run_cli(tiny, out, "--strategy", "lru[cache_rate=0]")
    assert_usage_error(result, "cache")
    assert_nothing_written(out)


# -- listing commands -------------------------------------------------------------------------------


def test_strategies_lists_one_line_per_registered_strategy_with_its_summary():
    result = invoke("strategies")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    registered = available()
    assert [line.split()[0] for line in lines] == list(registered) == BUILTIN_NAMES
    for line, cls in zip(lines, registered.values(), strict=True):
        assert line.startswith(cls.name) and line.endswith(cls.summary)


def test_strategies_lists_plugins_from_the_entry_point_group(monkeypatch):
    from .test_registry import FakeEntryPoint, Toggle

    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [FakeEntryPoint("toggle", "tests.test_registry:Toggle", Toggle)])
    result = invoke("strategies")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == [*BUILTIN_NAMES, "toggle"]


def test_models_lists_builtin_and_the_seven_families():
    result = invoke("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["builtin", *FAMILIES]
    assert list(SUPPORTED_FAMILIES) == FAMILIES
    assert "32 experts, top-4" in lines[0]


def test_models_names_where_the_builtin_model_is_shipped():
    from promoe_bench.builtin_model import BUILTIN_DIR

    result = invoke("models")
    assert result.exit_code == 0
    assert str(BUILTIN_DIR) in result.stdout.splitlines()[0]


def test_version_option_prints_the_package_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0
    assert version("promoe-bench") in result.stdout


def test_leftovers_helper_sees_staging_folders(tmp_path):
    # guards the "nothing left behind" checks above against a helper that could never fail
    out = tmp_path / "out"
    (tmp_path / f".out.partial-{os.getpid()}").mkdir()
    assert leftovers(out) == [f".out.partial-{os.getpid()}"]
    shutil.rmtree(tmp_path / f".out.partial-{os.getpid()}")
    assert leftovers(out) == []
