"""`build_backend`: the one place that maps a `generation_backend` setting to an engine; `engine_kwargs`: its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ilr.generation.base import GenerationBackend
from ilr.generation.transformers_backend import TransformersBackend
from ilr.generation.vllm_colocate import VLLMColocateBackend
from ilr.generation.vllm_common import _import_vllm
from ilr.generation.vllm_server import VLLMServerBackend
from ilr.recipe_rules import GENERATION_BACKENDS


if TYPE_CHECKING:
    from ilr.configs import AgentConfig


def build_backend(
    agent: AgentConfig,
    backend: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    **engine_kwargs: Any,
) -> GenerationBackend:
    """
    Build the generation backend of one agent, so that callers never branch on the engine.

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            The agent.
        backend (`str`):
            `transformers`, `vllm` (colocated engine) or `vllm_server` (the agent's `trl vllm-serve`), as the
            training config's `generation_backend`.
        model (`PreTrainedModel`, *optional*):
            The training model. `transformers` generates with it (loaded with [`~ilr.models.load_model`] when
            missing); the vLLM backends push its weights on `update_weights`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Defaults to [`~ilr.models.load_tokenizer`]`(agent)`.
        **engine_kwargs:
            Keyword arguments of the backend class: `max_batch_size`, `generation_kwargs` ([`TransformersBackend`]);
            `gpu_memory_utilization`, `max_model_len`, `enable_sleep_mode`, ... ([`VLLMColocateBackend`]);
            `connection_timeout` ([`VLLMServerBackend`]).

    Returns:
        [`GenerationBackend`]: The backend.

    Raises:
        `ValueError`: for an unknown backend. `ImportError`: when a vLLM backend is asked for without vLLM (the
            message gives the install command).
    """
    from ilr.models import load_model, load_tokenizer

    if backend not in GENERATION_BACKENDS:
        raise ValueError(f"Unknown generation backend {backend!r}: use one of {list(GENERATION_BACKENDS)}.")
    if backend != "transformers":
        _import_vllm()  # fail before loading anything
    tokenizer = load_tokenizer(agent) if tokenizer is None else tokenizer
    if backend == "transformers":
        model = load_model(agent) if model is None else model
        return TransformersBackend(model, tokenizer, name=agent.name, **engine_kwargs)
    if backend == "vllm":
        return VLLMColocateBackend(agent, tokenizer, model=model, **engine_kwargs)
    return VLLMServerBackend(agent, tokenizer, model=model, **engine_kwargs)


def engine_kwargs(args: Any, num_agents: int) -> dict[str, Any]:
    """
    The [`build_backend`] keyword arguments a training config asks for, the same for training and for generation-only
    commands (`ilr interact`).

    Args:
        args ([`~ilr.configs.ILRConfig`]):
            The training config: `generation_backend`, `generation_kwargs` and the `vllm_*` settings.
        num_agents (`int`):
            Agents whose colocated engines share the GPU: each gets `vllm_gpu_memory_utilization / num_agents`.

    Returns:
        `dict[str, Any]`: Keyword arguments of the config's backend class.
    """
    if args.generation_backend == "transformers":
        return {"generation_kwargs": args.generation_kwargs}
    if args.generation_backend == "vllm":
        return {
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization / num_agents,
            "max_model_len": args.vllm_max_model_length,
            "enable_sleep_mode": args.vllm_enable_sleep_mode,
            "llm_kwargs": {"enforce_eager": args.vllm_enforce_eager},
        }
    return {}
