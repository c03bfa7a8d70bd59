"""Loading an agent's tokenizer and model from its [`~ilr.configs.AgentConfig`].

Everything an agent can customise (revision, dtype, attention kernel, GGUF weights, chat template, LoRA) is applied
here, so generation backends and the trainer receive ready objects and never read those settings themselves.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import torch


if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from ilr.configs import AgentConfig


# Tokens some vocabularies reserve for padding without declaring them as `pad_token` (Llama 3 has the second one).
_PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>", "[PAD]", "<|padding|>")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """
    Map a recipe's `dtype` string to what `from_pretrained(dtype=...)` takes.

    Args:
        dtype (`str`, `torch.dtype` or `None`):
            `"auto"` (the checkpoint's own dtype), a torch dtype name (`"bfloat16"`, `"float16"`, `"float32"`) or a
            short alias (`"bf16"`, `"fp16"`, `"fp32"`). `None` means `"auto"`.

    Returns:
        `torch.dtype` or `"auto"`.
    """
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(
            f"Unknown `dtype` {dtype!r}: use `auto`, `bfloat16`, `float16` or `float32` in the agent's settings."
        ) from None


def _trust_remote_code(agent: AgentConfig) -> bool:
    # `ModelConfig.trust_remote_code` exists in some TRL versions only.
    return bool(getattr(agent, "trust_remote_code", False))


def _load_error(agent: AgentConfig, what: str, error: Exception) -> OSError:
    """An `OSError` that says where we looked for the model and how to make it loadable."""
    from huggingface_hub import is_offline_mode

    path = agent.model_name_or_path
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        where = f"`{path}` is not a folder with a saved {what}" if not os.path.isdir(path) else f"`{path}` is broken"
        fix = "point `model_name_or_path` at a folder written by `save_pretrained`"
    elif is_offline_mode():
        where = f"`{path}` is not a local folder and the Hub is offline (`HF_HUB_OFFLINE=1`)"
        fix = f"unset `HF_HUB_OFFLINE` to download it, or download it first (`hf download {path}`) on a machine online"
    else:
        where = f"`{path}` could not be loaded from the Hub (no local folder of that name either)"
        fix = "check the repository id and `model_revision`, your network, and `HF_TOKEN` for gated models"
    return OSError(f"Cannot load the {what} of agent `{agent.name}`: {where}. To fix it, {fix}. ({error})")


def _read_chat_template(value: str) -> str:
    """A chat template given inline, or the content of the `.jinja` file it names."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            return handle.read()
    if value.endswith((".jinja", ".jinja2")) and "{" not in value:
        raise FileNotFoundError(f"`chat_template` names a template file that does not exist: {value!r}.")
    return value


def load_tokenizer(agent: AgentConfig) -> PreTrainedTokenizerBase:
    """
    Load an agent's tokenizer, ready for batched generation.

    The agent's `chat_template` (inline Jinja or a path to a `.jinja` file) replaces the tokenizer's own. When the
    tokenizer declares no pad token, a dedicated padding token of its vocabulary is used if there is one (e.g. Llama
    3's `<|finetune_right_pad_id|>`), else its EOS. Padding is on the left, as generation needs.

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            The agent (`model_name_or_path`, `model_revision`, `gguf_file`, `chat_template`).

    Returns:
        `PreTrainedTokenizerBase`: The tokenizer.

    Raises:
        `OSError`: when the tokenizer cannot be found; the message names the path and `HF_HUB_OFFLINE`.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            agent.model_name_or_path,
            revision=agent.model_revision,
            trust_remote_code=_trust_remote_code(agent),
            gguf_file=agent.gguf_file,
        )
    except OSError as error:
        raise _load_error(agent, "tokenizer", error) from error
    if agent.chat_template is not None:
        tokenizer.chat_template = _read_chat_template(agent.chat_template)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer of agent `{agent.name}` ({agent.model_name_or_path}) has no chat template. Set "
            "`chat_template` for this agent (a Jinja string or a path to a .jinja file)."
        )
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((token for token in _PAD_CANDIDATES if token in vocab), tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """
    Rebuild a GGUF-loaded model as a plain one that can be trained and `save_pretrained`-ed.

    transformers dequantises GGUF weights on load but keeps the GGUF `quantization_config` on the config, so the
    model cannot be saved as loaded. The copy has the same weights, a config without `quantization_config`, and the
    original's generation config.

    Args:
        model (`PreTrainedModel`):
            A model loaded with `from_pretrained(..., gguf_file=...)`.

    Returns:
        `PreTrainedModel`: The plain model, in `model`'s dtype.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def load_model(
    agent: AgentConfig, *, device: str | torch.device | None = None, for_training: bool = False
) -> PreTrainedModel:
    """
    Load an agent's causal language model.

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            The agent (`model_name_or_path`, `model_revision`, `dtype`, `attn_implementation`, `gguf_file`,
            `load_in_4bit`/`load_in_8bit`, `use_peft` and the `lora_*` settings).
        device (`str` or `torch.device`, *optional*):
            Move the model there; by default it stays where `from_pretrained` puts it (the CPU).
        for_training (`bool`, *optional*, defaults to `False`):
            Return the model in train mode and, when `agent.use_peft` is set, wrapped with LoRA adapters from
            `trl.get_peft_config(agent)`. Otherwise the model is in eval mode and never wrapped (a fresh adapter
            is the identity, so it would only slow down evaluation).

    Returns:
        `PreTrainedModel` (or `peft.PeftModel`): The model.

    Raises:
        `OSError`: when the model cannot be found; the message names the path and `HF_HUB_OFFLINE`.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": agent.model_revision,
        "dtype": resolve_dtype(agent.dtype),
        "trust_remote_code": _trust_remote_code(agent),
    }
    if agent.attn_implementation is not None:
        kwargs["attn_implementation"] = agent.attn_implementation
    if agent.load_in_4bit or agent.load_in_8bit:  # bitsandbytes (CUDA), as TRL's scripts load it
        from trl import get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(agent)
    try:
        if agent.gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(agent.model_name_or_path, gguf_file=agent.gguf_file, **kwargs)
            model = dequantized_copy(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(agent.model_name_or_path, **kwargs)
    except OSError as error:
        raise _load_error(agent, "model", error) from error
    if device is not None:
        model = model.to(device)
    if for_training and agent.use_peft:
        from peft import get_peft_model
        from trl import get_peft_config

        peft_config = get_peft_config(agent)
        # TRL's ModelConfig turns a one-item list into a string, which PEFT reads as a regex over full module names:
        # `lora_target_modules: [q_proj]` would match nothing. A plain module name goes back into a list.
        target = peft_config.target_modules
        if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[A-Za-z0-9_]+", target):
            peft_config.target_modules = {target}
        model = get_peft_model(model, peft_config)
    model.train(for_training)
    return model


def model_family(model_or_config: PreTrainedModel | PretrainedConfig | Any) -> str:
    """
    The architecture family of a model: its `model_type` without version suffixes (`qwen2` and `qwen3` -> `qwen`,
    `llama` -> `llama`, `gemma3_text` -> `gemma`).

    Args:
        model_or_config (`PreTrainedModel`, `peft.PeftModel` or `PretrainedConfig`):
            A model (PEFT-wrapped or not) or its config.

    Returns:
        `str`: The family name, lower case.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"Cannot tell the model family of {type(model_or_config).__name__}: no `model_type`.")
    match = re.match(r"[a-z]+", model_type.lower())
    return match.group(0) if match else model_type.lower()


# ---------------------------------------------------------------------------------------------------------------------
# A prompt's KV cache, computed once and shared by the samples that continue it (generation and the GRPO update)
# ---------------------------------------------------------------------------------------------------------------------
def has_expandable_cache(model: Any) -> bool:
    """
    Whether `model` is a decoder whose cache is a plain `DynamicCache` of full-attention layers: one holding every prompt
    position's keys and values, which can be repeated along the batch for the samples that share the prompt.
    Sliding-window, chunked, linear-attention or quantized cache layers keep something else.

    Args:
        model:
            A transformers model (a PEFT model is fine), unwrapped from any distributed wrapper.

    Returns:
        `bool`
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        cache = DynamicCache(config=config.get_text_config(decoder=True))
    except Exception:  # a configuration DynamicCache cannot read: not a model this was written for
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def is_expandable_cache(cache: Any, length: int) -> bool:
    """
    Whether a cache returned by a prompt forward pass is a full-attention `DynamicCache` of exactly `length` positions.

    Args:
        cache:
            The forward pass's `past_key_values`.
        length (`int`):
            The prompt width the pass ran on.

    Returns:
        `bool`
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return (
        isinstance(cache, DynamicCache)
        and all(type(layer) is DynamicLayer for layer in cache.layers)
        and cache.get_seq_length() == length
    )


def repeat_cache_rows(cache: Any, repeats: torch.Tensor, rows: int) -> None:
    """
    Repeat, in place and differentiably, each prompt row of a cache checked with [`is_expandable_cache`] for the
    samples that continue it.

    Args:
        cache (`DynamicCache`):
            One row per prompt.
        repeats (`torch.Tensor`):
            Samples per prompt row, on the cache's device.
        rows (`int`):
            `repeats.sum()`, given so that no device synchronisation is needed.
    """
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(repeats, dim=0, output_size=rows)
        layer.values = layer.values.repeat_interleave(repeats, dim=0, output_size=rows)
