"""`push_to_hub` in a real ILR run: step branches and final models per agent, failures reported, secrets never written.

The Hub client (`huggingface_hub.HfApi`) is the only fake: everything else (training, checkpoints, cards, the
background pusher, its retries) runs for real.
"""

import functools
import hashlib
import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from ilr import hub
from ilr.configs import parse_recipe
from ilr.hub import HubPusher, HubUnavailableError
from ilr.rewards import REWARD_FUNCS
from ilr.train import cli_main, main
from test_hub_push import FakeHfApi, http_error
from test_trainer import digits_reward, toy_rows


TOKEN = "hf_FAKEsecretTOKEN0123456789abcdef"
ENV_TOKEN = "hf_FAKEenvTOKEN9876543210fedcba"


@pytest.fixture
def fake_hub(monkeypatch):
    """Every `HfApi` the run creates is this one fake; no sleeping between retries; the token in the environment."""
    api = FakeHfApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None, **kwargs: api)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(HubPusher, "__init__", functools.partialmethod(HubPusher.__init__, sleep=lambda s: None))
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setitem(REWARD_FUNCS, "digits", digits_reward)
    return api


def _recipe(tmp_path: Path, model_a: str, model_b: str) -> Path:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in toy_rows()))
    recipe = {
        "agents": [
            {"model_name_or_path": model_a, "name": "a", "hub_model_id": "org/a-ilr"},
            {"model_name_or_path": model_b, "name": "b", "hub_model_id": "org/b-ilr"},
        ],
        "dataset_name": "toy",
        "data_files": [str(data)],
        "question_column": "problem",
        "answer_column": "answer",
        "reward_funcs": ["digits"],
        "interaction_mode": "cooperate",
        "num_generations": 4,
        "generation_batch_size": 8,
        "per_device_train_batch_size": 8,
        "max_completion_length": 8,
        "max_analysis_length": 4,
        "peer_max_tokens": 8,
        "learning_rate": 5e-3,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "push_to_hub": True,
        "hub_token": TOKEN,
        "hub_private_repo": True,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "disable_tqdm": True,
        "log_level": "info",
        "seed": 0,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _assert_no_secret(tmp_path: Path, *texts: str) -> None:
    """Neither token in any text nor in any file the run wrote (logs, metrics, checkpoints, cards, configs)."""
    for secret in (TOKEN, ENV_TOKEN):
        for text in texts:
            assert secret not in text
        for path in (tmp_path / "out").rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_each_agent_pushes_step_branches_then_its_final_model_with_a_card(
    tmp_path, tiny_model_a, tiny_model_b, fake_hub, caplog, capsys
):
    recipe = _recipe(tmp_path, tiny_model_a, tiny_model_b)
    with caplog.at_level(logging.INFO):
        folders = main(
            *parse_recipe(["--config", str(recipe), "--output_dir", str(tmp_path / "out")]), recipe_path=recipe
        )
    assert folders == [str(tmp_path / "out" / "a"), str(tmp_path / "out" / "b")]

    created = {(call["repo_id"], call["private"]) for call in fake_hub.names("create_repo")}
    assert created == {("org/a-ilr", True), ("org/b-ilr", True)}
    branches = sorted((call["repo_id"], call["branch"]) for call in fake_hub.names("create_branch"))
    assert branches == [(f"org/{x}-ilr", f"step-00000{s}") for x in "ab" for s in (2, 4)]
    revisions = sorted((call["repo_id"], call["revision"]) for call in fake_hub.names("upload_folder"))
    assert revisions == sorted(
        [(f"org/{x}-ilr", r) for x in "ab" for r in ("step-000002", "step-000004")]
        + [("org/a-ilr", "main"), ("org/b-ilr", "main")]
    )
    final_commits = [commit for commit in fake_hub.commits if commit["revision"] == "main"]
    assert len(final_commits) == 2
    for commit in fake_hub.commits:
        assert "model.safetensors" in commit["files"] and "optimizer.pt" not in commit["files"]
    card = final_commits[0]["files"]["README.md"].decode()
    assert "ILR" in card and "Idea3" in card and "toy" in card and "learning_rate" in card
    assert "org/b-ilr" in card  # the pairing
    assert "3 of 3 pushes to org/a-ilr succeeded" in caplog.text
    _assert_no_secret(tmp_path, caplog.text, capsys.readouterr().out, card)


def test_failed_pushes_are_reported_at_the_end_and_leave_the_local_files_intact(
    tmp_path, tiny_model_a, tiny_model_b, fake_hub, caplog, capsys
):
    # Every upload fails with a server error whose text echoes the token, as a careless proxy might.
    fake_hub.failures = [http_error(503, f"503 Service Unavailable (token={TOKEN})") for _ in range(100)]
    recipe = _recipe(tmp_path, tiny_model_a, tiny_model_b)
    with caplog.at_level(logging.INFO):
        code_or_error = None
        try:
            cli_main(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
        except HubUnavailableError as error:
            code_or_error = str(error)
    assert code_or_error is not None and "6 Hub push(es) failed" in code_or_error
    assert "models are saved in" in code_or_error and "hf upload" in code_or_error

    out = tmp_path / "out"
    assert (out / "a" / "model.safetensors").is_file() and (out / "checkpoint-4" / "b" / "optimizer.pt").is_file()
    # The checkpoint the pushes read is intact: its weights are the final model's, byte for byte.
    for agent in ("a", "b"):
        final, saved = _hashes(out / agent), _hashes(out / "checkpoint-4" / agent)
        weights = "model.safetensors" if "model.safetensors" in final else "adapter_model.safetensors"
        assert final[weights] == saved[weights]
    assert not list((out / ".hub_staging").rglob("*.safetensors"))  # snapshots cleaned up
    assert caplog.text.count("Hub push failed") == 6
    _assert_no_secret(tmp_path, caplog.text, capsys.readouterr().out, code_or_error)


def test_push_to_hub_needs_a_repository_per_agent(tmp_path, tiny_model_a, tiny_model_b, fake_hub):
    recipe = yaml.safe_load(_recipe(tmp_path, tiny_model_a, tiny_model_b).read_text())
    del recipe["agents"][1]["hub_model_id"]
    path = tmp_path / "no_repo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"agents \['b'\] have no `hub_model_id`"):
        main(*parse_recipe(["--config", str(path), "--output_dir", str(tmp_path / "out")]))
