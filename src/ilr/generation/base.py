"""The generation interface: sampling settings, completions, and the backend base class every engine implements."""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    """
    Sampling settings of one `generate` call.

    Args:
        n (`int`, *optional*, defaults to `1`):
            Completions per prompt (the GRPO group size for a trained stage).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0.0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filter; `0` disables it.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Maximum tokens generated per completion.
        seed (`int`, *optional*):
            Seed for this call; the same seed, prompts and weights give the same completions on the same device.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"`n` must be >= 1 (got {self.n}).")
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1] (got {self.top_p}).")
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1 (got {self.max_new_tokens}).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """
    One sampled completion.

    Args:
        text (`str`):
            Decoded completion, special tokens (EOS, padding) removed.
        token_ids (`list[int]`):
            Generated token ids, EOS included when generation stopped on it; no padding.
        logprobs (`list[float]`):
            Sampling logprob of each token in `token_ids` (same length).
        finish_reason (`str`):
            `"stop"` (EOS or a stop string) or `"length"` (hit `max_new_tokens`).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class GenerationOutput:
    """
    Result of one `generate` call.

    Args:
        prompt_ids (`list[list[int]]`):
            Token ids of each prompt after the agent's chat template (no padding).
        completions (`list[list[Completion]]`):
            For each prompt, its `n` completions.
        num_prompt_tokens (`int`):
            Prompt tokens processed (each prompt counted once).
        num_generated_tokens (`int`):
            Tokens generated over all completions.
    """

    prompt_ids: list[list[int]]
    completions: list[list[Completion]]
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0


@dataclass
class BackendStats:
    """Running counters of a backend, for step accounting (calls per step, tokens per second)."""

    calls: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class GenerationError(RuntimeError):
    """A generation call still failed after its retries; the message names the agent and what to check."""


class GenerationBackend(abc.ABC):
    """
    Interface of every generation engine. Subclasses implement `_generate` and `update_weights`.

    `generate` is a template method: it applies the chat template, calls the subclass's `_generate` on token ids
    (retrying transient failures), then counts tokens and time in `stats`. `sleep` and `wake_up` are optional hooks
    for engines that can free their accelerator memory while the trainer steps (colocated vLLM); they do nothing
    elsewhere.

    Attributes:
        name (`str`): the agent's name (for logs).
        tokenizer: the agent's tokenizer (used by callers to count and truncate text in the agent's own tokens).
        stats (`BackendStats`): counters, incremented by every `generate` call.
        eos_token_ids (`list[int]`): the ids generation stops at.
        max_retries (`int`): retries of a failed `_generate` call before `GenerationError` (0: fail at once).
        retry_backoff (`float`): seconds before the first retry, doubled for each further one.
    """

    # Programming and input errors fail at once: retrying cannot fix them. Out-of-memory is not transient either.
    NOT_RETRIED: ClassVar[tuple[type[BaseException], ...]] = (ValueError, TypeError, KeyError, NotImplementedError)

    name: str
    tokenizer: Any
    stats: BackendStats
    eos_token_ids: list[int]

    def __init__(self, name: str, tokenizer: Any, eos_token_ids: Sequence[int]):
        self.name = name
        self.tokenizer = tokenizer
        self.stats = BackendStats()
        self.eos_token_ids = list(eos_token_ids)
        self.max_retries = 0
        self.retry_backoff = 1.0
        if not self.eos_token_ids:
            raise ValueError(
                f"Agent `{name}` has no EOS token: set `eos_token` in its tokenizer or `eos_token_id` in its "
                "generation config, or generation never stops before the length limit."
            )
        self._adds_bos: bool | None = None

    def generate(self, prompts: list[Messages], params: SamplingParams) -> GenerationOutput:
        """
        Generate `params.n` completions for every chat prompt, in one batched call.

        Args:
            prompts (`list[list[dict[str, str]]]`):
                Chat-formatted prompts (`[{"role": "user", "content": ...}]`); the agent's chat template is applied
                with `add_generation_prompt=True`.
            params (`SamplingParams`):
                Sampling settings.

        Returns:
            `GenerationOutput`: prompt ids, completions, token counts.
        """
        start = time.perf_counter()
        if prompts:
            prompt_ids = self.encode_prompts(prompts)
            output = self._generate_with_retries(prompt_ids, params)
        else:
            output = GenerationOutput(prompt_ids=[], completions=[])
        output.num_prompt_tokens = sum(len(ids) for ids in output.prompt_ids)
        output.num_generated_tokens = sum(len(c.token_ids) for group in output.completions for c in group)
        self.stats.calls += 1
        self.stats.prompts += len(prompts)
        self.stats.prompt_tokens += output.num_prompt_tokens
        self.stats.generated_tokens += output.num_generated_tokens
        self.stats.seconds += time.perf_counter() - start
        return output

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        """Generate from chat-templated token ids; `generate` fills in the token counts and the stats."""
        raise NotImplementedError

    def _generate_with_retries(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        import torch

        for attempt in range(self.max_retries + 1):
            try:
                return self._generate(prompt_ids, params)
            except self.NOT_RETRIED:
                raise
            except torch.OutOfMemoryError as error:
                raise GenerationError(
                    f"Agent `{self.name}`: out of memory while generating {len(prompt_ids)} x {params.n} completions "
                    f"of up to {params.max_new_tokens} tokens. Lower `generation_batch_size` or "
                    "`max_completion_length`, or give the engine more memory (`vllm_gpu_memory_utilization`)."
                ) from error
            except Exception as error:  # a dropped server connection, a transient device or engine error
                if attempt == self.max_retries:
                    raise GenerationError(
                        f"Agent `{self.name}`: generation failed {attempt + 1} time(s), last with "
                        f"{type(error).__name__}: {_first_line(error)}. Check the agent's engine (for "
                        "`generation_backend: vllm_server`, that its `trl vllm-serve` answers on its "
                        "`vllm_server_port`); `generation_retries` sets how often a failure is retried."
                    ) from error
                delay = self.retry_backoff * 2**attempt
                logger.warning(
                    "Agent `%s`: generation failed (%s: %s); retry %d of %d in %.1f s.",
                    self.name,
                    type(error).__name__,
                    _first_line(error),
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def encode_prompts(self, prompts: list[Messages]) -> list[list[int]]:
        """
        Apply the agent's chat template and tokenise, with exactly one BOS where the tokenizer uses one.

        The template's text is tokenised without special tokens, since templates such as Llama 3's write the BOS
        themselves; a BOS is prepended only when the tokenizer adds one to plain text and the template did not.

        Args:
            prompts (`list[list[dict[str, str]]]`):
                Chat-formatted prompts.

        Returns:
            `list[list[int]]`: The token ids of each prompt, ending with the generation prompt.
        """
        texts = self.tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if getattr(self, "_adds_bos", None) is None:
            self._adds_bos = bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]
        if self._adds_bos:
            prompt_ids = [ids if ids[:1] == [bos] else [bos, *ids] for ids in prompt_ids]
        return [list(ids) for ids in prompt_ids]

    def _completion(self, token_ids: list[int], logprobs: list[float]) -> Completion:
        """Cut a completion after its first EOS, decode it and tell why it ended."""
        eos = set(self.eos_token_ids)
        end = next((i + 1 for i, token in enumerate(token_ids) if token in eos), None)
        if end is not None:
            token_ids, logprobs = token_ids[:end], logprobs[:end]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(text, list(token_ids), list(logprobs), "stop" if end is not None else "length")

    @abc.abstractmethod
    def update_weights(self, model: Any) -> None:
        """Make the engine generate with `model`'s current weights (after an optimizer step)."""

    def sleep(self) -> None:  # noqa: B027 (optional hook)
        """Free the engine's accelerator memory until the next `generate` (no-op unless the engine supports it)."""

    def wake_up(self) -> None:  # noqa: B027 (optional hook)
        """Undo `sleep`; `generate` calls it itself."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the engine's resources (GPU memory, server connections)."""


def agent_eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """
    The ids an agent's generation stops at: the tokenizer's EOS, then those of the model's generation config (chat
    models often end a turn with a token other than the tokenizer's EOS, e.g. Llama 3.1's `<|eot_id|>`).

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The agent's tokenizer.
        generation_config (`GenerationConfig`, *optional*):
            The model's generation config.

    Returns:
        `list[int]`: Distinct ids, the tokenizer's first.
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    for token_id in [extra] if isinstance(extra, int) else extra or []:
        if token_id not in ids:
            ids.append(token_id)
    return ids


# ---------------------------------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
