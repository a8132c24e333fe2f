"""Offloading never changes the model's output: every strategy, every family, against transformers."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from promoe_bench.bench import make_batches
from promoe_bench.checkpoint import LoadedModel, load_checkpoint
from promoe_bench.generation import left_pad
from promoe_bench.predictors import LearnedPredictors, load_predictors, model_fingerprint
from promoe_bench.workloads import load_workload

from .checkpoints import FAMILIES, write_checkpoint
from .conftest import one_torch_thread
from .runtime_helpers import run_generation, untrained_predictors

STRATEGIES = ["full_gpu", "on_demand", "lru", "lru[cache_rate=0.25]", "static", "skip_gate", "oracle",
              "promoe", "promoe[predictor=gate]", "promoe[predictor=oracle,cache_rate=0.25]",
              "promoe[chunked=0]", "promoe[preempt=0]", "promoe[reorder=0]", "promoe[distance=1]",
              "promoe[chunked=0,preempt=0,reorder=0,cache_rate=0.25]"]
GEN_LEN = 6


@pytest.fixture(scope="module")
def references(checkpoints):
    """family -> (ids, mask, tokens, logits) from transformers' own generate() with its eager experts, on
    a batch of prompts of different lengths (left-padded)."""
    out = {}
    generator = torch.Generator().manual_seed(1)
    for family, folder in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager")
        prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=generator).tolist() for n in (9, 4, 6)]
        ids, mask = left_pad(prompts, pad_id=0)
        generated = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                                   max_new_tokens=GEN_LEN, output_logits=True, return_dict_in_generate=True)
        out[family] = (ids, mask, generated.sequences[:, ids.shape[1]:], torch.stack(generated.logits, dim=1))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_strategy_reproduces_transformers_generate(family, checkpoints, references):
    loaded = load_checkpoint(str(checkpoints[family]), torch.device("cpu"))
    ids, mask, want_tokens, want_logits = references[family]
    predictors = untrained_predictors(loaded, distances=(1, 2))  # random guesses: outputs must not care
    for spec in STRATEGIES:
        result, runtime = run_generation(loaded, spec, ids, GEN_LEN, attention_mask=mask, predictors=predictors)
        assert torch.equal(result.tokens, want_tokens), f"{family}/{spec}: greedy tokens differ"
        torch.testing.assert_close(result.logits, want_logits, rtol=1e-4, atol=1e-5, msg=f"{family}/{spec}")
        misses = sum(row["misses"] for row in runtime.recorder.rows)
        if "cache_rate=0.25" in spec:
            assert misses > 0, "a quarter cache must miss, or this test does not exercise offloading"
        if spec.startswith(("promoe", "skip_gate", "oracle")):
            guessed = [row for row in runtime.recorder.rows if row["predicted"]]
            assert guessed, f"{family}/{spec}: no layer was predicted, so prefetching went untested"


# -- bfloat16 and float16 ---------------------------------------------------------------------------------
# In a low-precision dtype, adding the experts' outputs in another order gives another sum, and strategies run
# a layer's experts in orders of their own (resident ones first, prefetched ones next). The runtime weights
# each (token, k) output on its own and sums them over k in a fixed order, then casts once, so every strategy
# must give full_gpu's logits bit for bit, and full_gpu must give transformers' tokens.
# With two experts per token any order gives the same sum (a + b == b + a, however rounded), so the tiny
# checkpoints here route each token to four of 16 experts: a combine that depended on the order would show.

LOW_PRECISION = ("bfloat16", "float16")
LOW_PRECISION_STRATEGIES = ["on_demand", "lru", "lru[cache_rate=0.25]", "static", "oracle", "promoe",
                            "promoe[predictor=gate]", "promoe[predictor=oracle,cache_rate=0.25]", "promoe[chunked=0]"]
REORDERING = ("oracle", "promoe")  # they run a layer's experts in an order of their own: they must, here
WIDE_ROUTING = 4  # experts per token, of 16: a quarter cache (4 slots) holds one token's experts and must miss
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # each family's name for it
CHAT_REQUESTS = 8  # the chat workload's first requests, as one left-padded batch
# How far full_gpu's logits may be from transformers', in roundings of the dtype at the logits' scale: eager
# rounds each expert's weighted output to the dtype before adding it, which puts a tiny checkpoint's logits
# up to 2 roundings away; the built-in model's six trained layers compound that to about 9.
TINY_LOGIT_ULPS, BUILTIN_LOGIT_ULPS = 4, 16


@dataclass
class Reference:
    tokens: torch.Tensor  # [B, N]
    logits: torch.Tensor  # [B, N, V], float32


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    loaded: LoadedModel
    input_ids: torch.Tensor  # [B, P], left-padded
    attention_mask: torch.Tensor  # [B, P]
    predictors: LearnedPredictors
    logit_ulps: int
    references: dict  # transformers' experts implementation -> Reference; its default first
    full: Reference  # full_gpu's generation
    full_orders: dict  # full_gpu's (step, layer) -> experts in the order they ran

    def run(self, spec: str):
        return run_generation(self.loaded, spec, self.input_ids, GEN_LEN, attention_mask=self.attention_mask,
                              predictors=self.predictors)


def transformers_references(folder, dtype: torch.dtype, input_ids, attention_mask) -> dict:
    """transformers' own generate() with its default experts implementation for `dtype` (grouped_mm on the
    CPU where it dispatches), then with eager: implementation -> Reference."""
    out = {}
    for implementation in (None, "eager"):
        chosen = {} if implementation is None else {"experts_implementation": implementation}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **chosen)
        model.generation_config.eos_token_id = None  # the runtime never stops early; neither may generate()
        name = model.get_experts_implementation()[""]
        if name not in out:  # the default may be eager itself
            generated = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                                       max_new_tokens=GEN_LEN, output_logits=True, return_dict_in_generate=True)
            out[name] = Reference(generated.sequences[:, input_ids.shape[1]:],
                                  torch.stack(generated.logits, dim=1).float())
    return out


def expert_orders(runtime) -> dict:
    """(step, layer) -> the experts of that forward in the order they ran."""
    orders = {}
    for row in runtime.recorder.timeline:
        if row["kind"] == "expert":
            orders.setdefault((row["step"], row["layer"]), []).append(row["expert"])
    return orders


def shared_context(tokens: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: the steps two generations computed from the same tokens: up to and including the
    first step where they pick different ones."""
    parted = (tokens != other).long()
    return parted.cumsum(dim=1) - parted == 0


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    """family -> folder of a tiny checkpoint that routes each token to 4 of 16 experts."""
    root = tmp_path_factory.mktemp("wide_checkpoints")
    return {family: write_checkpoint(root / family, family, num_experts_per_tok=WIDE_ROUTING,
                                     **{key: 16 for key in FAMILIES[family] if key in EXPERT_COUNTS})
            for family in FAMILIES}


def tiny_case(folder, dtype: str):
    """A left-padded batch of random prompts of different lengths; untrained predictors (wrong guesses)."""
    loaded = load_checkpoint(str(folder), torch.device("cpu"), dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, loaded.config.vocab_size, (n,), generator=generator).tolist() for n in (9, 4, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    return loaded, ids, mask, untrained_predictors(loaded, distances=(1, 2))


def builtin_case():
    """The chat workload's first requests, batched the way `promoe-bench run` batches them; the model's own
    trained predictors."""
    loaded = load_checkpoint("builtin", torch.device("cpu"), dtype="bfloat16")
    workload = load_workload("chat").with_overrides(num_requests=CHAT_REQUESTS, batch_size=CHAT_REQUESTS)
    (batch,) = make_batches(workload, loaded)
    predictors = load_predictors(Path(loaded.path) / "promoe_predictors",
                                 model_fingerprint(loaded.config, loaded.layers))
    return loaded, batch.input_ids, batch.attention_mask, predictors


@pytest.fixture(scope="module", params=[(family, dtype) for dtype in LOW_PRECISION for family in FAMILIES]
                + [("builtin-chat", "bfloat16")], ids="-".join)
def case(request):
    """One model in one dtype with its prompts, transformers' references and full_gpu's generation."""
    name, dtype = request.param
    with one_torch_thread():  # two spinning intra-op threads on a shared 2-core machine stall for seconds
        if name == "builtin-chat":
            (loaded, ids, mask, predictors), ulps = builtin_case(), BUILTIN_LOGIT_ULPS
        else:
            folder = request.getfixturevalue("wide_checkpoints")[name]
            (loaded, ids, mask, predictors), ulps = tiny_case(folder, dtype), TINY_LOGIT_ULPS
        references = transformers_references(loaded.path, getattr(torch, dtype), ids, mask)
        full, runtime = run_generation(loaded, "full_gpu", ids, GEN_LEN, attention_mask=mask)
    return Case(f"{name}/{dtype}", getattr(torch, dtype), loaded, ids, mask, predictors, ulps, references,
                Reference(full.tokens, full.logits), expert_orders(runtime))


def test_full_gpu_reproduces_transformers_generate_in_low_precision(case):
    """Tokens equal to transformers' own generate() with each experts implementation that agrees with its
    default; logits within a few roundings of the dtype. Where transformers' implementations disagree with
    each other (eager rounds each expert's output before adding), the logits still agree up to the step where
    the tokens part: the parting is a near tie, rounded two ways."""
    default_name, default = next(iter(case.references.items()))
    agreeing = [name for name, ref in case.references.items() if torch.equal(ref.tokens, default.tokens)]
    for name, ref in case.references.items():
        note = "" if name in agreeing else (
            f"transformers' own {name} and {default_name} experts give different tokens here, so the tokens "
            f"are held against {', '.join(agreeing)} only")
        if note:
            warnings.warn(f"{case.name}: {note}", stacklevel=1)
        else:
            assert torch.equal(case.full.tokens, ref.tokens), f"{case.name}: tokens differ from transformers' {name}"
        shared = shared_context(ref.tokens, case.full.tokens)
        atol = case.logit_ulps * torch.finfo(case.dtype).eps * float(ref.logits.abs().max())
        where = f"{case.name} vs transformers' {name}. {note}"
        torch.testing.assert_close(case.full.logits[shared], ref.logits[shared], rtol=0, atol=atol,
                                   msg=lambda m, where=where: f"{where}\n{m}")


def test_every_strategy_gives_full_gpus_logits_bit_for_bit_in_low_precision(case):
    """Whatever order a strategy runs a layer's experts in, and whatever it misses, its tokens and logits
    are full_gpu's exactly."""
    tokens_differ, logits_differ, reordered = {}, {}, set()
    with one_torch_thread():
        for spec in LOW_PRECISION_STRATEGIES:
            result, runtime = case.run(spec)
            if not torch.equal(result.tokens, case.full.tokens):
                tokens_differ[spec] = f"from step {int((result.tokens != case.full.tokens).any(dim=0).nonzero()[0])}"
            if not torch.equal(result.logits, case.full.logits):
                logits_differ[spec] = f"by up to {float((result.logits - case.full.logits).abs().max()):.3g}"
            if "cache_rate=0.25" in spec:
                misses = sum(row["misses"] for row in runtime.recorder.rows)
                assert misses > 0, f"{case.name}/{spec}: a quarter cache must miss, or offloading went untested"
            if expert_orders(runtime) != case.full_orders:
                reordered.add(spec)
    assert set(REORDERING) <= reordered, (
        f"{case.name}: {set(REORDERING) - reordered} ran every layer's experts in full_gpu's order, "
        "so the order independence went untested")
    assert not tokens_differ, f"{case.name}: greedy tokens differ from full_gpu's: {tokens_differ}"
    assert not logits_differ, f"{case.name}: logits differ from full_gpu's: {logits_differ}"
