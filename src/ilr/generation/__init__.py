"""Generation backends: one interface, several engines (transformers, vLLM colocated, vLLM server).

The caller (Idea3, the trainer, evaluation) never branches on the engine. A backend takes chat-formatted prompts,
applies its agent's own chat template with its own tokenizer, and returns for every prompt its `n` completions as
text, token ids and per-token sampling logprobs, plus token counts. One `generate` call covers every prompt and
sample of a stage: callers batch, backends never loop over questions.

Logprobs follow TRL's definition: `log_softmax(logits / temperature)` of the sampled token under the model that
generated it (no top-p/top-k renormalisation), so they can serve as GRPO's old-policy logprobs. Greedy decoding
(`temperature=0`) reports `log_softmax(logits)`. The vLLM backends read vLLM's `processed_logprobs`, as TRL does:
the same quantity when `top_p=1` and `top_k=0` (GRPO's defaults); with top-p/top-k, vLLM renormalises over the kept
tokens.

Every backend stops at the agent's EOS ids (the tokenizer's EOS plus the model's `generation_config.eos_token_id`),
returns completions cut right after the first EOS, and sets `finish_reason` to `"stop"` exactly when the completion
ends with an EOS. Use [`build_backend`] to get a backend from an agent's settings.

Modules: `base` (the interface), `transformers_backend`, `vllm_colocate`, `vllm_server`, `vllm_common` (what the
two vLLM backends share) and `factory` (`build_backend`, `engine_kwargs`).
"""

from ilr.generation.base import (
    BackendStats,
    Completion,
    GenerationBackend,
    GenerationError,
    GenerationOutput,
    Messages,
    SamplingParams,
    agent_eos_token_ids,
)
from ilr.generation.factory import build_backend, engine_kwargs
from ilr.generation.transformers_backend import TransformersBackend
from ilr.generation.vllm_colocate import VLLMColocateBackend
from ilr.generation.vllm_common import vllm_named_weights
from ilr.generation.vllm_server import VLLMServerBackend

# Recipe rules without TRL; `check_vllm_server_ports` is also re-exported here for callers.
from ilr.recipe_rules import check_vllm_server_ports


__all__ = [
    "BackendStats",
    "Completion",
    "GenerationBackend",
    "GenerationError",
    "GenerationOutput",
    "Messages",
    "SamplingParams",
    "TransformersBackend",
    "VLLMColocateBackend",
    "VLLMServerBackend",
    "agent_eos_token_ids",
    "build_backend",
    "check_vllm_server_ports",
    "engine_kwargs",
    "vllm_named_weights",
]
