"""The offline demo (`recipes/demo/run_demo.py`): the before/after table, the reward curves, and whole runs."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ilr.comparison import build_table, compare_outcomes, format_table, is_compliant, outcomes_from_details
from ilr.curves import read_reward_curves, render_reward_curves
from ilr.machine import choose_threads
from test_trainer import CPU_RUN


REPO = Path(__file__).resolve().parents[1]


DEMO_SCRIPT = REPO / "recipes" / "demo" / "run_demo.py"


def _load_demo_script():
    spec = importlib.util.spec_from_file_location("run_demo", DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the reward pool's forkserver and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


main = _load_demo_script().main
DEMO_DATA = REPO / "recipes" / "demo" / "data"
SMOLLM2 = REPO / "outputs" / "models" / "SmolLM2-135M-Instruct"


def outcomes(values) -> dict[str, float]:
    return {f"q{i}": float(v) for i, v in enumerate(values)}


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extracted", "compliant"),
    [
        ("38", True),
        ("17+21=38", True),
        ("x = 5", True),
        ("1,000", True),
        ("\\frac{3}{4}", True),
        ("38 \\text{ apples}", True),
        ("17+21", False),  # the question's own arithmetic is not an answer
        ("", False),
        (None, False),
        ("c", False),
    ],
)
def test_compliance_is_a_non_empty_numeric_box(extracted, compliant):
    assert is_compliant(extracted) is compliant


def test_outcomes_from_details_records():
    records = [
        {"id": "a", "correct": [True], "extracted": ["12"]},
        {"id": "b", "correct": [False], "extracted": ["13"]},
        {"id": "c", "correct": [False], "extracted": [None]},
    ]
    result = outcomes_from_details(records)
    assert result == {"accuracy": {"a": 1.0, "b": 0.0, "c": 0.0}, "format": {"a": 1.0, "b": 1.0, "c": 0.0}}
    with pytest.raises(ValueError, match="one greedy answer"):
        outcomes_from_details([{"id": "a", "correct": [True, False], "extracted": ["1", "2"]}])


def test_clear_gain_has_an_interval_above_zero():
    rng = np.random.default_rng(0)
    before = rng.random(100) < 0.1
    after = before | (rng.random(100) < 0.5)  # never worse on a question, better on about half
    comparison = compare_outcomes(outcomes(before), outcomes(after), n_resamples=2000)
    assert comparison.n == 100
    assert comparison.before["estimate"] == pytest.approx(before.mean())
    assert comparison.after["estimate"] == pytest.approx(after.mean())
    difference = comparison.difference["difference"]
    assert difference["estimate"] == pytest.approx(after.mean() - before.mean())
    assert 0 < difference["low"] < difference["estimate"] < difference["high"]
    assert comparison.excludes_zero and comparison.gain
    assert comparison.to_dict()["gain"] is True


def test_no_change_and_a_loss_are_not_gains():
    same = outcomes([1, 0] * 20)
    unchanged = compare_outcomes(same, same, n_resamples=500)
    assert unchanged.difference["difference"]["estimate"] == 0.0
    assert not unchanged.excludes_zero and not unchanged.gain

    loss = compare_outcomes(outcomes([1] * 40), outcomes([0] * 40), n_resamples=500)
    assert loss.difference["difference"]["estimate"] == -1.0
    assert loss.excludes_zero and not loss.gain


def test_paired_difference_uses_only_common_questions():
    before = {"q0": 0.0, "q1": 0.0, "q2": 1.0}
    after = {"q0": 1.0, "q1": 1.0, "q3": 1.0}
    comparison = compare_outcomes(before, after, n_resamples=200)
    assert comparison.n == 2
    assert comparison.difference["n_only_a"] == 1 and comparison.difference["n_only_b"] == 1
    assert comparison.before["estimate"] == 0.0 and comparison.after["estimate"] == 1.0


def test_table_has_a_row_per_agent_and_metric():
    before = {"a": {"accuracy": outcomes([0] * 30), "format": outcomes([0, 1] * 15)}}
    before["b"] = before["a"]  # agents that start from the same weights share one evaluation
    after = {
        "a": {"accuracy": outcomes([1] * 30), "format": outcomes([1] * 30)},
        "b": {"accuracy": outcomes([0] * 30), "format": outcomes([0, 1] * 15)},
    }
    table = build_table(before, after, n_resamples=500)
    assert list(table) == ["a", "b"] and list(table["a"]) == ["accuracy", "format"]
    assert table["a"]["accuracy"].gain and not table["b"]["accuracy"].gain
    text = format_table(table)
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("| Agent | Metric | Before (%) [95% CI]")
    assert "| a | accuracy | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] | +100.0 [100.0, 100.0] | yes | 30 |" in text
    assert "| b | format (numeric \\boxed{}) | 50.0 [" in text and text.rstrip().endswith("| no | 30 |")
    with pytest.raises(ValueError, match="No evaluation before training"):
        build_table({}, after)


def test_reward_curves_from_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 2, "ilr/a/share/reward": 0.5, "ilr/a/fuse/reward": None, "ilr/a/share/rewards/format": 1.0},
        {"step": 1, "ilr/a/share/reward": 0.25, "ilr/a/fuse/reward": 0.1, "ilr/b/share/reward": 0.0},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    curves = read_reward_curves(path, ["a", "b"])
    assert curves == {"a": {"share": [(1, 0.25), (2, 0.5)], "fuse": [(1, 0.1)]}, "b": {"share": [(1, 0.0)]}}
    png = render_reward_curves(curves, tmp_path / "curves.png", trained_stages=["share"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("cores", "load", "threads"),
    [(2, 0.1, 2), (2, 0.6, 2), (2, 1.2, 1), (2, 5.0, 1), (16, 3.2, 13), (4, float("nan"), 4)],
)
def test_threads_use_the_idle_cores(cores, load, threads):
    assert choose_threads(cores, load) == threads


def test_held_out_questions_are_never_in_the_training_files():
    def problems(name: str) -> dict[str, str]:
        rows = [json.loads(line) for line in (DEMO_DATA / name).read_text().splitlines()]
        return {row["id"]: row["problem"] for row in rows}

    test = problems("arithmetic_test.jsonl")
    assert len(test) == 100
    for name in ("arithmetic.jsonl", "arithmetic_hinted.jsonl"):
        train = problems(name)
        assert not set(train) & set(test)
        stems = {problem.split("$")[1] for problem in train.values()}
        assert not stems & {problem.split("$")[1] for problem in test.values()}  # no expression shared
    hint = "\\boxed{7}"
    assert not any(hint in problem for problem in test.values())


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------------------
def _tiny_recipe(tmp_path: Path, model_a: str, model_b: str) -> Path:
    recipe = {
        "agents": [
            {"model_name_or_path": model_a, "name": "a", "dtype": "float32"},
            {"model_name_or_path": model_b, "name": "b", "dtype": "float32"},
        ],
        "dataset_name": "arithmetic",
        "data_files": [str(DEMO_DATA / "arithmetic_hinted.jsonl")],
        "question_column": "problem",
        "answer_column": "answer",
        "answer_format": "plain",
        "reward_funcs": ["accuracy", "format"],
        "reward_weights": [1.0, 0.5],
        "interaction_mode": "cooperate",
        "train_stages": ["share"],
        "num_generations": 4,
        "generation_batch_size": 8,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 8,
        "max_analysis_length": 4,
        "peer_max_tokens": 8,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "beta": 0.0,
        "loss_type": "dapo",
        "scale_rewards": "batch",
        "max_steps": 5,
        "logging_steps": 1,
        "save_strategy": "no",
        **CPU_RUN,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _check_outputs(output_dir: Path, agents: list[str], steps: int, questions: int) -> dict:
    results = json.loads((output_dir / "results.json").read_text())
    assert set(results["agents"]) == set(agents) and set(results["accuracy_gain"]) == set(agents)
    assert results["evaluation"]["questions"] == questions
    for agent in agents:
        entry = results["agents"][agent]
        assert set(entry["metrics"]) == {"accuracy", "format"}
        for comparison in entry["metrics"].values():
            assert comparison["n"] == questions
            for key in ("before", "after"):
                assert 0.0 <= comparison[key]["low"] <= comparison[key]["estimate"] <= comparison[key]["high"] <= 1.0
            assert comparison["difference"]["difference"]["method"] == "paired-bootstrap"
        for key in ("base_results", "results"):
            assert (
                json.loads(Path(entry[key]).read_text())["benchmarks"]["arithmetic"]["data"]["n_problems"] == questions
            )
        card = Path(entry["card"]).read_text()
        assert card.startswith("---") and "Δ vs base" in card
        assert (Path(entry["card"]).parent / "eval_chart.png").is_file()
    metrics = [json.loads(line) for line in (output_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == list(range(1, steps + 1))
    assert (output_dir / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (output_dir / "results.md").read_text()
    assert markdown.count("\n| ") == 2 + 2 * len(agents) - 1 and "Wall time" in markdown
    for key in ("before_s", "train_s", "after_s", "total_s"):
        assert results["timing"][key] >= 0
    assert results["machine"]["torch_threads"] >= 1
    return results


# What `make demo --quick` may print at the default verbosity: the line of what runs, a progress bar per evaluation and
# for training, one line per phase, the table with its notes, the files. It printed 656 lines when every INFO record,
# the whole recipe and every generation config reached the console.
CONSOLE_LINE_BUDGET = 40


def terminal_lines(text: str) -> list[str]:
    """The lines a terminal would show: a progress bar redraws its own line (with "\r", or a new line in a pipe), so
    each bar counts once."""
    lines: list[str] = []
    for raw in text.rstrip("\n").split("\n"):
        line = raw.split("\r")[-1]
        bar = re.match(r"(.+?):\s+\d+%\|", line)
        if bar and lines and lines[-1].startswith(bar.group(1) + ":"):
            lines[-1] = line
        else:
            lines.append(line)
    return lines


def test_demo_runs_end_to_end_on_the_tiny_models(tmp_path, tiny_model_a, tiny_model_b):
    recipe = _tiny_recipe(tmp_path, tiny_model_a, tiny_model_b)
    output_dir = tmp_path / "demo"
    argv = ["--config", str(recipe), "--output_dir", str(output_dir), "--quick"]
    argv += ["--max_new_tokens", "8", "--n_resamples", "500", "--threads", "1"]
    # A fresh process, as `make demo DEMO_ARGS=--quick` runs it: libraries that speak when imported speak here too.
    run = subprocess.run(
        [sys.executable, str(DEMO_SCRIPT), *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = _check_outputs(output_dir, ["a", "b"], steps=2, questions=12)
    assert results["training"]["max_steps"] == 2
    # Two different starting models: two evaluations before training, one per agent after.
    assert len(list((output_dir / "before").glob("results_*.json"))) == 2
    assert {path.name for path in (output_dir / "after").iterdir()} == {"a", "b"}

    # The console: within its budget, the table on stdout, no library chatter; the full log and recipe on disk.
    console = terminal_lines(run.stdout + run.stderr)
    assert len(console) <= CONSOLE_LINE_BUDGET, "\n".join(f"{i}: {line!r}" for i, line in enumerate(console))
    assert "| a | accuracy |" in run.stdout and "| b | format (numeric \\boxed{}) |" in run.stdout
    assert run.stderr.startswith("Demo: a, b from ")
    assert "ILR training: 2 models (a=" in run.stderr and "), 2 steps, data arithmetic" in run.stderr
    assert "Done in " in run.stderr and "reward_curves.png" in run.stderr
    for noise in ("GenerationConfig", "Setting accelerator to CPU", "clean_up_tokenization_spaces", "INFO"):
        assert noise not in run.stdout + run.stderr
    log = (output_dir / "demo.log").read_text()
    assert "Generate config" not in log and "ILR training: 2 models" in log and "| a | accuracy |" in log
    assert (output_dir / "train" / "train.log").is_file()
    resolved = yaml.safe_load((output_dir / "train" / "recipe.yaml").read_text())
    assert resolved["max_steps"] == 2 and [agent["name"] for agent in resolved["agents"]] == ["a", "b"]

    # --skip_train re-evaluates the models trained above and rebuilds the table.
    assert main([*argv, "--skip_train"]) == 0
    assert json.loads((output_dir / "results.json").read_text())["training"]["skipped"] is True


def test_skip_train_without_trained_models_says_so(tmp_path, tiny_model_a, tiny_model_b):
    recipe = _tiny_recipe(tmp_path, tiny_model_a, tiny_model_b)
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path / "none"), "--eval_questions", "2"]
    with pytest.raises(FileNotFoundError, match="run without it"):
        main([*argv, "--max_new_tokens", "4", "--n_resamples", "100", "--threads", "1", "--skip_train"])


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="run recipes/demo/prepare_smollm2.py (make train) first")
def test_quick_demo_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names the model and data relative to the repository
    output_dir = tmp_path / "demo"
    assert main(["--quick", "--output_dir", str(output_dir), "--n_resamples", "1000"]) == 0
    _check_outputs(output_dir, ["smollm2-a", "smollm2-b"], steps=2, questions=12)
    # The two agents start from the same weights: one evaluation before training serves both.
    assert len(list((output_dir / "before").glob("results_*.json"))) == 1
