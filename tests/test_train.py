"""The training entry point's single-agent baseline: plain TRL GRPO on the same data, and its compute-matched option."""

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ilr.compute import generated_tokens
from ilr.configs import parse_recipe
from ilr.rewards import REWARD_FUNCS
from ilr.train import compute_matched_args, main
from test_trainer import CPU_RUN, digits_reward, toy_rows


def conversational_digits_reward(completions, **kwargs):
    """`digits_reward` of TRL's conversational completions (a list of messages each)."""
    return digits_reward([c[-1]["content"] if isinstance(c, list) else c for c in completions])


@pytest.fixture(autouse=True)
def digits_registered(monkeypatch):
    monkeypatch.setitem(REWARD_FUNCS, "digits", conversational_digits_reward)


def _grpo_recipe(tmp_path, model: str, **overrides) -> str:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in toy_rows()))
    recipe = {
        "agents": [{"model_name_or_path": model, "name": "solo"}],
        "method": "grpo",
        "dataset_name": "toy",
        "data_files": [str(data)],
        "question_column": "problem",
        "answer_column": "answer",
        "reward_funcs": ["digits"],
        "num_generations": 4,
        "generation_batch_size": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_completion_length": 8,
        "max_analysis_length": 4,
        "learning_rate": 5e-3,
        "beta": 0.0,
        "loss_type": "dapo",
        "max_steps": 2,
        "save_strategy": "no",
        **CPU_RUN,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_compute_matched_gives_the_baseline_an_ilr_agents_token_budget(tmp_path):
    recipe = _grpo_recipe(tmp_path, "/nonexistent", compute_matched=True)
    _, _, args = parse_recipe(["--config", recipe])
    matched = compute_matched_args(args)
    # An ILR agent: 4 share + 4 fuse completions of <= 8 tokens and 1 analysis of <= 4 tokens = 68 tokens a question.
    assert matched.num_generations == 10 and matched.generation_batch_size == 2 * 10  # 9 rounded up: 2 x 9 % 4 != 0
    assert matched.num_generations * matched.max_completion_length >= 68
    assert matched.steps_per_generation == matched.generation_batch_size // matched.per_device_train_batch_size
    assert args.num_generations == 4 and not matched.compute_matched  # the recipe's settings are left alone

    _, _, even = parse_recipe(["--config", recipe, "--per_device_train_batch_size", "2"])
    assert compute_matched_args(even).num_generations == 9  # ceil(68 / 8); 2 questions x 9 split into micro-batches
    _, _, share_only = parse_recipe(
        ["--config", recipe, "--per_device_train_batch_size", "2", "--train_stages", "share"]
    )
    assert compute_matched_args(share_only).num_generations == 6  # 4 share + 1 fuse + 1 analysis of half length


@pytest.mark.parametrize("compute_matched", [False, True], ids=["plain", "compute_matched"])
def test_grpo_baseline_trains_one_model_with_trl(tmp_path, tiny_model_a, caplog, compute_matched):
    recipe = _grpo_recipe(tmp_path, tiny_model_a, compute_matched=compute_matched)
    with caplog.at_level(logging.INFO, logger="ilr"):
        folders = main(
            *parse_recipe(["--config", recipe, "--output_dir", str(tmp_path / "out"), "--log_level", "info"])
        )

    assert folders == [str(tmp_path / "out" / "solo")]
    trained, initial = load_file(f"{folders[0]}/model.safetensors"), load_file(f"{tiny_model_a}/model.safetensors")
    assert not torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert ("compute_matched: 10 completions per question instead of 4" in caplog.text) == compute_matched
    # The log history outlives the run with the tokens it generated, counted as ILR counts them (`ilr.compute`).
    assert generated_tokens(tmp_path / "out", ["solo"])["solo"] > 0


def test_the_baseline_never_writes_the_hub_token(tmp_path, tiny_model_a, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "")  # restored after the test: the baseline exports the recipe's token there
    token = "hf_FAKEbaselineTOKEN0123456789abc"
    recipe = _grpo_recipe(
        tmp_path, tiny_model_a, hub_token=token, save_strategy="steps", save_steps=1, compute_matched=True
    )
    main(*parse_recipe(["--config", recipe, "--output_dir", str(tmp_path / "out")]))
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in written)  # the Trainer's pickled arguments
    assert not [path for path in written if token.encode() in path.read_bytes()]
