"""Which checkpoints the runtime accepts, and where their MoE layers are.

Nothing here is per-family modeling code: every supported family decorates its experts class with
transformers' `use_experts_implementation`, so one discovery rule finds them all.
"""

import re
from dataclasses import dataclass

from torch import nn
from transformers import CONFIG_MAPPING

from .errors import UsageError

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")

# Config fields that name a routed-expert count; a config with none of them is a dense model.
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_family(config: dict, where: str) -> None:
    """Raise a UsageError unless `config` (config.json as a dict) is of a supported MoE family."""
    model_type = config.get("model_type")
    if model_type in SUPPORTED_FAMILIES:
        return
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"unknown model family {model_type!r} in {where}; supported: {supported}")
    if not any(config.get(field) for field in _EXPERT_COUNT_FIELDS):
        raise UsageError(f"{where} is not a Mixture-of-Experts model (model_type {model_type!r} has no experts)")
    raise UsageError(f"MoE family {model_type!r} ({where}) is not supported yet; supported: {supported}")


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a loaded model: its experts module and the block that owns router and experts."""

    index: int  # 0..L-1 over MoE layers only (dense layers of e.g. DeepSeek are skipped)
    decoder_layer: int  # index into model.layers
    name: str  # module path of the experts module
    experts: nn.Module
    block: nn.Module


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    modules = dict(model.named_modules())
    layers = []
    for name, module in modules.items():
        # use_experts_implementation gives the class `_apply_gate` and the instance `has_gate`.
        if not (hasattr(type(module), "_apply_gate") and hasattr(module, "has_gate")):
            continue
        match = re.search(r"layers\.(\d+)\.", name)
        assert match, f"experts module {name} is not inside a decoder layer"
        block = modules[name.rsplit(".", 1)[0]]
        layers.append(MoELayer(len(layers), int(match.group(1)), name, module, block))
    return layers


def router_of(layer: MoELayer) -> nn.Module:
    """The layer's router; every supported family's returns (logits, weights, top-k indices)."""
    return getattr(layer.block, "router", None) or layer.block.gate
