"""`ilr study`: the arms' recipes, the table's statistics on hand-checkable inputs, and a whole study on the tiny models
(real training and evaluation subprocesses, real files) that skips its finished runs when run again."""

import json
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from ilr.cli import main as cli_main
from ilr.lifetime import start_child, stop_child
from ilr.study import (
    ARMS,
    DONE_NAME,
    StudyConfigError,
    baseline_agents,
    format_study_table,
    load_study_config,
    plan_runs,
    run_recipe,
    run_study,
    summarize_study,
)
from ilr.testing import descendants_of, list_processes, wait_until_gone
from test_demo import _tiny_recipe as demo_tiny_recipe


REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "demo" / "data"


def _write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def _tiny_recipe(tmp_path: Path, model: str) -> Path:
    """The demo test's tiny recipe with both agents from the same model (one GRPO run per seed, one evaluation before
    training), both stages trained, and one step."""
    path = demo_tiny_recipe(tmp_path, model, model)
    recipe = yaml.safe_load(path.read_text())
    recipe.update(
        method="ilr",
        interaction_mode="dynamic",
        train_stages=["share", "fuse"],
        generation_batch_size=4,
        per_device_train_batch_size=4,
        max_completion_length=4,
        max_steps=1,
        push_to_hub=False,
    )
    return _write(path, recipe)


def _study_config(tmp_path: Path, recipe: Path, arms: list[str], **extra) -> Path:
    return _write(
        tmp_path / "study.yaml",
        {
            "recipe": str(recipe),
            "output_dir": str(tmp_path / "study"),
            "arms": arms,
            "seeds": [0],
            "threads": 1,
            "n_resamples": 200,
            "evaluation": {
                "local_benchmarks": [
                    {"data_files": str(DEMO_DATA / "arithmetic_test.jsonl"), "name": "arithmetic", "id_column": "id"}
                ],
                "limit": 3,
                "max_new_tokens": 4,
                "batch_size": 3,
            },
            **extra,
        },
    )


# ---------------------------------------------------------------------------------------------------------------------
# Config, plan and recipes
# ---------------------------------------------------------------------------------------------------------------------
AGENTS = [
    {"model_name_or_path": "m1", "name": "a", "dtype": "float32"},
    {"model_name_or_path": "m1", "name": "b", "dtype": "float32"},
    {"model_name_or_path": "m2", "name": "c", "dtype": "float32"},
]


def test_agents_with_the_same_starting_model_share_one_grpo_run(tmp_path):
    assert baseline_agents(AGENTS) == {"a": "a", "b": "a", "c": "c"}
    recipe = _write(tmp_path / "r.yaml", {"agents": AGENTS, "method": "ilr"})
    config = load_study_config(_study_config(tmp_path, recipe, ["ilr", "grpo_compute_matched", "grpo"], seeds=[3, 4]))
    runs = plan_runs(config, AGENTS)
    # Seed by seed; the ILR arm trains all three agents together, each GRPO arm one run per starting model.
    assert [(run.arm, run.seed, run.agents) for run in runs[:5]] == [
        ("ilr", 3, ("a", "b", "c")),
        ("grpo_compute_matched", 3, ("a",)),
        ("grpo_compute_matched", 3, ("c",)),
        ("grpo", 3, ("a",)),
        ("grpo", 3, ("c",)),
    ]
    assert len(runs) == 10 and runs[5].seed == 4
    assert runs[2].directory == tmp_path / "study" / "runs" / "grpo_compute_matched" / "seed3" / "c"

    derived = run_recipe(config, runs[2], {"agents": AGENTS, "method": "ilr", "seed": 42, "push_to_hub": True})
    assert derived["method"] == "grpo" and derived["compute_matched"] is True and derived["seed"] == 3
    assert [agent["name"] for agent in derived["agents"]] == ["c"] and "push_to_hub" not in derived
    assert derived["output_dir"] == str(runs[2].train_dir)
    assert derived["difficulty_cache_dir"] == str(tmp_path / "study" / "irt")  # shared across arms and seeds


def test_each_ablation_changes_only_its_keys(tmp_path):
    recipe = {"agents": AGENTS[:2], "method": "ilr", "calibration": True, "interaction_mode": "dynamic", "lr": 1}
    config = load_study_config(
        _study_config(tmp_path, _write(tmp_path / "r.yaml", recipe), list(ARMS), overrides={"max_steps": 7})
    )
    for run in plan_runs(config, AGENTS[:2]):
        derived = run_recipe(config, run, recipe)
        changed = {key for key in derived if derived[key] != recipe.get(key)}
        assert changed == {"agents", "seed", "output_dir", "difficulty_cache_dir", "max_steps", *ARMS[run.arm]} - (
            {"agents"} if run.arm.startswith("ilr") else set()
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arms": ["ilr", "no_such_arm"]}, "not built in"),
        ({"arms": ["ilr"]}, "baseline arm 'grpo' is not among"),
        ({"seeds": []}, "non-empty list"),
        ({"evaluation": {"benchmarks": ["gsm8k"], "model": "x"}}, "must not set"),
        ({"typo_key": 1}, "unknown study key"),
    ],
)
def test_bad_study_configs_name_the_fix(tmp_path, change, message):
    recipe = _write(tmp_path / "r.yaml", {"agents": AGENTS, "method": "ilr"})
    path = _study_config(tmp_path, recipe, ["ilr", "grpo"])
    _write(path, {**yaml.safe_load(path.read_text()), **change})
    with pytest.raises(StudyConfigError, match=message):
        load_study_config(path)


def test_a_study_of_a_grpo_recipe_is_refused(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {"agents": AGENTS, "method": "grpo"})
    with pytest.raises(StudyConfigError, match="method: ilr"):
        load_study_config(_study_config(tmp_path, recipe, ["ilr", "grpo"]))


def test_custom_arms_carry_their_keys(tmp_path):
    recipe = _write(tmp_path / "r.yaml", {"agents": AGENTS, "method": "ilr"})
    config = load_study_config(_study_config(tmp_path, recipe, {"grpo": None, "ilr_lr": {"learning_rate": 1e-6}}))
    assert config.arms == {"grpo": {"method": "grpo"}, "ilr_lr": {"learning_rate": 1e-6}}


# ---------------------------------------------------------------------------------------------------------------------
# The table on hand-checkable inputs
# ---------------------------------------------------------------------------------------------------------------------
def test_summary_rows_intervals_and_paired_differences():
    before = {"a": {"q1": 0.0, "q2": 0.0, "q3": 1.0}, "b": {"q1": 0.0, "q2": 0.0, "q3": 1.0}}
    scores = {
        # ILR: both seeds of agent a answer q1 and q3; agent b only q3 (as before).
        "ilr": {
            "a": {0: {"q1": 1.0, "q2": 0.0, "q3": 1.0}, 1: {"q1": 1.0, "q2": 0.0, "q3": 1.0}},
            "b": {0: {"q1": 0.0, "q2": 0.0, "q3": 1.0}, 1: {"q1": 0.0, "q2": 0.0, "q3": 1.0}},
        },
        # GRPO: one run per starting model (agent a's), as before training.
        "grpo": {"a": {0: {"q1": 0.0, "q2": 0.0, "q3": 1.0}, 1: {"q1": 0.0, "q2": 0.0, "q3": 1.0}}},
    }
    tokens = {"ilr": {"a": {0: 100.0, 1: 300.0}, "b": {0: 50.0, 1: 50.0}}, "grpo": {"a": {0: 80.0, 1: 80.0}}}
    rows = summarize_study(scores, before, {"a": "a", "b": "a"}, tokens=tokens, n_resamples=2000)
    assert [(row.arm, row.agent) for row in rows] == [("before", "a"), ("ilr", "a"), ("ilr", "b"), ("grpo", "a")]
    by_key = {(row.arm, row.agent): row for row in rows}
    ilr_a = by_key[("ilr", "a")]
    assert ilr_a.accuracy["estimate"] == pytest.approx(2 / 3) and ilr_a.seeds == [0, 1]
    assert ilr_a.generated_tokens == 200.0 and by_key[("before", "a")].generated_tokens == 0.0
    # +1 on q1 and 0 elsewhere, in both seeds: the paired difference is 1/3; resampling the 3 questions, it is 0 when
    # q1 is never drawn ((2/3)^3 = 30%) and at most 1: the interval runs from 0 to at least 2/3.
    for paired in (ilr_a.vs_before, ilr_a.vs_baseline):
        assert paired["difference"]["estimate"] == pytest.approx(1 / 3) and paired["n_common"] == 3
        assert paired["difference"]["low"] == 0.0 and paired["difference"]["high"] >= 2 / 3
    # Agent b is compared with the GRPO run of its starting model (agent a's): identical answers, difference 0.
    assert by_key[("ilr", "b")].vs_baseline["difference"] == pytest.approx(
        {**by_key[("ilr", "b")].vs_baseline["difference"], "estimate": 0.0, "low": 0.0, "high": 0.0}
    )
    assert by_key[("grpo", "a")].vs_baseline is None  # the baseline is not compared with itself

    table = format_study_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| ilr | a | 2 | 200 | 66.7 [" in table and "| +33.3 [+0.0, " in lines[3]
    assert lines[2].startswith("| before | a | - | 0 | 33.3 [")


# ---------------------------------------------------------------------------------------------------------------------
# A whole study on the tiny models: real subprocesses, real files, resumed
# ---------------------------------------------------------------------------------------------------------------------
def test_study_runs_reports_and_skips_finished_runs(tmp_path, tiny_model_a, capsys):
    config = _study_config(tmp_path, _tiny_recipe(tmp_path, tiny_model_a), ["ilr_cooperate", "grpo"])
    output_dir = tmp_path / "study"
    assert cli_main(["study", "--config", str(config)]) == 0

    results = json.loads((output_dir / "results.json").read_text())
    assert results["failures"] == {} and results["missing_runs"] == []
    rows = {(row["arm"], row["agent"]): row for row in results["rows"]}
    assert set(rows) == {("before", "a"), ("ilr_cooperate", "a"), ("ilr_cooperate", "b"), ("grpo", "a")}
    for key, row in rows.items():
        accuracy = row["accuracy"]
        assert 0.0 <= accuracy["low"] <= accuracy["estimate"] <= accuracy["high"] <= 1.0
        if key[0] != "before":
            assert row["generated_tokens"] > 0  # both methods count what they sampled
            assert row["vs_before"]["n_common"] == 3
    assert rows[("ilr_cooperate", "a")]["vs_baseline"]["difference"]["method"] == "paired-crossed-bootstrap"
    # ILR samples share, analyses and fuse; GRPO only its group: ILR's agent generated more.
    assert rows[("ilr_cooperate", "a")]["generated_tokens"] > rows[("grpo", "a")]["generated_tokens"]
    assert (output_dir / "accuracy_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ilr_cooperate | b | 1 |" in capsys.readouterr().out
    grpo_run = output_dir / "runs" / "grpo" / "seed0" / "a"
    assert yaml.safe_load((grpo_run / "recipe.yaml").read_text())["method"] == "grpo"
    assert (grpo_run / DONE_NAME).is_file() and (output_dir / "runs" / "ilr_cooperate" / "seed0" / DONE_NAME).is_file()
    assert len(list((output_dir / "before").glob("*/results_*.json"))) == 1  # one starting model, evaluated once

    # Again: every run is done, nothing is trained or evaluated (no log grows).
    logs = {path: path.stat().st_size for path in output_dir.rglob("*.log")}
    assert cli_main(["study", "--config", str(config)]) == 0
    assert {path: path.stat().st_size for path in output_dir.rglob("*.log")} == logs

    assert json.loads((output_dir / "results.json").read_text())["rows"] == results["rows"]


# ---------------------------------------------------------------------------------------------------------------------
# The method learns: SmolLM2 on the real rewards, against a control that cannot learn
# ---------------------------------------------------------------------------------------------------------------------
SMOLLM2 = REPO / "outputs" / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="run recipes/demo/prepare_smollm2.py (make demo) first")
def test_smollm2_learns_and_a_zero_learning_rate_control_does_not(tmp_path, monkeypatch):
    # The demo's recipe (ILR, accuracy + format rewards scored by math-verify, 12 steps; measured +7 points of held-out
    # accuracy [2, 12] for one agent) against the same run with learning rate 0: same data, sampling and rewards, so
    # the only thing that can make the arms differ is the update. ~25 minutes on 2 idle cores.
    monkeypatch.chdir(REPO)  # the recipe names the model and data relative to the repository
    config = _write(
        tmp_path / "study.yaml",
        {
            "recipe": "recipes/demo/ilr/config_smollm2_demo.yaml",
            "output_dir": str(tmp_path / "study"),
            "arms": {"ilr": {}, "control_lr0": {"learning_rate": 0.0}},
            "baseline": "control_lr0",
            "seeds": [42],
            "threads": 1,
            "n_resamples": 2000,
            "evaluation": {
                "local_benchmarks": [
                    {"data_files": "recipes/demo/data/arithmetic_test.jsonl", "name": "arithmetic", "id_column": "id"}
                ],
                "max_new_tokens": 64,
                "batch_size": 50,
            },
        },
    )
    assert cli_main(["study", "--config", str(config)]) == 0
    rows = {
        (row["arm"], row["agent"]): row
        for row in json.loads((tmp_path / "study" / "results.json").read_text())["rows"]
    }
    for agent in ("smollm2-a", "smollm2-b"):
        # Learning rate 0 leaves the weights as they were: greedy answers, hence accuracy, exactly the starting model's.
        control = rows[("control_lr0", agent)]["vs_before"]["difference"]
        assert (control["estimate"], control["low"], control["high"]) == (0.0, 0.0, 0.0)
    # The method: at least one agent answers more held-out questions right than the control, interval above zero.
    gains = [rows[("ilr", agent)]["vs_baseline"]["difference"] for agent in ("smollm2-a", "smollm2-b")]
    assert max(gain["low"] for gain in gains) > 0, gains


def test_an_arm_with_a_bad_key_stops_the_study_before_any_run(tmp_path, tiny_model_a):
    config = _study_config(tmp_path, _tiny_recipe(tmp_path, tiny_model_a), {"grpo": None, "bad": {"learning_rat": 1}})
    with pytest.raises(StudyConfigError, match=r"arm 'bad'.*learning_rat"):
        run_study(load_study_config(config))
    assert not (tmp_path / "study" / "before").exists()  # nothing was evaluated or trained


@pytest.mark.slow  # ~25 s of CPU: two more training and evaluation processes than the test above
def test_sigterm_stops_the_running_child_and_ends_the_study_with_143(tmp_path, tiny_model_a):
    config = _study_config(tmp_path, _tiny_recipe(tmp_path, tiny_model_a), ["grpo"])
    run_dir = tmp_path / "study" / "runs" / "grpo" / "seed0" / "a"
    study = start_child([sys.executable, "-m", "ilr.study", "--config", str(config)], tmp_path / "study.log")
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "train.log").is_file():  # evaluated the starting model, now training
            assert study.poll() is None and time.monotonic() < deadline, (tmp_path / "study.log").read_text()
            time.sleep(0.2)
        children = set()
        while not children and time.monotonic() < deadline:
            children = descendants_of(study.pid, list_processes())
            time.sleep(0.1)
        study.send_signal(signal.SIGTERM)
        assert study.wait(timeout=240) == 143, (tmp_path / "study.log").read_text()
    finally:
        stop_child(study)
    left, _ = wait_until_gone(lambda: {pid: p for pid, p in list_processes().items() if pid in children}, 30)
    assert children and not left
    assert not (run_dir / DONE_NAME).exists() and "Study stopped (SIGTERM)" in (tmp_path / "study.log").read_text()
