"""Hardware and model profiles, and the cost model that projects MoE offloading onto hardware one does not have.

A hardware profile is a TOML file of spec-sheet and measured figures (profiles/hardware/, `load_hardware`). A model
profile is made from a checkpoint's config.json alone, never its weights (profiles/models/ ships real configs,
`load_model_profile`). `CostModel` turns both into seconds with a roofline: an operation takes its kernel launches
plus the longer of its FLOPs at peak tensor throughput and its bytes at device-memory bandwidth.

Conventions (units: bytes, FLOPs, seconds; GB = 1e9 B, TFLOP = 1e12 FLOP):
- Shared experts are always on, so they stay on the device: they count in `non_expert_params`, never as routed
  experts. `shared_experts` is the config's count (DeepSeek's n_shared_experts; 1 for Qwen's single shared expert)
  and `shared_intermediate` their summed width: DeepSeek runs its n shared experts as one MLP of n x
  moe_intermediate_size, Qwen's is shared_expert_intermediate_size wide (5632 = 4 experts' worth in Qwen1.5-MoE).
- Only routed experts take a precision (`PRECISIONS`); non-expert weights stay 16-bit at every expert precision,
  as in the paper's int4 models, whose experts alone are offloaded and quantized.
- Non-expert work is spread evenly over the MoE layers (`CostModel.non_expert_s`): the simulator's clock advances
  per MoE layer, and the MoE layers' shares add up to the whole forward (dense layers, embeddings, LM head too).
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .toml_fields import read_fields

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
PRECISIONS = ("fp16", "int8", "int4")
INT4_GROUP = 128  # int4 weights share one fp16 scale per group of 128 input channels (GPTQ/AWQ's usual group)
# The supported families (config.json's model_type; "deepseek" is deepseek-moe-16b's remote-code model) and the
# config field counting their routed experts.
_EXPERTS_FIELD = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
                  "olmoe": "num_experts", "deepseek": "n_routed_experts", "deepseek_v2": "n_routed_experts",
                  "deepseek_v3": "n_routed_experts", "gpt_oss": "num_local_experts"}
FAMILIES = tuple(_EXPERTS_FIELD)
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def shipped_dir() -> Path:
    """The shipped profiles: installed as package data in promoe_bench/_profiles, or, in a source checkout, the
    repository's top-level profiles/ folder."""
    installed = Path(__file__).resolve().parent / "_profiles"
    return installed if installed.is_dir() else REPO_PROFILES


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


# ---------------------------------------------------------------------------------------------- hardware

@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    h2d_gbps: float  # pinned host-to-device bandwidth, GB/s
    copy_latency_us: float  # fixed cost of one copy
    memory_gb: float  # device memory
    hbm_gbps: float  # device-memory bandwidth, GB/s
    fp16_tflops: float  # peak dense fp16/bf16 tensor throughput, without sparsity
    launch_us: float  # fixed cost of one kernel launch
    emulated: bool = False  # the CPU's emulated link; its compute figures are placeholders for measured costs

    def __post_init__(self):
        detail = _hardware_problem(dataclasses.asdict(self))
        if detail:
            raise UsageError(f"hardware {self.name}: {detail}")


def _hardware_problem(values: dict) -> str | None:
    """What is wrong with a hardware profile's field values, or None."""
    for field in ("name", "description"):
        if not isinstance(values[field], str) or not values[field]:
            return f"field {field!r} must be a non-empty string, got {values[field]!r}"
    if not isinstance(values.get("emulated", False), bool):
        return f"field 'emulated' must be true or false, got {values['emulated']!r}"
    for field, positive, unit in (("h2d_gbps", True, "GB/s"), ("memory_gb", True, "GB"), ("hbm_gbps", True, "GB/s"),
                                  ("fp16_tflops", True, "TFLOP/s"), ("copy_latency_us", False, "us"),
                                  ("launch_us", False, "us")):
        value = values[field]
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            return f"field {field!r} must be a number {'> 0' if positive else '>= 0'} ({unit}), got {value!r}"
    return None


def shipped_hardware() -> dict[str, Hardware]:
    """Every shipped hardware profile, by name, sorted."""
    return {p.stem: _load_hardware_file(p) for p in sorted((shipped_dir() / "hardware").glob("*.toml"))}


def load_hardware(name_or_path: str) -> Hardware:
    """A shipped hardware profile by name (`rtx4090`), or a hardware TOML file by path."""
    return _load_hardware_file(_shipped_or_path(name_or_path, "hardware", ".toml", "hardware"))


def _shipped_or_path(name_or_path: str, folder: str, suffix: str, what: str, other: str = "") -> Path:
    """The file that a path (anything with a folder or the suffix) or a shipped profile's name names."""
    path = Path(name_or_path)
    if path.suffix == suffix or path.name != name_or_path:
        if not path.is_file():
            raise UsageError(f"{what} file {name_or_path} does not exist")
        return path
    candidate = shipped_dir() / folder / f"{name_or_path}{suffix}"
    if not candidate.is_file():
        names = ", ".join(sorted(p.stem for p in (shipped_dir() / folder).glob(f"*{suffix}")))
        raise UsageError(f"unknown {what} {name_or_path!r}; shipped: {names}; or give a {suffix} file's path{other}")
    return candidate


def _load_hardware_file(path: Path) -> Hardware:
    raw = read_fields(path, Hardware)
    detail = _hardware_problem(raw)
    if detail:
        raise UsageError(f"{path}: {detail}")
    return Hardware(**raw)


# ---------------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelProfile:
    name: str
    family: str  # config.json's model_type
    layers: int  # decoder layers
    moe_layers: int  # layers whose MLP is routed experts
    experts: int  # routed experts per MoE layer
    top_k: int
    shared_experts: int  # always-on experts per MoE layer, as the config counts them (0 if none)
    shared_intermediate: int  # their summed MLP width (0 if none)
    hidden: int
    expert_intermediate: int
    expert_params: int  # one routed expert: gate + up + down, plus gpt_oss's biases
    expert_biases: int  # of which biases (gpt_oss: 2 x intermediate + hidden), kept 16-bit when quantized
    non_expert_params: int  # everything but the routed experts (see model_profile_from_config)
    vocab: int
    tied_embeddings: bool
    attention_width: int  # heads x (qk head dim + v head dim): attention FLOPs per attended token = 2 x this, per layer
    kv_width: int  # key + value elements cached per token per layer (MLA: decompressed, as transformers caches)
    sliding_layers: int = 0  # layers attending to at most `sliding_window` tokens (gpt_oss)
    sliding_window: int = 0

    @property
    def dense_layers(self) -> int:
        """Layers whose MLP is dense (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)."""
        return self.layers - self.moe_layers

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.moe_layers * self.experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: every non-expert one (embeddings included) and its top_k experts per layer."""
        return self.non_expert_params + self.moe_layers * self.top_k * self.expert_params

    @property
    def matmul_params(self) -> int:
        """Non-expert weights multiplied (and read) once per forward: all but the input embedding table, whose rows
        are only looked up (a tied table is the LM head, so it counts). Norm weights (<0.01%) are included."""
        return self.non_expert_params - (0 if self.tied_embeddings else self.vocab * self.hidden)

    def expert_bytes(self, precision: str = "fp16") -> int:
        """One routed expert's bytes. fp16: 2 B/param. int8: 1 B/param plus an fp16 scale per output channel
        (2 x intermediate + hidden). int4: 0.5 B/param plus an fp16 scale per group of INT4_GROUP input channels
        of each row, symmetric (no zero points). Biases stay 16-bit."""
        check_precision(precision)
        h, i = self.hidden, self.expert_intermediate
        weights, biases = self.expert_params - self.expert_biases, 2 * self.expert_biases
        if precision == "fp16":
            return 2 * weights + biases
        if precision == "int8":
            return weights + 2 * (2 * i + h) + biases
        groups = 2 * i * math.ceil(h / INT4_GROUP) + h * math.ceil(i / INT4_GROUP)  # gate, up [I, H]; down [H, I]
        return (weights + 1) // 2 + 2 * groups + biases

    def non_expert_bytes(self, precision: str = "fp16") -> int:
        """Non-expert bytes: 2 B/param whatever the experts' precision (checked, so one precision goes everywhere)."""
        check_precision(precision)
        return 2 * self.non_expert_params

    def attended(self, context: int) -> int:
        """Layer-tokens one token attends to when `context` tokens (itself included) precede it."""
        return (self.layers - self.sliding_layers) * context + self.sliding_layers * min(context, self.sliding_window)

    def flops_per_token(self, context: int) -> float:
        """Non-expert FLOPs of one token attending to `context` tokens: 2 per matmul weight (attention projections,
        dense MLPs, shared experts, routers, LM head) plus QK^T and AV, 2 x attention_width per attended token."""
        return 2.0 * self.matmul_params + 2.0 * self.attention_width * self.attended(context)

    def expert_flops(self, tokens: int) -> float:
        """FLOPs of one routed expert on `tokens` tokens."""
        return 2.0 * self.expert_params * tokens

    def kv_bytes(self, context: int) -> int:
        """16-bit KV-cache bytes one sequence of `context` tokens holds (and attention reads)."""
        return 2 * self.kv_width * self.attended(context)


class _Config:
    """config.json's fields, read with one-line errors naming the file and the field."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def int(self, key: str, default: int | None = None, low: int = 1) -> int:
        value = self.raw.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{self.where}: field {key!r} must be an integer >= {low}, got {value!r}")
        return value


def model_profile_from_config(config: dict, name: str, where: str | None = None) -> ModelProfile:
    """The profile of a checkpoint from its config.json (as a dict). `where` names it in errors.

    non_expert_params counts the input embedding, the LM head (unless tied), the final norm, and per layer its two
    norms, attention (projections, their biases, q/k norms, gpt_oss's sinks), its dense MLP (dense layers) or its
    router and shared experts (MoE layers). Routed experts are counted by expert_params.
    """
    where = where or f"model {name}"
    family = config.get("model_type")
    if family not in FAMILIES:
        if not any(config.get(f) for f in _EXPERT_COUNT_FIELDS):
            raise UsageError(f"{where} is not a Mixture-of-Experts model (model_type {family!r} has no experts)")
        raise UsageError(f"{where}: MoE family {family!r} has no profile rules; supported: {', '.join(FAMILIES)}")
    c = _Config(config, where)
    h, layers, vocab = c.int("hidden_size"), c.int("num_hidden_layers"), c.int("vocab_size")
    experts = c.int(_EXPERTS_FIELD[family], low=0)
    if experts == 0:
        raise UsageError(f"{where} is not a Mixture-of-Experts model (model_type {family!r} with 0 experts)")
    top_k = c.int("num_experts_per_tok" if "num_experts_per_tok" in config else "experts_per_token")  # gpt_oss: both
    if top_k > experts:
        raise UsageError(f"{where}: field 'num_experts_per_tok' ({top_k}) exceeds the {experts} experts")
    moe_layers = sum(_is_moe_layer(c, family, layers))
    narrow = family in ("qwen2_moe", "qwen3_moe") or family.startswith("deepseek")  # experts narrower than the MLP
    inter = c.int("moe_intermediate_size" if narrow else "intermediate_size")
    dense_mlp = 3 * h * c.int("intermediate_size") if moe_layers < layers else 0
    attention, attention_width, kv_width = _attention(c, family, h)
    shared_experts, shared_inter = _shared(c, family, inter)
    shared = 3 * h * shared_inter + (h if family == "qwen2_moe" and shared_inter else 0)  # + Qwen's sigmoid gate
    router = h * experts + (experts if family in ("gpt_oss", "deepseek_v3") else 0)  # + bias / score correction
    expert_biases = 2 * inter + h if family == "gpt_oss" else 0
    tied = bool(config.get("tie_word_embeddings", False))  # every supported family's config class defaults to False
    sliding = (config.get("layer_types") or []) if family == "gpt_oss" else []  # the others attend to everything
    sliding_layers = sum(1 for t in sliding if t == "sliding_attention")
    non_expert = (vocab * h * (1 if tied else 2) + h + layers * (attention + 2 * h)
                  + (layers - moe_layers) * dense_mlp + moe_layers * (router + shared))
    return ModelProfile(
        name=name, family=family, layers=layers, moe_layers=moe_layers, experts=experts, top_k=top_k,
        shared_experts=shared_experts, shared_intermediate=shared_inter, hidden=h, expert_intermediate=inter,
        expert_params=3 * h * inter + expert_biases, expert_biases=expert_biases, non_expert_params=non_expert,
        vocab=vocab, tied_embeddings=tied, attention_width=attention_width, kv_width=kv_width,
        sliding_layers=sliding_layers, sliding_window=c.int("sliding_window") if sliding_layers else 0)


def _is_moe_layer(c: _Config, family: str, layers: int) -> list[bool]:
    """Which decoder layers route to experts, by the rule of the family's own modeling code."""
    if family in ("qwen2_moe", "qwen3_moe"):
        step, dense = c.int("decoder_sparse_step", default=1), set(c.raw.get("mlp_only_layers") or ())
        return [i not in dense and (i + 1) % step == 0 for i in range(layers)]
    if family.startswith("deepseek"):
        first, freq = c.int("first_k_dense_replace", default=0, low=0), c.int("moe_layer_freq", default=1)
        return [i >= first and i % freq == 0 for i in range(layers)]
    return [True] * layers


def _attention(c: _Config, family: str, h: int) -> tuple[int, int, int]:
    """(params of one layer's attention, heads x (qk + v head dims), key + value elements cached per token)."""
    heads = c.int("num_attention_heads")
    if family in ("deepseek_v2", "deepseek_v3"):  # multi-head latent attention
        nope, rope, v, kv_rank = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim"), c.int("v_head_dim"), \
            c.int("kv_lora_rank")
        q_rank = None if c.raw.get("q_lora_rank") is None else c.int("q_lora_rank")  # None: one plain q_proj
        q = h * heads * (nope + rope) if q_rank is None else h * q_rank + q_rank + q_rank * heads * (nope + rope)
        params = q + h * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v) + heads * v * h
        return params, heads * (nope + rope + v), heads * (nope + rope + v)
    d = c.int("head_dim", default=h // heads)
    q_out, kv_out = heads * d, c.int("num_key_value_heads", default=heads) * d
    params = 2 * h * q_out + 2 * h * kv_out
    if c.raw.get("qkv_bias", True) if family == "qwen2_moe" else c.raw.get("attention_bias", False):
        params += q_out + 2 * kv_out + (0 if family == "qwen2_moe" else h)  # Qwen2-MoE: no bias on o_proj
    params += {"olmoe": q_out + kv_out, "qwen3_moe": 2 * d, "gpt_oss": heads}.get(family, 0)  # q/k norms; sinks
    return params, 2 * q_out, 2 * kv_out


def _shared(c: _Config, family: str, inter: int) -> tuple[int, int]:
    """(shared experts as the config counts them, their summed width)."""
    if family.startswith("deepseek"):  # n shared experts run as one MLP n x moe_intermediate_size wide
        count = c.int("n_shared_experts", default=0, low=0)
        return count, count * inter
    if family == "qwen2_moe":  # one shared expert, shared_expert_intermediate_size wide
        width = c.int("shared_expert_intermediate_size", default=0, low=0)
        return (1 if width else 0), width
    return 0, 0


def shipped_model_profiles() -> dict[str, ModelProfile]:
    """Every shipped model profile, by name, sorted."""
    return {p.stem: _load_config_file(p, p.stem) for p in sorted((shipped_dir() / "models").glob("*.json"))}


def load_model_profile(name_or_path: str) -> ModelProfile:
    """A shipped model by name (`mixtral-8x7b`), a config.json-style file, or a checkpoint folder (its config.json;
    the weights are never read)."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; give a checkpoint folder, a .json config or a shipped name")
        return _load_config_file(path / "config.json", path.resolve().name)
    file = _shipped_or_path(name_or_path, "models", ".json", "model profile", " or a checkpoint folder")
    return _load_config_file(file, file.stem)


def _load_config_file(path: Path, name: str) -> ModelProfile:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object (a config.json), got {type(config).__name__}")
    return model_profile_from_config(config, name, where=str(path))
