"""The tiny fixture models: offline loading, distinct tokenizers, chat templates, generation, a TRL GRPO step, and
the network guard of conftest."""

import json
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ilr.testing import TINY_MODEL_A, NetworkAccessBlockedError, build_tiny_model


MESSAGES = [
    {"role": "system", "content": "Answer in \\boxed{}."},
    {"role": "user", "content": "What is 17 + 25?"},
]


@pytest.fixture(scope="module", params=["a", "b"])
def info(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"tiny_model_{request.param}_info")


def test_loads_offline_with_auto_classes(info):
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    model = AutoModelForCausalLM.from_pretrained(info.path)

    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == info.vocab_size
    assert model.config.hidden_size == info.spec.hidden_size
    assert model.config.tie_word_embeddings == info.spec.tie_word_embeddings
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        info.eos_token,
        info.pad_token,
        info.bos_token,
    )
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # Every special token is one id, also when it appears inside text.
    for token in tokenizer.all_special_tokens:
        assert len(tokenizer.encode(f"a{token}b", add_special_tokens=False)) == 3


def test_tokenizers_differ(tiny_model_a_info, tiny_model_b_info):
    tokenizer_a = AutoTokenizer.from_pretrained(tiny_model_a_info.path)
    tokenizer_b = AutoTokenizer.from_pretrained(tiny_model_b_info.path)
    text = "Let x be 42, so \\boxed{\\frac{1}{2}}.\ndef solve(n):\n    return n"

    ids_a = tokenizer_a(text, add_special_tokens=False).input_ids
    ids_b = tokenizer_b(text, add_special_tokens=False).input_ids
    assert ids_a != ids_b
    assert len(tokenizer_a) != len(tokenizer_b)
    assert tokenizer_a.eos_token_id != tokenizer_b.eos_token_id
    # Both are lossless byte-level tokenizers.
    assert tokenizer_a.decode(ids_a) == tokenizer_b.decode(ids_b) == text
    # B adds its BOS to plain text like Llama 3; A has none, like Qwen.
    assert tokenizer_a(text).input_ids == ids_a
    assert tokenizer_b(text).input_ids == [tokenizer_b.bos_token_id, *ids_b]


def test_chat_template_ends_with_generation_prompt(info):
    tokenizer = AutoTokenizer.from_pretrained(info.path)

    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith(info.generation_prompt)
    assert text.count(info.eos_token) == len(MESSAGES)
    assert MESSAGES[1]["content"] in text
    closed = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert not closed.endswith(info.generation_prompt)
    # transformers 5 returns a BatchEncoding here; the template writes the BOS itself, so it is not doubled.
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    if info.bos_token is not None:
        assert ids.count(info.bos_token_id) == 1


def test_batched_sampling_stops_at_eos_and_pads(info):
    tokenizer = AutoTokenizer.from_pretrained(info.path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(info.path)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        for content in ["Hi", "Compute 3 \\times 4 and put the answer in \\boxed{}.", "def f(x):"]
    ]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (inputs.attention_mask[:, 0] == 0).any()  # prompts of unequal length, padded on the left

    max_new_tokens = 16
    # A random model rarely samples the EOS; a bias makes some rows stop early, the others run to the limit.
    output = model.generate(
        **inputs,
        do_sample=True,
        num_return_sequences=4,
        max_new_tokens=max_new_tokens,
        sequence_bias=[[[info.eos_token_id], 2.0]],
    )
    completions = output[:, inputs.input_ids.shape[1] :]

    assert output.shape[0] == len(prompts) * 4
    stopped = 0
    for row in completions.tolist():
        if info.eos_token_id in row:
            end = row.index(info.eos_token_id)
            assert set(row[end + 1 :]) <= {info.pad_token_id}
            stopped += end + 1 < max_new_tokens
        else:
            assert len(row) == max_new_tokens
    assert stopped > 0
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    assert not any(info.eos_token in text or info.pad_token in text for text in texts)


def test_build_is_deterministic(tiny_model_a_info, tmp_path):
    rebuilt = build_tiny_model(TINY_MODEL_A, tmp_path)

    vocab = json.loads(Path(rebuilt.path, "tokenizer.json").read_text())["model"]
    reference = json.loads(Path(tiny_model_a_info.path, "tokenizer.json").read_text())["model"]
    assert vocab == reference
    assert (
        Path(rebuilt.path, "model.safetensors").read_bytes()
        == Path(tiny_model_a_info.path, "model.safetensors").read_bytes()
    )


def test_trl_grpo_step_updates_weights(tiny_model_a, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]} for a, b in [(1, 2), (30, 12)]]
    )

    def mean_token_id(completions, completion_ids, **kwargs):
        # Any reward that differs within a group gives non-zero advantages.
        return [sum(ids) / max(len(ids), 1) for ids in completion_ids]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        learning_rate=1e-2,
        beta=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = GRPOTrainer(model=tiny_model_a, reward_funcs=mean_token_id, args=args, train_dataset=dataset)
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}

    trainer.train()

    changed = [name for name, param in trainer.model.named_parameters() if not torch.equal(param, before[name])]
    assert changed, "the GRPO step left every weight unchanged"
    assert trainer.state.global_step == 1


def test_network_guard_blocks_remote_and_allows_loopback():
    with pytest.raises(NetworkAccessBlockedError, match=r"192\.0\.2\.1"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routed
    with socket.socket() as sock, pytest.raises(NetworkAccessBlockedError):
        sock.connect_ex(("huggingface.co", 443))

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1),
            socket.create_connection(("localhost", port), timeout=1),
        ):
            pass
