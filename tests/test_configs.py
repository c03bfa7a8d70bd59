"""Recipe parsing: TrlParser semantics (YAML, CLI overrides, unknown keys raise) and early, named errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ilr.configs import AgentConfig, ILRConfig, RecipeError, cooperate_probability, parse_recipe


REPO = Path(__file__).resolve().parents[1]

# Settings that make a recipe valid on a CPU-only machine without vLLM.
CPU = {"use_cpu": True, "bf16": False, "report_to": "none", "generation_backend": "transformers"}


def base_recipe(**overrides) -> dict:
    recipe = {
        "agents": [
            {"model_name_or_path": "org/model-a", "name": "a"},
            {"model_name_or_path": "org/model-b", "name": "b", "use_peft": True, "lora_r": 8},
        ],
        "dataset_name": "math_train",
        "reward_funcs": ["accuracy", "format"],
        "reward_weights": [1.0, 0.5],
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "output_dir": "outputs/test",
        **CPU,
    }
    recipe.update(overrides)
    return {key: value for key, value in recipe.items() if value is not None}


def write(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def parse(tmp_path: Path, recipe: dict, *cli: str):
    return parse_recipe(["--config", write(tmp_path, recipe), *cli])


def test_valid_recipe_fills_all_three_dataclasses(tmp_path):
    script_args, agents_args, training_args = parse(tmp_path, base_recipe())
    assert script_args.reward_funcs == ["accuracy", "format"]
    assert script_args.math_scoring == "training"
    assert (
        parse(tmp_path, base_recipe(math_scoring="training,fractions=any"))[0].math_scoring == "training,fractions=any"
    )
    assert [agent.name for agent in agents_args.agents] == ["a", "b"]
    assert all(isinstance(agent, AgentConfig) for agent in agents_args.agents)
    assert agents_args.agents[1].use_peft is True and agents_args.agents[1].lora_r == 8
    assert agents_args.agents[0].use_peft is False
    assert isinstance(training_args, ILRConfig)
    assert training_args.num_generations == 4
    assert training_args.reward_weights == [1.0, 0.5]
    assert training_args.train_stages == ["share", "fuse"]
    assert training_args.method == "ilr"


def test_cli_flags_override_yaml(tmp_path):
    _, _, training_args = parse(tmp_path, base_recipe(), "--num_generations", "2", "--train_stages", "fuse")
    assert training_args.num_generations == 2
    assert training_args.train_stages == ["fuse"]


def test_agents_can_be_given_as_json_on_the_command_line(tmp_path):
    agents = '[{"model_name_or_path": "x/one"}, {"model_name_or_path": "y/two", "dtype": "bfloat16"}]'
    _, agents_args, _ = parse(tmp_path, base_recipe(), "--agents", agents)
    assert [agent.name for agent in agents_args.agents] == ["one", "two"]
    assert agents_args.agents[1].dtype == "bfloat16"


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-6` (no dot) as a string; it must still become a float.
    _, _, training_args = parse(tmp_path, base_recipe(learning_rate="1e-6"))
    assert training_args.learning_rate == pytest.approx(1e-6)


def test_agent_name_defaults_to_last_part_of_model_id(tmp_path):
    recipe = base_recipe(agents=["org/Alpha-1B", {"model_name_or_path": "./local/Beta/"}])
    _, agents_args, _ = parse(tmp_path, recipe)
    assert [agent.name for agent in agents_args.agents] == ["Alpha-1B", "Beta"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"num_generaions": 4}, r"Unknown recipe key.*`num_generaions`.*did you mean `num_generations`"),
        ({"num_generations": "eight"}, r"`num_generations` expects an integer \(got 'eight'\)"),
        ({"num_generations": 2.5}, r"`num_generations` expects an integer \(got 2.5\)"),
        ({"learning_rate": [1, 2]}, r"`learning_rate` takes a single value"),
        ({"agents": [{"name": "a"}, {"model_name_or_path": "b"}]}, r"agents\[0\]`?.*model_name_or_path"),
        ({"agents": [{"model_name_or_path": "a", "lora_rank": 8}, "b"]}, r"Unknown key `lora_rank`.*lora_r"),
        ({"agents": [{"model_name_or_path": "a", "lora_r": "big"}, "b"]}, r"agents\[0\].*lora_r.*expects an integer"),
        ({"agents": ["org/a"]}, r"method: ilr` trains two or more agents"),
        ({"agents": []}, r"No agents"),
        ({"agents": ["x/a", "y/a"]}, r"share `name`.*distinct `name:`"),
        (
            {
                "agents": [
                    {"model_name_or_path": "a", "hub_model_id": "o/r"},
                    {"model_name_or_path": "b", "hub_model_id": "o/r"},
                ]
            },
            r"share `hub_model_id`",
        ),
        ({"reward_funcs": ["accuracy", "acuracy"]}, r"`reward_funcs`.*got 'acuracy'.*Did you mean `accuracy`"),
        ({"reward_funcs": ["accuracy"], "reward_weights": [1.0, 2.0]}, r"`reward_weights` has 2 values for 1"),
        ({"reward_funcs": ["code"], "reward_weights": None}, r"allow_code_execution: true"),
        ({"math_scoring": "strict"}, r"`math_scoring`: Unknown math scoring preset 'strict'"),
        ({"math_scoring": "training,multi_box=all"}, r"`math_scoring`: MathScoring.multi_box must be one of"),
        ({"train_stages": ["share", "fusion"]}, r"`train_stages`.*'fusion'.*Did you mean `fuse`"),
        ({"train_stages": ["analyse"]}, r"analysis_samples` >= 2"),
        ({"train_stages": []}, r"`train_stages` is empty"),
        ({"interaction_mode": "ratio:1.5"}, r"ratio:p with 0 <= p <= 1"),
        ({"interaction_mode": "cooperative"}, r"interaction_mode"),
        ({"calibration_scope": "global"}, r"`calibration_scope` must be one of \['group', 'batch'\]"),
        ({"difficulty_source": "elo"}, r"`difficulty_source`"),
        ({"loss_type": "ppo"}, r"`loss_type` must be one of"),
        ({"scale_rewards": "std"}, r"`scale_rewards`"),
        ({"num_generations": 1, "per_device_train_batch_size": 4}, r"at least 2 generations"),
        ({"num_generations": 3}, r"divisible by num_generations"),
        ({"peer_max_tokens": 0}, r"`peer_max_tokens` must be > 0"),
        ({"dataset_name": "someone/unknown-set"}, r"not a registered benchmark.*question_column"),
        ({"method": "grpo"}, r"exactly one agent"),
        ({"use_vllm": True}, r"generation_backend: vllm"),
        ({"lr_scheduler_type": "cosine_annealing"}, r"lr_scheduler_type"),
    ],
)
def test_broken_recipes_fail_early_with_a_named_key(tmp_path, overrides, expected):
    with pytest.raises(RecipeError, match=expected):
        parse(tmp_path, base_recipe(**overrides))


def test_vllm_backend_without_vllm_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    # `make test` installs vLLM's CPU build here: hide it, as on a machine without it.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(RecipeError, match=r"pip install -e '\.\[vllm\]'.*`make install` \(CPU"):
        parse(tmp_path, base_recipe(generation_backend="vllm"))


def test_unregistered_dataset_with_columns_is_accepted(tmp_path):
    recipe = base_recipe(dataset_name="someone/set", question_column="q", answer_column="a", answer_format="gsm8k")
    script_args, _, _ = parse(tmp_path, recipe)
    assert script_args.answer_format == "gsm8k"


@pytest.mark.parametrize(
    ("mode", "expected"), [("dynamic", None), ("cooperate", 1.0), ("compete", 0.0), ("ratio:0.25", 0.25)]
)
def test_cooperate_probability(mode, expected):
    assert cooperate_probability(mode) == expected


@pytest.mark.parametrize("recipe", sorted(REPO.glob("recipes/**/config_*.yaml")), ids=lambda p: p.parent.parent.name)
def test_every_shipped_recipe_parses(recipe):
    # GPU recipes select vLLM and bf16; on this CPU machine we only swap those, everything else is checked as shipped.
    overrides = [f"--{key}" if value is True else f"--{key}={value}" for key, value in CPU.items()]
    script_args, agents_args, training_args = parse_recipe(["--config", str(recipe), *overrides])
    assert agents_args.agents and script_args.reward_funcs
    if training_args.method == "ilr":
        assert len(agents_args.agents) >= 2


MATCHED_BUDGET_KEYS = (
    "num_generations",
    "max_completion_length",
    "analysis_samples",
    "max_analysis_length",
    "train_stages",
)


@pytest.mark.parametrize(
    "recipe", sorted(REPO.glob("recipes/*/grpo/config_compute_matched.yaml")), ids=lambda p: p.parent.parent.name
)
def test_compute_matched_baselines_size_their_budget_from_the_ilr_recipes(recipe):
    from ilr.train import compute_matched_args

    overrides = [f"--{key}" if value is True else f"--{key}={value}" for key, value in CPU.items()]
    _, agents_args, baseline = parse_recipe(["--config", str(recipe), *overrides])
    assert baseline.method == "grpo" and baseline.compute_matched
    model = agents_args.agents[0].model_name_or_path
    ilr_recipes = [
        r for r in REPO.glob("recipes/*/ilr/config_*.yaml") if f"model_name_or_path: {model}\n" in r.read_text()
    ]
    assert ilr_recipes, f"no ILR recipe trains {model}"
    for ilr_recipe in ilr_recipes:
        _, _, ilr_args = parse_recipe(["--config", str(ilr_recipe), *overrides])
        for key in MATCHED_BUDGET_KEYS:
            assert getattr(baseline, key) == getattr(ilr_args, key), (ilr_recipe.name, key)
    # 8 share + 8 fuse completions of 1024 tokens and one 512-token analysis: 17 completions' worth per question
    assert compute_matched_args(baseline).num_generations >= 17


def test_cli_check_reports_user_errors_in_one_line(tmp_path):
    bad = write(tmp_path, base_recipe(num_generaions=4))
    result = subprocess.run(
        [sys.executable, "-m", "ilr.cli", "check", "--config", bad], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "num_generaions" in result.stderr

    good = write(tmp_path, base_recipe())
    result = subprocess.run(
        [sys.executable, "-m", "ilr.cli", "check", "--config", good], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Recipe OK: method=ilr, 2 agent(s)" in result.stdout


def test_vllm_server_agents_need_distinct_ports(tmp_path, monkeypatch):
    import importlib.util

    # Without vLLM (`make install EXTRAS=dev`), pretend it is installed, so the port check itself is reached.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find_spec(name, *a)
    )
    agents = [
        {"model_name_or_path": "org/a", "vllm_server_port": 8001, "vllm_group_port": 51301},
        {"model_name_or_path": "org/b", "vllm_server_port": 8001, "vllm_group_port": 51302},
    ]
    with pytest.raises(RecipeError, match=r"Port 8001 .*`vllm_server_port` of agent `b`"):
        parse(tmp_path, base_recipe(agents=agents, generation_backend="vllm_server"))
    agents[1]["vllm_server_port"] = 8002
    # Generation-only: training against servers also needs NCCL (CUDA), tested in test_vllm_server.py.
    recipe = write(tmp_path, base_recipe(agents=agents, generation_backend="vllm_server"))
    _, _, training_args = parse_recipe(["--config", recipe], training=False)
    assert (training_args.use_vllm, training_args.vllm_mode) == (True, "server")


def test_cli_help_reaches_the_command(capsys):
    from ilr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--help"])
    assert exit_info.value.code == 0
    assert "--num_generations" in capsys.readouterr().out  # the recipe keys, not the top-level usage
    assert main(["--help"]) == 0
    assert "usage: ilr" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(REPO.glob("recipes/slurm/*.slurm")), ids=lambda p: p.name)
def test_slurm_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
