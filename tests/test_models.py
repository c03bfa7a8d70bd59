"""Loading agents' tokenizers and models from their settings, on the tiny fixture models."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

import ilr.models
from ilr.configs import AgentConfig
from ilr.models import load_model, load_tokenizer, model_family, resolve_dtype


TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
MESSAGES = [{"role": "user", "content": "2+2?"}]


def save_without_pad(info, folder) -> str:
    """A copy of a tiny model's tokenizer that declares no pad token (like Llama 3's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_tokenizer_is_left_padded_and_keeps_its_template(tiny_model_a_info):
    tokenizer = load_tokenizer(AgentConfig(model_name_or_path=tiny_model_a_info.path))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tiny_model_a_info.pad_token
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith(tiny_model_a_info.generation_prompt)


def test_chat_template_override_from_string_and_file(tiny_model_b, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    for value in (TEMPLATE, str(path)):
        tokenizer = load_tokenizer(AgentConfig(model_name_or_path=tiny_model_b, chat_template=value))
        assert tokenizer.chat_template == TEMPLATE
        text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        assert text == "[user]2+2?[assistant]"
    with pytest.raises(FileNotFoundError, match=r"missing\.jinja"):
        load_tokenizer(AgentConfig(model_name_or_path=tiny_model_b, chat_template=str(tmp_path / "missing.jinja")))


def test_missing_pad_token_uses_a_dedicated_one_else_eos(tiny_model_a_info, tiny_model_b_info, tmp_path, monkeypatch):
    # Both vocabularies reserve a padding token: B's is Llama 3's `<|finetune_right_pad_id|>`.
    for info in (tiny_model_a_info, tiny_model_b_info):
        folder = save_without_pad(info, tmp_path / info.spec.name)
        tokenizer = load_tokenizer(AgentConfig(model_name_or_path=folder))
        assert tokenizer.pad_token == info.pad_token and tokenizer.pad_token_id == info.pad_token_id
    # A vocabulary without one falls back to the EOS.
    monkeypatch.setattr(ilr.models, "_PAD_CANDIDATES", ())
    tokenizer = load_tokenizer(AgentConfig(model_name_or_path=str(tmp_path / tiny_model_b_info.spec.name)))
    assert tokenizer.pad_token == tiny_model_b_info.eos_token


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("float32", torch.float32),
        ("torch.float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_resolve_dtype(value, expected):
    assert resolve_dtype(value) == expected


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown `dtype` 'float8'"):
        resolve_dtype("float8")


def test_load_model_dtype_attention_and_mode(tiny_model_a):
    model = load_model(AgentConfig(model_name_or_path=tiny_model_a, dtype="bfloat16", attn_implementation="eager"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert not model.training
    model = load_model(AgentConfig(model_name_or_path=tiny_model_a, dtype="auto"), for_training=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # as saved
    assert model.training


def test_peft_wrapping_applies_lora_when_training(tiny_model_a):
    from peft import PeftModel

    # A one-item list: TRL's ModelConfig turns it into the string "q_proj", which PEFT alone would read as a regex.
    agent = AgentConfig(model_name_or_path=tiny_model_a, use_peft=True, lora_r=4, lora_target_modules=["q_proj"])
    model = load_model(agent, for_training=True)
    assert isinstance(model, PeftModel)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "q_proj" in name for name in trainable)
    num_layers = model.config.num_hidden_layers
    assert len(trainable) == 2 * num_layers  # lora_A and lora_B of every q_proj
    assert model_family(model) == "llama"
    # An adapter that was never trained is the identity: evaluation loads the plain model.
    assert not isinstance(load_model(agent), PeftModel)


def test_peft_all_linear_targets(tiny_model_b):
    agent = AgentConfig(model_name_or_path=tiny_model_b, use_peft=True, lora_r=4, lora_target_modules=["all-linear"])
    model = load_model(agent, for_training=True)
    targets = {name.split(".lora_A")[0].split(".")[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_model_family():
    assert model_family(LlamaConfig()) == "llama"
    assert model_family(Qwen2Config()) == "qwen"
    with pytest.raises(ValueError, match="model family"):
        model_family(object())


def test_missing_local_model_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    agent = AgentConfig(model_name_or_path=missing, name="ghost")
    for load in (load_model, load_tokenizer):
        with pytest.raises(OSError, match="no_such_model") as error:
            load(agent)
        assert "ghost" in str(error.value) and "save_pretrained" in str(error.value)


def test_missing_hub_model_offline_names_hf_hub_offline():
    # conftest sets HF_HUB_OFFLINE=1.
    agent = AgentConfig(model_name_or_path="ilr-tests/not-downloaded")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as error:
        load_model(agent)
    assert "ilr-tests/not-downloaded" in str(error.value)


def write_gguf(model, path) -> None:
    """Write a Llama model as an unquantised GGUF file, with llama.cpp's tensor names and q/k row order."""
    gguf = pytest.importorskip("gguf")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in layer_names.items()})
    heads = {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}
    for hf_name, gguf_name in names.items():
        tensor = model.state_dict()[hf_name].float()
        if gguf_name.split(".", 2)[-1] in heads:  # llama.cpp interleaves the rotary halves of q and k
            n = heads[gguf_name.split(".", 2)[-1]]
            tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, -1).transpose(1, 2).reshape(tensor.shape)
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_model_loads_as_a_plain_savable_model(tiny_model_a, tmp_path):
    from transformers import AutoModelForCausalLM

    original = load_model(AgentConfig(model_name_or_path=tiny_model_a))
    write_gguf(original, tmp_path / "tiny.gguf")
    # As transformers loads it, the model keeps the GGUF quantization config and refuses to be saved.
    as_loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    with pytest.raises(ValueError, match="not serializable"):
        as_loaded.save_pretrained(tmp_path / "as_loaded")

    model = load_model(AgentConfig(model_name_or_path=str(tmp_path), gguf_file="tiny.gguf"))
    assert not hasattr(model.config, "quantization_config")
    for name, expected in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=0, msg=name)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(
        reloaded.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight
    )
