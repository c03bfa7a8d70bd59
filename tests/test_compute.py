"""Training compute as generated tokens: the GRPO baseline's counter on TRL's log history, and the reader of both
methods' files, on hand-checkable inputs."""

import json
from types import SimpleNamespace

import pytest
from transformers import TrainerState

from ilr.compute import GeneratedTokensCallback, generated_tokens


def _log(callback, args, state, step, mean_length):
    state.global_step = step
    logs = {"completions/mean_length": mean_length, "loss": 0.0}
    state.log_history.append({**logs, "step": step})  # what `Trainer.log` appends before calling the callbacks
    callback.on_log(args, state, None, logs=logs)


def test_grpo_counter_multiplies_mean_length_by_completions_per_step():
    # 4 per device x 2 processes x 3 accumulation steps = 24 completions per optimizer step.
    args = SimpleNamespace(
        per_device_train_batch_size=4, world_size=2, gradient_accumulation_steps=3, num_iterations=1
    )
    state, callback = TrainerState(), GeneratedTokensCallback()
    _log(callback, args, state, step=1, mean_length=10.0)
    _log(callback, args, state, step=3, mean_length=5.0)  # logging every 2 steps: 2 steps of 24 completions
    assert [r["tokens/generated"] for r in state.log_history] == [240.0, 240.0]
    assert [r["tokens/total_generated"] for r in state.log_history] == [240.0, 480.0]
    # A generation batch reused twice (`num_iterations: 2`) samples half as many completions per step.
    args.num_iterations = 2
    _log(callback, args, state, step=4, mean_length=10.0)
    assert state.log_history[-1]["tokens/total_generated"] == 600.0


def test_grpo_counter_ignores_logs_without_completions():
    args = SimpleNamespace(
        per_device_train_batch_size=4, world_size=1, gradient_accumulation_steps=1, num_iterations=1
    )
    state = TrainerState()
    state.log_history.append({"train_runtime": 1.0, "step": 5})
    GeneratedTokensCallback().on_log(args, state, None, logs={"train_runtime": 1.0})
    assert "tokens/generated" not in state.log_history[-1]


def test_generated_tokens_reads_ilr_metrics_and_grpo_state(tmp_path):
    ilr_dir, grpo_dir = tmp_path / "ilr", tmp_path / "grpo"
    ilr_dir.mkdir()
    grpo_dir.mkdir()
    # Two processes: per-agent counts and `tokens/generated` are means over them, the running total their sum.
    records = [
        {"step": 1, "ilr/a/generated_tokens": 30.0, "ilr/b/generated_tokens": 10.0, "tokens/generated": 40.0,
         "tokens/total_generated": 80.0},
        {"step": 2, "ilr/a/generated_tokens": 20.0, "ilr/b/generated_tokens": 30.0, "tokens/generated": 50.0,
         "tokens/total_generated": 180.0},
    ]  # fmt: skip
    (ilr_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert generated_tokens(ilr_dir, ["a", "b"]) == {"a": 100.0, "b": 80.0}
    history = [{"step": 1, "tokens/total_generated": 240.0}, {"step": 2, "tokens/total_generated": 480.0}, {"step": 2}]
    (grpo_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert generated_tokens(grpo_dir, ["a"]) == {"a": 480.0}
    with pytest.raises(FileNotFoundError, match="has not finished"):
        generated_tokens(tmp_path, ["a"])
