"""`promoe-bench train-predictor`: ProMoE's learned predictors, trained offline on a workload's routing.

Each request's greedy continuation is generated with transformers' own experts; one causal forward over
prompt + continuation then gives, per token and MoE layer, the layer's input hidden state and the
router's top-k (exactly what incremental decoding routes). For each source layer l and distance d, a
two-layer MLP learns layer l+d's experts from layer l's input: target 1/k on each true expert, L1 loss
on the softmax, Adam (lr 1e-3), dropout, 9:1 train/eval split by request, early stop on eval loss.
"""

import random
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from .checkpoint import load_tokenizer
from .errors import UsageError
from .families import MoELayer, find_moe_layers, router_of
from .predictors import LearnedPredictors, PredictorMLP, model_fingerprint
from .quiet import torch_threads
from .workloads import Workload, build_requests

BATCH_SIZE = 256
MAX_EPOCHS = 200
PATIENCE = 5  # epochs without a better eval loss before stopping


@torch.no_grad()
def generate_sequences(model, prompts: list[list[int]], gen_len: int, progress=False) -> list[tuple[list[int], int]]:
    """(prompt + greedy continuation, prompt length) per prompt, batch 1."""
    sequences = []
    for prompt in tqdm(prompts, desc="generating", unit="request", disable=not progress or None, leave=False):
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                             min_new_tokens=gen_len, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
        sequences.append((out[0].tolist(), len(prompt)))
    return sequences


@torch.no_grad()
def capture(model, layers: list[MoELayer], sequences: list[tuple[list[int], int]]):
    """Per sequence: (hidden, chosen, n_prompt); hidden[l] [T, H] is MoE layer l's input, chosen[l]
    [T, K] its router's experts. One causal forward routes every token as incremental decoding would."""
    hidden: list = [None] * len(layers)
    chosen: list = [None] * len(layers)

    def hook(index):
        def pre_hook(module, args):
            hidden[index] = args[0].reshape(-1, args[0].shape[-1])
            chosen[index] = router_of(layers[index])(args[0])[-1].reshape(hidden[index].shape[0], -1)
        return pre_hook

    handles = [layer.block.register_forward_pre_hook(hook(layer.index)) for layer in layers]
    results = []
    try:
        for ids, n_prompt in sequences:
            model(input_ids=torch.tensor([ids], device=model.device))
            results.append((list(hidden), list(chosen), n_prompt))
    finally:
        for handle in handles:
            handle.remove()
    return results


def _recall(picks: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean per-token share of the true top-k found among the guessed top-k ([N, K] each)."""
    found = (picks[:, :, None] == truth[:, None, :]).any(dim=1).float()  # [N, K]: each true expert found?
    return found.mean().item()


def train_pair(x_train, y_train, x_eval, y_eval, num_experts: int, width: int, seed: int):
    """One predictor; returns (mlp, eval recall@k, epochs run)."""
    # a small MLP gains nothing from more threads, and intra-op threads contending with other work on a
    # small machine ran 50x slower (36 s vs 0.7 s an epoch)
    with torch_threads(1):
        return _train_pair(x_train, y_train, x_eval, y_eval, num_experts, width, seed)


def _train_pair(x_train, y_train, x_eval, y_eval, num_experts: int, width: int, seed: int):
    torch.manual_seed(seed)
    top_k = y_train.shape[1]

    def target(y):
        return torch.zeros(len(y), num_experts, device=y.device).scatter_(1, y, 1.0 / top_k)

    t_train, t_eval = target(y_train), target(y_eval)
    mlp = PredictorMLP(x_train.shape[1], width, num_experts).to(x_train.device)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    best, best_state, stale, epochs = float("inf"), None, 0, 0
    while epochs < MAX_EPOCHS and stale < PATIENCE:
        epochs += 1
        mlp.train()
        for batch in torch.randperm(len(x_train), device=x_train.device).split(BATCH_SIZE):
            loss = (mlp(x_train[batch]).softmax(-1) - t_train[batch]).abs().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mlp.eval()
        with torch.no_grad():
            eval_loss = (mlp(x_eval).softmax(-1) - t_eval).abs().sum(-1).mean().item()
        if eval_loss < best - 1e-5:
            best, stale = eval_loss, 0
            best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
        else:
            stale += 1
    mlp.load_state_dict(best_state)
    mlp.eval()
    with torch.no_grad():
        recall = _recall(mlp(x_eval).topk(top_k, dim=-1).indices, y_eval)
    return mlp.cpu(), recall, epochs


def parse_distances(text: str) -> list[int]:
    """'2', '1..3' or '1,2' -> sorted distances."""
    try:
        if ".." in text:
            low, high = (int(part) for part in text.split(".."))
            distances = list(range(low, high + 1))
        else:
            distances = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--distance {text!r}: expected N, A..B or A,B,C") from None
    if not distances:
        raise UsageError(f"--distance {text!r}: an empty range; write A..B with A <= B")
    if min(distances) < 1:
        raise UsageError(f"--distance {text!r}: distances are at least 1")
    return sorted(set(distances))


def train_predictors(path, workload: Workload, distances: list[int], width: int | None, seed: int,
                     device: torch.device, exclude: list[Workload] = (), progress: bool = False) -> LearnedPredictors:
    """Generate the workload's continuations, capture the routing, and train every (l, d) predictor."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    layers = find_moe_layers(model)
    num_layers, num_experts = len(layers), layers[0].experts.num_experts
    if max(distances) >= num_layers:
        raise UsageError(f"--distance {max(distances)} reaches past the model's {num_layers} MoE layers")

    def requests(w):
        return build_requests(w, (lambda text: tokenizer(text)["input_ids"]) if tokenizer else None,
                              model.config.vocab_size)

    excluded = {tuple(p) for w in exclude for p in requests(w)}
    prompts = [p for p in requests(workload) if tuple(p) not in excluded]
    if len(prompts) < 2:
        raise UsageError(f"workload {workload.name} leaves {len(prompts)} request(s) to train on; need at least "
                         f"2 (a 9:1 split by request)")
    sequences = generate_sequences(model, prompts, workload.output_tokens, progress)
    captured = capture(model, layers, sequences)
    order = list(range(len(captured)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, len(order) // 10)
    splits = {"eval": order[:n_eval], "train": order[n_eval:]}

    def stack(kind, part, layer):  # hidden (0) or chosen (1) of `layer`, over a split's requests
        return torch.cat([captured[i][part][layer] for i in splits[kind]]).to(device)

    hidden_size = model.config.hidden_size
    width = width or min(1024, 2 * hidden_size)
    mlps, evaluation = {}, []
    pairs = [(source, d) for d in distances for source in range(num_layers - d)]
    for source, d in tqdm(pairs, desc="training", unit="predictor", disable=not progress or None, leave=False):
        x_train, x_eval = stack("train", 0, source).float(), stack("eval", 0, source).float()
        y_train, y_eval = stack("train", 1, source + d), stack("eval", 1, source + d)
        mlp, recall, epochs = train_pair(x_train, y_train, x_eval, y_eval, num_experts, width, seed)
        with torch.no_grad():
            gate = router_of(layers[source + d])(stack("eval", 0, source))[-1]
        mlps[(source, d)] = mlp
        evaluation.append({"source": source, "target": source + d, "distance": d, "recall": round(recall, 4),
                           "gate_recall": round(_recall(gate.reshape(len(y_eval), -1), y_eval), 4),
                           "epochs": epochs})
    top_k = int(model.config.num_experts_per_tok)
    meta = {
        "fingerprint": model_fingerprint(model.config, layers),
        "model": str(path), "family": model.config.model_type,
        "workload": workload.name, "excluded_workloads": [w.name for w in exclude],
        "requests": {k: len(v) for k, v in splits.items()},
        "tokens": {k: sum(len(captured[i][0][0]) for i in v) for k, v in splits.items()},
        "distances": distances, "pairs": [list(p) for p in pairs], "top_k": top_k, "seed": seed,
        "sizes": {"hidden_size": hidden_size, "width": width, "num_experts": num_experts},
        "eval": evaluation, "seconds": round(time.perf_counter() - started, 1),
    }
    return LearnedPredictors(mlps, top_k, meta)
