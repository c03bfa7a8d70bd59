"""`ilr interact`: a real discussion between the two tiny heterogeneous models, printed as a transcript."""

import json

import pytest
import yaml

from ilr.cli import main


@pytest.fixture
def pair_recipe(tmp_path, tiny_model_a, tiny_model_b):
    recipe = {
        "agents": [
            {"model_name_or_path": tiny_model_a, "name": "alpha"},
            {"model_name_or_path": tiny_model_b, "name": "beta"},
        ],
        "dataset_name": "gsm8k",
        "interaction_mode": "compete",
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "max_completion_length": 8,
        "max_analysis_length": 8,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "output_dir": str(tmp_path / "out"),
        "seed": 3,
    }
    path = tmp_path / "pair.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_interact_prints_every_agent_and_stage(pair_recipe, capsys, tmp_path):
    output = tmp_path / "transcript.json"
    code = main(["interact", "--config", pair_recipe, "--question", "What is 17 + 21?", "--format", "json",
                 "--output", str(output)])  # fmt: skip
    assert code == 0
    transcript = json.loads(capsys.readouterr().out)
    assert transcript == json.loads(output.read_text())
    assert transcript["agent_names"] == ["alpha", "beta"]
    assert transcript["stages"] == ["share", "analyse", "fuse"]
    # The recipe's fixed `compete` mode framed both agents.
    assert transcript["cooperate"] == [[False, False]]
    fuse_prompt = transcript["groups"]["fuse"][1][0]["prompt"][-1]["content"]
    assert "What is 17 + 21?" in fuse_prompt
    # Agent 1's shared answer reached agent 2's fuse prompt.
    shared = transcript["groups"]["share"][0][0]
    assert shared["texts"][shared["selected"]].strip() in fuse_prompt


def test_interact_text_debate_from_a_dataset(pair_recipe, capsys):
    from pathlib import Path

    data = Path(__file__).parent / "fixtures" / "data" / "gsm8k.jsonl"
    code = main(["interact", "--config", pair_recipe, "--dataset", "gsm8k", "--data_files", str(data),
                 "--limit", "2", "--protocol", "debate", "--rounds", "1"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for name in ("alpha", "beta", "round_0", "round_1"):
        assert name in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--question", "1+1?", "--dataset", "gsm8k"], "either --question"),
        ([], "either --question"),
        (["--question", "1+1?", "--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_interact_user_errors_exit_2(pair_recipe, capsys, args, message):
    assert main(["interact", "--config", pair_recipe, *args]) == 2
    assert message in capsys.readouterr().err
