"""Reliability: broken recipes, bad data rows and scoring under load.

- A broken recipe fails in `parse_recipe`, before any model or dataset is loaded (the agents below point at paths that
  do not exist), in well under 5 s, with a `RecipeError` naming the key and the fix; through the CLI it is one line on
  stderr and exit code 2.
- Bad rows of a local data file are skipped with a count in the log, never kept to score a silent 0 or 1, and a file
  with no usable row stops with a `DataError` naming the file and the fix.
- Scoring thousands of maths and code completions keeps memory bounded and uses every core.
"""

import json
import logging
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ilr import cli, rewards, sandbox
from ilr.cards import write_card
from ilr.configs import RecipeError, parse_recipe
from ilr.data import DEFAULT_MAX_QUESTION_CHARS, DataError, load_benchmark, load_custom_dataset
from ilr.evaluate import EvaluationError, format_summary, load_results, run_evaluation
from ilr.machine import available_cores
from ilr.rewards import accuracy_reward, check_golds, get_reward_funcs, score_math, shutdown_reward_pool
from test_evaluate import AnswerBackend, config_for, write_arithmetic


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _pool():
    yield
    shutdown_reward_pool()


# ---------------------------------------------------------------------------------------------------------------------
# Bad recipes
# ---------------------------------------------------------------------------------------------------------------------

# A valid tiny recipe. The agents' folders do not exist: any case that got as far as loading a model would fail with
# another error than the `RecipeError` each case expects.
TINY_RECIPE = {
    "agents": [
        {"model_name_or_path": "/nonexistent/tiny-a", "name": "a"},
        {"model_name_or_path": "/nonexistent/tiny-b", "name": "b"},
    ],
    "dataset_name": "gsm8k",
    "reward_funcs": ["accuracy", "format"],
    "reward_weights": [1.0, 0.5],
    "num_generations": 4,
    "per_device_train_batch_size": 8,
    "max_completion_length": 64,
    "max_steps": 1,
    "output_dir": "outputs/reliability",
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "generation_backend": "transformers",
}
# A message states the fix: one of these words (case-insensitive).
FIX_WORDS = re.compile(r"\b(set|use|remove|rename|add|give|install|write|fix)\b|did you mean", re.IGNORECASE)


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


NEEDS_NO_GPU = pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
AGENT_A, AGENT_B = TINY_RECIPE["agents"]


def _case(case_id: str, overrides: dict, key: str, also: str | None = None, marks=()):
    """One broken recipe: TINY_RECIPE with `overrides` (a `None` value deletes the key); `key` must be named."""
    return pytest.param(overrides, key, also, id=case_id, marks=marks)


BROKEN_RECIPES = [
    _case("unknown-key", {"num_generaions": 4}, "num_generaions", also=r"did you mean `num_generations`"),
    _case(
        "unknown-agent-key",
        {"agents": [{"model_name_or_path": "/nonexistent/a", "lora_rank": 8}, "/nonexistent/b"]},
        "lora_rank",
        also=r"Did you mean `lora_r`",
    ),
    _case("wrong-type-int", {"num_generations": "eight"}, "num_generations", also="integer"),
    _case("wrong-type-float-for-int", {"max_steps": 2.5}, "max_steps", also="integer"),
    _case("wrong-type-bool", {"calibration": "maybe"}, "calibration"),
    _case("list-for-a-number", {"learning_rate": [1, 2]}, "learning_rate"),
    _case("agents-not-a-list", {"agents": {"model_name_or_path": "/nonexistent/a"}}, "agents"),
    _case("num-generations-zero", {"num_generations": 0}, "num_generations"),
    _case("num-generations-one", {"num_generations": 1, "per_device_train_batch_size": 4}, "num_generations"),
    _case("batch-size-zero", {"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    _case("batch-size-negative", {"per_device_train_batch_size": -1}, "per_device_train_batch_size"),
    _case("grad-accumulation-zero", {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    _case("max-completion-length-zero", {"max_completion_length": 0}, "max_completion_length"),
    _case("learning-rate-negative", {"learning_rate": -1e-6}, "learning_rate"),
    _case("no-training-length", {"max_steps": 0, "num_train_epochs": 0}, "max_steps"),
    _case("group-does-not-divide-batch", {"num_generations": 3}, "num_generations", also=r"\[2, 4, 8\]"),
    _case("generation-batch-not-divisible", {"generation_batch_size": 6}, "num_generations"),
    _case("no-agents", {"agents": None}, "agents"),
    _case(
        "agent-without-model",
        {"agents": [{"name": "a"}, {"model_name_or_path": "/nonexistent/b"}]},
        "model_name_or_path",
    ),
    _case("one-agent-for-ilr", {"agents": ["/nonexistent/a"]}, "method"),
    _case(
        "duplicate-hub-model-id",
        {
            "agents": [
                {"model_name_or_path": "/nonexistent/a", "hub_model_id": "org/same"},
                {"model_name_or_path": "/nonexistent/b", "hub_model_id": "org/same"},
            ]
        },
        "hub_model_id",
    ),
    _case("duplicate-name", {"agents": ["/nonexistent/x/m", "/nonexistent/y/m"]}, "name"),
    _case("unknown-benchmark", {"dataset_name": "gsm8"}, "dataset_name", also=r"Did you mean `gsm8k`"),
    _case("unknown-answer-format", {"answer_format": "latex"}, "answer_format"),
    _case("unknown-reward", {"reward_funcs": ["accuracy", "acuracy"]}, "reward_funcs", also="Did you mean `accuracy`"),
    _case("reward-weights-length", {"reward_weights": [1.0]}, "reward_weights"),
    _case(
        "vllm-without-vllm",
        {"generation_backend": "vllm"},
        "generation_backend",
        also=r"pip install",
        marks=pytest.mark.skipif(_vllm_installed(), reason="vllm is installed"),
    ),
    _case("use-vllm-instead-of-backend", {"use_vllm": True}, "generation_backend"),
    _case(
        "train-stages-misspelled", {"train_stages": ["share", "fusion"]}, "train_stages", also="Did you mean `fuse`"
    ),
    _case("analyse-without-a-group", {"train_stages": ["analyse"]}, "analysis_samples"),
    _case("interaction-mode-unknown", {"interaction_mode": "cooperative"}, "interaction_mode"),
    _case("interaction-ratio-above-one", {"interaction_mode": "ratio:1.5"}, "interaction_mode"),
    _case("interaction-ratio-negative", {"interaction_mode": "ratio:-0.1"}, "interaction_mode"),
    _case("calibration-scope-invalid", {"calibration_scope": "global"}, "calibration_scope"),
    _case("difficulty-source-invalid", {"difficulty_source": "elo"}, "difficulty_source"),
    _case("temperature-zero", {"temperature": 0.0}, "temperature"),
    _case("temperature-negative", {"temperature": -0.5}, "temperature"),
    _case("top-p-above-one", {"top_p": 1.5}, "top_p"),
    _case("epsilon-negative", {"epsilon": -0.2}, "epsilon"),
    _case("beta-negative", {"beta": -0.1}, "beta"),
    _case("loss-type-unknown", {"loss_type": "ppo"}, "loss_type"),
    _case("method-unknown", {"method": "ppo"}, "method"),
    _case("code-reward-without-opt-in", {"reward_funcs": ["code"], "reward_weights": None}, "allow_code_execution"),
    _case("data-files-missing", {"data_files": ["/nonexistent/train.jsonl"]}, "data_files"),
    # Per-agent fields are range-checked like their global twins, and parse whatever their first character.
    _case("agent-lora-r-negative", {"agents": [{**AGENT_A, "use_peft": True, "lora_r": -8}, AGENT_B]}, "lora_r"),
    _case("agent-lora-alpha-zero", {"agents": [{**AGENT_A, "lora_alpha": 0}, AGENT_B]}, "lora_alpha"),
    _case(
        "agent-lora-dropout-above-one",
        {"agents": [{**AGENT_A, "use_peft": True, "lora_dropout": 1.5}, AGENT_B]},
        "lora_dropout",
        also=r"in \[0, 1\)",
    ),
    _case(
        "agent-learning-rate-negative",
        {"agents": [{**AGENT_A, "learning_rate": -1e-6}, AGENT_B]},
        "learning_rate",
        also=r"agents\[0\].*>= 0 \(got -1e-06\)",
    ),
    _case(
        "agent-name-starting-with-dash",
        {"agents": [{**AGENT_A, "name": "-a"}, AGENT_B]},
        "name",
        also="must start with a letter or digit",
    ),
    _case("agent-name-dot-dot", {"agents": [{**AGENT_A, "name": ".."}, AGENT_B]}, "name"),
    _case("agent-dtype-unknown", {"agents": [{**AGENT_A, "dtype": "float8"}, AGENT_B]}, "dtype", also="bfloat16"),
    _case(
        "agent-lora-r-not-a-number", {"agents": [{**AGENT_A, "lora_r": "-eight"}, AGENT_B]}, "lora_r", also="integer"
    ),
    _case(
        "agent-4bit-and-8bit",
        {"agents": [{**AGENT_A, "load_in_4bit": True, "load_in_8bit": True}, AGENT_B]},
        "load_in_8bit",
        also="load_in_4bit",
    ),
    _case(
        "agent-port-out-of-range", {"agents": [{**AGENT_A, "vllm_server_port": 70000}, AGENT_B]}, "vllm_server_port"
    ),
    _case("agent-quant-type-unknown", {"agents": [{**AGENT_A, "bnb_4bit_quant_type": "int4"}, AGENT_B]}, "bnb_4bit"),
    _case("agents-a-string", {"agents": "abc"}, "agents", also=r"must be a list of agents \(got str 'abc'\)"),
    _case("warmup-steps-negative", {"warmup_steps": -0.03}, "warmup_steps", also=r">= 0 \(got -0.03\)"),
    _case(
        "save-steps-zero-in-the-grpo-baseline",
        {"method": "grpo", "agents": [AGENT_A], "save_steps": 0},
        "save_steps",
        also="save_strategy: no",
    ),
    # Hardware settings: refused where this machine lacks the hardware (`ilr check` notes them instead, see below).
    _case("bf16-without-a-gpu", {"bf16": True, "use_cpu": False}, "bf16", also="ilr check", marks=NEEDS_NO_GPU),
    _case("tf32-without-ampere", {"tf32": True}, "tf32", marks=NEEDS_NO_GPU),
    _case(
        "agent-4bit-without-cuda",
        {"agents": [{**AGENT_A, "load_in_4bit": True}, AGENT_B]},
        "load_in_4bit",
        marks=NEEDS_NO_GPU,
    ),
]


def write_recipe(tmp_path: Path, overrides: dict | None = None, name: str = "recipe.yaml") -> str:
    recipe = {**TINY_RECIPE, **(overrides or {})}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({key: value for key, value in recipe.items() if value is not None}))
    return str(path)


def test_tiny_recipe_is_valid(tmp_path):
    # Each broken recipe below differs from this one only by its overrides.
    script_args, agents_args, training_args = parse_recipe(["--config", write_recipe(tmp_path)])
    assert [agent.name for agent in agents_args.agents] == ["a", "b"]
    assert script_args.dataset_name == "gsm8k" and training_args.num_generations == 4


def test_there_are_enough_broken_recipes():
    assert len(BROKEN_RECIPES) >= 20


@pytest.mark.parametrize(("overrides", "key", "also"), BROKEN_RECIPES)
def test_broken_recipe_fails_early_naming_key_and_fix(tmp_path, overrides, key, also):
    config = write_recipe(tmp_path, overrides)
    with pytest.raises(RecipeError) as error_info:
        parse_recipe(["--config", config])
    message = str(error_info.value)
    assert key in message, message
    assert FIX_WORDS.search(message), f"no fix in: {message}"
    if also:
        assert re.search(also, message), message


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"save_steps": 0}, "`save_steps: 0` saves a checkpoint only at the end of training"),
        ({"logging_steps": -1}, "`logging_steps: -1` logs metrics only at the last step"),
        ({"max_grad_norm": -1}, "`max_grad_norm: -1` turns gradient clipping off"),
    ],
)
def test_values_with_a_special_meaning_are_accepted_with_a_one_line_warning(tmp_path, caplog, overrides, warning):
    with caplog.at_level(logging.WARNING, logger="ilr.configs"):
        training_args = parse_recipe(["--config", write_recipe(tmp_path, overrides)])[2]
    (key, value), *_ = overrides.items()
    assert getattr(training_args, key) == value
    messages = [record.getMessage() for record in caplog.records if record.name == "ilr.configs"]
    assert len(messages) == 1 and messages[0].startswith(warning) and "\n" not in messages[0], messages
    with caplog.at_level(logging.WARNING, logger="ilr.configs"):
        caplog.clear()
        parse_recipe(["--config", write_recipe(tmp_path)])
    assert not [record for record in caplog.records if record.name == "ilr.configs"]


def test_agent_values_starting_with_a_dash_parse(tmp_path):
    agents = [{**AGENT_A, "chat_template": "-{{ messages }}", "model_revision": "-rc1"}, AGENT_B]
    agent = parse_recipe(["--config", write_recipe(tmp_path, {"agents": agents})])[1].agents[0]
    assert (agent.chat_template, agent.model_revision) == ("-{{ messages }}", "-rc1")


@NEEDS_NO_GPU
def test_check_validates_a_gpu_recipe_on_this_cpu_machine_with_notes(tmp_path):
    """The README's example recipe (bf16, no `use_cpu`) is checked for its GPU machine: notes, not errors."""
    recipe = REPO / "recipes" / "Llama-3.1-8B-Instruct_Qwen2.5-7B-Instruct" / "ilr" / "config_group1.yaml"
    result = subprocess.run(
        [*_ilr_command(), "check", "--config", str(recipe)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "Recipe OK: method=ilr, 2 agent(s)" in result.stdout
    assert "note: `bf16: true` will need a GPU with bf16 support; not checked on this machine." in result.stdout
    if not _vllm_installed():
        backend = yaml.safe_load(recipe.read_text())["generation_backend"]
        assert f"note: `generation_backend: {backend}` will need vLLM" in result.stdout
    # The same recipe with a value error still fails, naming the key.
    result = subprocess.run(
        [*_ilr_command(), "check", "--config", str(recipe), "--generation_backend", "transformers", "--top_p", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "`top_p` must be in (0, 1]" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "recipe", sorted(REPO.glob("recipes/**/config_*.yaml")), ids=lambda path: str(path.relative_to(REPO / "recipes"))
)
def test_every_shipped_recipe_checks_for_its_machine(recipe):
    notes: list[str] = []
    _, agents_args, training_args = parse_recipe(["--config", str(recipe)], hardware_notes=notes)
    assert len(agents_args.agents) == 1 if training_args.method == "grpo" else len(agents_args.agents) >= 2
    assert all(note.endswith(("not checked on this machine.", "not installed here.")) for note in notes), notes


@NEEDS_NO_GPU
def test_check_notes_every_hardware_setting_and_keeps_checking_the_rest(tmp_path):
    agents = [{**AGENT_A, "load_in_4bit": True}, AGENT_B]
    recipe = write_recipe(tmp_path, {"agents": agents, "bf16": True, "use_cpu": False, "tf32": True})
    notes: list[str] = []
    parse_recipe(["--config", recipe], hardware_notes=notes)
    assert notes == [
        "agent a: `load_in_4bit: true` will need a CUDA GPU; not checked on this machine.",
        "`bf16: true` will need a GPU with bf16 support; not checked on this machine.",
        "`tf32: true` will need an NVIDIA Ampere (or newer) GPU; not checked on this machine.",
    ]
    recipe = write_recipe(tmp_path, {"bf16": True, "use_cpu": False, "num_generations": 0})
    with pytest.raises(RecipeError, match="num_generations"):
        parse_recipe(["--config", recipe], hardware_notes=[])


def test_invalid_yaml_is_a_recipe_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("num_generations: [4\nmax_steps: 1\n")
    with pytest.raises(RecipeError, match=r"`--config` file is not valid YAML.*line 1.*Fix the syntax"):
        parse_recipe(["--config", str(path)])


def _ilr_command() -> list[str]:
    script = Path(sys.executable).with_name("ilr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ilr.cli"]


@pytest.mark.parametrize(
    ("command", "overrides", "key"),
    [
        pytest.param("check", {"temperature": 0.0}, "temperature", id="check-temperature-zero"),
        pytest.param(
            "train",
            {
                "agents": [
                    {"model_name_or_path": "/nonexistent/a", "hub_model_id": "org/same"},
                    {"model_name_or_path": "/nonexistent/b", "hub_model_id": "org/same"},
                ]
            },
            "hub_model_id",
            id="train-duplicate-hub-model-id",
        ),
        pytest.param("check", "not: valid: yaml: [", "YAML", id="check-invalid-yaml"),
        pytest.param(
            "train",
            {"dataset_name": "toy", "data_files": ["garbage.jsonl"], "question_column": "q", "answer_column": "a"},
            "garbage.jsonl",
            id="train-no-usable-rows",
        ),
    ],
)
def test_cli_reports_a_broken_recipe_in_one_line(tmp_path, command, overrides, key):
    if isinstance(overrides, str):
        config = tmp_path / "recipe.yaml"
        config.write_text(overrides)
    else:
        config = write_recipe(tmp_path, overrides)
    (tmp_path / "garbage.jsonl").write_bytes(b'{"q": "", "a": "1"}\n\xff\xfe not utf-8\n{"q": "What?", "a": ""}\n')
    result = subprocess.run(
        [*_ilr_command(), command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # Progress bars of the data loading (datasets' `Map`) may come first; the error itself is one line.
    lines = [line for line in result.stderr.splitlines() if line.strip() and "examples/s]" not in line]
    # Warnings a person needs may come first (here: the file's unreadable line); the error itself is one line.
    errors = [line for line in lines if not line.startswith("WARNING ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"ilr {command}: error: ") and key in errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------------------------


def json_line(row: dict) -> bytes:
    return (json.dumps(row) + "\n").encode()


GOOD_GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
]


def write_bad_gsm8k(path: Path) -> str:
    """Two good rows among one of each kind of bad line or row, in GSM8K's raw schema."""
    lines = [
        json_line(GOOD_GSM8K[0]),
        b"\n",  # blank line
        b"   \n",  # whitespace only
        b'{"question": "caf\xe9 au lait costs 2 dollars?", "answer": "#### 2"}\n',  # Latin-1, not UTF-8
        b'{"question": "truncated line", "answer": "#### 3"\n',  # not JSON
        b'["a", "list"]\n',  # not an object
        json_line({"question": "No answer field at all?"}),
        json_line({"question": "Empty answer?", "answer": ""}),
        json_line({"question": "No #### marker?", "answer": "the answer is 5"}),
        json_line({"question": "", "answer": "#### 9"}),
        json_line({"question": "x" * 200_000, "answer": "#### 1"}),
        json_line(GOOD_GSM8K[1]),
    ]
    path.write_bytes(b"".join(lines))
    return str(path)


def test_bad_lines_and_rows_are_skipped_with_counts(tmp_path, caplog):
    files = write_bad_gsm8k(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING, logger="ilr.data"):
        ds = load_benchmark("gsm8k", data_files=files)
    assert ds["answer"] == ["7", "42"]
    assert [row["problem"] for row in ds] == [row["question"] for row in GOOD_GSM8K]
    assert (
        f"{files}: skipped 5 of 12 lines (2 blank, 1 not UTF-8, 1 not valid JSON, 1 not a JSON object)" in caplog.text
    )
    assert "gsm8k: dropped 5 of 7 rows" in caplog.text
    assert "3 without a usable gold" in caplog.text
    assert "1 with an empty question" in caplog.text
    assert f"1 with a question over `max_question_chars` ({DEFAULT_MAX_QUESTION_CHARS} characters" in caplog.text
    # Every kept row can be scored: a right answer gets 1.0 and a wrong one 0.0, never a `None`.
    right = accuracy_reward([f"\\boxed{{{gold}}}" for gold in ds["answer"]], answer=ds["answer"])
    wrong = accuracy_reward(["\\boxed{-1}"] * len(ds), answer=ds["answer"])
    assert (right, wrong) == ([1.0, 1.0], [0.0, 0.0])


def test_bad_rows_are_skipped_when_streaming_too(tmp_path, caplog):
    files = write_bad_gsm8k(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING, logger="ilr.data"):
        rows = list(load_benchmark("gsm8k", data_files=files, streaming=True))
    assert [row["answer"] for row in rows] == ["7", "42"]
    assert "skipped 5 of 12 lines" in caplog.text
    assert caplog.text.count("gsm8k: dropped row") == 5
    assert "with an empty question (4 so far)" in caplog.text


def test_max_question_chars_can_be_raised_or_turned_off(tmp_path):
    rows = [{"question": "x" * 200_000, "answer": "#### 1"}, GOOD_GSM8K[0]]
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"".join(json_line(row) for row in rows))
    assert len(load_benchmark("gsm8k", data_files=str(path))) == 1
    assert len(load_benchmark("gsm8k", data_files=str(path), max_question_chars=None)) == 2
    assert len(load_benchmark("gsm8k", data_files=str(path), max_question_chars=300_000)) == 2


def test_unparsable_math_golds_are_dropped_with_a_count(tmp_path, caplog):
    rows = [
        {"q": "Half of one?", "a": "\\frac{1}{2}"},
        {"q": "Broken LaTeX gold", "a": "\\frac{"},
        {"q": "Garbage gold", "a": "@@##!!"},
        {"q": "A numeric column value", "a": 12},
        {"q": "An interval", "a": "(-\\infty, 2]"},
        {"q": "Missing gold"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b"".join(json_line(row) for row in rows))
    with caplog.at_level(logging.WARNING, logger="ilr.data"):
        ds = load_custom_dataset(str(path), question_column="q", answer_column="a")
    assert ds["answer"] == ["\\frac{1}{2}", "12", "(-\\infty, 2]"]
    assert "mine: dropped 3 of 6 rows" in caplog.text
    assert "2 whose gold math-verify cannot parse, e.g. '\\\\frac{'" in caplog.text
    assert "1 without a usable gold" in caplog.text
    assert None not in accuracy_reward([f"\\boxed{{{gold}}}" for gold in ds["answer"]], answer=ds["answer"])
    # Turning the check off keeps them (and they would score `None`).
    assert len(load_custom_dataset(str(path), question_column="q", answer_column="a", verify_golds=False)) == 5


def test_a_file_without_a_usable_row_names_the_file_and_the_fix(tmp_path):
    undecodable = tmp_path / "latin1.jsonl"
    undecodable.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(undecodable))}.*one JSON object per line, UTF-8"):
        load_benchmark("gsm8k", data_files=str(undecodable))

    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_bytes(b"".join(json_line({"question": "q", "answer": "no marker"}) for _ in range(3)))
    with pytest.raises(DataError) as error_info:
        load_benchmark("gsm8k", data_files=str(no_gold))
    message = str(error_info.value)
    assert str(no_gold) in message and "3 without a usable gold" in message
    assert "`answer` written as `gsm8k`" in message and "set `question_column`" in message

    bad_golds = tmp_path / "bad_golds.jsonl"
    bad_golds.write_bytes(json_line({"q": "q1", "a": "\\frac{"}) + json_line({"q": "q2", "a": "@@"}))
    with pytest.raises(DataError, match=r"bad_golds.jsonl is usable \(2 whose gold math-verify cannot parse"):
        load_custom_dataset(str(bad_golds), question_column="q", answer_column="a")


def test_a_column_of_mixed_kinds_names_the_column(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(json_line({"question": "q", "answer": "#### 1"}) + json_line({"question": ["q"], "answer": "#"}))
    with pytest.raises(DataError, match=r"column `question` mixes values"):
        load_benchmark("gsm8k", data_files=str(path))


def test_check_golds():
    assert check_golds(["5", "\\frac{", "", "x+1", None, "@@##!!", "5"]) == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]


def test_a_reward_on_an_unparsable_gold_is_none_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="ilr.rewards"):
        assert score_math(["\\boxed{5}", "\\boxed{5}", "\\boxed{4}"], ["\\frac{", "5", "5"]) == [None, 1.0, 0.0]
    assert "score_math: 1 golds math-verify cannot parse, e.g. '\\\\frac{'; scored None." in caplog.text
    logged = {}
    accuracy_reward(["\\boxed{5}", "\\boxed{5}"], answer=["\\frac{", "5"], log_metric=logged.__setitem__)
    assert logged == {"accuracy_reward/unscored": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# Bad benchmark files and results files
# ---------------------------------------------------------------------------------------------------------------------


def write_arithmetic_with_bad_lines(path: Path) -> Path:
    """Six gsm8k-schema problems, one line that is not JSON and one that is not UTF-8."""
    lines = [json_line({"question": f"What is {i} + {2 * i}?", "answer": f"#### {3 * i}"}) for i in range(6)]
    lines[2:2] = [
        b'{"question": "What is 1 + 1?", "answer": "#### 2"\n',
        b'{"question": "caf\xe9", "answer": "#### 1"}\n',
    ]
    path.write_bytes(b"".join(lines) + b"\n")  # a trailing blank line is harmless
    return path


def test_evaluate_refuses_a_benchmark_file_with_unreadable_lines(tmp_path):
    data = write_arithmetic_with_bad_lines(tmp_path / "arith.jsonl")
    backend = AnswerBackend("fake")
    with pytest.raises(EvaluationError) as error_info:
        run_evaluation(config_for(tmp_path, data), backends=[backend])
    message = str(error_info.value)
    assert f"2 of 9 lines of {data} cannot be read (1 not valid JSON, 1 not UTF-8)" in message
    assert "`--skip_bad_lines`" in message
    assert backend.questions == [] and not (tmp_path / "out").exists()  # nothing generated, nothing written


def test_skipped_lines_are_recorded_in_the_results_and_shown_in_the_card(tmp_path):
    data = write_arithmetic_with_bad_lines(tmp_path / "arith.jsonl")
    results = run_evaluation(config_for(tmp_path, data, skip_bad_lines=True), backends=[AnswerBackend("fake")])
    entry = results["fake"]["benchmarks"]["gsm8k"]
    assert (entry["data"]["n_problems"], entry["data"]["n_skipped_lines"]) == (6, 2)
    assert "(n=6, 2 unreadable lines skipped)" in format_summary(results["fake"])
    files = write_card(tmp_path / "out" / "results_fake.json", tmp_path / "card")
    card = files["README.md"].read_text()
    assert "**Unreadable data lines were skipped** (GSM8K: 2 lines; `--skip_bad_lines`)" in card

    clean = write_arithmetic(tmp_path / "clean.jsonl", 6)
    results = run_evaluation(
        config_for(tmp_path, clean, output_dir=str(tmp_path / "clean")), backends=[AnswerBackend("fake")]
    )
    assert results["fake"]["benchmarks"]["gsm8k"]["data"]["n_skipped_lines"] == 0
    files = write_card(tmp_path / "clean" / "results_fake.json", tmp_path / "clean_card")
    assert "Unreadable data lines" not in files["README.md"].read_text()


def test_evaluate_cli_stops_on_unreadable_lines_before_loading_a_model(tmp_path):
    data = write_arithmetic_with_bad_lines(tmp_path / "arith.jsonl")
    flags = ["--model", "/nonexistent/model", "--benchmarks", "gsm8k", "--data_files", f"gsm8k={data}"]
    result = subprocess.run(
        [*_ilr_command(), "evaluate", *flags, "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ilr evaluate: error: gsm8k: 2 of 9 lines"), result.stderr


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    """A valid results file of the fake agent on six gsm8k-schema problems."""
    root = tmp_path_factory.mktemp("results")
    data = write_arithmetic(root / "arith.jsonl", 6)
    run_evaluation(config_for(root, data, k=[2], num_samples=2, temperature=0.7), backends=[AnswerBackend("fake")])
    return root / "out" / "results_fake.json"


def _set(results: dict, path: str, value) -> dict:
    """`results` with the field at dotted `path` set to `value` (`DELETE` removes it)."""
    *parents, last = path.split(".")
    node = results
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return results


DELETE = object()
# (case, how a valid results file is broken (see `_broken_results`), what the one-line error must say)
BROKEN_RESULTS = [
    (
        "schema-version-text",
        ("file", {"schema_version": "abc", "benchmarks": {}}),
        "`schema_version` must be an integer",
    ),
    ("schema-version-zero", {"schema_version": 0}, "`schema_version` must be between 1 and 1"),
    ("schema-version-newer", {"schema_version": 2}, "newer than this ilr (1): upgrade ilr"),
    ("no-model", ("file", {"schema_version": 1, "benchmarks": {}}), "`model` is missing"),
    ("not-an-object", ("file", [1, 2]), "not an `ilr evaluate` results file"),
    ("metrics-a-number", {"benchmarks.gsm8k.metrics": 3}, "`benchmarks.gsm8k.metrics` must be an object (got 3)"),
    ("no-accuracy", {"benchmarks.gsm8k.metrics.accuracy": DELETE}, "`benchmarks.gsm8k.metrics.accuracy` is missing"),
    (
        "estimate-text",
        {"benchmarks.gsm8k.metrics.accuracy.estimate": "50%"},
        "`benchmarks.gsm8k.metrics.accuracy.estimate` must be a number",
    ),
    (
        "pass-at-k-not-an-interval",
        {"benchmarks.gsm8k.metrics.pass@2": [0.5]},
        "`benchmarks.gsm8k.metrics.pass@2` must be an object",
    ),
    ("benchmarks-a-list", {"benchmarks": []}, "`benchmarks` must be an object"),
    (
        "no-problem-count",
        {"benchmarks.gsm8k.data.n_problems": DELETE},
        "`benchmarks.gsm8k.data.n_problems` is missing",
    ),
    (
        "per-problem-ids-text",
        {"benchmarks.gsm8k.per_problem.ids": "0,1"},
        "`benchmarks.gsm8k.per_problem.ids` must be a list",
    ),
    ("model-name-null", {"model.name": None}, "`model.name` must be a string (got None)"),
    ("protocol-missing", {"protocol": DELETE}, "`protocol` is missing"),
    ("sampling-k-text", {"sampling.k": "2"}, "`sampling.k` must be a list of an integer or null"),
    ("average-a-number", {"average": 0.5}, "`average` must be null or an object"),
    ("seed-a-bool", {"seed": True}, "`seed` must be an integer (got True)"),
]


def _broken_results(results_file: Path, tmp_path: Path, change: dict | tuple) -> Path:
    """A copy of `results_file` with `change` ({dotted field: value}), or `("file", value)`: the whole file."""
    if isinstance(change, tuple):
        results = change[1]
    else:
        results = json.loads(results_file.read_text())
        for key, value in change.items():
            _set(results, key, value)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(results))
    return path


def test_the_results_file_is_valid(results_file):
    assert load_results(results_file)["benchmarks"]["gsm8k"]["metrics"]["pass@2"]["estimate"] >= 0


@pytest.mark.parametrize("command", ["compare", "card", "evaluate-baseline"])
@pytest.mark.parametrize(("change", "field"), [pytest.param(c, f, id=i) for i, c, f in BROKEN_RESULTS])
def test_every_command_reading_a_results_file_reports_a_broken_one_in_one_line(
    results_file, tmp_path, capsys, command, change, field
):
    broken = str(_broken_results(results_file, tmp_path, change))
    argv = {
        "compare": ["compare", str(results_file), broken],
        "card": ["card", broken, "--output_dir", str(tmp_path / "card")],
        "evaluate-baseline": ["evaluate", "--model", "/nonexistent/m", "--benchmarks", "gsm8k", "--baseline", broken],
    }[command]
    assert cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    name = command.split("-")[0]
    assert lines[0].startswith(f"ilr {name}: error: {broken} ") and field in lines[0], lines[0]
    assert not (tmp_path / "card").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------------

GIB = 1 << 30


def _tree_rss_bytes() -> int:
    """Resident memory of this process and all its descendants, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {os.getpid()}, {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as file:
                total += int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


class _PeakTreeRss:
    """Samples the process tree's resident memory in a thread while the block runs; `peak` is the highest sum seen."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_PeakTreeRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _math_load(n: int) -> tuple[list[str], list[str], list[float]]:
    """`n` distinct completions over golds of three kinds (integers, fractions, expressions); every fourth is wrong."""
    completions, golds, expected = [], [], []
    for i in range(n):
        kind = i % 3
        gold = (str(i), f"\\frac{{{i}}}{{{i + 7}}}", f"{i}x+1")[kind]
        right = i % 4 != 0
        answer = gold if right else (str(i + 1), f"\\frac{{{i + 1}}}{{{i + 7}}}", f"{i + 1}x+1")[kind]
        completions.append(f"Let me work it out step by step for case {i}... so the answer is \\boxed{{{answer}}}.")
        golds.append(gold)
        expected.append(1.0 if right else 0.0)
    return completions, golds, expected


def _code_load(n: int) -> tuple[list[str], list[list[str]], list[float]]:
    """`n` distinct programs: a correct one, a half-correct one, and one without a fenced block, in turn."""
    completions, tests, expected = [], [], []
    for i in range(n):
        kind = i % 3
        body = ("a + b", f"a + b if a < {i % 5 + 2} else 0", "a + b")[kind]
        program = f"def add(a, b):\n    # variant {i}\n    return {body}\n"
        completions.append(f"Here it is:\n```python\n{program}```\n" if kind != 2 else program)
        tests.append([f"assert add(1, {i % 3}) == {1 + i % 3}", f"assert add({i % 5 + 2}, 1) == {i % 5 + 3}"])
        expected.append((1.0, 0.5, 0.0)[kind])
    return completions, tests, expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox and /proc need Linux")
@pytest.mark.skipif(available_cores() < 2, reason="needs at least 2 cores")
@pytest.mark.parametrize(
    ("n_math", "n_code"),
    [pytest.param(2_000, 64, id="short"), pytest.param(10_000, 1_000, marks=pytest.mark.slow, id="full")],
)
def test_scoring_under_load_is_bounded_and_uses_every_core(monkeypatch, n_math, n_code):
    shutdown_reward_pool()  # a fresh pool: every worker must take part in this batch
    completions, golds, expected = _math_load(n_math)
    with _PeakTreeRss() as math_memory:
        start = time.perf_counter()
        # A generous per-answer limit: a verdict lost to a slow, loaded machine would read as a wrong score.
        details = rewards._score_math_detailed(completions, golds, max_workers=None, timeout_s=60.0)
        math_s = time.perf_counter() - start
    assert [value for _, value, _ in details] == expected
    math_pids = {pid for _, _, pid in details}
    assert os.getpid() not in math_pids and len(math_pids) == available_cores()

    # Record how many sandboxes run at once: the batch must keep one per core busy.
    running, peak_running, lock = [0], [0], threading.Lock()
    execute = sandbox._execute

    def counting_execute(*args, **kwargs):
        with lock:
            running[0] += 1
            peak_running[0] = max(peak_running[0], running[0])
        try:
            return execute(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(sandbox, "_execute", counting_execute)
    monkeypatch.delenv(sandbox.ALLOW_ENV_VAR, raising=False)
    (code_fn,) = get_reward_funcs(["code"], allow_code_execution=True)  # the recipe's opt-in
    programs, tests, code_expected = _code_load(n_code)
    with _PeakTreeRss() as code_memory:
        start = time.perf_counter()
        code_rewards = code_fn(programs, tests=tests, task=["code"] * n_code)
        code_s = time.perf_counter() - start
    assert code_rewards == code_expected
    assert peak_running[0] == min(os.cpu_count() or 1, sum(1 for kind in range(n_code) if kind % 3 != 2))

    shutdown_reward_pool()  # reap the workers, so RUSAGE_CHILDREN covers them
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(
        f"\nmath: {n_math} completions in {math_s:.1f} s = {n_math / math_s:.0f}/s on {len(math_pids)} workers; "
        f"code: {n_code} completions in {code_s:.1f} s = {n_code / code_s:.1f}/s, {peak_running[0]} sandboxes at "
        f"once; peak RSS: process tree {max(math_memory.peak, code_memory.peak) / 2**20:.0f} MiB, this process "
        f"{self_peak / 2**20:.0f} MiB, largest child {child_peak / 2**20:.0f} MiB"
    )
    assert max(math_memory.peak, code_memory.peak) < 2 * GIB
    assert self_peak < 2 * GIB and child_peak < 2 * GIB
