"""`ilr check` without TRL: the same answers as `parse_recipe`, from flags generated from TRL's own dataclasses.

- `ilr.recipe_fields` equals what the installed TRL and transformers describe (an upgrade that changes a flag fails here,
  with the command that regenerates it).
- For every shipped recipe, every broken recipe of `test_reliability.py` and the TRL/transformers checks mirrored in
  `ilr.recipe_check`, the fast check and `parse_recipe` agree: the same error message, or the same values, notes and
  warnings.
- `ilr check` imports none of torch, transformers, TRL or datasets.
"""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ilr import recipe_fields
from ilr.configs import AgentConfig, describe_recipe_flags, parse_recipe
from ilr.recipe_check import TRL_CHECKED_KEYS, RecipeValues, check_recipe_args
from ilr.recipe_rules import RecipeError
from test_reliability import BROKEN_RECIPES, TINY_RECIPE


REPO = Path(__file__).resolve().parents[1]
REGENERATE = "python -m ilr.recipe_fields"

# What `ilr check` prints and what the ILR checks and trainer read.
COMPARED = {
    "script": ("dataset_name", "dataset_train_split", "reward_funcs", "data_files", "math_scoring", "answer_format"),
    "agent": ("name", "model_name_or_path", "model_revision", "dtype", "use_peft", "lora_r", "lora_target_modules"),
    "training": (
        "method",
        "interaction_mode",
        "train_stages",
        "calibration",
        "calibration_scope",
        "num_generations",
        "generation_backend",
        "generation_batch_size",
        "steps_per_generation",
        "use_vllm",
        "vllm_mode",
        "bf16",
        "tf32",
        "scale_rewards",
        "loss_type",
        "learning_rate",
        "save_steps",
        "logging_steps",
        "output_dir",
        "pad_to_multiple_of",
        "reward_weights",
    ),
}


def test_generated_flags_match_the_installed_trl():
    described = describe_recipe_flags()
    for name, key in (("RECIPE_FLAGS", "recipe"), ("AGENT_FLAGS", "agent")):
        assert getattr(recipe_fields, name) == described[key], (
            f"`ilr.recipe_fields.{name}` no longer matches TRL {described['versions']['trl']} / transformers "
            f"{described['versions']['transformers']} (generated from {recipe_fields.VERSIONS}): run `{REGENERATE}`."
        )
    # Every agent field is a flag: the fast check accepts the same agent keys.
    assert {flag[0] for flag in recipe_fields.AGENT_FLAGS} == {
        f.name for f in AgentConfig.__dataclass_fields__.values()
    }


def test_the_generated_module_is_written_as_checked_in(tmp_path):
    path = tmp_path / "recipe_fields.py"
    recipe_fields.write(str(path))
    assert path.read_text() == Path(recipe_fields.__file__).read_text(), f"run `{REGENERATE}`"


def _outcome(parse, args: list[str], caplog) -> tuple:
    """What a parse reports: its error, or the compared values, the notes and the warnings it logged."""
    caplog.clear()
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="ilr.configs"):
        try:
            script_args, agents_args, training_args = parse(args, hardware_notes=notes)
        except RecipeError as error:
            return ("error", str(error))
    if parse is check_recipe_args:
        # Deferred to TRL only where the recipe sets one of `TRL_CHECKED_KEYS` (or a config-class setting).
        deferring = any(f"{key}" in " ".join(args) or key in Path(args[1]).read_text() for key in TRL_CHECKED_KEYS)
        assert isinstance(training_args, RecipeValues) != deferring, (args, type(training_args))
    values = {key: getattr(script_args, key) for key in COMPARED["script"]}
    values |= {key: getattr(training_args, key) for key in COMPARED["training"]}
    values["agents"] = [{key: getattr(agent, key) for key in COMPARED["agent"]} for agent in agents_args.agents]
    warnings = [record.getMessage() for record in caplog.records if record.name == "ilr.configs"]
    return ("ok", values, notes, warnings)


def _assert_same(args: list[str], caplog) -> tuple:
    fast = _outcome(check_recipe_args, list(args), caplog)
    slow = _outcome(parse_recipe, list(args), caplog)
    assert fast == slow
    return fast


def _write(tmp_path: Path, overrides: dict) -> str:
    recipe = {**TINY_RECIPE, **overrides}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in recipe.items() if value is not None}))
    return str(path)


SHIPPED = sorted(REPO.glob("recipes/**/config_*.yaml"))
VARIANTS = {
    "as-shipped": [],
    "transformers": ["--generation_backend", "transformers"],
    "cpu": ["--use_cpu", "--bf16=false", "--generation_backend=transformers", "--report_to=none"],
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda path: str(path.relative_to(REPO / "recipes")))
def test_shipped_recipes_check_the_same_without_trl(recipe, variant, caplog):
    outcome = _assert_same(["--config", str(recipe), *VARIANTS[variant]], caplog)
    assert outcome[0] == "ok", outcome


@pytest.mark.parametrize(("overrides", "key", "also"), BROKEN_RECIPES)
def test_broken_recipes_fail_the_same_without_trl(tmp_path, overrides, key, also, caplog):
    outcome = _assert_same(["--config", _write(tmp_path, overrides)], caplog)
    # Hardware settings are notes under `ilr check`; everything else is an error naming its key.
    reported = outcome[1] if outcome[0] == "error" else " ".join(outcome[2])
    assert key in reported, outcome


# TRL's and transformers' own checks that `ilr.recipe_check` mirrors, values they normalise, and the parser's own
# behaviours (CLI overrides, abbreviations, `--no_` switches, unknown arguments, the `env:` mapping).
MIRRORED = {
    "logging-steps-zero": ({"logging_steps": 0}, []),
    "logging-steps-fraction": ({"logging_steps": 2.5}, []),
    "save-steps-fraction": ({"save_steps": 2.5}, []),
    "save-steps-ratio": ({"save_steps": 0.5}, []),
    "plateau-without-eval": ({"lr_scheduler_type": "reduce_lr_on_plateau"}, []),
    "greedy-without-eval": ({"lr_scheduler_type": "greedy"}, []),
    "scheduler-unknown": ({"lr_scheduler_type": "cosine_annealing"}, []),
    "optimizer-unknown": ({"optim": "sgd_fast"}, []),
    "prefetch-without-workers": ({"dataloader_prefetch_factor": 2}, []),
    "empty-cache-steps-negative": ({"torch_empty_cache_steps": -1}, []),
    "hub-log-without-log": ({"log_completions_hub_repo": "org/logs"}, []),
    "batch-and-steps-per-generation": ({"generation_batch_size": 16, "steps_per_generation": 2}, []),
    "generation-batch-not-a-multiple": ({"generation_batch_size": 12}, []),
    "generation-batch-ok": ({"generation_batch_size": 16}, []),
    "steps-per-generation": ({"steps_per_generation": 3}, []),
    "gradient-accumulation": ({"gradient_accumulation_steps": 3}, []),
    "clip-min-above-max": ({"vllm_importance_sampling_clip_min": 4.0}, []),
    "truncate-without-clips": (
        {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": None},
        ["--vllm_importance_sampling_clip_max", "none"],
    ),
    "pad-to-multiple": ({"pad_to_multiple_of": "64"}, []),
    "pad-to-multiple-none": ({"pad_to_multiple_of": "none"}, []),
    "pad-to-multiple-garbage": ({"pad_to_multiple_of": "lots"}, []),
    "scale-rewards-bool": ({"scale_rewards": True}, []),
    "bf16-unset": ({"bf16": None, "use_cpu": True}, []),
    "output-dir-unset": ({"output_dir": None}, []),
    "output-dir-home": ({"output_dir": "~/runs/x"}, []),
    "lora-one-target": (
        {"agents": [{**TINY_RECIPE["agents"][0], "lora_target_modules": ["q_proj"]}, TINY_RECIPE["agents"][1]]},
        [],
    ),
    "cli-overrides": ({}, ["--num_generations", "2", "--train_stages", "fuse", "share"]),
    "cli-dashes": ({}, ["--num-generations", "8"]),
    "cli-abbreviation": ({}, ["--num_gen", "2"]),
    "cli-no-switch": ({}, ["--no_calibration"]),
    "cli-switch-value": ({}, ["--calibration", "false"]),
    "cli-bad-bool": ({}, ["--calibration", "maybe"]),
    "cli-bad-int": ({}, ["--num_generations", "x"]),
    "cli-unknown-argument": ({}, ["--not_a_key", "1"]),
    "cli-stray-value": ({}, ["stray"]),
    "cli-agents-json": ({}, ["--agents", '[{"model_name_or_path": "x/one"}, {"model_name_or_path": "y/two"}]']),
    "cli-agents-not-json": ({}, ["--agents", "x/one"]),
    "cli-choice": ({}, ["--save_strategy", "sometimes"]),
    "yaml-choice": ({"save_strategy": "no"}, []),
    "env-mapping": ({"env": {"ILR_TEST_RECIPE_ENV": "1"}}, []),
    "env-not-a-mapping": ({"env": ["A=1"]}, []),
    "report-to-list": ({"report_to": ["tensorboard"]}, []),
    "agent-dtype": ({"agents": [{**TINY_RECIPE["agents"][0], "dtype": "bfloat16"}, TINY_RECIPE["agents"][1]]}, []),
    # Deferred to TRL (`TRL_CHECKED_KEYS`): still the same answer.
    "deferred-eval-strategy": ({"eval_strategy": "steps", "eval_steps": 1}, []),
    "deferred-fp16": ({"fp16": True}, []),
    "deferred-deepspeed-missing": ({"deepspeed": "/nonexistent/ds.json"}, []),
    "deferred-after-a-note": (
        {"agents": [{**TINY_RECIPE["agents"][0], "load_in_4bit": True}, TINY_RECIPE["agents"][1]]},
        ["--debug", "underflow_overflow"],
    ),
}


@pytest.mark.parametrize(("overrides", "cli"), MIRRORED.values(), ids=MIRRORED.keys())
def test_mirrored_trl_checks_give_the_same_answer(tmp_path, overrides, cli, caplog, monkeypatch):
    monkeypatch.delenv("ILR_TEST_RECIPE_ENV", raising=False)
    _assert_same(["--config", _write(tmp_path, overrides), *cli], caplog)


def test_a_config_file_that_is_not_a_mapping(tmp_path, caplog):
    for text in ("- a\n- b\n", "num_generations: [4\n"):
        path = tmp_path / "recipe.yaml"
        path.write_text(text)
        assert _assert_same(["--config", str(path)], caplog)[0] == "error"


def test_deferred_keys_are_flags():
    # A misspelt entry would never defer anything.
    assert {flag[0] for flag in recipe_fields.RECIPE_FLAGS} >= TRL_CHECKED_KEYS


def test_ilr_check_imports_no_heavy_library():
    recipe = REPO / "recipes" / "Llama-3.1-8B-Instruct_Qwen2.5-7B-Instruct" / "ilr" / "config_group1.yaml"
    code = (
        "import sys\n"
        "from ilr.cli import main\n"
        f"assert main(['check', '--config', {str(recipe)!r}]) == 0\n"
        "print(sorted({'torch', 'transformers', 'trl', 'datasets', 'accelerate'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
    assert "Recipe OK: method=ilr, 2 agent(s)" in result.stdout
