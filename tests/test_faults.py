"""Faults during training: signals, kill -9 at random points (checkpoint writing included), failing generation."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ilr.checkpoints import TMP_CHECKPOINT_PREFIX, TRAINER_STATE_NAME, latest_checkpoint
from ilr.configs import AgentConfig, parse_recipe
from ilr.generation import GenerationBackend, GenerationError, SamplingParams, TransformersBackend
from ilr.models import load_tokenizer
from ilr.rewards import REWARD_FUNCS
from ilr.testing import assert_session_ends, processes_of_session
from test_trainer import RUNNER, TESTS_DIR, _final_weights, _kill_recipe, digits_reward, make_trainer


logger = logging.getLogger(__name__)

# How long the processes a run started (reward workers, their fork server and resource tracker) may outlive it.
HELPERS_EXIT_S = 5.0


@pytest.fixture
def runner(tmp_path, monkeypatch, one_thread) -> Path:
    monkeypatch.setitem(REWARD_FUNCS, "digits", digits_reward)
    path = tmp_path / "runner.py"
    path.write_text(RUNNER.format(tests_dir=str(TESTS_DIR)))
    return path


def _start(runner: Path, recipe: Path, output_dir: Path, *extra: str, delay: str = "0.3") -> subprocess.Popen:
    """
    Start a training run in a session of its own, so that every process it starts can be found afterwards (the
    session id is its pid); its output (stdout and stderr) goes to `<output_dir>.log`, read with `_output`.
    """
    command = [sys.executable, str(runner), "--config", str(recipe), "--output_dir", str(output_dir), *extra]
    env = {**os.environ, "ILR_TEST_REWARD_DELAY": delay}
    with open(f"{output_dir}.log", "w") as log:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _output(output_dir: Path) -> str:
    return Path(f"{output_dir}.log").read_text()


def _logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_a, tiny_model_b) -> tuple[Path, dict[str, torch.Tensor]]:
    """The recipe every test here runs, and the final weights of one uninterrupted run of it."""
    from ilr.train import main

    folder = tmp_path_factory.mktemp("straight")
    recipe = _kill_recipe(folder, tiny_model_a, tiny_model_b)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(REWARD_FUNCS, "digits", digits_reward)
        main(*parse_recipe(["--config", str(recipe), "--output_dir", str(folder / "out")]))
    torch.set_num_threads(previous)
    return recipe, _final_weights(folder / "out")


def _assert_same(straight: dict[str, torch.Tensor], resumed: dict[str, torch.Tensor]) -> None:
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def _assert_checkpoints_complete(output_dir: Path) -> None:
    """Every `checkpoint-*` folder has everything a resume reads: no partial checkpoint is ever visible."""
    for checkpoint in output_dir.glob("checkpoint-*"):
        assert (checkpoint / TRAINER_STATE_NAME).is_file(), checkpoint
        assert (checkpoint / "rng_state.pth").is_file(), checkpoint
        for agent, weights in (("a", "model.safetensors"), ("b", "adapter_model.safetensors")):
            for name in (weights, "optimizer.pt", "scheduler.pt"):
                assert (checkpoint / agent / name).is_file(), checkpoint / agent / name


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, save it, exit 128 + signal, resume exactly
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_current_step_and_exits_cleanly(tmp_path, straight, runner, signum):
    from ilr.train import main

    recipe, straight_weights = straight
    no_periodic_saves = ("--save_steps", "100")  # the only checkpoint is the one the signal asks for

    stopped_dir = tmp_path / "stopped"
    process = _start(runner, recipe, stopped_dir, *no_periodic_saves)
    deadline = time.monotonic() + 240
    while len(_logged_steps(stopped_dir)) < 2:
        assert process.poll() is None, _output(stopped_dir)[-3000:]
        assert time.monotonic() < deadline, "the run never logged two steps"
        time.sleep(0.02)
    process.send_signal(signum)
    process.wait(timeout=240)
    assert_session_ends(process.pid, HELPERS_EXIT_S)
    output = _output(stopped_dir)

    assert process.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output
    last_step = _logged_steps(stopped_dir)[-1]
    assert 2 <= last_step < 6  # it stopped early, after the step it was in
    assert latest_checkpoint(stopped_dir).name == f"checkpoint-{last_step}"
    assert f"stopped by {signal.Signals(signum).name} after step {last_step}" in output
    assert "resume_from_checkpoint: true" in output
    assert not list(stopped_dir.glob(f"{TMP_CHECKPOINT_PREFIX}*"))
    assert not (stopped_dir / "a").exists()  # the final models are not written by an interrupted run
    _assert_checkpoints_complete(stopped_dir)

    main(*parse_recipe(["--config", str(recipe), "--output_dir", str(stopped_dir), *no_periodic_saves]))
    _assert_same(straight_weights, _final_weights(stopped_dir))
    assert _logged_steps(stopped_dir) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 at random points, checkpoint writing included
# ---------------------------------------------------------------------------------------------------------------------
def _kill_loop(tmp_path: Path, straight: tuple, runner: Path, kills: int, seed: int) -> None:
    recipe, straight_weights = straight
    every_step = ("--save_steps", "1")  # a checkpoint is being written at a good share of the kill times

    rng = random.Random(seed)
    killed_dir = tmp_path / "killed"
    saved_before = 0
    for _ in range(kills):
        process = _start(runner, recipe, killed_dir, *every_step, delay="0.05")
        # Wait until the run has done some work of its own (past start-up), then kill it at a random moment.
        deadline = time.monotonic() + 240
        while len(_logged_steps(killed_dir)) <= saved_before and process.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        # The run scores with the reward pool (its data loading checks the golds there): its workers, fork server and
        # resource tracker share its session. Without them this test would prove nothing about leaks.
        helpers = len(processes_of_session(process.pid)) - 1
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        exit_s = assert_session_ends(process.pid, HELPERS_EXIT_S)
        if process.returncode == 0:  # it finished before the kill landed
            break
        assert helpers >= 3, f"the killed run had only {helpers} helper processes: {_output(killed_dir)[-2000:]}"
        logger.info("SIGKILL: the run's %d helper processes all exited within %.3f s", helpers, exit_s)
        _assert_checkpoints_complete(killed_dir)
        checkpoint = latest_checkpoint(killed_dir)
        saved = int(checkpoint.name.split("-")[1]) if checkpoint else 0
        logged = _logged_steps(killed_dir)
        # Nothing older than the last complete checkpoint is lost: at most the steps logged after it are redone.
        assert saved >= saved_before and (not logged or saved >= max(logged) - 1)
        saved_before = saved

    from ilr.train import main

    main(*parse_recipe(["--config", str(recipe), "--output_dir", str(killed_dir), *every_step]))
    assert not list(killed_dir.glob(f"{TMP_CHECKPOINT_PREFIX}*"))
    _assert_checkpoints_complete(killed_dir)
    _assert_same(straight_weights, _final_weights(killed_dir))


def test_random_kills_never_leave_a_partial_checkpoint_and_resume_exactly(tmp_path, straight, runner):
    _kill_loop(tmp_path, straight, runner, kills=2, seed=0)


@pytest.mark.slow
def test_random_kills_long_loop(tmp_path, straight, runner):
    _kill_loop(tmp_path, straight, runner, kills=12, seed=1)


# ---------------------------------------------------------------------------------------------------------------------
# A failing generation engine: retried with backoff, then a clear stop
# ---------------------------------------------------------------------------------------------------------------------
class FlakyBackend(GenerationBackend):
    """A real transformers backend behind an engine that fails its first `failures` calls with `error`."""

    def __init__(self, inner: TransformersBackend, failures: int, error: Exception):
        super().__init__(inner.name, inner.tokenizer, inner.eos_token_ids)
        self.inner, self.failures, self.error, self.attempts = inner, failures, error, 0

    def _generate(self, prompt_ids, params):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        return self.inner._generate(prompt_ids, params)

    def update_weights(self, model):
        self.inner.update_weights(model)


@pytest.fixture
def tiny_backend(tiny_model_a) -> TransformersBackend:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_a)
    return TransformersBackend(model, load_tokenizer(AgentConfig(model_name_or_path=tiny_model_a)), name="a")


PROMPTS = [[{"role": "user", "content": "What is 1 + 1?"}]]
PARAMS = SamplingParams(n=2, max_new_tokens=4, seed=0)


def test_transient_generation_failures_are_retried_with_backoff(tiny_backend, caplog):
    flaky = FlakyBackend(tiny_backend, failures=2, error=ConnectionError("server closed the connection"))
    flaky.max_retries, flaky.retry_backoff = 2, 0.01
    with caplog.at_level(logging.WARNING, logger="ilr.generation"):  # a training run may have raised ilr's level
        output = flaky.generate(PROMPTS, PARAMS)
    assert flaky.attempts == 3 and len(output.completions[0]) == 2
    assert flaky.stats.calls == 1  # one logical call, whatever the retries
    assert caplog.text.count("generation failed (ConnectionError: server closed the connection); retry") == 2
    assert output.completions == tiny_backend.generate(PROMPTS, PARAMS).completions  # same seed, same samples


def test_generation_that_keeps_failing_stops_with_the_agent_and_the_fix(tiny_backend):
    flaky = FlakyBackend(tiny_backend, failures=10, error=RuntimeError("engine died\ndetails"))
    flaky.max_retries, flaky.retry_backoff = 1, 0.0
    with pytest.raises(GenerationError, match=r"Agent `a`: generation failed 2 time\(s\), last with RuntimeError"):
        flaky.generate(PROMPTS, PARAMS)
    assert flaky.attempts == 2


def test_input_errors_are_not_retried(tiny_backend):
    flaky = FlakyBackend(tiny_backend, failures=10, error=ValueError("prompt too long"))
    flaky.max_retries = 5
    with pytest.raises(ValueError, match="prompt too long"):
        flaky.generate(PROMPTS, PARAMS)
    assert flaky.attempts == 1


def test_trainer_stops_on_a_dead_engine_without_a_checkpoint(tmp_path, tiny_model_a, tiny_model_b, one_thread):
    trainer = make_trainer(
        tmp_path, tiny_model_a, tiny_model_b, save_strategy="steps", save_steps=1, generation_retries=1, max_steps=3
    )
    assert all(backend.max_retries == 1 for backend in trainer.backends)
    trainer.backends[1].retry_backoff = 0.0
    trainer.backends[1]._generate = FlakyBackend(trainer.backends[1], 100, ConnectionError("refused"))._generate
    with pytest.raises(GenerationError, match="Agent `b`"):
        trainer.train()
    assert not list((tmp_path / "out").glob("*checkpoint-*"))
