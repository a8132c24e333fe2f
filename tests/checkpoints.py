"""Tiny checkpoints of every supported family, written with save_pretrained in the real format."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)  # no early stop in generate()
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)
FAMILIES = {
    "mixtral": dict(num_local_experts=8),
    "qwen2_moe": dict(num_experts=8, shared_expert_intermediate_size=24, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=8, decoder_sparse_step=1),
    "olmoe": dict(num_experts=8),
    "deepseek_v2": dict(n_routed_experts=8, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                        topk_group=1, head_dim=8, num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=8, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                        topk_group=1, head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, layer_types=["sliding_attention", "full_attention"] * 2, num_hidden_layers=4,
                    head_dim=8, sliding_window=16),
}


def write_checkpoint(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    kwargs = {**COMMON, **MOE, **FAMILIES[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves routers near-uniform; spread them so routing is decisive
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.normal_(0, 1.0)
    model.save_pretrained(folder)
    return folder


def write_dense_checkpoint(folder: Path) -> Path:
    config = AutoConfig.for_model("llama", **COMMON)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder
