"""The built-in default model: a small Mixtral-style MoE trained on the CPU by training/train_builtin.py
(recipe and seed in training/builtin.toml), shipped in the package as an ordinary Hugging Face checkpoint
(config.json, model.safetensors, tokenizer files) with its model card (README.md) and training.json."""

import json
from pathlib import Path

from .errors import UsageError

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_checkpoint() -> Path:
    if not (BUILTIN_DIR / "config.json").is_file():
        raise UsageError(f"the built-in model is missing ({BUILTIN_DIR}); rebuild it: python training/train_builtin.py")
    return BUILTIN_DIR


def builtin_config() -> dict:
    return json.loads((builtin_checkpoint() / "config.json").read_text())
