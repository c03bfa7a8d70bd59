import json
import logging
import random
from pathlib import Path

import pytest
from datasets import Dataset, IterableDataset

from ilr import prompts
from ilr.data import (
    BENCHMARKS,
    CANONICAL_COLUMNS,
    CANONICAL_FEATURES,
    BenchmarkSpec,
    add_prompt_column,
    build_prompt,
    extract_gold,
    extract_gsm8k_answer,
    get_spec,
    load_benchmark,
    load_custom_dataset,
    load_math_split,
    make_math_split,
    normalize_example,
    split_humaneval_tests,
)
from ilr.rewards import extract_boxed


FIXTURES = Path(__file__).parent / "fixtures" / "data"

# Golds expected from each fixture, in row order, after rows without a usable gold are dropped.
EXPECTED_ANSWERS = {
    "gsm8k": ["1200", "12", "10"],
    "math500": ["\\frac{\\sqrt{3}}{2}", "42", "\\{-2, 2\\}"],
    "minerva": ["2", "500", "\\frac{3}{7}"],
    "olympiadbench": ["8", "2, 3", "5"],
    "aime24": ["024", "9", "3"],
    "aime25": ["9", "25", "99"],
    "aime": ["024", "9", "3", "9", "25", "99"],
    "math_train": ["\\frac{\\sqrt{3}}{2}", "42", "3", "7", "x+1"],
}
EXPECTED_ENTRY_POINTS = {
    "mbpp": ["sum_squares", "days_between", "all_distinct"],
    "mbpp_sanitized": ["hypotenuse", "reverse_words"],
    "humaneval": ["add_pairs", "is_even_length", "circle_area"],
}


def fixture_files(name: str) -> str | dict[str, str]:
    spec = BENCHMARKS[name]
    if spec.sources:
        return {src: str(FIXTURES / f"{src}.jsonl") for src in spec.sources}
    return str(FIXTURES / f"{name}.jsonl")


def read_raw(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def load(tmp_path):
    """`load_benchmark` with a per-test cache, so the user's HF cache is left alone."""

    def _load(name_or_spec, **kwargs):
        return load_benchmark(name_or_spec, cache_dir=str(tmp_path / "hf_cache"), **kwargs)

    return _load


# --- gold extraction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,200", "1200"),
        ("#### 72", "72"),
        ("Profit is -3 dollars.\n####  -3 ", "-3"),
        ("Total 1,234,567.5\n#### 1,234,567.5", "1234567.5"),
        ("Worked solution without a final marker: 12", None),
        ("Empty marker\n#### ", None),
        (None, None),
    ],
)
def test_gsm8k_gold(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("Do not answer $\\boxed{4}$ too early; in fact $x = \\boxed{3}$.", "3"),
        ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
        ("$\\boxed{\\left\\{ x \\mid x > 0 \\right.}$", "\\left\\{ x \\mid x > 0 \\right."),
        ("The floor is $\\boxed 7$.", "7"),
        ("Hence $\\fbox{12}$.", "12"),
        ("$\\boxed{ (1, -2) }$", "(1, -2)"),
        ("Here $\\boxed{3$ is cut off", None),
        ("Put your answer in \\boxed", None),
        ("No box: the area is 1.", None),
        ("\\boxedx{5} is not a box command", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (25, "plain", "25"),
        ("  \\frac{1}{2} ", "plain", "\\frac{1}{2}"),
        ("", "plain", None),
        (None, "plain", None),
        (["$8$"], "list", "8"),
        (["$2$", "$3$"], "list", "2, 3"),
        (["$\\sqrt{2}$, $-\\sqrt{2}$"], "list", "$\\sqrt{2}$, $-\\sqrt{2}$"),
        ([], "list", None),
        ("so $\\boxed{}$", "boxed", None),
        ("... #### 1,200", "gsm8k", "1200"),
    ],
)
def test_extract_gold_formats(value, fmt, expected):
    assert extract_gold(value, fmt) == expected


def test_math500_falls_back_to_boxed_solution():
    row = {"problem": "p", "solution": "so $\\boxed{42}$", "answer": "", "unique_id": "test/x/1.json"}
    assert normalize_example(row, 0, BENCHMARKS["math500"])["answer"] == "42"
    row["answer"] = "41"  # the answer column wins when present
    assert normalize_example(row, 0, BENCHMARKS["math500"])["answer"] == "41"


# --- registry and canonical schema ----------------------------------------------------------------------------------


def test_registry_specs():
    assert set(BENCHMARKS) == {
        "gsm8k",
        "math500",
        "minerva",
        "olympiadbench",
        "aime24",
        "aime25",
        "aime",
        "mbpp",
        "mbpp_sanitized",
        "humaneval",
        "math_train",
    }
    for name, spec in BENCHMARKS.items():
        assert spec.name == name
        assert (spec.hub_id is None) == bool(spec.sources)
        assert spec.n_expected
    assert BENCHMARKS["aime"].n_expected == sum(BENCHMARKS[s].n_expected for s in BENCHMARKS["aime"].sources)
    assert BENCHMARKS["gsm8k"].config == "main" and BENCHMARKS["gsm8k"].answer_format == "gsm8k"
    assert BENCHMARKS["olympiadbench"].config == "OE_TO_maths_en_COMP"
    assert BENCHMARKS["math_train"].n_expected == 12500 and BENCHMARKS["math_train"].answer_format == "boxed"
    with pytest.raises(KeyError, match="Registered: gsm8k"):
        get_spec("gsm9k")
    with pytest.raises(ValueError, match="answer format"):
        BenchmarkSpec(name="x", hub_id="a/b", answer_format="latex")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_normalises_from_its_fixture(name, load):
    ds = load(name, data_files=fixture_files(name))
    assert isinstance(ds, Dataset)
    assert ds.features == CANONICAL_FEATURES
    assert tuple(ds.column_names) == CANONICAL_COLUMNS
    spec = BENCHMARKS[name]
    rows = ds.to_list()
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["task"] == (spec.task if not spec.sources else "math")
        assert row["problem"].strip()
        assert row["source"] in ((name,) if not spec.sources else spec.sources)
        if row["task"] == "math":
            assert row["answer"] and row["tests"] == [] and row["entry_point"] == ""
        else:
            assert row["answer"] == "" and row["tests"] and row["entry_point"]
    if name in EXPECTED_ANSWERS:
        assert [r["answer"] for r in rows] == EXPECTED_ANSWERS[name]
    else:
        assert [r["entry_point"] for r in rows] == EXPECTED_ENTRY_POINTS[name]


def test_ids(load):
    assert load("gsm8k", data_files=fixture_files("gsm8k"))["id"] == ["0", "1", "2"]
    assert load("mbpp", data_files=fixture_files("mbpp"))["id"] == ["9001", "9002", "9003"]
    ids = load("aime", data_files=fixture_files("aime"))["id"]
    assert ids[:2] == ["aime24/901", "aime24/902"] and ids[3] == "aime25/0"


# --- code benchmarks ------------------------------------------------------------------------------------------------


def run_snippets(solution: str, setup: str, tests: list[str]) -> None:
    for test in tests:
        namespace: dict = {}
        exec(setup, namespace)
        exec(solution, namespace)
        exec(test, namespace)


@pytest.mark.parametrize("name", ["mbpp", "mbpp_sanitized"])
def test_mbpp_rows_and_tests_run(name, load):
    raw = {str(r["task_id"]): r for r in read_raw(name)}
    for row in load(name, data_files=fixture_files(name)):
        ref = raw[row["id"]]
        assert row["problem"].startswith(ref["text" if name == "mbpp" else "prompt"])
        assert row["problem"].endswith(f"Your code should pass this test:\n{ref['test_list'][0]}")
        assert row["tests"] == ref["test_list"]
        run_snippets(ref["code"], row["setup"], row["tests"])
        wrong = ref["code"].replace("return", "return None or 0 *", 1)  # a wrong solution must fail a test
        with pytest.raises((AssertionError, TypeError)):
            run_snippets(wrong, row["setup"], row["tests"])


def test_mbpp_setup_columns(load):
    rows = {r["id"]: r for r in load("mbpp", data_files=fixture_files("mbpp"))}
    assert rows["9002"]["setup"] == "from datetime import date"
    assert rows["9001"]["setup"] == ""
    rows = {r["id"]: r for r in load("mbpp_sanitized", data_files=fixture_files("mbpp_sanitized"))}
    assert rows["9101"]["setup"] == "import math"


def test_humaneval_check_is_split(load):
    raw = {r["task_id"]: r for r in read_raw("humaneval")}
    rows = {r["id"]: r for r in load("humaneval", data_files=fixture_files("humaneval"))}
    split = rows["HumanEval/9001"]["tests"]
    # METADATA and the trivial `assert True` are gone, the multi-line assert is kept whole.
    assert split == [
        "candidate = add_pairs\nassert candidate([], []) == []\n",
        "candidate = add_pairs\nassert candidate([1, 2], [3, 4]) == [4, 6]\n",
        "candidate = add_pairs\nassert candidate(\n        [-1, 0, 1],\n        [1, 0, -1],\n    ) == [0, 0, 0]\n",
    ]
    # Module-level imports are repeated in each snippet.
    assert rows["HumanEval/9003"]["tests"] == [
        "import math\ncandidate = circle_area\nassert math.isclose(candidate(1.0), math.pi)\n",
        "import math\ncandidate = circle_area\nassert candidate(0) == 0\n",
    ]
    # A check body with a loop cannot be split: one test runs the whole check.
    (whole,) = rows["HumanEval/9002"]["tests"]
    assert whole.rstrip().endswith("check(is_even_length)") and "def check(candidate):" in whole
    for task_id, row in rows.items():
        assert row["problem"] == raw[task_id]["prompt"]
        solution = raw[task_id]["prompt"] + raw[task_id]["canonical_solution"]
        run_snippets(solution, row["setup"], row["tests"])
        wrong = raw[task_id]["prompt"] + "    return None\n"
        for test in row["tests"]:
            with pytest.raises((AssertionError, TypeError)):
                run_snippets(wrong, row["setup"], [test])


def test_humaneval_split_fallbacks():
    helper = "def helper(x):\n    return x\n\n\ndef check(candidate):\n    assert candidate(1) == helper(1)\n"
    assert split_humaneval_tests(helper, "f") == [f"{helper}\n\ncheck(f)\n"]
    assert split_humaneval_tests("def check(candidate):\n    assert True\n", "f")[0].endswith("check(f)\n")
    assert split_humaneval_tests("def check(:\n", "f") == ["def check(:\n\n\ncheck(f)\n"]
    assert split_humaneval_tests("def check(fn):\n    assert fn(2) == 4\n", "sq") == ["fn = sq\nassert fn(2) == 4\n"]


# --- loading --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gsm8k", "olympiadbench", "humaneval"])
def test_parquet_matches_jsonl(name, load, tmp_path):
    parquet = tmp_path / f"{name}.parquet"
    Dataset.from_list(read_raw(name)).to_parquet(str(parquet))
    from_parquet = load(name, data_files=str(parquet)).to_list()
    assert from_parquet == load(name, data_files=fixture_files(name)).to_list()
    assert from_parquet


@pytest.mark.parametrize("name", ["gsm8k", "olympiadbench", "mbpp", "mbpp_sanitized", "humaneval", "aime"])
def test_streaming_gives_same_rows(name, load):
    eager = load(name, data_files=fixture_files(name))
    streamed = load(name, data_files=fixture_files(name), streaming=True)
    assert isinstance(streamed, IterableDataset)
    assert list(streamed) == eager.to_list()
    assert list(load(name, data_files=fixture_files(name), streaming=True, limit=2)) == eager.to_list()[:2]


def test_limit(load):
    full = load("math_train", data_files=fixture_files("math_train"))
    assert load("math_train", data_files=fixture_files("math_train"), limit=2).to_list() == full.to_list()[:2]
    assert len(load("math_train", data_files=fixture_files("math_train"), limit=100)) == len(full)
    assert len(load("aime", data_files=fixture_files("aime"), limit=4)) == 4
    with pytest.raises(ValueError, match="limit"):
        load("gsm8k", data_files=fixture_files("gsm8k"), limit=-1)


def test_bad_golds_dropped_and_counted(load, caplog):
    with caplog.at_level(logging.WARNING, logger="ilr.data"):
        ds = load("gsm8k", data_files=fixture_files("gsm8k"))
    assert len(ds) == 3 and len(read_raw("gsm8k")) == 4
    assert "gsm8k: dropped 1 of 4 rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ilr.data"):
        ds = load("math_train", data_files=fixture_files("math_train"))
    assert "math_train: dropped 1 of 6 rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ilr.data"):
        rows = list(load("olympiadbench", data_files=fixture_files("olympiadbench"), streaming=True))
    assert [r["id"] for r in rows] == ["3001", "3002", "3003"]
    assert "olympiadbench: dropped row 3004" in caplog.text


@pytest.mark.parametrize("streaming", [False, True])
def test_zero_usable_rows_raises(load, tmp_path, streaming):
    files = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}] * 3)
    with pytest.raises(ValueError, match=r"gsm8k: .*usable gold"):
        load("gsm8k", data_files=files, streaming=streaming)


def test_missing_columns_and_files(load, tmp_path):
    files = write_jsonl(tmp_path / "wrong.jsonl", [{"problem": "q", "answer": "1"}])
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"lacks the columns \['question'\] .*`data_files`"):
            load("gsm8k", data_files=files, streaming=streaming)
    with pytest.raises(FileNotFoundError):
        load("gsm8k", data_files=str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="dict from component name"):
        load("aime", data_files=fixture_files("aime24"))


def test_offline_hub_load_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = BenchmarkSpec(name="nowhere", hub_id="ilr-tests/no-such-dataset", question_column="q")
    # Fast because nothing is attempted: a request would raise the test guard's NetworkAccessBlockedError instead.
    with pytest.raises(ConnectionError, match="data_files") as err:
        load_benchmark(spec)
    assert "HF_HUB_OFFLINE" in str(err.value) and "ilr-tests/no-such-dataset" in str(err.value)
    with pytest.raises(ConnectionError, match="data_files"):
        load_custom_dataset("ilr-tests/no-such-dataset", question_column="q", answer_column="a")


def test_custom_dataset(tmp_path):
    rows = [
        {"uid": "a", "q": "What is $1+1$?", "sol": "It is $\\boxed{2}$."},
        {"uid": "b", "q": "What is $2+2$?", "sol": "It is four."},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    ds = load_custom_dataset(
        path, question_column="q", answer_column="sol", answer_format="boxed", id_column="uid", cache_dir=str(tmp_path)
    )
    assert ds.to_list() == [
        {
            "id": "a",
            "problem": "What is $1+1$?",
            "answer": "2",
            "tests": [],
            "setup": "",
            "entry_point": "",
            "task": "math",
            "source": "mine",
        }
    ]
    ds = load_custom_dataset(
        str(FIXTURES / "gsm8k.jsonl"),
        question_column="question",
        answer_column="answer",
        answer_format="gsm8k",
        name="gsm8k_local",
        streaming=True,
        cache_dir=str(tmp_path),
    )
    assert [r["answer"] for r in ds] == EXPECTED_ANSWERS["gsm8k"]


# --- MATH split -----------------------------------------------------------------------------------------------------


def synthetic_pool(n: int) -> Dataset:
    return Dataset.from_dict(
        {"id": [str(i) for i in range(n)], "problem": [f"Problem {i}: compute $x_{{{i}}}$." for i in range(n)]}
    )


def test_math_split_sizes_and_exclusion():
    pool = synthetic_pool(1250)
    # Held-out problems differ in whitespace only, plus one that is not in the pool.
    excluded = [f"  Problem {i}:\n compute   $x_{{{i}}}$. " for i in range(0, 1250, 25)] + ["Not in the pool"]
    split = make_math_split(pool, excluded, validation_size=100)
    assert (len(split["train"]), len(split["validation"])) == (1100, 100)
    train, val = set(split["train"]["id"]), set(split["validation"]["id"])
    assert not train & val
    assert train | val == {str(i) for i in range(1250) if i % 25}


def test_math_split_default_sizes():
    pool = synthetic_pool(12500)
    split = make_math_split(pool, [f"Problem {i}: compute $x_{{{i}}}$." for i in range(500)])
    assert (len(split["train"]), len(split["validation"])) == (11000, 1000)


def test_math_split_deterministic():
    pool = synthetic_pool(300)
    a = make_math_split(pool, [], seed=42, validation_size=30)
    b = make_math_split(pool, [], seed=42, validation_size=30)
    c = make_math_split(pool, [], seed=7, validation_size=30)
    assert a["validation"]["id"] == b["validation"]["id"] and a["train"]["id"] == b["train"]["id"]
    assert a["validation"]["id"] != c["validation"]["id"]
    # The split depends on the problems, not on the pool's row order.
    order = list(range(300))
    random.Random(0).shuffle(order)
    d = make_math_split(pool.select(order), [], seed=42, validation_size=30)
    assert d["validation"]["id"] == a["validation"]["id"]
    # Pinned so the split stays the same across versions and machines.
    tiny = make_math_split(
        Dataset.from_dict({"id": [str(i) for i in range(10)], "problem": [f"Problem {i}" for i in range(10)]}),
        [],
        seed=42,
        validation_size=3,
    )
    assert list(tiny["validation"]["id"]) == ["6", "4", "0"]


def test_math_split_duplicates_and_errors():
    pool = Dataset.from_dict({"id": ["a", "b", "c", "d"], "problem": ["P one", "P  two", "P two", "P three"]})
    split = make_math_split(pool, [], validation_size=1)
    ids = list(split["train"]["id"]) + list(split["validation"]["id"])
    assert sorted(ids) == ["a", "b", "d"]
    with pytest.raises(ValueError, match="validation_size"):
        make_math_split(pool, ["P one"], validation_size=3)


def test_load_math_split_from_files(tmp_path):
    split = load_math_split(
        pool_files=fixture_files("math_train"),
        exclude_files=fixture_files("math500"),
        validation_size=1,
        cache_dir=str(tmp_path),
    )
    problems = list(split["train"]["problem"]) + list(split["validation"]["problem"])
    # 6 rows, 1 without a boxed gold, 1 also in MATH-500 (up to whitespace).
    assert len(problems) == 4 and len(split["validation"]) == 1
    assert "Compute  $3 \\cdot 14$." not in problems
    assert split["train"].features == CANONICAL_FEATURES


# --- prompts --------------------------------------------------------------------------------------------------------


def test_templates():
    assert {"math_single", "code_single"} <= set(prompts.available_templates())
    math = prompts.load_template("math_single")
    assert math.rstrip().endswith("put your final answer within \\boxed{}.")
    assert "```python" in prompts.load_template("code_single.txt")
    assert prompts.load_template("math_single") is math  # cached
    with pytest.raises(ValueError, match=r"Available templates: .*math_single"):
        prompts.load_template("nope")
    with pytest.raises(ValueError, match="Unknown prompt template"):
        prompts.load_template("../data")


def test_render_keeps_latex_braces_and_dollars():
    problem = "Let $f(x) = \\frac{1}{x}$ and $S = \\{1, 2\\}$. Why is {x} or ${problem} or $$ here? {0} {}"
    text = prompts.render("math_single", problem=problem, unused=1)
    assert text.startswith(problem + "\n\n")
    assert text.endswith("\\boxed{}.")
    assert text.count("\\boxed{}") == 1
    with pytest.raises(KeyError, match="problem"):
        prompts.render("math_single")


def test_build_prompt(load):
    row = load("math500", data_files=fixture_files("math500"))[0]
    messages = build_prompt(row)
    assert messages == [{"role": "user", "content": prompts.render("math_single", problem=row["problem"])}]
    assert row["problem"] in messages[0]["content"]
    code_row = load("humaneval", data_files=fixture_files("humaneval"))[0]
    messages = build_prompt(code_row, system_prompt="You are a careful programmer.")
    assert messages[0] == {"role": "system", "content": "You are a careful programmer."}
    assert messages[1]["role"] == "user" and code_row["problem"] in messages[1]["content"]
    assert "```python" in messages[1]["content"] and "\\boxed" not in messages[1]["content"]
    with pytest.raises(ValueError, match="Unknown task"):
        build_prompt({"problem": "x", "task": "chess"})


def test_build_prompt_never_passes_the_gold(monkeypatch):
    seen = {}
    monkeypatch.setattr("ilr.data.render", lambda name, **fields: seen.update(fields) or "text")
    build_prompt({"problem": "p", "answer": "42", "task": "math", "id": "1"})
    assert seen == {"problem": "p", "task": "math", "id": "1"}


def test_add_prompt_column_for_grpo(load):
    trl_data_utils = pytest.importorskip("trl.data_utils")
    ds = add_prompt_column(load("aime", data_files=fixture_files("aime")), system_prompt="Be brief.")
    assert "prompt" in ds.column_names and set(CANONICAL_COLUMNS) <= set(ds.column_names)
    first = ds[0]
    assert first["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert first["problem"] in first["prompt"][1]["content"]
    assert trl_data_utils.is_conversational(first)
    streamed = add_prompt_column(load("aime", data_files=fixture_files("aime"), streaming=True))
    assert next(iter(streamed))["prompt"][0]["role"] == "user"
