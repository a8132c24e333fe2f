"""Train the built-in model: a small Mixtral-style MoE on English prose that ships with Python.

    python training/train_builtin.py [--out promoe_bench/builtin] [--steps N]

Corpus: the text of `pydoc_data.topics` and the docstrings of the standard library (read with `ast`,
nothing imported), split by document into train and held-out. Tokenizer: a byte-level BPE trained
on the train split with `tokenizers`. Model: transformers' MixtralForCausalLM with a router
load-balancing loss computed per sequence (`aux_loss` in the history). Recipe and seed:
training/builtin.toml. Writes the checkpoint in HF format (config.json, model.safetensors, tokenizer
files) and training.json (losses, time, corpus sizes).
"""

import argparse
import ast
import json
import math
import pydoc_data.topics
import random
import sysconfig
import time
import tomllib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
EOS = "<|endoftext|>"


def corpus_documents() -> list[str]:
    """pydoc topics, then stdlib docstrings longer than 80 characters, in a fixed order."""
    docs = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream of ids, each followed by the end-of-text token."""
    ids = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def sequence_balance_loss(router_logits, top_k: int, batch: int) -> torch.Tensor:
    """Switch-style load-balancing loss per sequence, averaged over sequences and layers (value top_k
    when perfectly even). The usual batch-wide loss lets every sequence keep to a few experts of its
    own, which makes routing far easier to cache than a real model's."""
    losses = []
    for logits in router_logits:  # per layer: [B*T, E]
        probs = logits.float().softmax(dim=-1).view(batch, -1, logits.shape[-1])  # [B, T, E]
        routed = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)  # [B, T, E]
        losses.append(logits.shape[-1] * (routed.mean(dim=1) * probs.mean(dim=1)).sum(dim=-1).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_batches: int = 40) -> float:
    """Mean next-token loss over consecutive windows of `stream` (the LM loss only, no aux loss)."""
    model.eval()
    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[: max_batches * 16]
    losses = []
    for chunk in windows.split(16):
        logits = model(input_ids=chunk).logits
        losses.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=HERE / "builtin.toml")
    parser.add_argument("--out", type=Path, default=HERE.parent / "promoe_bench" / "builtin")
    parser.add_argument("--steps", type=int, help="override the recipe's step count (for a quick try)")
    args = parser.parse_args()
    recipe = tomllib.loads(args.recipe.read_text())
    train_cfg = recipe["train"]
    steps = args.steps or train_cfg["steps"]
    torch.manual_seed(recipe["seed"])
    started = time.perf_counter()

    docs = corpus_documents()
    random.Random(recipe["seed"]).shuffle(docs)
    n_heldout = int(len(docs) * train_cfg["heldout_fraction"])
    heldout_docs, train_docs = docs[:n_heldout], docs[n_heldout:]
    tokenizer = train_tokenizer(train_docs, recipe["tokenizer"]["vocab_size"])
    train_ids, heldout_ids = token_stream(tokenizer, train_docs), token_stream(tokenizer, heldout_docs)
    print(f"corpus: {len(train_docs)} train docs ({len(train_ids)} tokens), "
          f"{len(heldout_docs)} held-out docs ({len(heldout_ids)} tokens)", flush=True)

    config = MixtralConfig(vocab_size=len(tokenizer), output_router_logits=True,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.eos_token_id, **recipe["model"])
    model = MixtralForCausalLM(config)
    model.set_experts_implementation("grouped_mm")  # training speed; inference uses the suite's runtime
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"],
                                  betas=(0.9, 0.95))
    warmup = train_cfg["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    data = batches(train_ids, train_cfg["seq_len"] + 1, train_cfg["batch_size"],
                   torch.Generator().manual_seed(recipe["seed"]))
    history = []
    model.train()
    for step in range(1, steps + 1):
        batch = next(data)
        out = model(input_ids=batch, labels=batch)  # loss = LM loss + router_aux_loss_coef * aux loss
        coef = config.router_aux_loss_coef
        balance = sequence_balance_loss(out.router_logits, config.num_experts_per_tok, len(batch))
        loss = out.loss - coef * out.aux_loss + coef * balance  # balance per sequence instead of per batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % train_cfg["eval_every"] == 0 or step == steps:
            lm_loss = out.loss.item() - coef * out.aux_loss.item()
            record = {"step": step, "train_loss": lm_loss, "aux_loss": balance.item(),
                      "heldout_loss": evaluate(model, heldout_ids, train_cfg["seq_len"]),
                      "minutes": (time.perf_counter() - started) / 60}
            history.append(record)
            print(json.dumps(record), flush=True)

    final = history[-1]
    model.config.output_router_logits = False
    model.config.use_cache = True
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {
        "recipe": recipe, "steps": steps, "parameters": params, "minutes": (time.perf_counter() - started) / 60,
        "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
        "final_train_loss": evaluate(model, train_ids[: len(heldout_ids)], train_cfg["seq_len"]),
        "final_heldout_loss": final["heldout_loss"], "history": history,
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['minutes']:.1f} min: train {summary['final_train_loss']:.3f}, "
          f"held-out {summary['final_heldout_loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
