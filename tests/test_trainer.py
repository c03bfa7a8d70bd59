"""The ILR co-learning loop: it learns, it trains each agent on its own tokens only, and it resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

from ilr.checkpoints import latest_checkpoint
from ilr.configs import AgentConfig, ILRConfig, parse_recipe
from ilr.rewards import REWARD_FUNCS
from ilr.sampler import QuestionSampler
from ilr.samples import TrainingSample, collate_samples
from ilr.testing import assert_session_ends
from ilr.trainer import ILRTrainer


TESTS_DIR = Path(__file__).resolve().parent


def digits_reward(completions, **kwargs):
    """Toy reward a random tiny model can raise fast: the fraction of characters that are digits."""
    delay = float(os.environ.get("ILR_TEST_REWARD_DELAY", "0"))
    if delay:
        time.sleep(delay)  # slows the killed run down so the test can kill it mid-run; never changes values
    return [sum(char.isdigit() for char in text) / max(1, len(text)) for text in completions]


def some_unscored_reward(completions, **kwargs):
    """Cannot score every third completion."""
    return [None if i % 3 == 0 else 1.0 for i in range(len(completions))]


# Recipe settings of every test run: CPU, fp32, no trackers, seeded.
CPU_RUN = {
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}


def toy_rows(count: int = 12) -> list[dict]:
    return [
        {"id": str(i), "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "tests": [], "setup": "",
         "entry_point": "", "task": "math", "source": "toy"}
        for i in range(count)
    ]  # fmt: skip


def make_args(output_dir: Path, **overrides) -> ILRConfig:
    settings = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "interaction_mode": "cooperate",
        "train_stages": ["share", "fuse"],
        "num_generations": 8,
        "generation_batch_size": 8,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_iterations": 1,
        "max_completion_length": 8,
        "max_analysis_length": 4,
        "peer_max_tokens": 8,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "loss_type": "dapo",
        "scale_rewards": "group",
        "beta": 0.0,
        "max_steps": 20,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
    }
    settings.update(overrides)
    return ILRConfig(**settings)


def make_trainer(tmp_path, model_a, model_b, reward_funcs=None, **overrides) -> ILRTrainer:
    agents = [AgentConfig(model_name_or_path=model_a, name="a"), AgentConfig(model_name_or_path=model_b, name="b")]
    return ILRTrainer(
        agents,
        make_args(tmp_path / "out", **overrides),
        Dataset.from_list(toy_rows()),
        reward_funcs or {"digits": digits_reward},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------------------
def test_sampler_visits_each_question_once_per_epoch_and_resumes():
    sampler = QuestionSampler(10, seed=3)
    draws = [sampler.draw(4) for _ in range(5)]  # 20 questions: two full epochs
    flat = [index for draw in draws for index in draw]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh order each epoch
    assert sampler.epoch == 2 and sampler.position == 0

    resumed, original = QuestionSampler(10, seed=3), QuestionSampler(10, seed=3)
    original.draw(7)
    resumed.load_state_dict(original.state_dict())
    assert resumed.draw(9) == original.draw(9)
    with pytest.raises(ValueError, match="same data and seed"):
        QuestionSampler(11, seed=3).load_state_dict(original.state_dict())


def test_collate_left_pads_prompts_and_right_pads_completions():
    samples = [
        TrainingSample([1, 2, 3], [7, 8], 0.5, False, "share", 0),
        TrainingSample([4], [9, 9, 9], -1.0, True, "fuse", 1),
    ]
    batch = collate_samples(samples, pad_token_id=0, mask_truncated=True)
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8, 0], [0, 0, 4, 9, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [0, 0, 0]]  # the truncated one is masked out
    assert batch.advantages.tolist() == [0.5, -1.0] and batch.logits_to_keep == 3


def test_unsupported_grpo_options_fail_before_loading_models(tmp_path):
    with pytest.raises(NotImplementedError, match="importance_sampling_level"):
        make_trainer(tmp_path, "/nonexistent/a", "/nonexistent/b", importance_sampling_level="sequence")


# ---------------------------------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------------------------------
def test_step_calls_each_backend_once_per_stage_and_trains_only_own_tokens(
    tmp_path, tiny_model_a, tiny_model_b, one_thread
):
    trainer = make_trainer(tmp_path, tiny_model_a, tiny_model_b)
    calls_before = [backend.stats.calls for backend in trainer.backends]
    questions = trainer.draw_questions()
    transcript = trainer.interact(questions, trainer.select_modes(questions, 1), 1)
    assert [backend.stats.calls - before for backend, before in zip(trainer.backends, calls_before)] == [3, 3]

    rewards = trainer.score(transcript)
    advantages, _ = trainer.compute_advantages(trainer.calibrate(rewards), rewards)
    samples = trainer.build_samples(transcript, 0, advantages, 1)
    assert [sample.stage for sample in samples] == ["share"] * 8 + ["fuse"] * 8  # stages are never mixed
    for sample in samples:
        group = transcript.group(0, sample.stage, sample.question)
        assert sample.prompt_ids == group.prompt_ids
        assert sample.completion_ids in group.completion_ids  # sampled by agent 0 itself
    # The peer's shown idea is in agent 0's fuse prompt, never in what agent 0 is trained to produce.
    fuse = transcript.group(0, "fuse", 0)
    peer_idea = transcript.group(1, "share", 0)
    peer_text = peer_idea.texts[peer_idea.selected].strip()
    own_tokens = {tuple(ids) for group in transcript.groups_for(0) for ids in group.completion_ids}
    assert all(tuple(sample.completion_ids) in own_tokens for sample in samples)
    if peer_text:
        assert peer_text[:4] in fuse.prompt[-1]["content"]

    before = [[p.detach().clone() for p in model.parameters()] for model in trainer.models]
    metrics = trainer.update_agent(0, samples)
    changed = [
        any(not torch.equal(p, q) for p, q in zip(model.parameters(), old))
        for model, old in zip(trainer.models, before)
    ]
    assert changed == [True, False]
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_engines_sleep_after_the_discussion_and_wake_for_the_sync(tmp_path, tiny_model_a, tiny_model_b, one_thread):
    # Colocated vLLM engines with sleep mode free their memory for the update (`ilr plan` counts on it); the hook is
    # a no-op for this backend, so the order of the calls is what is checked.
    trainer = make_trainer(tmp_path, tiny_model_a, tiny_model_b)
    events = []
    for backend in trainer.backends:
        for hook in ("generate", "sleep", "update_weights"):
            original = getattr(backend, hook)

            def record(*args, _original=original, _event=f"{backend.name}.{hook}", **kwargs):
                events.append(_event)
                return _original(*args, **kwargs)

            setattr(backend, hook, record)
    update_agent = trainer.update_agent

    def update(*args, **kwargs):
        events.append("update")
        return update_agent(*args, **kwargs)

    trainer.update_agent = update
    trainer.training_step(1)
    last_generate = max(i for i, event in enumerate(events) if event.endswith(".generate"))
    sleeps = [i for i, event in enumerate(events) if event.endswith(".sleep")]
    assert [events[i] for i in sleeps] == ["a.sleep", "b.sleep"]
    assert last_generate < min(sleeps) and max(sleeps) < events.index("update")
    assert events[-2:] == ["a.update_weights", "b.update_weights"]


def test_unscored_rewards_are_nan_counted_and_get_zero_advantage(tmp_path, tiny_model_a, tiny_model_b, one_thread):
    trainer = make_trainer(
        tmp_path, tiny_model_a, tiny_model_b, {"digits": digits_reward, "partial": some_unscored_reward}, max_steps=1
    )
    questions = trainer.draw_questions()
    transcript = trainer.interact(questions, trainer.select_modes(questions, 1), 1)
    rewards = trainer.score(transcript)
    num_completions = sum(
        g.num_samples for stage in transcript.stages for row in transcript.groups[stage] for g in row
    )
    assert rewards.unscored == {"digits": 0, "partial": len(range(0, num_completions, 3))}
    for stage in ("share", "fuse"):
        unscored = np.isnan(rewards.per_function["partial"][stage])
        assert unscored.any()
        assert np.array_equal(np.isnan(rewards.total[stage]), unscored)  # never a silent 0 in the total
    advantages, _ = trainer.compute_advantages(trainer.calibrate(rewards), rewards)
    share_nan = torch.as_tensor(np.isnan(rewards.total["share"]))
    assert torch.all(advantages["share"][share_nan] == 0) and torch.isfinite(advantages["share"]).all()

    metrics = trainer.train()
    assert metrics["rewards/partial/unscored"] > 0
    assert np.isfinite(metrics["ilr/a/loss"]) and np.isfinite(metrics["ilr/b/loss"])


# ---------------------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------------------
def _share_rewards(tmp_path, model_a, model_b, sign: float) -> np.ndarray:
    trainer = make_trainer(tmp_path, model_a, model_b)
    compute_advantages = trainer.compute_advantages

    def signed_advantages(calibrated, raw=None):  # sign -1: every advantage flipped, a run that must not learn
        advantages, changes = compute_advantages(calibrated, raw)
        return {stage: sign * stage_advantages for stage, stage_advantages in advantages.items()}, changes

    trainer.compute_advantages = signed_advantages
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return np.array([[line["ilr/a/share/reward"], line["ilr/b/share/reward"]] for line in lines])


def test_both_agents_learn_and_flipped_advantages_do_not(tmp_path, tiny_model_a, tiny_model_b, one_thread):
    learned = _share_rewards(tmp_path / "learn", tiny_model_a, tiny_model_b, 1.0)
    flipped = _share_rewards(tmp_path / "flip", tiny_model_a, tiny_model_b, -1.0)
    assert learned.shape == flipped.shape == (20, 2)
    start, end = learned[:5].mean(axis=0), learned[-5:].mean(axis=0)
    assert np.all(end > start + 0.15), (start, end)  # both agents, e.g. 0.07 -> 0.78 and 0.05 -> 0.45
    assert np.all(flipped[-5:].mean(axis=0) <= flipped[:5].mean(axis=0)), flipped
    metrics = json.loads((tmp_path / "learn" / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("calibration/clip_frac", "calibration/adv_delta", "interaction/coop_frac", "ilr/a/loss",
                "ilr/b/grad_norm", "ilr/a/learning_rate", "ilr/a/fuse/reward", "tokens/per_second",
                "time/generation", "time/scoring", "time/update", "time/sync"):  # fmt: skip
        assert key in metrics


# ---------------------------------------------------------------------------------------------------------------------
# Dynamic Interaction pre-pass
# ---------------------------------------------------------------------------------------------------------------------
def test_dynamic_mode_runs_the_self_rank_prepass_once_then_uses_the_cache(
    tmp_path, tiny_model_a, tiny_model_b, one_thread
):
    agents = [
        AgentConfig(model_name_or_path=tiny_model_a, name="a"),
        AgentConfig(model_name_or_path=tiny_model_b, name="b"),
    ]
    rows = toy_rows(8)
    args = make_args(tmp_path / "out", interaction_mode="dynamic", difficulty_source="self_rank", ability_samples=2)
    trainer = ILRTrainer(
        agents, args, Dataset.from_list(rows[:6]), {"digits": digits_reward}, eval_dataset=Dataset.from_list(rows[6:])
    )
    estimate = trainer.prepare_irt()
    # Ratings of train and validation questions, and greedy validation answers: 3 calls per agent.
    assert [backend.stats.calls for backend in trainer.backends] == [3, 3]
    assert estimate.difficulty.shape == (6, 2) and np.isfinite(estimate.gamma).all()
    assert len(list((tmp_path / "out" / "irt").glob("irt_self_rank_*.json"))) == 1
    cached = trainer.prepare_irt()
    assert [backend.stats.calls for backend in trainer.backends] == [3, 3]
    assert np.array_equal(cached.gamma, estimate.gamma)
    trainer.irt = cached
    modes = trainer.select_modes(trainer.draw_questions(), 1)
    assert modes.shape == (1, 2) and modes.dtype == bool


def test_ability_refresh_resolves_gamma_from_the_share_accuracy_of_the_window():
    from types import SimpleNamespace

    from ilr.difficulty import IRTEstimate
    from ilr.scoring import StepRewards

    trainer = object.__new__(ILRTrainer)
    trainer.args = SimpleNamespace(ability_refresh_steps=2, irt_scale=1.7)
    trainer.agents = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    trainer.accelerator = SimpleNamespace(num_processes=1)
    trainer.irt = IRTEstimate(["q0", "q1"], np.array([[-1.0, -1.0], [1.0, 1.0]]), np.zeros(2), "self_rank")
    trainer.ability_window = []
    share_accuracy = np.stack([np.ones((2, 4)), np.zeros((2, 4))])  # [m, Q, G]: agent a always right, b never
    share_accuracy[1, 0, 0] = np.nan  # an unscored answer is skipped, not counted wrong
    rewards = StepRewards(total={}, per_function={"accuracy": {"share": share_accuracy}}, unscored={})
    questions = [{"id": "q0"}, {"id": "q1"}]

    trainer.refresh_ability(questions, rewards, step=1)
    assert np.array_equal(trainer.irt.gamma, [0.0, 0.0]) and len(trainer.ability_window) == 1
    trainer.refresh_ability(questions, rewards, step=2)
    assert trainer.irt.gamma[0] > 1.0 and trainer.irt.gamma[1] < -1.0  # beyond the hardest / easiest question
    assert trainer.ability_window == []


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: kill -9 mid-run, resume, same weights as an uninterrupted run
# ---------------------------------------------------------------------------------------------------------------------
RUNNER = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests_dir!r})
from test_trainer import digits_reward
from ilr.rewards import REWARD_FUNCS
REWARD_FUNCS["digits"] = digits_reward
from ilr.train import cli_main
if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
"""


def _kill_recipe(tmp_path, model_a, model_b) -> Path:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in toy_rows()))
    recipe = {
        "agents": [
            {"model_name_or_path": model_a, "name": "a"},
            {
                "model_name_or_path": model_b,
                "name": "b",
                "use_peft": True,
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
            },
        ],
        "dataset_name": "toy",
        "data_files": [str(data)],
        "question_column": "problem",
        "answer_column": "answer",
        "reward_funcs": ["digits"],
        "interaction_mode": "ratio:0.5",
        "num_generations": 4,
        "generation_batch_size": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_iterations": 2,
        "max_completion_length": 8,
        "max_analysis_length": 4,
        "peer_max_tokens": 8,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.2,
        "beta": 0.05,
        "loss_type": "dapo",
        "scale_rewards": "group",
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 2,
        "save_total_limit": 2,
        "logging_steps": 1,
        **CPU_RUN,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    weights = {f"a/{k}": v for k, v in load_file(output_dir / "a" / "model.safetensors").items()}
    weights.update({f"b/{k}": v for k, v in load_file(output_dir / "b" / "adapter_model.safetensors").items()})
    return weights


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_model_a, tiny_model_b, one_thread, monkeypatch):
    from ilr.train import main

    recipe = _kill_recipe(tmp_path, tiny_model_a, tiny_model_b)
    monkeypatch.setitem(REWARD_FUNCS, "digits", digits_reward)
    main(*parse_recipe(["--config", str(recipe), "--output_dir", str(tmp_path / "straight")]))

    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(tests_dir=str(TESTS_DIR)))
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "ILR_TEST_REWARD_DELAY": "0.3"}
    command = [sys.executable, str(runner), "--config", str(recipe), "--output_dir", str(killed_dir)]
    # A session of its own: whatever the run started can be found after the kill (see test_faults.py).
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoint-4").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "checkpoint-4 never appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert_session_ends(process.pid, timeout_s=5.0)  # its reward workers, fork server and resource tracker
    assert latest_checkpoint(killed_dir).name == "checkpoint-4"
    assert not (killed_dir / "a").exists()  # it never finished
    (killed_dir / "tmp-checkpoint-6").mkdir()  # as if killed while writing the next checkpoint
    (killed_dir / "tmp-checkpoint-6" / "partial").write_text("")

    main(*parse_recipe(["--config", str(recipe), "--output_dir", str(killed_dir), "--resume_from_checkpoint", "true"]))
    assert not (killed_dir / "tmp-checkpoint-6").exists()
    assert sorted(p.name for p in killed_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # limit 2
    straight, resumed = _final_weights(tmp_path / "straight"), _final_weights(killed_dir)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    initial = load_file(Path(tiny_model_a) / "model.safetensors")
    assert not torch.equal(initial["model.embed_tokens.weight"], straight["a/model.embed_tokens.weight"])
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines of the killed steps after checkpoint-4 were replaced
