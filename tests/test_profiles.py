"""Profiles: every shipped hardware and model profile loads and says where its numbers come from, the model profiles
have the paper's shapes and the published parameter counts, expert bytes and costs equal hand-computed figures, and
every bad file is refused with one line naming the file, the field and what was expected."""

import json
import tomllib
from pathlib import Path

import pytest

from promoe_bench.config import DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US
from promoe_bench.costs import KERNELS_PER_LAYER, CostModel
from promoe_bench.profiles import (
    Hardware,
    load_hardware,
    load_model_profile,
    model_profile_from_config,
    shipped_dir,
    shipped_hardware,
    shipped_model_profiles,
)

from .test_workloads import DROP, assert_one_line_error, write_fields

HARDWARE = shipped_hardware()
MODELS = shipped_model_profiles()
MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336  # 176,160,768
# int4: half a byte per weight, plus one fp16 scale per 128 input channels of each row:
# gate and up are [14336, 4096] (32 groups a row), down is [4096, 14336] (112 groups a row)
MIXTRAL_INT4_BYTES = MIXTRAL_EXPERT_PARAMS // 2 + 2 * (2 * 14336 * 32 + 4096 * 112)


# ---------------------------------------------------------------------------------------------- hardware

def test_the_required_hardware_is_shipped_and_named_after_its_file():
    assert {"rtx4090", "a100-40gb-pcie", "h100-pcie", "h200", "l4", "jetson-orin", "cpu-emulated"} <= set(HARDWARE)
    for name, hardware in HARDWARE.items():
        assert hardware.name == name
        assert load_hardware(name) == hardware


def test_every_shipped_hardware_number_has_its_source_in_a_comment():
    for path in sorted((shipped_dir() / "hardware").glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        numbers = [key for key, value in raw.items() if isinstance(value, float | int) and not isinstance(value, bool)]
        lines = {line.split("=")[0].strip(): line for line in path.read_text().splitlines() if "=" in line}
        for key in numbers:
            assert "#" in lines[key] and len(lines[key].split("#", 1)[1].strip()) > 10, (path.name, key)


def test_only_the_cpu_profile_is_emulated_and_it_is_the_suites_emulated_link():
    assert [name for name, h in HARDWARE.items() if h.emulated] == ["cpu-emulated"]
    cpu = HARDWARE["cpu-emulated"]
    assert (cpu.h2d_gbps, cpu.copy_latency_us) == (DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US)


def test_the_rtx4090_has_the_papers_measured_link():
    assert HARDWARE["rtx4090"].h2d_gbps == 23.9


def test_a_hardware_file_loads_by_path(tmp_path):
    path = write_hardware(tmp_path, name="mine")
    assert load_hardware(str(path)).name == "mine"


BASE_HARDWARE = {"name": "t", "description": "a test device", "h2d_gbps": 10.0, "copy_latency_us": 5.0,
                 "memory_gb": 16.0, "hbm_gbps": 500.0, "fp16_tflops": 100.0, "launch_us": 4.0}


def write_hardware(folder: Path, filename="hw.toml", **changes) -> Path:
    return write_fields(folder / filename, {**BASE_HARDWARE, **changes})


@pytest.mark.parametrize("changes, fragments", [
    ({"hbm_gbps": DROP}, ["missing required field 'hbm_gbps'"]),
    ({"h2d_gbps": "fast"}, ["field 'h2d_gbps' must be a number > 0 (GB/s)", "'fast'"]),
    ({"h2d_gbps": -1.0}, ["field 'h2d_gbps' must be a number > 0 (GB/s)", "-1.0"]),
    ({"fp16_tflops": 0}, ["field 'fp16_tflops' must be a number > 0"]),
    ({"launch_us": -2}, ["field 'launch_us' must be a number >= 0 (us)"]),
    ({"memory_gb": True}, ["field 'memory_gb' must be a number"]),
    ({"emulated": "yes"}, ["field 'emulated' must be true or false"]),
    ({"pcie_gen": 4}, ["unknown field 'pcie_gen'", "valid fields: name, description"]),
])
def test_a_bad_hardware_file_names_the_file_and_the_field(tmp_path, changes, fragments):
    path = write_hardware(tmp_path, **changes)
    assert_one_line_error(lambda: load_hardware(str(path)), str(path), *fragments)


def test_invalid_toml_and_unknown_names_are_usage_errors(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    assert_one_line_error(lambda: load_hardware(str(path)), str(path), "invalid TOML")
    assert_one_line_error(lambda: load_hardware("tpu-v9"), "unknown hardware 'tpu-v9'", "rtx4090", "h200")
    assert_one_line_error(lambda: load_hardware(str(tmp_path / "none.toml")), "does not exist")


def test_hardware_made_in_code_is_validated_too():
    assert_one_line_error(lambda: Hardware(**{**BASE_HARDWARE, "hbm_gbps": -5.0}), "hardware t", "'hbm_gbps'")


# ---------------------------------------------------------------------------------------------- models

# name: (decoder layers, MoE layers, routed experts, top-k)
PAPER_SHAPES = {
    "deepseek-moe-16b": (28, 27, 64, 6),  # first_k_dense_replace = 1: layer 0's MLP is dense
    "deepseek-v2-lite": (27, 26, 64, 6),  # likewise
    "qwen1.5-moe-a2.7b": (24, 24, 60, 4),
    "qwen2-57b-a14b": (28, 28, 64, 8),
    "mixtral-8x7b": (32, 32, 8, 2),
    "qwen3-30b-a3b": (48, 48, 128, 8),
    "olmoe-1b-7b": (16, 16, 64, 8),
    "gpt-oss-20b": (24, 24, 32, 4),
}


def test_every_required_model_is_shipped_with_its_source():
    assert set(PAPER_SHAPES) <= set(MODELS)
    for path in (shipped_dir() / "models").glob("*.json"):
        source = json.loads(path.read_text())["_source"]
        assert "config.json" in source and "/" in source.split()[0], (path.name, source)  # a hub repo id


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_shipped_models_have_the_papers_shapes(name):
    m = load_model_profile(name)
    assert (m.layers, m.moe_layers, m.experts, m.top_k) == PAPER_SHAPES[name]
    assert m.dense_layers == m.layers - m.moe_layers


@pytest.mark.parametrize("name, shared_experts, shared_intermediate", [
    ("deepseek-moe-16b", 2, 2 * 1408), ("deepseek-v2-lite", 2, 2 * 1408),
    ("qwen1.5-moe-a2.7b", 1, 5632), ("qwen2-57b-a14b", 1, 20480), ("mixtral-8x7b", 0, 0),
])
def test_shared_experts_are_counted_as_the_config_says(name, shared_experts, shared_intermediate):
    m = MODELS[name]
    assert (m.shared_experts, m.shared_intermediate) == (shared_experts, shared_intermediate)


def test_qwen_non_expert_params_by_hand():
    # Qwen1.5-MoE: biases on q, k and v; one 5632-wide shared expert with a sigmoid gate [1, hidden]
    per_layer = (4 * 2048 * 2048 + 3 * 2048  # attention projections and their biases
                 + 2 * 2048  # two norms
                 + 2048 * 60  # router
                 + 3 * 2048 * 5632 + 2048)  # shared expert and its gate
    assert MODELS["qwen1.5-moe-a2.7b"].non_expert_params == 2 * 151936 * 2048 + 2048 + 24 * per_layer


def test_mixtral_expert_bytes_by_hand():
    m = MODELS["mixtral-8x7b"]
    assert m.expert_params == MIXTRAL_EXPERT_PARAMS
    assert m.expert_bytes("fp16") == 352_321_536
    assert m.expert_bytes("int8") == MIXTRAL_EXPERT_PARAMS + 2 * (2 * 14336 + 4096)  # + one scale per output row
    assert m.expert_bytes("int4") == MIXTRAL_INT4_BYTES == 90_832_896


def test_gpt_oss_experts_carry_biases_that_stay_16_bit():
    m = MODELS["gpt-oss-20b"]
    biases = 2 * 2880 + 2880  # gate_up_proj_bias [5760], down_proj_bias [2880]
    assert m.expert_params == 3 * 2880 * 2880 + biases
    groups = 2 * 2880 * 23 + 2880 * 23  # 2880 input channels = 22.5 groups of 128, rounded up
    assert m.expert_bytes("int4") == 3 * 2880 * 2880 // 2 + 2 * groups + 2 * biases


def test_non_expert_weights_stay_16_bit_whatever_the_experts_precision():
    m = MODELS["qwen2-57b-a14b"]
    assert m.non_expert_bytes("int4") == m.non_expert_bytes("fp16") == 2 * m.non_expert_params
    assert_one_line_error(lambda: m.expert_bytes("fp8"), "precision must be one of fp16, int8, int4", "'fp8'")


@pytest.mark.parametrize("name, total, active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9),  # Mistral's announcement
    ("deepseek-moe-16b", 16.4e9, 2.8e9),  # DeepSeekMoE paper
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9),  # model card
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),  # model card
    ("olmoe-1b-7b", 6.9e9, 1.3e9),  # OLMoE paper
])
def test_parameter_counts_match_the_published_ones(name, total, active):
    m = MODELS[name]
    assert m.total_params == pytest.approx(total, rel=0.02)
    assert m.active_params == pytest.approx(active, rel=0.02)


@pytest.mark.parametrize("name, total, active", [
    ("gpt-oss-20b", 20.91e9, 3.61e9),  # model card
    ("deepseek-v2-lite", 15.7e9, 2.4e9),  # model card
])
def test_published_active_counts_that_leave_out_the_input_embedding(name, total, active):
    m = MODELS[name]
    assert m.total_params == pytest.approx(total, rel=0.01)
    assert m.active_params - m.vocab * m.hidden == pytest.approx(active, rel=0.03)


def test_multi_head_latent_attention_with_a_q_lora_gives_deepseek_v3s_671b():
    v3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
          "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256, "num_experts_per_tok": 8,
          "n_shared_experts": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
          "vocab_size": 129280, "tie_word_embeddings": False}
    m = model_profile_from_config(v3, "deepseek-v3")
    assert (m.moe_layers, m.dense_layers) == (58, 3)
    assert m.total_params == pytest.approx(671e9, rel=0.005)  # the paper's 671B, without the MTP module
    assert m.active_params == pytest.approx(37e9, rel=0.02)


def test_qwen_sparse_step_and_mlp_only_layers_choose_the_dense_layers():
    config = {**json.loads((shipped_dir() / "models" / "qwen3-30b-a3b.json").read_text()),
              "decoder_sparse_step": 2, "mlp_only_layers": [1]}
    m = model_profile_from_config(config, "q")
    assert (m.moe_layers, m.dense_layers) == (23, 25)  # odd layers are MoE, but layer 1 is forced dense
    dense_mlp = 3 * 2048 * 6144
    assert m.non_expert_params - MODELS["qwen3-30b-a3b"].non_expert_params == 25 * dense_mlp - 25 * 2048 * 128


def test_flops_per_token_by_hand():
    m = MODELS["mixtral-8x7b"]
    embedding = 32000 * 4096
    assert m.matmul_params == m.non_expert_params - embedding  # the input table is looked up, not multiplied
    attention = 2 * 32 * (2 * 128)  # QK^T and AV: 2 FLOPs x heads x (qk + v head dims) per attended token
    assert m.flops_per_token(1000) == 2 * m.matmul_params + attention * 32 * 1000
    assert m.expert_flops(3) == 2 * MIXTRAL_EXPERT_PARAMS * 3


def test_gpt_oss_sliding_layers_attend_to_at_most_the_window():
    m = MODELS["gpt-oss-20b"]
    assert (m.sliding_layers, m.sliding_window) == (12, 128)
    assert m.attended(1000) == 12 * 1000 + 12 * 128
    assert m.attended(100) == 24 * 100


def test_a_model_loads_from_a_checkpoint_folder_without_reading_weights(tmp_path):
    folder = tmp_path / "my-mixtral"
    folder.mkdir()
    (folder / "config.json").write_text((shipped_dir() / "models" / "mixtral-8x7b.json").read_text())
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    m = load_model_profile(str(folder))
    assert m.name == "my-mixtral" and m.expert_params == MIXTRAL_EXPERT_PARAMS
    assert load_model_profile(str(folder / "config.json")).name == "config"


def test_a_dense_model_is_refused():
    llama = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32000}
    assert_one_line_error(lambda: model_profile_from_config(llama, "llama", where="llama/config.json"),
                          "llama/config.json is not a Mixture-of-Experts model", "'llama'")


def test_an_moe_family_without_rules_is_refused():
    assert_one_line_error(lambda: model_profile_from_config({"model_type": "dbrx", "num_experts": 16}, "d"),
                          "MoE family 'dbrx' has no profile rules", "mixtral")


def test_a_bad_config_names_the_file_and_the_field(tmp_path):
    config = json.loads((shipped_dir() / "models" / "olmoe-1b-7b.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    assert_one_line_error(lambda: load_model_profile(str(path)), str(path), "'hidden_size'", "integer >= 1", "None")
    path.write_text(json.dumps({**config, "num_experts_per_tok": 65}))
    assert_one_line_error(lambda: load_model_profile(str(path)), "'num_experts_per_tok' (65) exceeds the 64 experts")
    path.write_text("{")
    assert_one_line_error(lambda: load_model_profile(str(path)), str(path), "invalid JSON")
    assert_one_line_error(lambda: load_model_profile("gpt-5"), "unknown model profile 'gpt-5'", "mixtral-8x7b")


# ---------------------------------------------------------------------------------------------- cost model

def test_copy_of_an_int4_mixtral_expert_on_the_rtx4090_by_hand():
    cost = CostModel(HARDWARE["rtx4090"], MODELS["mixtral-8x7b"], "int4")
    assert cost.expert_bytes == MIXTRAL_INT4_BYTES
    assert cost.copy_s(cost.expert_bytes) == pytest.approx(6e-6 + 90_832_896 / 23.9e9, rel=1e-12)  # ~3.8 ms


def test_decode_expert_is_bandwidth_bound_and_a_long_prefill_compute_bound():
    cost = CostModel(HARDWARE["rtx4090"], MODELS["mixtral-8x7b"])
    launches = 3 * 5e-6
    read = 352_321_536 / 1008e9  # 0.35 ms
    # the ridge: 2 B/param at 1008 GB/s against 2 FLOP/param/token at 165.2 TFLOP/s -> 163.9 tokens
    assert cost.expert_s(1) == pytest.approx(launches + read, rel=1e-12)
    assert cost.expert_s(160) == pytest.approx(launches + read, rel=1e-12)
    compute = 2 * MIXTRAL_EXPERT_PARAMS * 4096 / 165.2e12  # 8.7 ms, 25x the read
    assert cost.expert_s(4096) == pytest.approx(launches + compute, rel=1e-12)
    assert cost.expert_s(170) == pytest.approx(launches + 2 * MIXTRAL_EXPERT_PARAMS * 170 / 165.2e12, rel=1e-12)


def test_non_expert_shares_of_the_moe_layers_add_up_to_the_whole_forward():
    m, h = MODELS["deepseek-moe-16b"], HARDWARE["a100-40gb-pcie"]  # its dense layer 0 is spread over 27 MoE layers
    cost = CostModel(h, m)
    context, sequences = 500, 2
    kernels = (KERNELS_PER_LAYER * 28 + 3) * 5e-6
    weights = 2 * (m.non_expert_params - 102400 * 2048)
    kv = 2 * 28 * (2 * 16 * 128) * context  # 16-bit keys and values of 16 heads of 128, per layer, per token
    decode = 27 * cost.non_expert_s(sequences, context, sequences)
    assert decode == pytest.approx(kernels + (weights + sequences * kv) / 1555e9, rel=1e-9)  # bandwidth-bound
    prefill = 27 * cost.non_expert_s(2000, 1000)
    assert prefill == pytest.approx(kernels + 2000 * m.flops_per_token(1000) / 312e12, rel=1e-9)  # compute-bound


def test_router_and_predictor_costs_by_hand():
    cost = CostModel(HARDWARE["h200"], MODELS["qwen3-30b-a3b"])
    router = 2048 * 128
    assert cost.router_s(1) == pytest.approx(2 * 5e-6 + 2 * router / 4800e9, rel=1e-12)
    predictor = 2049 * 1024 + 1025 * 128  # hidden -> 1024 -> 128 experts, with biases
    assert cost.predictor_s(1) == pytest.approx(3 * 5e-6 + 2 * predictor / 4800e9, rel=1e-12)
    assert cost.predictor_s(100_000) == pytest.approx(3 * 5e-6 + 2 * predictor * 100_000 / 989.4e12, rel=1e-12)


def test_a_cost_model_refuses_an_unknown_precision():
    assert_one_line_error(lambda: CostModel(HARDWARE["l4"], MODELS["olmoe-1b-7b"], "nf4"), "precision", "'nf4'")
