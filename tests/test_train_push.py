"""`push_to_hub` in a real ILR run: step branches and final models per agent, failures reported, secrets never written.

Nothing is faked: the run trains tiny models, saves checkpoints and cards, and pushes them with the real
`huggingface_hub` client over HTTP to the Hub test server (`tests/hub_server.py`), which keeps what it receives and
injects the failures. Only the pushers' waits between retries are skipped.
"""

import functools
import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from conftest import HUB_TOKEN
from hub_server import Fault
from ilr.configs import parse_recipe
from ilr.hub import HubPusher, HubUnavailableError
from ilr.rewards import REWARD_FUNCS
from ilr.train import cli_main, main
from test_trainer import digits_reward, toy_rows


TOKEN = HUB_TOKEN  # the recipe's `hub_token`: the test Hub lets it write to `org/`
ENV_TOKEN = "hf_FAKEenvTOKEN9876543210fedcba"  # a stale login the recipe's token must win over (the Hub rejects it)


@pytest.fixture
def run_hub(hub_online, monkeypatch):
    """The test Hub, reached by every `HfApi` the run creates; no sleeping between the pushers' retries."""
    monkeypatch.setattr(HubPusher, "__init__", functools.partialmethod(HubPusher.__init__, sleep=lambda s: None))
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setitem(REWARD_FUNCS, "digits", digits_reward)
    return hub_online


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
    tmp_path, tiny_model_a, tiny_model_b, run_hub, caplog, capsys
):
    # A flaky Hub: repository creation fails once (retried by the pusher), an upload loses its connection mid-body
    # once (retried by huggingface_hub itself); everything lands all the same.
    run_hub.inject(Fault("POST", r"^/api/repos/create$", 503))
    run_hub.inject(Fault("POST", r"/commit/step-000002$", drop=True))
    recipe = _recipe(tmp_path, tiny_model_a, tiny_model_b)
    with caplog.at_level(logging.INFO):
        folders = main(
            *parse_recipe(["--config", str(recipe), "--output_dir", str(tmp_path / "out")]), recipe_path=recipe
        )
    assert folders == [str(tmp_path / "out" / "a"), str(tmp_path / "out" / "b")]
    out = tmp_path / "out"

    for agent in ("a", "b"):
        repo_id = f"org/{agent}-ilr"
        assert run_hub.repo("model", repo_id).meta["private"] is True
        assert set(run_hub.branches(repo_id)) == {"main", "step-000002", "step-000004"}
        for step in (2, 4):
            pushed = run_hub.files_at(repo_id, f"step-00000{step}")
            local = out / f"checkpoint-{step}" / agent
            # The agent's checkpoint as saved (weights byte for byte) plus the trainer state; no optimizer state.
            assert pushed["model.safetensors"] == (local / "model.safetensors").read_bytes()
            assert json.loads(pushed["trainer_state.json"])["global_step"] == step
            assert (local / "optimizer.pt").is_file() and not any("optimizer" in name for name in pushed)
            assert not any(name.endswith((".pt", ".pth")) for name in pushed)
            assert run_hub.commit_messages(repo_id, f"step-00000{step}")[0] == f"ILR checkpoint, step {step}"
        final = run_hub.files_at(repo_id, "main")
        assert final["model.safetensors"] == (out / agent / "model.safetensors").read_bytes()
        assert "tokenizer.json" in final and "config.json" in final
        assert not any(name.endswith((".pt", ".pth")) for name in final)
        card = final["README.md"].decode()
        assert "ILR" in card and "Idea3" in card and "toy" in card and "learning_rate" in card
        assert "hub_token: <removed>" in card  # the recipe, without the token
        assert ModelCard(card).data.model_name == f"{agent}-ilr"
        for branch in run_hub.branches(repo_id):  # no token in anything pushed
            assert not any(
                TOKEN.encode() in data or ENV_TOKEN.encode() in data
                for data in run_hub.files_at(repo_id, branch).values()
            )
    assert "org/b-ilr" in run_hub.files_at("org/a-ilr")["README.md"].decode()  # the pairing
    # The checkpoints were pushed as they were saved, before the final model.
    commits = [r.path for r in run_hub.hits("POST", r"/commit/") if r.status == 200]
    assert commits.index("/api/models/org/a-ilr/commit/step-000002") < commits.index(
        "/api/models/org/a-ilr/commit/main"
    )
    assert all(r.authorized for r in run_hub.requests)  # with the recipe's token, not the stale one in HF_TOKEN
    assert [r.status for r in run_hub.hits("POST", r"^/api/repos/create$")] == [503, 200, 200]
    assert [r.status for r in run_hub.hits("POST", r"/commit/step-000002$")] == [-1, 200, 200]
    assert "3 of 3 pushes to org/a-ilr succeeded" in caplog.text
    _assert_no_secret(tmp_path, caplog.text, capsys.readouterr().out)


def test_failed_pushes_are_reported_at_the_end_and_leave_the_local_files_intact(
    tmp_path, tiny_model_a, tiny_model_b, run_hub, caplog, capsys
):
    # The Hub is down for the whole run, with an error text that echoes the token, as a careless proxy might.
    run_hub.inject(
        Fault("POST", r"^/api/repos/create$", 503, times=1000, message=f"Service Unavailable (token={TOKEN})")
    )
    recipe = _recipe(tmp_path, tiny_model_a, tiny_model_b)
    with caplog.at_level(logging.INFO):
        code_or_error = None
        try:
            cli_main(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
        except HubUnavailableError as error:
            code_or_error = str(error)
    assert code_or_error is not None and "6 Hub push(es) failed" in code_or_error
    assert "models are saved in" in code_or_error and "hf upload" in code_or_error
    assert run_hub.hits("POST", r"/commit/") == [] and run_hub.repo("model", "org/a-ilr") is None
    # Every push was tried 1 + 5 times (the pusher's default retries).
    assert len(run_hub.hits("POST", r"^/api/repos/create$")) == 6 * 6

    out = tmp_path / "out"
    assert (out / "a" / "model.safetensors").is_file() and (out / "checkpoint-4" / "b" / "optimizer.pt").is_file()
    # The checkpoint the pushes read is intact: its weights are the final model's, byte for byte.
    for agent in ("a", "b"):
        final, saved = _hashes(out / agent), _hashes(out / "checkpoint-4" / agent)
        weights = "model.safetensors" if "model.safetensors" in final else "adapter_model.safetensors"
        assert final[weights] == saved[weights]
    assert not list((out / ".hub_staging").rglob("*.safetensors"))  # snapshots cleaned up
    assert caplog.text.count("Hub push failed") == 6
    _assert_no_secret(tmp_path, code_or_error, *(r.getMessage() for r in caplog.records if r.name.startswith("ilr")))
    _assert_no_secret(tmp_path, capsys.readouterr().out)


def test_push_to_hub_needs_a_repository_per_agent(tmp_path, tiny_model_a, tiny_model_b, run_hub):
    recipe = yaml.safe_load(_recipe(tmp_path, tiny_model_a, tiny_model_b).read_text())
    del recipe["agents"][1]["hub_model_id"]
    path = tmp_path / "no_repo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"agents \['b'\] have no `hub_model_id`"):
        main(*parse_recipe(["--config", str(path), "--output_dir", str(tmp_path / "out")]))
