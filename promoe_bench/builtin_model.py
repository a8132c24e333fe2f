"""The built-in default model: a small MoE checkpoint made deterministically in the real format
(config.json + safetensors) on first use, kept in a cache folder and loaded like any checkpoint."""

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.utils import logging as hf_logging

VERSION = 1  # bump when the recipe changes, so stale caches are not reused

CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,  # per expert
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def cache_dir() -> Path:
    root = os.environ.get("PROMOE_BENCH_CACHE") or Path.home() / ".cache" / "promoe-bench"
    return Path(root) / f"builtin-v{VERSION}"


def builtin_checkpoint() -> Path:
    """Path of the built-in checkpoint, created (atomically) if it is not cached yet."""
    path = cache_dir()
    if (path / "config.json").is_file():
        return path
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**CONFIG), dtype=torch.float32)
    model.save_pretrained(staging)
    if path.exists():  # another process made it meanwhile
        shutil.rmtree(staging)
    else:
        os.replace(staging, path)
    return path
