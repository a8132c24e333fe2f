"""Workloads: every shipped one loads, each source parses, limits and seeds select exactly the same requests every
time, and every bad file is refused with one line naming the file, the field and what was expected."""

import json
import random
import zlib
from pathlib import Path

import pytest

from promoe_bench.errors import UsageError
from promoe_bench.workloads import Workload, build_requests, load_workload, shipped_dir, shipped_workloads

VOCAB = 1000
SHIPPED = shipped_workloads()


def numbers(text: str) -> list[int]:
    """A tokenizer for test prompts written as token ids: "3 4 5" -> [3, 4, 5]."""
    return [int(word) for word in text.split()]


def chunks(text: str) -> list[int]:
    """A tokenizer for real text that, like a model's, gives about one token per 4 characters of English."""
    return [zlib.crc32(text[i:i + 4].encode()) % VOCAB for i in range(0, len(text), 4)]


def byte_tokens(text: str) -> list[int]:
    return list(text.encode())


def decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode()


def prompt(first: int, length: int) -> str:
    """A prompt of `length` tokens under `numbers`: first, first + 1, ..."""
    return " ".join(str(first + i) for i in range(length))


BASE = {"name": "t", "description": "a test workload", "source": "prompts", "path": "prompts.jsonl",
        "num_requests": 3, "min_prompt_tokens": 1, "max_prompt_tokens": 100, "overflow": "truncate",
        "output_tokens": 4, "batch_size": 1, "seed": 0}
DROP = object()


def write_fields(path: Path, fields: dict) -> Path:
    """A flat TOML file of `fields` (a DROP value leaves the field out)."""
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items() if v is not DROP))
    return path


def write_toml(folder: Path, filename="w.toml", **changes) -> Path:
    """A workload TOML: BASE with `changes`."""
    return write_fields(folder / filename, {**BASE, **changes})


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_prompts(folder: Path, lengths_by_category: dict[str, list[int]]) -> Path:
    """prompts.jsonl whose prompt k has ids 100k, 100k + 1, ... (so every request says which prompt it came from)."""
    records, k = [], 0
    for category, lengths in lengths_by_category.items():
        for length in lengths:
            records.append({"id": f"p{k}", "category": category, "text": prompt(100 * k, length)})
            k += 1
    return write_jsonl(folder / "prompts.jsonl", records)


def requests_of(folder: Path, tokenize=numbers, **changes) -> list[list[int]]:
    return build_requests(load_workload(str(write_toml(folder, **changes))), tokenize, VOCAB * 100)


def assert_one_line_error(call, *fragments) -> str:
    with pytest.raises(UsageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "first question"},
                                  {"from": "gpt", "value": "an answer"}, {"from": "human", "value": "a follow-up"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "only the model speaks"}]},
    {"id": "c", "conversations": [{"from": "user", "value": "second question"}, {"from": "gpt", "value": "ok"}]},
    {"id": "d", "conversations": []},
]


# --- the shipped workloads -------------------------------------------------------------------------------------

def test_shipped_workloads_are_the_five_designed_ones_sorted_by_name():
    assert list(SHIPPED) == ["chat", "mixed", "prefill-long", "sharegpt", "synthetic"]
    assert sorted(p.stem for p in shipped_dir().glob("*.toml")) == list(SHIPPED)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_workload_loads_by_name_and_validates(name):
    workload = load_workload(name)
    assert workload == SHIPPED[name] and workload.name == name
    assert workload.description and "\n" not in workload.description
    assert workload.min_prompt_tokens <= workload.max_prompt_tokens
    assert workload.with_overrides() == workload  # validates again


DESIGN = {  # the brief each shipped workload was written to
    "chat": dict(source="prompts", categories=("chat", "code"), min_prompt_tokens=8, max_prompt_tokens=128,
                 overflow="truncate", output_tokens=128, num_requests=16, batch_size=1),
    "prefill-long": dict(source="prompts", categories=("long",), min_prompt_tokens=512, max_prompt_tokens=2048,
                         overflow="skip", output_tokens=8, num_requests=8, batch_size=1),
    "mixed": dict(source="prompts", categories=None, min_prompt_tokens=8, max_prompt_tokens=2048,
                  overflow="truncate", output_tokens=64, num_requests=16, batch_size=4),
    "sharegpt": dict(source="sharegpt", min_prompt_tokens=8, max_prompt_tokens=1024, overflow="truncate",
                     output_tokens=128, num_requests=16, batch_size=1),
    "synthetic": dict(source="synthetic", path=None, min_prompt_tokens=32, max_prompt_tokens=256,
                      output_tokens=64, num_requests=8, batch_size=1),
}


@pytest.mark.parametrize("name", list(DESIGN))
def test_shipped_workload_has_its_designed_shape(name):
    workload, values = SHIPPED[name], DESIGN[name]
    assert {k: getattr(workload, k) for k in values} == values
    assert workload.seed == 0


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_workload_builds_num_requests_within_its_limits(name, tmp_path):
    workload = SHIPPED[name]
    if workload.source == "sharegpt":
        many = [{"conversations": [{"from": "human", "value": f"question {i} " + "word " * (10 + i)}]}
                for i in range(20)]
        workload = workload.with_path(write_jsonl(tmp_path / "share.jsonl", many))
    elif workload.source == "prompts" and not workload.path.is_file():
        pytest.skip(f"{workload.path} (the shipped prompt set) is not written yet")
    tokenize = None if workload.source == "synthetic" else chunks
    assert_requests_fit(workload, build_requests(workload, tokenize, VOCAB))


def assert_requests_fit(workload, requests):
    assert len(requests) == workload.num_requests
    assert all(workload.min_prompt_tokens <= len(r) <= workload.max_prompt_tokens for r in requests)
    assert all(0 <= i < VOCAB for r in requests for i in r)


@pytest.mark.parametrize("name", [name for name, w in SHIPPED.items() if w.source == "prompts"])
def test_shipped_prompt_workload_builds_from_a_prompt_set_of_the_shipped_shape(name, tmp_path):
    """Short chat questions, code tasks and 700-1600-word documents, as the shipped prompts.jsonl has them."""
    vocabulary = "the expert cache layer token memory copy device host prefetch routing batch".split()
    pick = random.Random(0).choices
    records = [{"id": f"chat{i}", "category": "chat", "text": "What is " + " ".join(pick(vocabulary, k=2 + i)) + "?"}
               for i in range(6)]
    records += [{"id": f"code{i}", "category": "code",
                 "text": "Write a Python function for " + " ".join(pick(vocabulary, k=5 + 4 * i))} for i in range(6)]
    records += [{"id": f"long{i}", "category": "long", "text": " ".join(pick(vocabulary, k=700 + 180 * i))
                 + "\n\nSummarize the document above in three sentences."} for i in range(6)]
    workload = SHIPPED[name].with_path(write_jsonl(tmp_path / "prompts.jsonl", records))
    requests = build_requests(workload, chunks, VOCAB)
    assert_requests_fit(workload, requests)
    assert len({tuple(r) for r in requests}) > 1


def test_shipped_sharegpt_loads_without_its_file_and_asks_for_one_when_built():
    workload = load_workload("sharegpt")
    assert not workload.path.exists()
    assert_one_line_error(lambda: build_requests(workload, chunks, VOCAB),
                          "workload sharegpt needs a ShareGPT file: pass --workload-file PATH")


def test_prompts_source_without_path_reads_the_shipped_prompt_set(tmp_path):
    workload = load_workload(str(write_toml(tmp_path, path=DROP)))
    assert workload.path == shipped_dir() / "prompts.jsonl"


# --- sources ---------------------------------------------------------------------------------------------------

def test_prompts_source_keeps_only_the_listed_categories(tmp_path):
    write_prompts(tmp_path, {"chat": [3, 3], "code": [4], "long": [9, 9]})
    requests = requests_of(tmp_path, categories=["chat", "code"], num_requests=3)
    assert sorted(r[0] for r in requests) == [0, 100, 200]
    everything = requests_of(tmp_path, num_requests=5)
    assert sorted(r[0] for r in everything) == [0, 100, 200, 300, 400]


def test_data_path_is_relative_to_the_toml_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_prompts(tmp_path / "data", {"chat": [3]})
    toml = write_toml(tmp_path, path="data/prompts.jsonl", num_requests=1)
    monkeypatch.chdir(tmp_path / "data")  # not where the TOML is
    assert load_workload(str(toml)).path == tmp_path / "data" / "prompts.jsonl"


@pytest.mark.parametrize("layout", ["json-list", "jsonl"])
def test_sharegpt_takes_each_first_human_turn_and_skips_records_without_one(tmp_path, layout):
    if layout == "json-list":
        (tmp_path / "share.json").write_text(json.dumps(SHAREGPT, indent=1))
        path = "share.json"
    else:
        path = write_jsonl(tmp_path / "share.jsonl", SHAREGPT).name
    requests = requests_of(tmp_path, byte_tokens, source="sharegpt", path=path, num_requests=2)
    assert sorted(decode_bytes(r) for r in requests) == ["first question", "second question"]


def test_alpaca_prompt_is_the_instruction_plus_a_non_empty_input_after_a_blank_line(tmp_path):
    write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Say hi.", "output": "Hi"},
    ])
    requests = requests_of(tmp_path, byte_tokens, source="alpaca", path="alpaca.jsonl", num_requests=3)
    assert sorted(decode_bytes(r) for r in requests) == ["Name a colour.", "Say hi.",
                                                         "Translate to French.\n\nGood morning"]


def test_synthetic_requests_have_lengths_within_limits_and_ids_below_the_vocabulary():
    workload = SHIPPED["synthetic"].with_overrides(num_requests=40, min_prompt_tokens=3, max_prompt_tokens=9)
    requests = build_requests(workload, None, 50)
    assert len(requests) == 40
    assert {len(r) for r in requests} <= set(range(3, 10)) and len({len(r) for r in requests}) > 1
    assert all(0 <= i < 50 for r in requests for i in r)


# --- length limits ---------------------------------------------------------------------------------------------

def test_truncate_keeps_the_first_max_tokens_and_drops_prompts_under_min(tmp_path):
    write_prompts(tmp_path, {"chat": [2, 5, 8, 12]})  # prompts start at 0, 100, 200, 300
    requests = requests_of(tmp_path, min_prompt_tokens=4, max_prompt_tokens=8, overflow="truncate")
    assert sorted(requests) == [numbers(prompt(100, 5)), numbers(prompt(200, 8)), numbers(prompt(300, 8))]


def test_skip_drops_prompts_over_max_and_under_min(tmp_path):
    write_prompts(tmp_path, {"chat": [2, 5, 8, 12]})
    requests = requests_of(tmp_path, min_prompt_tokens=4, max_prompt_tokens=8, overflow="skip", num_requests=2)
    assert sorted(requests) == [numbers(prompt(100, 5)), numbers(prompt(200, 8))]


def test_fewer_survivors_than_requests_are_used_again_in_the_same_order(tmp_path):
    write_prompts(tmp_path, {"chat": [1, 5, 6]})
    requests = requests_of(tmp_path, min_prompt_tokens=4, num_requests=5)
    assert requests[0] != requests[1]
    assert requests == [requests[0], requests[1]] * 2 + [requests[0]]


# --- determinism -----------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_requests_and_another_seed_another_order(tmp_path):
    write_prompts(tmp_path, {"chat": [3] * 12})
    first = requests_of(tmp_path, num_requests=12, seed=7)
    assert requests_of(tmp_path, num_requests=12, seed=7) == first
    other = requests_of(tmp_path, num_requests=12, seed=8)
    assert sorted(other) == sorted(first) and other != first


def test_build_requests_twice_returns_equal_lists_for_every_strategy(tmp_path):
    write_prompts(tmp_path, {"chat": [3, 4, 5]})
    workload = load_workload(str(write_toml(tmp_path, num_requests=5)))
    first = build_requests(workload, numbers, VOCAB)
    first[0].append(-1)  # one strategy mutating its copy changes nothing for the next
    first = build_requests(workload, numbers, VOCAB)
    assert build_requests(workload, numbers, VOCAB) == first
    synthetic = SHIPPED["synthetic"]
    assert build_requests(synthetic, None, VOCAB) == build_requests(synthetic, None, VOCAB)
    assert build_requests(synthetic, None, VOCAB) != build_requests(synthetic.with_overrides(seed=1), None, VOCAB)


# --- overrides -------------------------------------------------------------------------------------------------

def test_with_overrides_replaces_only_the_given_values():
    chat = SHIPPED["chat"]
    changed = chat.with_overrides(output_tokens=5, batch_size=2, seed=None, num_requests=None)
    assert (changed.output_tokens, changed.batch_size) == (5, 2)
    assert changed == Workload(**{**chat.__dict__, "output_tokens": 5, "batch_size": 2})
    assert chat.output_tokens == 128  # the original is untouched


@pytest.mark.parametrize("values, fragments", [
    pytest.param(dict(batch_size=0), ["workload chat", "field 'batch_size' must be an integer >= 1, got 0"],
                 id="batch-size-0"),
    pytest.param(dict(max_prompt_tokens=4),
                 ["field 'max_prompt_tokens' must be an integer >= min_prompt_tokens (8), got 4"], id="max-below-min"),
    pytest.param(dict(seed=-1), ["field 'seed'", ">= 0"], id="negative-seed"),
])
def test_bad_override_is_refused(values, fragments):
    assert_one_line_error(lambda: SHIPPED["chat"].with_overrides(**values), *fragments)


def test_with_path_needs_an_existing_file(tmp_path):
    assert_one_line_error(lambda: SHIPPED["sharegpt"].with_path(tmp_path / "gone.json"), "gone.json", "does not exist")
    assert_one_line_error(lambda: SHIPPED["synthetic"].with_path(tmp_path), "synthetic", "reads no file")


# --- bad files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, fragments", [
    pytest.param(dict(batch_size=DROP), ["missing required field 'batch_size'"], id="missing-field"),
    pytest.param(dict(batchsize=2), ["unknown field 'batchsize'", "valid fields:", "batch_size"], id="unknown-field"),
    pytest.param(dict(batch_size="four"), ["field 'batch_size' must be an integer >= 1, got 'four'"],
                 id="wrong-type"),
    pytest.param(dict(batch_size=-2), ["field 'batch_size' must be an integer >= 1, got -2"], id="negative-batch"),
    pytest.param(dict(num_requests=True), ["field 'num_requests' must be an integer >= 1, got True"],
                 id="boolean-for-integer"),
    pytest.param(dict(name=3), ["field 'name' must be a string, got 3"], id="number-for-string"),
    pytest.param(dict(min_prompt_tokens=64, max_prompt_tokens=8),
                 ["field 'max_prompt_tokens' must be an integer >= min_prompt_tokens (64), got 8"], id="max-below-min"),
    pytest.param(dict(source="huggingface"),
                 ["field 'source' must be one of prompts, sharegpt, alpaca, synthetic", "'huggingface'"],
                 id="unknown-source"),
    pytest.param(dict(overflow="wrap"), ["field 'overflow' must be one of truncate, skip, got 'wrap'"],
                 id="bad-overflow"),
    pytest.param(dict(source="sharegpt", path=DROP), ["field 'path' is required for source 'sharegpt'"],
                 id="sharegpt-without-path"),
    pytest.param(dict(source="alpaca", path=DROP), ["field 'path' is required for source 'alpaca'"],
                 id="alpaca-without-path"),
    pytest.param(dict(source="sharegpt", path="nowhere.json"), ["field 'path'", "nowhere.json", "does not exist"],
                 id="sharegpt-file-missing"),
    pytest.param(dict(categories="chat"), ["field 'categories' must be a non-empty list of strings"],
                 id="categories-not-a-list"),
    pytest.param(dict(source="synthetic", path=DROP, categories=["chat"]),
                 ["field 'categories' is only for source 'prompts'"], id="categories-on-synthetic"),
])
def test_bad_workload_file_is_one_line_naming_file_field_and_expectation(tmp_path, changes, fragments):
    write_prompts(tmp_path, {"chat": [3]})
    toml = write_toml(tmp_path, "bad.toml", **changes)
    assert_one_line_error(lambda: load_workload(str(toml)), str(toml), *fragments)


def test_invalid_toml_is_refused_with_the_parsers_message(tmp_path):
    toml = tmp_path / "broken.toml"
    toml.write_text('name = "x"\nbatch_size = \n')
    assert_one_line_error(lambda: load_workload(str(toml)), str(toml), "invalid TOML", "line 2")


def test_missing_workload_file_and_unknown_name_are_refused(tmp_path):
    assert_one_line_error(lambda: load_workload(str(tmp_path / "nope.toml")), "nope.toml", "does not exist")
    assert_one_line_error(lambda: load_workload("chatty"), "unknown workload 'chatty'",
                          "shipped workloads: chat, mixed, prefill-long, sharegpt, synthetic")


def test_malformed_sharegpt_names_the_bad_line_or_record(tmp_path):
    bad_line = tmp_path / "share.jsonl"
    bad_line.write_text(json.dumps(SHAREGPT[0]) + "\n" + '{"conversations": [\n')
    w = load_workload(str(write_toml(tmp_path, source="sharegpt", path=bad_line.name)))
    assert_one_line_error(lambda: build_requests(w, byte_tokens, VOCAB), str(bad_line), "line 2", "not valid JSON")

    bad_list = tmp_path / "share.json"
    bad_list.write_text('[\n{"conversations": []},\n{"conversations": [}\n]')
    w = w.with_path(bad_list)
    assert_one_line_error(lambda: build_requests(w, byte_tokens, VOCAB), str(bad_list), "invalid JSON at line 3")

    bad_list.write_text(json.dumps([SHAREGPT[0], ["not", "an", "object"]]))
    assert_one_line_error(lambda: build_requests(w, byte_tokens, VOCAB), str(bad_list), "record 2",
                          "'conversations' list")


def test_sharegpt_file_without_a_usable_prompt_is_refused(tmp_path):
    write_jsonl(tmp_path / "share.jsonl", [SHAREGPT[1], SHAREGPT[3]])
    w = load_workload(str(write_toml(tmp_path, source="sharegpt", path="share.jsonl")))
    assert_one_line_error(lambda: build_requests(w, byte_tokens, VOCAB), "share.jsonl", "no usable prompt",
                          "human or user turn")


def test_category_absent_from_the_prompt_file_is_refused(tmp_path):
    write_prompts(tmp_path, {"chat": [3], "code": [3]})
    assert_one_line_error(lambda: requests_of(tmp_path, categories=["poetry"]), "prompts.jsonl",
                          "field 'categories'", "poetry", "the file has: chat, code")


def test_text_source_without_a_tokenizer_is_refused(tmp_path):
    write_prompts(tmp_path, {"chat": [3]})
    assert_one_line_error(lambda: requests_of(tmp_path, tokenize=None),
                          "workload t needs a tokenizer, and the model has none; use a synthetic workload")


def test_no_prompt_within_the_limits_is_refused(tmp_path):
    write_prompts(tmp_path, {"chat": [3, 20]})
    assert_one_line_error(lambda: requests_of(tmp_path, min_prompt_tokens=5, max_prompt_tokens=10, overflow="skip"),
                          "workload t", "none of the 2 prompts", "between 5 and 10 tokens")
    assert_one_line_error(lambda: requests_of(tmp_path, min_prompt_tokens=50, max_prompt_tokens=60),
                          "workload t", "at least 50 tokens")


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    write_prompts(tmp_path, {"chat": [3]})
    w = load_workload(str(write_toml(tmp_path, num_requests=1)))
    assert_one_line_error(lambda: build_requests(w, numbers, 2), "workload t", "vocabulary of 2")
