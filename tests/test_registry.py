"""The strategy registry: `parse`, `resolve`, `available` and entry-point plugins."""

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest

import promoe_bench.strategies as registry
from promoe_bench.errors import UsageError
from promoe_bench.strategies import BUILTIN, ENTRY_POINT_GROUP, available, parse, resolve
from promoe_bench.strategies.base import Strategy
from promoe_bench.strategies.full_gpu import FullGPU
from promoe_bench.strategies.lru import LRUCache
from promoe_bench.strategies.on_demand import OnDemand
from promoe_bench.strategies.oracle import Oracle
from promoe_bench.strategies.prefetch import Prefetching
from promoe_bench.strategies.promoe import ProMoE
from promoe_bench.strategies.skip_gate import SkipGate
from promoe_bench.strategies.static import StaticCache

BUILTIN_NAMES = ["full_gpu", "on_demand", "lru", "static", "skip_gate", "promoe", "oracle"]
BUILTIN_CLASSES = [FullGPU, OnDemand, LRUCache, StaticCache, SkipGate, ProMoE, Oracle]


@dataclass
class Toggle(Strategy):
    """A plugin strategy with one field of each convertible type."""

    name = "toggle"
    summary = "test plugin with bool, int and str parameters"

    flag: bool = False
    depth: int = 1
    tag: str = "none"

    def on_router(self, env, layer, experts):
        return experts


@dataclass
class Picky(Strategy):
    """A plugin strategy whose constructor rejects a value (ValueError)."""

    name = "picky"
    summary = "test plugin that validates its parameter"

    depth: int = 1

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")

    def on_router(self, env, layer, experts):
        return experts


class NotAStrategy:
    name = "impostor"


class FakeEntryPoint:
    def __init__(self, name, value, target):
        self.name, self.value, self._target = name, value, target

    def load(self):
        return self._target


@pytest.fixture
def install_plugins(monkeypatch):
    """Make `promoe_bench.strategies.entry_points` report the given entry points; returns the groups asked for."""
    asked = []

    def install(*entries):
        def fake_entry_points(group):
            asked.append(group)
            return list(entries) if group == ENTRY_POINT_GROUP else []

        monkeypatch.setattr(registry, "entry_points", fake_entry_points)
        return asked

    return install


@pytest.fixture
def toggle_plugin(install_plugins):
    return install_plugins(FakeEntryPoint("toggle", "tests.test_registry:Toggle", Toggle))


# -- parse: names and parameters -------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", list(zip(BUILTIN_NAMES, BUILTIN_CLASSES, strict=True)))
def test_parse_plain_name_gives_that_strategy_with_default_parameters(name, cls):
    strategy = parse(name)
    assert type(strategy) is cls
    assert strategy.cache_rate is None and strategy.gpu_memory is None
    assert strategy.label == name


def test_parse_ignores_whitespace_around_name_and_parameters():
    strategy = parse("  lru [ cache_rate = 0.25 ]  ")
    assert type(strategy) is LRUCache
    assert strategy.cache_rate == 0.25


def test_parse_empty_brackets_mean_no_parameters():
    assert parse("lru[]").label == "lru"


def test_parse_converts_parameters_to_the_field_types():
    strategy = parse("lru[cache_rate=0.25,gpu_memory=1024]")
    assert strategy.cache_rate == 0.25 and type(strategy.cache_rate) is float
    assert strategy.gpu_memory == 1024 and type(strategy.gpu_memory) is int
    assert strategy.label == "lru[cache_rate=0.25,gpu_memory=1024]"


def test_parse_accepts_an_integer_for_a_float_parameter():
    strategy = parse("lru[cache_rate=1]")
    assert strategy.cache_rate == 1.0 and type(strategy.cache_rate) is float


@pytest.mark.parametrize("text, expected", [("1", True), ("true", True), ("True", True),
                                            ("0", False), ("false", False), ("FALSE", False)])
def test_parse_converts_bool_parameters_from_0_1_true_false(toggle_plugin, text, expected):
    strategy = parse(f"toggle[flag={text}]")
    assert strategy.flag is expected


def test_parse_converts_int_and_str_parameters_of_a_plugin(toggle_plugin):
    strategy = parse("toggle[depth=7,tag=wide]")
    assert strategy.depth == 7 and type(strategy.depth) is int
    assert strategy.tag == "wide"
    assert strategy.flag is False


# -- parse: errors ---------------------------------------------------------------------------------


def test_parse_unknown_name_lists_the_available_strategies():
    with pytest.raises(UsageError) as error:
        parse("belady")
    message = str(error.value)
    assert "unknown strategy 'belady'" in message
    assert all(name in message for name in BUILTIN_NAMES)


@pytest.mark.parametrize("spec, bad", [("lru[bogus=1]", "bogus=1"), ("lru[cache_rate]", "cache_rate"),
                                        ("lru[name=x]", "name=x"), ("lru[cache_rate=0.5,gpu=1]", "gpu=1")])
def test_parse_unknown_parameter_lists_the_strategys_parameters(spec, bad):
    with pytest.raises(UsageError) as error:
        parse(spec)
    message = str(error.value)
    assert f"no parameter {bad!r}" in message
    assert "cache_rate" in message.split("its parameters:")[1]
    assert "gpu_memory" in message.split("its parameters:")[1]


@pytest.mark.parametrize("spec, value, kind", [("lru[cache_rate=abc]", "abc", "float"),
                                                ("lru[gpu_memory=1.5]", "1.5", "int"),
                                                ("lru[gpu_memory=]", "", "int")])
def test_parse_bad_parameter_value_names_the_parameter_and_the_expected_type(spec, value, kind):
    with pytest.raises(UsageError) as error:
        parse(spec)
    message = str(error.value)
    assert f"{value!r} is not a valid {kind}" in message
    assert "lru[" in message


def test_parse_bad_bool_value_says_a_bool_was_expected(toggle_plugin):
    with pytest.raises(UsageError, match=r"'maybe' is not a valid bool"):
        parse("toggle[flag=maybe]")


@pytest.mark.parametrize("spec", ["", "lru[cache_rate=0.5", "lru x", "lru[a=1]b", "lru.v2", "[cache_rate=1]"])
def test_parse_unparseable_spec_shows_the_expected_form(spec):
    with pytest.raises(UsageError) as error:
        parse(spec)
    message = str(error.value)
    assert f"cannot parse strategy {spec!r}" in message
    assert "NAME[param=value,...]" in message


def test_parse_turns_a_rejected_constructor_value_into_a_usage_error(install_plugins):
    install_plugins(FakeEntryPoint("picky", "tests.test_registry:Picky", Picky))
    with pytest.raises(UsageError) as error:
        parse("picky[depth=0]")
    assert "picky[depth=0]" in str(error.value)
    assert "depth must be at least 1" in str(error.value)


# -- resolve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["all", "  all  "])
def test_resolve_all_returns_every_builtin_with_defaults_in_registry_order(text):
    strategies = resolve(text)
    assert [type(s) for s in strategies] == BUILTIN_CLASSES
    assert [s.label for s in strategies] == BUILTIN_NAMES
    assert list(BUILTIN) == BUILTIN_NAMES


def test_resolve_keeps_commas_inside_brackets_with_their_spec():
    strategies = resolve("lru[cache_rate=0.25,gpu_memory=4096],on_demand")
    assert [type(s) for s in strategies] == [LRUCache, OnDemand]
    assert strategies[0].cache_rate == 0.25 and strategies[0].gpu_memory == 4096
    assert strategies[1].cache_rate is None and strategies[1].gpu_memory is None


def test_resolve_keeps_the_given_order_and_tolerates_spaces_around_plain_names():
    strategies = resolve("on_demand , lru[cache_rate=0.5], full_gpu")
    assert [s.label for s in strategies] == ["on_demand", "lru[cache_rate=0.5]", "full_gpu"]


def test_resolve_tolerates_a_space_after_a_bracketed_spec():
    assert [s.label for s in resolve("lru[cache_rate=0.5] , on_demand")] == ["lru[cache_rate=0.5]", "on_demand"]


def test_resolve_keeps_repeated_specs_so_the_run_can_reject_them():
    # The registry does not deduplicate; `run` refuses repeated labels (see test_cli).
    strategies = resolve("lru,lru")
    assert [s.label for s in strategies] == ["lru", "lru"]
    assert strategies[0] is not strategies[1]


def test_resolve_labels_tell_a_parameterised_spec_from_the_plain_one():
    labels = [s.label for s in resolve("lru,lru[cache_rate=0.5]")]
    assert len(set(labels)) == 2


@pytest.mark.parametrize("text", ["", ","])
def test_resolve_with_no_spec_says_no_strategy_given(text):
    with pytest.raises(UsageError, match="no strategy given"):
        resolve(text)


def test_resolve_reports_the_first_bad_spec():
    with pytest.raises(UsageError, match="unknown strategy 'nope'"):
        resolve("lru,nope,on_demand")


@pytest.mark.parametrize("text", ["lru]", "lru[cache_rate=0.5]on_demand"])
def test_resolve_rejects_malformed_lists_instead_of_guessing(text):
    with pytest.raises(UsageError):
        resolve(text)


# -- plugins ---------------------------------------------------------------------------------------


def test_plugin_from_the_entry_point_group_is_available_after_the_builtins(toggle_plugin):
    strategies = available()
    assert list(strategies) == [*BUILTIN_NAMES, "toggle"]
    assert strategies["toggle"] is Toggle
    assert toggle_plugin and set(toggle_plugin) == {ENTRY_POINT_GROUP}
    assert ENTRY_POINT_GROUP == "promoe_bench.strategies"


def test_plugin_is_usable_by_parse_and_listed_in_errors(toggle_plugin):
    strategy = parse("toggle[flag=1,depth=3]")
    assert type(strategy) is Toggle
    assert strategy.label == "toggle[flag=1,depth=3]"  # only what differs from the defaults; bools as 0/1
    with pytest.raises(UsageError, match=r"available: full_gpu, on_demand, lru, static, skip_gate, promoe, "
                                         r"oracle, toggle"):
        parse("nope")


def test_resolve_all_includes_plugins(toggle_plugin):
    assert [type(s) for s in resolve("all")] == [*BUILTIN_CLASSES, Toggle]


def test_plugin_declared_as_a_real_entry_point_loads_by_module_and_class(install_plugins):
    install_plugins(EntryPoint(name="toggle", value=f"{__name__}:Toggle", group=ENTRY_POINT_GROUP))
    assert available()["toggle"] is Toggle
    assert parse("toggle[depth=2]").depth == 2


@pytest.mark.parametrize("target", [NotAStrategy, Toggle(), len, "Toggle", Strategy.__init__],
                         ids=["plain_class", "strategy_instance", "function", "string", "method"])
def test_entry_point_that_is_not_a_strategy_subclass_is_a_usage_error(install_plugins, target):
    install_plugins(FakeEntryPoint("impostor", "somepkg.mod:Thing", target))
    with pytest.raises(UsageError) as error:
        available()
    message = str(error.value)
    assert "impostor" in message and "somepkg.mod:Thing" in message
    assert "not a promoe_bench Strategy subclass" in message
    with pytest.raises(UsageError):
        parse("lru")


# -- the Strategy contract -------------------------------------------------------------------------


def test_strategy_subclass_without_on_router_cannot_be_instantiated():
    @dataclass
    class NoRouter(Strategy):
        name = "no_router"
        summary = "forgot on_router"

    with pytest.raises(TypeError, match="on_router"):
        NoRouter()


def test_strategy_base_class_itself_cannot_be_instantiated():
    with pytest.raises(TypeError, match="on_router"):
        Strategy()


def test_builtin_strategies_have_a_name_and_a_one_line_summary():
    for name, cls in BUILTIN.items():
        assert cls.name == name
        assert cls.summary and "\n" not in cls.summary


# -- the prefetching strategies: defaults, labels, validation, predicted layers ----------------------


def test_prefetching_strategies_share_the_prefetch_base_and_differ_in_their_defaults():
    promoe, skip_gate, oracle = parse("promoe"), parse("skip_gate"), parse("oracle")
    assert all(isinstance(s, Prefetching) for s in (promoe, skip_gate, oracle))
    assert isinstance(oracle, ProMoE)
    assert (promoe.predictor, promoe.distance, promoe.chunked, promoe.preempt, promoe.reorder) == (
        "learned", 2, True, True, True)
    assert (skip_gate.predictor, skip_gate.distance, skip_gate.chunked) == ("gate", 1, False)
    assert (oracle.predictor, oracle.distance) == ("oracle", 2)
    assert [promoe.predictors, skip_gate.predictors, oracle.predictors] == [{"learned"}, {"gate"}, {"oracle"}]


def test_only_strategies_that_read_the_recorded_routing_need_the_trace():
    needs = {name: cls().needs_trace for name, cls in BUILTIN.items()}
    assert needs == {"full_gpu": False, "on_demand": False, "lru": False, "static": True, "skip_gate": False,
                     "promoe": False, "oracle": True}
    assert parse("promoe[predictor=oracle]").needs_trace  # the oracle predictor reads the trace too


@pytest.mark.parametrize("spec, label", [
    ("promoe[chunked=0]", "promoe[chunked=0]"),
    ("promoe[chunked=false,preempt=no,reorder=off]", "promoe[chunked=0,preempt=0,reorder=0]"),
    ("promoe[chunked=1]", "promoe"),  # a default given explicitly is not shown
    ("promoe[distance=2,predictor=learned]", "promoe"),
    ("promoe[predictor=oracle,cache_rate=0.25]", "promoe[cache_rate=0.25,predictor=oracle]"),  # field order
    ("promoe[predictor=gate]", "promoe[predictor=gate]"),
    ("skip_gate[predictor=gate,distance=1]", "skip_gate"),
    ("skip_gate[distance=2]", "skip_gate[distance=2]"),
    ("oracle[predictor=oracle]", "oracle"),
    ("static[spare=3]", "static[spare=3]"),
    ("lru[cache_rate=0.5]", "lru[cache_rate=0.5]"),  # cache_rate's default is None, so 0.5 differs
])
def test_label_shows_only_the_parameters_that_differ_from_the_defaults(spec, label):
    assert parse(spec).label == label


def test_two_specs_with_the_same_label_are_the_same_strategy():
    # `run` refuses repeated labels, so a default spelled out counts as listing a strategy twice
    assert [s.label for s in resolve("promoe,promoe[chunked=1]")] == ["promoe", "promoe"]
    assert len({s.label for s in resolve("promoe,promoe[chunked=0],promoe[predictor=gate]")}) == 3


@pytest.mark.parametrize("spec, fragments", [
    ("promoe[predictor=magic]", ["predictor must be one of learned, gate, oracle", "'magic'"]),
    ("skip_gate[distance=0]", ["distance must be at least 1"]),
    ("oracle[distance=-1]", ["distance must be at least 1"]),
    ("static[spare=0]", ["spare must be at least 1"]),
    ("promoe[chunked=maybe]", ["'maybe' is not a valid bool"]),
    ("promoe[distance=1.5]", ["'1.5' is not a valid int"]),
    ("promoe[cache_rate=2]", ["cache_rate must be in (0, 1]"]),
])
def test_bad_prefetching_parameter_is_a_usage_error(spec, fragments):
    with pytest.raises(UsageError) as error:
        parse(spec)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize("spec, num_layers, expected", [
    # layer 0 also predicts the layers before layer 0 + distance, which no earlier input can predict
    ("promoe", 3, {0: [1, 2], 1: [], 2: []}),
    ("promoe", 5, {0: [1, 2], 1: [3], 2: [4], 3: [], 4: []}),
    ("skip_gate", 3, {0: [1], 1: [2], 2: []}),
    ("promoe[distance=3]", 3, {0: [1, 2], 1: [], 2: []}),  # clamped to the model's layers
    ("promoe[distance=3]", 5, {0: [1, 2, 3], 1: [4], 2: [], 3: [], 4: []}),
    ("promoe[distance=1]", 1, {0: []}),
])
def test_prefetching_targets_layer_plus_distance_and_everything_below_it_from_layer_0(spec, num_layers, expected):
    strategy = parse(spec)
    assert {layer: strategy.targets(layer, num_layers) for layer in range(num_layers)} == expected


def test_strategies_that_do_not_prefetch_predict_nothing():
    for name in ("full_gpu", "on_demand", "lru", "static"):
        strategy = parse(name)
        assert strategy.predictors == set(), name
        assert strategy.targets(0, 3) == [], name
