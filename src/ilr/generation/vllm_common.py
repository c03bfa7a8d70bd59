"""What both vLLM backends share: the import with its install hint, the weights under vLLM's names, EOS ids."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ilr.generation.base import agent_eos_token_ids
from ilr.recipe_rules import VLLM_INSTALL_COMMANDS


if TYPE_CHECKING:
    import torch

    from ilr.configs import AgentConfig


def _import_vllm() -> Any:
    """Import vLLM, or fail with the install command."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"This generation backend needs vLLM, which is not installed. Install it with {VLLM_INSTALL_COMMANDS}, "
            "or use `generation_backend: transformers`."
        ) from error
    return vllm


@contextlib.contextmanager
def vllm_named_weights(model: Any) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """
    The weights of a training model under the names vLLM loads, LoRA adapters merged.

    Mirrors TRL's `VLLMGeneration._iter_named_params` (trl/generation/vllm_generation.py) for an unsharded model:
    for a PEFT model the adapters are merged for the duration of the block, the `base_model.model.` prefix and
    `.base_layer` are dropped, adapter weights and `original_module` copies are skipped, and `modules_to_save`
    copies take the original's name. The tensors are the model's own (no copy): use them inside the block.

    Unlike TRL, a tied tensor is listed under each of its names (`model.embed_tokens.weight` and `lm_head.weight`):
    an engine may keep its own processed copy of the output head (vLLM's CPU build repacks it), which is refreshed
    only when the head is loaded by name. On an engine whose head shares the embedding's storage, the second load
    writes the same values again.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`):
            The training model, unwrapped (a `DistributedDataParallel` wrapper is removed here; gather ZeRO-3/FSDP
            shards before calling).

    Yields:
        `list[tuple[str, torch.Tensor]]`: `(name, tensor)` pairs, a tied tensor under each of its names.
    """
    from accelerate.utils import is_peft_model
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    peft = is_peft_model(model)
    if peft:
        model.merge_adapter()
    try:
        weights = []
        for name, param in model.named_parameters(remove_duplicate=False):
            name = name.replace("_checkpoint_wrapped_module.", "")
            if peft:
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if model.prefix in name or "original_module" in name:
                    continue
                name = name.replace("modules_to_save.default.", "")
            weights.append((name, param.data))
        yield weights
    finally:
        if peft:
            model.unmerge_adapter()


def _agent_eos_token_ids(agent: AgentConfig, tokenizer: Any, model: Any) -> list[int]:
    """EOS ids of an agent served by vLLM: from the training model's generation config, else from its checkpoint."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None and not agent.gguf_file:
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(
                agent.model_name_or_path, revision=agent.model_revision
            )
        except OSError:
            generation_config = None  # no generation_config.json: the tokenizer's EOS alone
    return agent_eos_token_ids(tokenizer, generation_config)


def _vllm_top_k(top_k: int) -> int:
    return top_k if top_k > 0 else -1  # vLLM's "off" is -1 (0 is rejected by older versions)


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
