"""The ILR loop under DeepSpeed ZeRO-2 and ZeRO-3: one engine per agent, the same updates as without DeepSpeed.

Each run is one CPU process started by `accelerate launch` with the repository's ZeRO configs (two CPU processes under
DeepSpeed do not work; see docs STACK_NOTES). The first run of the session JIT-compiles DeepSpeed's CPU comm op
(~25 s, cached in ~/.cache/torch_extensions).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from ilr.configs import AgentConfig
from ilr.testing import free_port
from ilr.trainer import ILRTrainer
from test_trainer import TESTS_DIR, digits_reward, make_args, toy_rows


pytest.importorskip("deepspeed")

REPO = TESTS_DIR.parent
CONFIGS = REPO / "recipes" / "accelerate_configs"

# Everything the semantics depend on, active: 4 micro-batches of 4 per agent and step in windows of 3 + 1 (an uneven
# last window), two passes (old log-probs from before the first update), the KL term (a reference engine), clipping
# that bites, weight decay on matrices only, a warm-up + cosine schedule. dapo normalises by window tokens, grpo
# divides by the window length: one each.
SETTINGS = {
    "generation_batch_size": 8,
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 3,
    "num_iterations": 2,
    "beta": 0.04,
    "max_grad_norm": 0.05,
    "weight_decay": 0.1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "learning_rate": 5e-3,
    "max_steps": 4,
    "save_strategy": "steps",
    "save_steps": 2,
}
LOSS_TYPE = {2: "dapo", 3: "grpo"}

WORKER = """
import json, shutil, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests_dir!r})
from pathlib import Path
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset
from test_deepspeed import SETTINGS
from test_trainer import digits_reward, make_args, toy_rows
from ilr.configs import AgentConfig
from ilr.trainer import ILRTrainer

folder, model_a, model_b, loss_type = Path(sys.argv[1]), *sys.argv[2:5]


def trainer_in(output_dir):
    args = make_args(output_dir, loss_type=loss_type, use_cpu=False, **SETTINGS)
    agents = [AgentConfig(model_name_or_path=model_a, name="a"), AgentConfig(model_name_or_path=model_b, name="b")]
    return ILRTrainer(agents, args, Dataset.from_list(toy_rows()), {{"digits": digits_reward}})


trainer = trainer_in(folder / "straight")
assert trainer.is_deepspeed and len({{id(r.engine_accelerator) for r in trainer.runtimes}}) == 2
trainer.train()
trainer.save_models()
result = {{"engines": [type(model).__name__ for model in trainer.models],
          "stage": trainer.accelerator.state.deepspeed_plugin.zero_stage}}

# A new trainer (a fresh Accelerate state: one `Accelerator` with DeepSpeed plugins per process) resumes from the
# step-2 checkpoint: weights, ZeRO optimizer partitions, schedule, RNG states, sampler.
AcceleratorState._reset_state()
GradientState._reset_state()
shutil.copytree(folder / "straight" / "checkpoint-2", folder / "resumed" / "checkpoint-2")
resumed = trainer_in(folder / "resumed")
resumed.train(resume_from_checkpoint=True)
resumed.save_models()
(folder / "result.json").write_text(json.dumps(result))
"""


def _launch(stage: int, worker: Path, folder: Path, model_a: str, model_b: str) -> dict:
    """`accelerate launch` with the repository's ZeRO config, as a user runs it (one process on this CPU)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"zero{stage}.yaml"),
        "--num_processes", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(worker), str(folder), model_a, model_b, LOSS_TYPE[stage],
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RANK", "WORLD_SIZE", "LOCAL_"))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return json.loads((folder / "result.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {
        f"{agent}/{k}": v for agent in ("a", "b") for k, v in load_file(folder / agent / "model.safetensors").items()
    }


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, tiny_model_a, tiny_model_b) -> dict[int, Path]:
    """The same runs without DeepSpeed, in this process, one per loss type."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    folders = {}
    for stage, loss_type in LOSS_TYPE.items():
        output_dir = tmp_path_factory.mktemp(f"plain{stage}")
        agents = [
            AgentConfig(model_name_or_path=tiny_model_a, name="a"),
            AgentConfig(model_name_or_path=tiny_model_b, name="b"),
        ]
        args = make_args(output_dir, loss_type=loss_type, **SETTINGS)
        trainer = ILRTrainer(agents, args, Dataset.from_list(toy_rows()), {"digits": digits_reward})
        assert not trainer.is_deepspeed
        trainer.train()
        trainer.save_models()
        folders[stage] = output_dir
    torch.set_num_threads(previous)
    return folders


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_like_the_plain_loop_and_resumes_exactly(
    stage, plain_runs, tmp_path, tiny_model_a, tiny_model_b
):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests_dir=str(TESTS_DIR)))
    result = _launch(stage, worker, tmp_path, tiny_model_a, tiny_model_b)
    assert result == {"engines": ["DeepSpeedEngine", "DeepSpeedEngine"], "stage": stage}
    straight, plain = tmp_path / "straight", plain_runs[stage]

    # Step by step the same loss, gradient norm (before clipping, which bites: max_grad_norm 0.05) and learning rate.
    for got, expected in zip(_metrics(straight), _metrics(plain), strict=True):
        for key in ("loss", "grad_norm", "learning_rate", "kl"):
            for agent in ("a", "b"):
                name = f"ilr/{agent}/{key}"
                assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-7), (got["step"], name)
    assert all(line["ilr/a/grad_norm"] > SETTINGS["max_grad_norm"] for line in _metrics(straight))

    # The same final weights (ZeRO's flat fp32 Adam differs from torch's in rounding only), and both agents moved.
    deepspeed_weights, plain_weights = _weights(straight), _weights(plain)
    assert deepspeed_weights.keys() == plain_weights.keys()  # a tied weight is saved once, as without DeepSpeed
    for name, tensor in deepspeed_weights.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, plain_weights[name], rtol=1e-4, atol=2e-5, msg=name)
    for agent, model in (("a", tiny_model_a), ("b", tiny_model_b)):
        initial = load_file(Path(model) / "model.safetensors")
        assert any(not torch.equal(initial[k], deepspeed_weights[f"{agent}/{k}"]) for k in initial)

    # Each agent's checkpoint holds its engine's own checkpoint (ZeRO-partitioned optimizer state) instead of
    # optimizer.pt, and resuming from step 2 ends exactly where the uninterrupted run ended.
    checkpoint = straight / "checkpoint-2" / "a"
    assert (checkpoint / "deepspeed").is_dir() and not (checkpoint / "optimizer.pt").exists()
    resumed = _weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], deepspeed_weights[name]) for name in deepspeed_weights)
    assert [line["step"] for line in _metrics(tmp_path / "resumed")] == [3, 4]
