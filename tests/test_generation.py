"""Generation backends on the two tiny models (transformers) and on fakes of vLLM's narrowest boundary.

The transformers backend runs for real: completions, chat-templated prompt ids, logprobs recomputed with a plain
forward pass, seeding and chunking. Here the vLLM backends also run against a fake `vllm` module (`LLM`,
`SamplingParams`, `TokensPrompt` and the output objects) and a fake `VLLMClient` that record every call, for what a
CPU engine cannot show (sleep mode, NCCL weight sync to a server) and the exact requests (ports, sampling parameters,
token-id prompts). The real engine, with its weight sync, is tested in `tests/test_vllm.py`.
"""

import copy
import inspect
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from ilr.configs import AgentConfig
from ilr.generation import (
    Completion,
    GenerationBackend,
    GenerationOutput,
    SamplingParams,
    TransformersBackend,
    VLLMColocateBackend,
    VLLMServerBackend,
    build_backend,
    check_vllm_server_ports,
    vllm_named_weights,
)
from ilr.models import load_model, load_tokenizer


LOGPROB_ATOL = 1e-4  # fp32 on CPU; the observed gap between generate's cached decoding and a full forward is ~5e-7
QUESTIONS = [
    "What is 2 + 3?",
    "Compute the product of all real solutions of the equation x^2 = 4, then put the answer in \\boxed{}.",
    "Hi",
]


def chat(questions: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": question}] for question in questions]


def templated_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    """The reference prompt ids: the chat template's text, tokenised without adding special tokens."""
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chat(questions)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.fixture(scope="module", params=["a", "b"])
def agent_parts(request, tiny_model_a_info, tiny_model_b_info):
    """(info, agent, tokenizer, model) of tiny model A (ChatML, no BOS) and B (Llama-3 style, BOS)."""
    info = tiny_model_a_info if request.param == "a" else tiny_model_b_info
    agent = AgentConfig(model_name_or_path=info.path, name=f"tiny_{request.param}")
    return info, agent, load_tokenizer(agent), load_model(agent)


@pytest.fixture
def backend(agent_parts) -> TransformersBackend:
    _, agent, tokenizer, model = agent_parts
    return TransformersBackend(model, tokenizer, name=agent.name)


def recomputed_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the completion tokens, from one unpadded forward pass over prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0]
    logits = logits[len(prompt_ids) - 1 : -1] / temperature
    return torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(completion_ids)[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# transformers backend
# ---------------------------------------------------------------------------------------------------------------------
def test_completions_shapes_trimming_and_counts(agent_parts):
    info, agent, tokenizer, model = agent_parts
    # A random model rarely samples its EOS: bias it so that some completions stop early and others hit the limit.
    backend = TransformersBackend(
        model, tokenizer, generation_kwargs={"sequence_bias": [[[info.eos_token_id], 3.0]]}, name=agent.name
    )
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=0)
    output = backend.generate(chat(QUESTIONS), params)

    assert isinstance(output, GenerationOutput)
    assert len(output.prompt_ids) == len(output.completions) == len(QUESTIONS)
    reasons = set()
    for group in output.completions:
        assert len(group) == params.n
        for completion in group:
            assert isinstance(completion, Completion)
            ids = completion.token_ids
            assert 1 <= len(ids) <= params.max_new_tokens
            assert len(completion.logprobs) == len(ids)
            assert all(lp <= 0.0 for lp in completion.logprobs)
            assert info.pad_token_id not in ids
            assert info.eos_token_id not in ids[:-1]  # cut right after the first EOS
            if completion.finish_reason == "stop":
                assert ids[-1] == info.eos_token_id
            else:
                assert completion.finish_reason == "length"
                assert len(ids) == params.max_new_tokens and ids[-1] != info.eos_token_id
            assert completion.text == tokenizer.decode(ids, skip_special_tokens=True)
            assert info.eos_token not in completion.text
            reasons.add(completion.finish_reason)
    assert reasons == {"stop", "length"}, "the bias should give both early stops and length cuts"
    assert output.num_prompt_tokens == sum(len(ids) for ids in output.prompt_ids)
    assert output.num_generated_tokens == sum(len(c.token_ids) for group in output.completions for c in group)


def test_prompt_ids_are_the_chat_template_tokens(backend, agent_parts):
    info, _, tokenizer, _ = agent_parts
    output = backend.generate(chat(QUESTIONS), SamplingParams(max_new_tokens=1))
    assert output.prompt_ids == templated_ids(tokenizer, QUESTIONS)
    generation_prompt = tokenizer(info.generation_prompt, add_special_tokens=False)["input_ids"]
    for ids in output.prompt_ids:
        assert ids[-len(generation_prompt) :] == generation_prompt
        if info.bos_token_id is None:
            assert ids[0] != info.bos_token_id
        else:
            # Model B: the template writes the BOS and the tokenizer would add another to plain text.
            text = tokenizer.apply_chat_template(chat(["x"])[0], add_generation_prompt=True, tokenize=False)
            assert tokenizer(text)["input_ids"][:2] == [info.bos_token_id] * 2
            assert ids[0] == info.bos_token_id and ids.count(info.bos_token_id) == 1


def test_bos_added_once_when_the_template_omits_it(tiny_model_b_info):
    agent = AgentConfig(
        model_name_or_path=tiny_model_b_info.path,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}",
    )
    tokenizer = load_tokenizer(agent)
    backend = TransformersBackend(load_model(agent), tokenizer)
    (ids,) = backend.encode_prompts(chat(["Hi"]))
    assert ids == [tiny_model_b_info.bos_token_id, *tokenizer("Hi:", add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize(("top_p", "top_k"), [(1.0, 0), (0.9, 20)])
def test_logprobs_match_a_forward_pass(agent_parts, top_p, top_k):
    """The stated requirement: log_softmax(logits / T) of the sampled tokens, as an unpadded forward pass gives it."""
    _, agent, tokenizer, model = agent_parts
    backend = TransformersBackend(model, tokenizer, name=agent.name)
    params = SamplingParams(n=2, temperature=0.7, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=3)
    output = backend.generate(chat(QUESTIONS), params)  # prompts of different lengths: left padding is exercised
    for prompt_ids, group in zip(output.prompt_ids, output.completions):
        for completion in group:
            expected = recomputed_logprobs(model, prompt_ids, completion.token_ids, params.temperature)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_seed_reproducibility(backend):
    prompts = chat(QUESTIONS[:2])
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=7)
    state = torch.get_rng_state()
    first = backend.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state), "a seeded call must leave the global RNG alone"
    again = backend.generate(prompts, params)
    other = backend.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=8))

    def tokens(output):
        return [[c.token_ids for c in group] for group in output.completions]

    assert tokens(first) == tokens(again)
    assert [[c.logprobs for c in g] for g in first.completions] == [[c.logprobs for c in g] for g in again.completions]
    assert tokens(first) != tokens(other)
    assert len({tuple(c.token_ids) for c in first.completions[0]}) > 1, "the n samples of a prompt should differ"


def test_greedy(agent_parts, backend):
    _, _, _, model = agent_parts
    output = backend.generate(chat(QUESTIONS[:2]), SamplingParams(n=2, temperature=0.0, max_new_tokens=8, seed=1))
    other_seed = backend.generate(chat(QUESTIONS[:2]), SamplingParams(n=2, temperature=0.0, max_new_tokens=8, seed=2))
    assert [[c.token_ids for c in g] for g in output.completions] == [
        [c.token_ids for c in g] for g in other_seed.completions
    ]
    for prompt_ids, (first, second) in zip(output.prompt_ids, output.completions):
        assert first.token_ids == second.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + first.token_ids])).logits[0, len(prompt_ids) - 1 : -1]
        assert first.token_ids == logits.argmax(-1).tolist()
        # Greedy logprobs use temperature 1.
        expected = recomputed_logprobs(model, prompt_ids, first.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(first.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_stats_count_one_call_per_generate(backend):
    params = SamplingParams(n=2, max_new_tokens=4, seed=0)
    outputs = [backend.generate(chat(QUESTIONS), params), backend.generate(chat(QUESTIONS[:1]), params)]
    empty = backend.generate([], params)
    assert empty.prompt_ids == [] and empty.completions == []
    stats = backend.stats
    assert stats.calls == 3
    assert stats.prompts == len(QUESTIONS) + 1
    assert stats.prompt_tokens == sum(o.num_prompt_tokens for o in outputs)
    assert stats.generated_tokens == sum(o.num_generated_tokens for o in outputs) == 2 * 4 * (len(QUESTIONS) + 1)
    assert stats.seconds > 0


def test_max_batch_size_chunking_matches_one_batch_under_greedy(agent_parts):
    _, _, tokenizer, model = agent_parts
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    prompts = chat([*QUESTIONS, "Find the smallest value of x such that the sum of its digits is prime."])
    whole = TransformersBackend(model, tokenizer, max_batch_size=None).generate(prompts, params)
    chunked = TransformersBackend(model, tokenizer, max_batch_size=3).generate(prompts, params)
    assert chunked.prompt_ids == whole.prompt_ids
    for group_whole, group_chunked in zip(whole.completions, chunked.completions):
        for a, b in zip(group_whole, group_chunked):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_model_mode_and_grad_during_generation(backend):
    seen = []
    hook = backend.model.register_forward_hook(
        lambda module, args, output: seen.append((module.training, torch.is_grad_enabled()))
    )
    backend.model.train()
    try:
        backend.generate(chat(QUESTIONS[:1]), SamplingParams(max_new_tokens=3))
    finally:
        hook.remove()
        training_after = backend.model.training
        backend.model.eval()
    assert seen and all(state == (False, False) for state in seen)
    assert training_after


def test_update_weights_shares_or_swaps_the_model(agent_parts):
    _, _, tokenizer, model = agent_parts
    backend = TransformersBackend(model, tokenizer)
    backend.update_weights(model)
    assert backend.model is model
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = backend.generate(chat(QUESTIONS[:1]), params).completions[0][0].token_ids
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    backend.update_weights(changed)
    assert backend.model is changed
    assert backend.generate(chat(QUESTIONS[:1]), params).completions[0][0].token_ids != before


def test_peft_model_generates_and_keeps_training_mode(tiny_model_a):
    agent = AgentConfig(model_name_or_path=tiny_model_a, use_peft=True, lora_r=4, lora_target_modules=["q_proj"])
    model = load_model(agent, for_training=True)
    backend = build_backend(agent, "transformers", model=model, tokenizer=load_tokenizer(agent))
    output = backend.generate(chat(QUESTIONS[:2]), SamplingParams(n=2, temperature=0.7, max_new_tokens=5, seed=0))
    assert [len(group) for group in output.completions] == [2, 2]
    assert model.training
    expected = recomputed_logprobs(model, output.prompt_ids[0], output.completions[0][0].token_ids, 0.7)
    torch.testing.assert_close(torch.tensor(output.completions[0][0].logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_build_backend_loads_what_is_missing(tiny_model_b):
    agent = AgentConfig(model_name_or_path=tiny_model_b, name="bee")
    backend = build_backend(agent, "transformers", max_batch_size=4)
    assert isinstance(backend, TransformersBackend) and isinstance(backend, GenerationBackend)
    assert backend.name == "bee" and backend.max_batch_size == 4
    assert backend.tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="Unknown generation backend"):
        build_backend(agent, "vllm-colocate")


@pytest.mark.parametrize("backend_name", ["vllm", "vllm_server"])
def test_vllm_backends_without_vllm_give_the_install_command(monkeypatch, tiny_model_a, backend_name):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    agent = AgentConfig(model_name_or_path=tiny_model_a, vllm_server_port=8001, vllm_group_port=51301)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'.*make install"):
        build_backend(agent, backend_name)


# ---------------------------------------------------------------------------------------------------------------------
# Fakes at vLLM's boundary
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class FakeLogprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]


def fake_completion(prompt_index: int, sample: int, eos_token_id: int, max_tokens: int):
    """Deterministic fake sample: even samples stop with EOS after 3 tokens, odd ones run to `max_tokens`."""
    if sample % 2 == 0:
        token_ids = [10 + sample, 20 + prompt_index, eos_token_id]
    else:
        token_ids = [30 + (i % 7) for i in range(max_tokens)]
    logprobs = [-0.01 * (1 + i) - 0.1 * sample - prompt_index for i in range(len(token_ids))]
    return token_ids, logprobs


class FakeSamplingParams:
    FIELDS = {"n", "temperature", "top_p", "top_k", "max_tokens", "logprobs", "seed", "stop_token_ids"}

    def __init__(self, **kwargs):
        assert set(kwargs) <= self.FIELDS, f"unexpected SamplingParams fields {set(kwargs) - self.FIELDS}"
        self.kwargs = kwargs


class FakeModelRunner:
    def __init__(self, calls):
        self.calls = calls

    def reload_weights(self, weights_iterator=None):
        self.calls.append(("reload_weights", [(name, tensor.detach().clone()) for name, tensor in weights_iterator]))


class FakeLLM:
    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        worker = types.SimpleNamespace(model_runner=FakeModelRunner(self.calls))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert use_tqdm is False
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(per_prompt) == len(prompts)
        self.calls.append(("generate", prompts, per_prompt))
        eos = per_prompt[0].kwargs["stop_token_ids"][0]
        outputs = []
        for p, (prompt, params) in enumerate(zip(prompts, per_prompt)):
            assert isinstance(prompt, FakeTokensPrompt)
            assert all(isinstance(token, int) for token in prompt["prompt_token_ids"])
            samples = []
            for k in range(params.kwargs["n"]):
                token_ids, logprobs = fake_completion(p, k, eos, params.kwargs["max_tokens"])
                # With logprobs=0 vLLM returns the sampled token; a more likely token is added here to check that the
                # backend reads the sampled token by id rather than by position.
                steps = [{t: FakeLogprob(lp, 2), 999: FakeLogprob(-0.001, 1)} for t, lp in zip(token_ids, logprobs)]
                reason = "stop" if token_ids[-1] == eos else "length"
                samples.append(FakeCompletionOutput(k, token_ids, steps, reason))
            outputs.append(FakeRequestOutput(list(prompt["prompt_token_ids"]), samples))
        return outputs

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


class FakeTokensPrompt(dict):
    """vLLM's `TokensPrompt` is a TypedDict: a dict with `prompt_token_ids`."""

    def __init__(self, *, prompt_token_ids):
        super().__init__(prompt_token_ids=prompt_token_ids)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    module.TokensPrompt = FakeTokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", module)
    # The colocated engine joins a torch.distributed world; keep the test's environment unchanged.
    for variable, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost"}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("MASTER_PORT", "29555")
    FakeLLM.instances = []
    return module


@pytest.fixture(scope="module")
def tiny_a(tiny_model_a_info):
    agent = AgentConfig(model_name_or_path=tiny_model_a_info.path, name="alpha", dtype="bfloat16")
    return (
        tiny_model_a_info,
        agent,
        load_tokenizer(agent),
        load_model(AgentConfig(model_name_or_path=agent.model_name_or_path)),
    )


def lora_model(path: str):
    """A LoRA-wrapped tiny model whose adapters are not the identity (B is zero at init), so merging matters."""
    agent = AgentConfig(model_name_or_path=path, use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    model = load_model(agent, for_training=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def merged_state(model) -> dict[str, torch.Tensor]:
    """What the engine must end up with: the PEFT model merged and unloaded (on a copy), or the plain weights."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


def assert_same_weights(sent: list[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor]) -> None:
    names = [name for name, _ in sent]
    assert len(names) == len(set(names)), "a tensor was sent twice"
    assert set(names) == set(expected)
    for name, tensor in sent:
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_vllm_named_weights_merges_lora_and_restores(tiny_model_a):
    model = lora_model(tiny_model_a)
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    expected = merged_state(model)
    assert all("lora" not in name and "base_layer" not in name for name in expected)
    with vllm_named_weights(model) as weights:
        assert_same_weights(weights, expected)
    torch.testing.assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_q)


# ---------------------------------------------------------------------------------------------------------------------
# Colocated vLLM
# ---------------------------------------------------------------------------------------------------------------------
def test_colocate_engine_arguments(fake_vllm, tiny_a):
    _, agent, tokenizer, model = tiny_a
    backend = build_backend(
        agent, "vllm", model=model, tokenizer=tokenizer, gpu_memory_utilization=0.3, max_model_len=512
    )
    assert isinstance(backend, VLLMColocateBackend)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": agent.model_name_or_path,
        "revision": "main",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.3,
        "max_model_len": 512,
        "enable_sleep_mode": False,
        "seed": 0,
        "distributed_executor_backend": "external_launcher",
        "logprobs_mode": "processed_logprobs",
        "max_num_batched_tokens": 4096,
        "trust_remote_code": False,
    }
    gguf_agent = AgentConfig(model_name_or_path="/models/smol", gguf_file="smol.Q4.gguf")
    VLLMColocateBackend(gguf_agent, tokenizer, llm_kwargs={"max_num_seqs": 8})
    assert FakeLLM.instances[-1].kwargs["model"] == "/models/smol/smol.Q4.gguf"
    assert FakeLLM.instances[-1].kwargs["tokenizer"] == "/models/smol"
    assert FakeLLM.instances[-1].kwargs["max_num_seqs"] == 8


def test_colocate_generate_requests_and_conversion(fake_vllm, tiny_a):
    info, agent, tokenizer, model = tiny_a
    backend = VLLMColocateBackend(agent, tokenizer, model=model)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=5)
    output = backend.generate(chat(QUESTIONS[:2]), params)

    (llm,) = FakeLLM.instances
    ((call, prompts, per_prompt),) = llm.calls
    assert call == "generate"
    expected_ids = templated_ids(tokenizer, QUESTIONS[:2])
    assert [prompt["prompt_token_ids"] for prompt in prompts] == expected_ids == output.prompt_ids
    assert per_prompt[0].kwargs == {
        "n": 3,
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": -1,  # vLLM's "off"
        "max_tokens": 5,
        "logprobs": 0,
        "stop_token_ids": [info.eos_token_id],
    }
    for p, group in enumerate(output.completions):
        assert len(group) == 3
        for k, completion in enumerate(group):
            token_ids, logprobs = fake_completion(p, k, info.eos_token_id, 5)
            assert completion.token_ids == token_ids
            assert completion.logprobs == pytest.approx(logprobs)
            assert completion.finish_reason == ("stop" if k % 2 == 0 else "length")
            assert completion.text == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert output.num_generated_tokens == 2 * (3 + 5 + 3)
    assert output.num_prompt_tokens == sum(map(len, expected_ids))
    assert backend.stats.calls == 1


def test_colocate_seeds_and_top_k(fake_vllm, tiny_a):
    _, agent, tokenizer, _ = tiny_a
    backend = VLLMColocateBackend(agent, tokenizer)
    params = SamplingParams(n=2, top_k=5, temperature=0.0, seed=11)
    backend.generate(chat(QUESTIONS), params)
    backend.generate(chat(QUESTIONS), params)
    backend.generate(chat(QUESTIONS), SamplingParams(n=2, top_k=5, temperature=0.0, seed=12))
    (_, _, first), (_, _, again), (_, _, other) = FakeLLM.instances[0].calls
    seeds = [params.kwargs["seed"] for params in first]
    assert len(set(seeds)) == len(QUESTIONS), "each prompt gets its own seed"
    assert seeds == [params.kwargs["seed"] for params in again]
    assert seeds != [params.kwargs["seed"] for params in other]
    assert first[0].kwargs["top_k"] == 5 and first[0].kwargs["temperature"] == 0.0


def test_colocate_sleep_mode(fake_vllm, tiny_a):
    _, agent, tokenizer, model = tiny_a
    backend = VLLMColocateBackend(agent, tokenizer, model=model, enable_sleep_mode=True)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["enable_sleep_mode"] is True
    assert llm.calls == [("sleep", 1)]  # starts asleep, like TRL
    backend.generate(chat(QUESTIONS[:1]), SamplingParams(max_new_tokens=2))
    assert llm.calls[1] == ("wake_up", ["weights", "kv_cache"]) and llm.calls[2][0] == "generate"
    backend.sleep()
    assert llm.calls[-1] == ("sleep", 1)
    backend.update_weights(model)  # level 1 keeps the weights in CPU memory: wake them, then overwrite
    assert llm.calls[4] == ("wake_up", ["weights"]) and llm.calls[5][0] == "reload_weights"
    backend.generate(chat(QUESTIONS[:1]), SamplingParams(max_new_tokens=2))
    assert ("wake_up", ["kv_cache"]) in llm.calls and llm.calls[-1][0] == "generate"

    # Level 2 discards the weights: they are pushed from the training model when the engine wakes up.
    backend = VLLMColocateBackend(agent, tokenizer, model=model, enable_sleep_mode=True, sleep_level=2)
    llm = FakeLLM.instances[-1]
    backend.update_weights(model)
    assert llm.calls == [("sleep", 2)]
    backend.generate(chat(QUESTIONS[:1]), SamplingParams(max_new_tokens=2))
    names = [call[0] for call in llm.calls]
    assert names[1] == "wake_up" and llm.calls[1][1] == ["weights"]
    assert names.index("reset_prefix_cache") < names.index("generate")
    assert ("wake_up", ["kv_cache"]) in llm.calls
    with pytest.raises(ValueError, match="sleep_level=2"):
        VLLMColocateBackend(agent, tokenizer, enable_sleep_mode=True, sleep_level=2)


# ---------------------------------------------------------------------------------------------------------------------
# vLLM server (trl vllm-serve)
# ---------------------------------------------------------------------------------------------------------------------
class FakeVLLMClient:
    """Records calls with the signatures of `trl.generation.vllm_client.VLLMClient` (checked below)."""

    instances: list["FakeVLLMClient"] = []

    def __init__(self, base_url=None, host="0.0.0.0", server_port=8000, group_port=51216, connection_timeout=0.0):
        self.init = {"host": host, "server_port": server_port, "group_port": group_port, "timeout": connection_timeout}
        self.calls = []
        FakeVLLMClient.instances.append(self)

    def generate(
        self,
        prompts,
        features=None,
        n=1,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_tokens=16,
        logprobs=0,
        structured_outputs_regex=None,
        generation_kwargs=None,
    ):
        self.calls.append(("generate", dict(locals())))
        eos = generation_kwargs["stop_token_ids"][0]
        completion_ids, all_logprobs, all_ids = [], [], []
        for p in range(len(prompts)):
            for k in range(n):
                token_ids, lps = fake_completion(p, k, eos, max_tokens)
                completion_ids.append(token_ids)
                # Sorted by probability, the sampled token second, as TRL's `parse_logprobs` may return it.
                all_logprobs.append([[-0.001, lp] for lp in lps])
                all_ids.append([[999, t] for t in token_ids])
        return {
            "prompt_ids": [list(prompt) for prompt in prompts],
            "completion_ids": completion_ids,
            "logprobs": all_logprobs,
            "logprob_token_ids": all_ids,
        }

    def init_communicator(self, device=0):
        self.calls.append(("init_communicator", device))

    def update_named_params(self, metadata, named_params):
        sent = [(name, tensor.detach().clone()) for name, tensor in named_params]
        self.calls.append(("update_named_params", metadata, sent))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def close_communicator(self):
        self.calls.append(("close_communicator",))


def test_fake_client_matches_trl_signatures():
    from trl.generation.vllm_client import VLLMClient

    for method in ("__init__", "generate", "init_communicator", "update_named_params", "reset_prefix_cache"):
        real = list(inspect.signature(getattr(VLLMClient, method)).parameters)
        fake = list(inspect.signature(getattr(FakeVLLMClient, method)).parameters)
        assert fake == real, method


@pytest.fixture
def fake_client(monkeypatch, fake_vllm):
    import trl.generation.vllm_client

    monkeypatch.setattr(trl.generation.vllm_client, "VLLMClient", FakeVLLMClient)
    FakeVLLMClient.instances = []
    backends = []
    yield backends
    for backend in backends:
        backend.close()


def server_agent(path: str, name: str, server_port: int | None, group_port: int | None) -> AgentConfig:
    return AgentConfig(
        model_name_or_path=path,
        name=name,
        vllm_server_host="10.0.0.5",
        vllm_server_port=server_port,
        vllm_group_port=group_port,
    )


def test_server_one_client_per_agent_with_its_ports(fake_client, tiny_model_a, tiny_model_b):
    agents = [server_agent(tiny_model_a, "a", 8001, 51301), server_agent(tiny_model_b, "b", 8002, 51302)]
    for agent in agents:
        fake_client.append(build_backend(agent, "vllm_server", connection_timeout=30.0))
    assert all(isinstance(backend, VLLMServerBackend) for backend in fake_client)
    assert [client.init for client in FakeVLLMClient.instances] == [
        {"host": "10.0.0.5", "server_port": 8001, "group_port": 51301, "timeout": 30.0},
        {"host": "10.0.0.5", "server_port": 8002, "group_port": 51302, "timeout": 30.0},
    ]
    # A third backend on a port already in use in this process is refused, until its owner is closed.
    with pytest.raises(ValueError, match="vllm_server_port"):
        build_backend(server_agent(tiny_model_a, "c", 8001, 51303), "vllm_server")
    fake_client[0].close()
    fake_client.append(build_backend(server_agent(tiny_model_a, "c", 8001, 51303), "vllm_server"))


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ([(8001, 51301), (8001, 51302)], "vllm_server_port"),
        ([(8001, 51301), (8002, 51301)], "vllm_group_port"),
        ([(8001, 51301), (51301, 51302)], "Port 51301"),
        ([(8001, None), (8002, 51302)], "has no `vllm_group_port`"),
        ([(None, 51301), (8002, 51302)], "has no `vllm_server_port`"),
    ],
)
def test_server_ports_must_be_distinct_and_set(ports, message):
    agents = [server_agent("m", f"agent{i}", *pair) for i, pair in enumerate(ports)]
    with pytest.raises(ValueError, match=message):
        check_vllm_server_ports(agents)


def test_server_generate_requests_and_conversion(fake_client, tiny_model_b_info):
    info = tiny_model_b_info
    agent = server_agent(info.path, "b", 8011, 51311)
    tokenizer = load_tokenizer(agent)
    backend = build_backend(agent, "vllm_server", tokenizer=tokenizer)
    fake_client.append(backend)
    params = SamplingParams(n=2, temperature=0.6, top_p=0.9, top_k=0, max_new_tokens=4, seed=5)
    output = backend.generate(chat(QUESTIONS), params)

    (client,) = FakeVLLMClient.instances
    ((name, call),) = client.calls
    assert name == "generate"
    expected_ids = templated_ids(tokenizer, QUESTIONS)
    assert call["prompts"] == expected_ids == output.prompt_ids
    assert all(ids[0] == info.bos_token_id and ids[1] != info.bos_token_id for ids in call["prompts"])
    assert (call["n"], call["temperature"], call["top_p"], call["top_k"]) == (2, 0.6, 0.9, -1)
    assert (call["max_tokens"], call["logprobs"]) == (4, 0)
    assert call["generation_kwargs"] == {"stop_token_ids": [info.eos_token_id], "seed": 5}
    for p, group in enumerate(output.completions):
        for k, completion in enumerate(group):
            token_ids, logprobs = fake_completion(p, k, info.eos_token_id, 4)
            assert completion.token_ids == token_ids
            assert completion.logprobs == pytest.approx(logprobs)  # the sampled token's, not the top one's
            assert completion.finish_reason == ("stop" if k % 2 == 0 else "length")
            assert completion.text == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert output.num_generated_tokens == len(QUESTIONS) * (3 + 4)


@pytest.mark.parametrize("peft", [False, True])
def test_server_weight_sync(fake_client, tiny_model_a, peft):
    agent = server_agent(tiny_model_a, "a", 8021, 51321)
    model = lora_model(tiny_model_a) if peft else load_model(agent)
    backend = build_backend(agent, "vllm_server", model=model)
    fake_client.append(backend)
    backend.update_weights(model)
    with torch.no_grad():
        next(model.parameters()).mul_(2.0)  # an "optimizer step"
    backend.update_weights(model)

    (client,) = FakeVLLMClient.instances
    names = [call[0] for call in client.calls]
    assert names == [
        "init_communicator",  # once, on the model's device
        "update_named_params",
        "reset_prefix_cache",
        "update_named_params",
        "reset_prefix_cache",
    ]
    assert client.calls[0][1] == torch.device("cpu")
    _, metadata, sent = client.calls[3]
    assert_same_weights(sent, merged_state(model))
    assert metadata == [(name, "float32", list(tensor.shape)) for name, tensor in sent]
    backend.close()
    assert client.calls[-1] == ("close_communicator",)


# ---------------------------------------------------------------------------------------------------------------------
# transformers backend: shared prompt prefill
# ---------------------------------------------------------------------------------------------------------------------
LONG_QUESTION = "Find the smallest value of x such that the sum of its digits is prime, and explain each step."


class ForwardShapes:
    """Records `(rows, columns)` of the `input_ids` of every forward pass of `model` while the block runs."""

    def __init__(self, model):
        self.model = model
        self.shapes: list[tuple[int, int]] = []

    def __enter__(self) -> list[tuple[int, int]]:
        def record(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self.shapes.append(tuple(input_ids.shape))

        self.handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
        return self.shapes

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()


def prompt_rows(shapes: list[tuple[int, int]]) -> int:
    """Rows of all forward passes that ran more than one position: the prompt rows the model computed."""
    return sum(rows for rows, columns in shapes if columns > 1)


@pytest.mark.parametrize(
    ("max_batch_size", "temperature", "top_p", "top_k"),
    [(None, 0.7, 1.0, 0), (None, 1.3, 0.9, 20), (5, 0.7, 0.95, 10), (3, 1.0, 1.0, 0)],
)
def test_shared_prefill_gives_the_completions_of_repeated_prompts(
    agent_parts, max_batch_size, temperature, top_p, top_k
):
    """Same seed, same batch layout: sharing each prompt's prefill must not change a single sampled token."""
    _, _, tokenizer, model = agent_parts
    prompts = chat([*QUESTIONS, LONG_QUESTION])  # prompts of different lengths: left padding is exercised
    params = SamplingParams(n=4, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=10, seed=11)
    repeated_backend = TransformersBackend(model, tokenizer, max_batch_size=max_batch_size, share_prompt_prefill=False)
    shared_backend = TransformersBackend(model, tokenizer, max_batch_size=max_batch_size)
    with ForwardShapes(model) as repeated_shapes:
        repeated = repeated_backend.generate(prompts, params)
    with ForwardShapes(model) as shared_shapes:
        shared = shared_backend.generate(prompts, params)

    # The shared path ran (chunks of 5 or 3 cut groups, and a chunk of one sample has nothing to share).
    assert prompt_rows(repeated_shapes) == len(prompts) * params.n
    assert prompt_rows(shared_shapes) < prompt_rows(repeated_shapes)
    assert shared.prompt_ids == repeated.prompt_ids
    for prompt_ids, group_shared, group_repeated in zip(shared.prompt_ids, shared.completions, repeated.completions):
        for a, b in zip(group_shared, group_repeated):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason and a.text == b.text
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
            expected = recomputed_logprobs(model, prompt_ids, a.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(a.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)
    assert len({tuple(c.token_ids) for c in shared.completions[0]}) > 1, "the n samples of a prompt should differ"


def test_shared_prefill_runs_each_prompt_once(agent_parts):
    _, _, tokenizer, model = agent_parts
    backend = TransformersBackend(model, tokenizer, max_batch_size=None)
    prompts = chat([*QUESTIONS, LONG_QUESTION])
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=0)
    with ForwardShapes(model) as shapes:
        output = backend.generate(prompts, params)
    width = max(len(ids) for ids in output.prompt_ids)
    # One pass over the distinct prompts without their last token, then `generate`: that token, then one per step.
    assert shapes == [(len(prompts), width - 1)] + [(len(prompts) * params.n, 1)] * params.max_new_tokens


def test_shared_prefill_is_skipped_where_nothing_is_shared(agent_parts):
    _, _, tokenizer, model = agent_parts
    backend = TransformersBackend(model, tokenizer, max_batch_size=None)
    prompts = chat(QUESTIONS)
    width = max(len(ids) for ids in backend.encode_prompts(prompts))
    for params in (
        SamplingParams(n=1, temperature=1.0, max_new_tokens=3, seed=0),
        SamplingParams(n=3, temperature=0.0, max_new_tokens=3),  # greedy: each prompt decoded once
    ):
        with ForwardShapes(model) as shapes:
            backend.generate(prompts, params)
        assert shapes[0] == (len(prompts), width)


def test_shared_prefill_needs_a_plain_full_attention_cache(agent_parts, monkeypatch):
    _, _, tokenizer, model = agent_parts
    backend = TransformersBackend(model, tokenizer)
    params = SamplingParams(n=2, max_new_tokens=4, seed=0)
    assert backend._can_share_prefill(backend._generation_config(params))
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    assert not backend._can_share_prefill(backend._generation_config(params))
    monkeypatch.undo()
    chunked = TransformersBackend(model, tokenizer, generation_kwargs={"prefill_chunk_size": 4})
    assert not chunked._can_share_prefill(chunked._generation_config(params))


def test_shared_prefill_falls_back_on_sliding_window_models(tiny_model_a):
    """A sliding-window cache keeps only the window: the backend must run every sample's prompt itself."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = load_tokenizer(AgentConfig(model_name_or_path=tiny_model_a))
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,  # shorter than the prompts
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MistralForCausalLM(config).eval()
    backend = TransformersBackend(model, tokenizer)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=6, seed=4)
    assert not backend._can_share_prefill(backend._generation_config(params))
    prompts = chat(QUESTIONS[:2])
    with ForwardShapes(model) as shapes:
        output = backend.generate(prompts, params)
    assert prompt_rows(shapes) == len(prompts) * params.n
    reference = TransformersBackend(model, tokenizer, share_prompt_prefill=False).generate(prompts, params)
    assert [[c.token_ids for c in g] for g in output.completions] == [
        [c.token_ids for c in g] for g in reference.completions
    ]
