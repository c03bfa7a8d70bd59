"""The ILR loop under DDP: two CPU processes (torchrun, gloo) train the same two agents in lockstep."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ilr.calibration import calibrate_rewards
from ilr.grpo import group_advantages
from ilr.testing import free_port
from test_trainer import TESTS_DIR


WORKER = """
import json, sys
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests_dir!r})
from datasets import Dataset
from test_trainer import digits_reward, make_args, toy_rows
from ilr.configs import AgentConfig
from ilr.train import end_process
from ilr.scoring import StepRewards
from ilr.trainer import ILRTrainer

output_dir, model_a, model_b = sys.argv[1:4]
args = make_args(
    __import__("pathlib").Path(output_dir), generation_batch_size=8, num_generations=4,
    per_device_train_batch_size=4, calibration_scope="batch", scale_rewards="batch", max_steps=3,
    save_strategy="steps", save_steps=3,
)
agents = [AgentConfig(model_name_or_path=model_a, name="a"), AgentConfig(model_name_or_path=model_b, name="b")]
trainer = ILRTrainer(agents, args, Dataset.from_list(toy_rows()), {{"digits": digits_reward}})
rank = trainer.accelerator.process_index
metrics = trainer.train()
trainer.save_models()

# Batch-scope calibration of rewards that differ by process: the peer statistics must cover both processes' questions.
local = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) * (rank + 1) / 10.0
calibrated = trainer.calibrate(StepRewards(total={{stage: local for stage in args.train_stages}}, per_function={{}},
                                           unscored={{}}))
record = {{
    "rank": rank,
    "world": trainer.accelerator.num_processes,
    "questions": len(trainer.draw_questions()),
    "local": local.tolist(),
    "calibrated": calibrated.rewards["share"].tolist(),
    "advantages": trainer.compute_advantages(calibrated)[0]["share"].tolist(),  # scale_rewards: batch
    "reward": metrics["train/reward"],
}}
with open(f"{{output_dir}}/rank{{rank}}.json", "w") as handle:
    json.dump(record, handle)
# As `ilr train` ends: destroy the process group, then leave before interpreter finalisation, where gloo's threads
# could abort the process (SIGABRT) after all its work is done.
trainer.end_training()
end_process(0)
"""


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_a, tiny_model_b) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    worker = folder / "worker.py"
    worker.write_text(WORKER.format(tests_dir=str(TESTS_DIR)))
    output_dir = folder / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(worker), str(output_dir), tiny_model_a, tiny_model_b,
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=480, env={"OMP_NUM_THREADS": "1", **_env()}
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return output_dir


def _env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith(("RANK", "WORLD_SIZE", "LOCAL_"))}


def test_ddp_processes_split_the_questions_and_keep_identical_weights(ddp_run, tiny_model_a):
    records = [json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in records] == [2, 2] and [r["questions"] for r in records] == [1, 1]
    assert records[0]["reward"] == records[1]["reward"]  # metrics are averaged across processes

    for agent, weights in (("a", "model.safetensors"), ("b", "model.safetensors")):
        final = load_file(ddp_run / agent / weights)
        saved = load_file(ddp_run / "checkpoint-3" / agent / weights)
        assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    initial = load_file(Path(tiny_model_a) / "model.safetensors")
    final_a = load_file(ddp_run / "a" / "model.safetensors")
    assert not torch.equal(initial["model.embed_tokens.weight"], final_a["model.embed_tokens.weight"])
    assert (ddp_run / "metrics.jsonl").read_text().count("\n") == 3  # written once, by the main process


def test_batch_scope_calibration_uses_every_process_rewards(ddp_run):
    records = [json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    whole_batch = torch.cat([torch.tensor(r["local"], dtype=torch.float32) for r in records], dim=1)
    expected = calibrate_rewards(whole_batch, scope="batch").rewards
    got = torch.cat([torch.tensor(r["calibrated"]) for r in records], dim=1)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    # and it is not what each process would get from its own rewards alone
    alone = calibrate_rewards(torch.tensor(records[1]["local"], dtype=torch.float32), scope="batch").rewards
    assert not torch.allclose(torch.tensor(records[1]["calibrated"]), alone)


def test_batch_scaled_advantages_use_the_whole_batch_std(ddp_run):
    records = [json.loads((ddp_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    whole_batch = torch.cat([torch.tensor(r["local"], dtype=torch.float32) for r in records], dim=1)
    calibrated = calibrate_rewards(whole_batch, scope="batch").rewards
    expected = torch.stack([group_advantages(agent, "batch") for agent in calibrated])
    got = torch.cat([torch.tensor(r["advantages"]) for r in records], dim=1)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # each process's own std would scale its questions differently (its rewards are spread differently)
    own = torch.stack([group_advantages(agent, "batch") for agent in torch.tensor(records[1]["calibrated"])])
    assert not torch.allclose(torch.tensor(records[1]["advantages"]), own)
