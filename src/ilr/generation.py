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
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import random
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

# Recipe names and checks, without TRL; `check_vllm_server_ports` is also re-exported here for callers.
from ilr.recipe_rules import GENERATION_BACKENDS, VLLM_INSTALL_COMMANDS, check_vllm_server_ports


if TYPE_CHECKING:
    import torch

    from ilr.configs import AgentConfig


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
# transformers
# ---------------------------------------------------------------------------------------------------------------------
class _SampledTokenLogprobs:
    """
    A logits processor that records `log_softmax(scores / temperature)` of every sampled token, one step behind.

    `generate` calls processors with the sequence so far and the next-token scores. Custom processors run after
    generate's own processors (none with our config unless `generation_kwargs` adds some) and before the sampling
    warpers (temperature, top-k, top-p), so `scores` are the model's logits. At step t the token sampled at step
    t-1 is the last of `input_ids`: its logprob is read from the distribution kept from the previous call. Only
    one step's distribution is kept (batch x vocab), instead of every step's logits as `output_logits=True` would
    (batch x steps x vocab: 40 GB for 64 x 1024 tokens of a 150k vocabulary), and no second forward pass is needed.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def result(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Logprobs of `new_tokens` (batch x steps), the tokens `generate` appended."""
        import torch

        if self.previous is not None:
            self.steps.append(self.previous.gather(1, new_tokens[:, -1:]).squeeze(1))
            self.previous = None
        if len(self.steps) != new_tokens.shape[1]:
            raise RuntimeError(
                f"Recorded {len(self.steps)} logprobs for {new_tokens.shape[1]} generated tokens: this transformers "
                "version calls logits processors differently; please report it."
            )
        return torch.stack(self.steps, dim=1)


class TransformersBackend(GenerationBackend):
    """
    Generation with `model.generate` on the training model itself (no copy, no weight sync).

    All `len(prompts) * n` sequences go through `generate` together, left-padded, in chunks of at most
    `max_batch_size` sequences. Each prompt is repeated `n` times rather than passed with `num_return_sequences`, so
    that chunks can be cut at any sequence. When there are several chunks, sequences are sorted by prompt length so
    that each chunk carries little padding. Greedy calls decode each prompt once and copy it `n` times.

    Shared prefill: `generate` would run every prompt `n` times through the model before sampling (transformers
    expands `num_return_sequences` the same way, with no prefix sharing), and Idea3's prompts, which carry the peers'
    texts, are long. Instead, the distinct prompts of a chunk run once, without their last token, with
    `use_cache=True`; their KV cache is repeated to the prompts' samples and handed to `generate`, which then runs
    only the last prompt token and the new ones:

    ```
    repeated:   [pad p1 p2 p3] x n rows                      -> generate
    shared:     [pad p1 p2]    x 1 row -> cache x n rows, [pad p1 p2 p3] x n rows -> generate (computes p3 onwards)
    ```

    Positions and masks are those `generate` uses, and the batch, hence the random numbers each sequence draws, is
    the same, so the completions are those of the repeated prompts (logprobs equal up to rounding, < 1e-6 in fp32).
    This needs a cache of every prompt position's keys and values: a plain `DynamicCache` of full-attention layers,
    as in [`~ilr.grpo.grouped_per_token_logps`]. Models with sliding-window, chunked, linear-attention or static
    caches, a `prefill_chunk_size`, and calls with one sample per prompt (`n=1`, greedy) take the repeated path.

    Logprobs are read during decoding by a logits processor (the model's logits of each step, divided by the
    temperature, log-softmaxed, at the token then sampled): no second forward pass and no stored logits. They match
    a plain forward pass over the unpadded prompt + completion to ~1e-6 in fp32 (tested at 1e-4).

    Determinism: with `params.seed` set, the torch RNG is seeded for the call (and restored afterwards), so the same
    seed, prompts, `n`, `max_batch_size`, weights, dtype and device give the same completions. Changing the batch
    layout (`max_batch_size`, other prompts in the call) changes which random numbers each sequence draws. Without a
    seed, the global torch RNG is used.

    Args:
        model (`PreTrainedModel` or `peft.PeftModel`):
            The agent's model. It is put in eval mode for generation and restored to its previous mode afterwards;
            its device is used for generation.
        tokenizer (`PreTrainedTokenizerBase`):
            The agent's tokenizer (with its chat template); a missing pad token falls back to the EOS.
        name (`str`, *optional*):
            The agent's name; defaults to the model's `name_or_path`.
        max_batch_size (`int`, *optional*, defaults to `64`):
            Most sequences (prompts x samples) in one `model.generate` call; bounds activation and KV-cache memory.
            `None` puts everything in one batch.
        generation_kwargs (`dict`, *optional*):
            Extra `GenerationConfig` fields for every call (e.g. `sequence_bias`), like TRL's `generation_kwargs`.
            Processors they add act before the logprobs are read, so logprobs describe the distribution sampled from.
        share_prompt_prefill (`bool`, *optional*, defaults to `True`):
            Run each distinct prompt of a chunk once and share its KV cache among its samples, where the model's cache
            allows it (see above); `False` always runs every sample's prompt (the reference path, for tests).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        max_batch_size: int | None = 64,
        generation_kwargs: dict[str, Any] | None = None,
        share_prompt_prefill: bool = True,
    ):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1 or None (got {max_batch_size}).")
        name = name or str(getattr(model, "name_or_path", None) or type(model).__name__).rstrip("/").split("/")[-1]
        super().__init__(name, tokenizer, agent_eos_token_ids(tokenizer, getattr(model, "generation_config", None)))
        self.model = model
        self.max_batch_size = max_batch_size
        self.generation_kwargs = dict(generation_kwargs or {})
        self.share_prompt_prefill = share_prompt_prefill
        pad = tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_ids[0] if pad is None else pad

    def update_weights(self, model: Any) -> None:
        """
        Generate with `model` from now on. A no-op when it is the model already in use: the trainer shares its
        training model with this backend, so optimizer steps are seen at once.

        Args:
            model (`PreTrainedModel` or `peft.PeftModel`):
                The (unwrapped) model to generate with.
        """
        if model is not self.model:
            self.model = model

    def _generation_config(self, params: SamplingParams) -> Any:
        from transformers import GenerationConfig

        if params.greedy:
            # transformers' own defaults, which it does not flag as unused when sampling is off.
            sampling = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
        else:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            sampling["top_k"] = params.top_k  # 0 disables it; left unset, the model's default (often 50) applies
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            num_beams=1,
            num_return_sequences=1,
            use_cache=True,  # the trainer may have switched it off in the model config for gradient checkpointing
            return_dict_in_generate=False,
            # Unset fields are filled from the model's generation config: neutralise those that change sampling.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_length=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            **sampling,
        )
        if getattr(getattr(self.model, "generation_config", None), "min_p", None) is not None:
            config.min_p = 0.0
        config.update(**self.generation_kwargs)
        return config

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        import torch

        model = self.model
        device = next(model.parameters()).device
        config = self._generation_config(params)
        # Greedy samples of a prompt are all the same: decode each prompt once and copy.
        copies = 1 if params.greedy else params.n
        # Sequence s samples for prompt `owners[s]`; the samples of a prompt are adjacent.
        owners = [p for p, _ in enumerate(prompt_ids) for _ in range(copies)]
        order = list(range(len(owners)))
        chunk = self.max_batch_size or len(order)
        if len(order) > chunk:
            order.sort(key=lambda s: len(prompt_ids[owners[s]]))
        results: list[tuple[list[int], list[float]] | None] = [None] * len(owners)
        share_prefill = copies > 1 and self.share_prompt_prefill and self._can_share_prefill(config)

        was_training = model.training
        seeded = contextlib.nullcontext()
        if params.seed is not None:  # seed for this call only: the caller's RNG stream is restored afterwards
            seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        # no_grad rather than inference_mode: tensors a model caches during generation (e.g. dynamic RoPE buffers)
        # must stay usable by the training forward that follows.
        with seeded, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            model.eval()
            try:
                for begin in range(0, len(order), chunk):
                    batch = order[begin : begin + chunk]
                    prompts = [prompt_ids[owners[s]] for s in batch]
                    rows = self._generate_batch(prompts, config, params, device, share_prefill=share_prefill)
                    for s, row in zip(batch, rows):
                        results[s] = row
            finally:
                model.train(was_training)

        completions = [
            [self._completion(*results[p * copies + k % copies]) for k in range(params.n)]
            for p in range(len(prompt_ids))
        ]
        return GenerationOutput(prompt_ids=prompt_ids, completions=completions)

    def _can_share_prefill(self, config: Any) -> bool:
        """Whether `generate` on this model can start from a prompt cache computed here and expanded."""
        from ilr.models import has_expandable_cache

        # `generate` rejects a cache passed with `cache_implementation` and ignores it with `prefill_chunk_size`; the
        # model's generation config fills the fields a call leaves unset.
        for generation_config in (config, getattr(self.model, "generation_config", None)):
            if getattr(generation_config, "cache_implementation", None) is not None:
                return False
            if getattr(generation_config, "prefill_chunk_size", None) is not None:
                return False
        return has_expandable_cache(self.model)

    def _shared_prompt_cache(
        self, prompts: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Any:
        """
        The KV cache of every row of the left-padded `input_ids` but its last column, each run of identical
        consecutive prompts computed once and repeated to its rows; `None` when nothing would be shared or the
        model's cache cannot be expanded (the caller then lets `generate` run the prompts itself).
        """
        import torch

        from ilr.models import is_expandable_cache, repeat_cache_rows

        firsts = [row for row in range(len(prompts)) if row == 0 or prompts[row] != prompts[row - 1]]
        width = input_ids.shape[1]
        # A one-token prompt would leave a row of padding only: run such a batch as it is.
        if len(firsts) == len(prompts) or min(len(ids) for ids in prompts) < 2:
            return None
        counts = [end - begin for begin, end in zip(firsts, [*firsts[1:], len(prompts)])]
        mask = attention_mask[firsts, :-1]
        # `generate`'s positions: counted over the attention mask, 0 on the padding.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        outputs = self.model(
            input_ids=input_ids[firsts, :-1],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = outputs.past_key_values
        if not is_expandable_cache(cache, width - 1):
            logger.warning(
                "Agent `%s`: the model returned a %s, which cannot be shared among samples; every sample's prompt is "
                "run instead.",
                self.name,
                type(cache).__name__,
            )
            return None
        repeat_cache_rows(cache, torch.tensor(counts, device=input_ids.device), len(prompts))
        return cache

    def _generate_batch(
        self,
        prompts: list[list[int]],
        config: Any,
        params: SamplingParams,
        device: torch.device,
        *,
        share_prefill: bool = False,
    ) -> list[tuple[list[int], list[float]]]:
        import torch
        from transformers import LogitsProcessorList

        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        prompt_cache = {}
        if share_prefill:
            # Given a cache of all but the last prompt column and the full prompts, `generate` runs the last column
            # onwards (it slices `input_ids` past the cache's length and takes the positions of the full mask).
            shared = self._shared_prompt_cache(prompts, input_ids, attention_mask)
            if shared is not None:
                prompt_cache["past_key_values"] = shared
        recorder = _SampledTokenLogprobs(1.0 if params.greedy else params.temperature)
        sequences = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
            **prompt_cache,
        )
        new_tokens = sequences[:, width:]
        logprobs = recorder.result(new_tokens)
        # Rows that stopped early are padded after their EOS; `_completion` cuts them there.
        return list(zip(new_tokens.tolist(), logprobs.tolist()))


# ---------------------------------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------------------------------
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMColocateBackend(GenerationBackend):
    """
    One in-process `vllm.LLM` for the agent, on the training GPU, as TRL's colocate mode builds it.

    The engine is created like TRL's `VLLMGeneration._init_vllm` (colocate): `distributed_executor_backend=
    "external_launcher"` (keeps the model in this process so weights can be loaded into it), `logprobs_mode=
    "processed_logprobs"` (temperature-scaled logprobs) and `max_num_batched_tokens=4096`. Prompts are sent as token
    ids (`TokensPrompt`), so the agent's own chat template and tokenizer stay in charge; text is decoded with the
    agent's tokenizer. Several agents each get their own engine: give each a share of `gpu_memory_utilization`.

    With `params.seed`, each prompt gets its own seed drawn from it (vLLM seeds per request, so one seed for all
    would give identical prompts identical samples).

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            Model path, revision, dtype and GGUF file of the engine.
        tokenizer (`PreTrainedTokenizerBase`):
            The agent's tokenizer (chat template, decoding).
        model (`PreTrainedModel`, *optional*):
            The training model; needed with `enable_sleep_mode` and `sleep_level=2` to restore the discarded weights.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Fraction of the GPU this engine may use (weights, activations and KV cache).
        max_model_len (`int`, *optional*):
            Context length (prompt + completion); defaults to the model's.
        enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Let `sleep()` free the engine's GPU memory while the trainer steps; the engine starts asleep and
            `generate` wakes it.
        sleep_level (`int`, *optional*, defaults to `1`):
            `1` offloads the weights to CPU memory and drops the KV cache; `2` drops both (TRL's choice: less host
            memory, but the weights are pushed again from `model` on wake-up).
        seed (`int`, *optional*):
            Engine seed (used by requests without their own). Defaults to the process rank, as in TRL.
        llm_kwargs (`dict`, *optional*):
            Further `vllm.LLM` arguments; they override the ones above.
    """

    _TAGS = ("weights", "kv_cache")
    # vLLM keeps its process groups in module state shared by every engine of the process; the last engine closed
    # releases them, so that engines built later (another run in the same process) start from a clean state.
    _open_engines: ClassVar[int] = 0
    _world_owned: ClassVar[bool] = False

    def __init__(
        self,
        agent: AgentConfig,
        tokenizer: Any,
        *,
        model: Any = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        seed: int | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        vllm = _import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"`sleep_level` must be 1 or 2 (got {sleep_level}).")
        if enable_sleep_mode and sleep_level == 2 and model is None:
            raise ValueError(
                "`sleep_level=2` discards the engine's weights when it sleeps; pass the training `model` so they can "
                "be restored, or use `sleep_level=1`."
            )
        super().__init__(agent.name, tokenizer, _agent_eos_token_ids(agent, tokenizer, model))
        self._vllm = vllm
        self.model = model
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()

        path = agent.model_name_or_path
        kwargs: dict[str, Any] = {
            "model": os.path.join(path, agent.gguf_file) if agent.gguf_file else path,
            "revision": agent.model_revision,
            "dtype": agent.dtype or "auto",
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_sleep_mode": enable_sleep_mode,
            "seed": int(os.environ.get("RANK", "0")) if seed is None else seed,
            "distributed_executor_backend": "external_launcher",
            "logprobs_mode": "processed_logprobs",
            "max_num_batched_tokens": 4096,
            "trust_remote_code": bool(getattr(agent, "trust_remote_code", False)),
        }
        if agent.gguf_file:
            kwargs["tokenizer"] = path  # vLLM reads a GGUF's tokenizer from the original repository
        kwargs.update(llm_kwargs or {})
        if kwargs["distributed_executor_backend"] == "external_launcher":
            # The external launcher joins the torch.distributed world of the trainer; alone, it is a world of one.
            from trl.trainer.utils import ensure_master_addr_port

            for variable, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(variable, default)
            ensure_master_addr_port()
        cls = type(self)
        if not cls._open_engines:
            import torch

            cls._world_owned = not torch.distributed.is_initialized()  # else vLLM joins the trainer's world
        self.llm = vllm.LLM(**kwargs)
        cls._open_engines += 1
        if enable_sleep_mode:
            self.sleep()

    def _sampling_params(self, params: SamplingParams, num_prompts: int) -> Any:
        common = {
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": _vllm_top_k(params.top_k),
            "max_tokens": params.max_new_tokens,
            "logprobs": 0,  # the sampled token's logprob only
            "stop_token_ids": list(self.eos_token_ids),
        }
        if params.seed is None:
            return self._vllm.SamplingParams(**common)
        rng = random.Random(params.seed)
        return [self._vllm.SamplingParams(**common, seed=rng.getrandbits(31)) for _ in range(num_prompts)]

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        self.wake_up()
        requests = [self._vllm.TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        sampling_params = self._sampling_params(params, len(prompt_ids))
        outputs = self.llm.generate(requests, sampling_params=sampling_params, use_tqdm=False)
        completions = []
        for request in outputs:
            group = []
            for sample in request.outputs:
                token_ids = list(sample.token_ids)
                # One dict per token, keyed by token id; it holds the sampled token (and top-k ones if asked).
                logprobs = [step[token].logprob for token, step in zip(token_ids, sample.logprobs)]
                group.append(self._completion(token_ids, logprobs))
            completions.append(group)
        return GenerationOutput(prompt_ids=prompt_ids, completions=completions)

    def _load_weights(self, model: Any) -> None:
        with vllm_named_weights(model) as weights:
            self.load_named_weights(weights)

    def load_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """
        Load checkpoint-format tensors into the engine and reset its prefix cache (`update_weights` sends them all).

        Args:
            weights (`Iterable[tuple[str, torch.Tensor]]`):
                `(name, tensor)` pairs under the model's Hugging Face names, as [`vllm_named_weights`] gives them.
                Layers left out keep their current weights.
        """
        # TRL's colocate sync (`VLLMGeneration.sync_weights`) calls the engine model's `load_weights` once per tensor.
        # That writes checkpoint-format tensors into parameters the engine may have processed after loading: vLLM's
        # CPU build repacks its linear layers for its kernels (their `weight_loader` is gone, and the load raises),
        # and quantised or padded layers differ likewise. The model runner's `reload_weights` puts each layer back
        # in checkpoint format, loads the tensors through the model's own `load_weights` (the same name mapping as
        # TRL's), then redoes the processing layer by layer; same names, same tensors, correct on every platform.
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=iter(weights))
        self.llm.reset_prefix_cache()

    def _wake(self, tags: Sequence[str]) -> None:
        tags = [tag for tag in self._TAGS if tag in tags and tag in self._asleep]
        if not tags:
            return
        _empty_cache()
        if "weights" in tags and self.sleep_level == 2:
            # Level 2 discarded the weights: map them alone, push the training model's, then wake the rest (TRL).
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
            self._load_weights(self.model)
            tags.remove("weights")
        if tags:
            self.llm.wake_up(tags=tags)
            self._asleep.difference_update(tags)

    def update_weights(self, model: Any) -> None:
        """
        Load `model`'s weights (LoRA merged) into the engine, after an optimizer step.

        Args:
            model (`PreTrainedModel` or `peft.PeftModel`):
                The training model, unwrapped.
        """
        self.model = model
        if self.sleep_level == 2 and "weights" in self._asleep:
            return  # discarded weights are pushed from `self.model` on wake-up
        # Weights must be mapped before they are overwritten (TRL, trl#5142).
        self._wake(["weights"])
        self._load_weights(model)

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded or discarded per `sleep_level`, KV cache dropped)."""
        if not self.enable_sleep_mode or self._asleep == set(self._TAGS):
            return
        self._wake(self._TAGS)  # from a half-awake state (weights only), wake fully so `sleep` sees one state
        self.llm.sleep(level=self.sleep_level)
        self._asleep = set(self._TAGS)

    def wake_up(self) -> None:
        """Restore the engine's weights and KV cache after `sleep`."""
        self._wake(self._TAGS)

    def close(self) -> None:
        """Drop the engine; its memory is freed once nothing else refers to it. The last engine of the process also
        releases vLLM's process groups (and the torch.distributed world, when vLLM created it)."""
        if self.llm is None:
            return
        self.llm = None
        cls = type(self)
        cls._open_engines -= 1
        if not cls._open_engines:
            from vllm.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            if cls._world_owned:
                parallel_state.destroy_distributed_environment()
        _empty_cache()


class VLLMServerBackend(GenerationBackend):
    """
    Generation on the agent's own `trl vllm-serve`, through TRL's `VLLMClient`.

    (In TRL 1.16 `trl vllm-serve` is a deprecated wrapper of `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --port P
    --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs --max-logprobs -1`; either works.)

    Prompts are tokenised here with the agent's chat template and sent as token ids. Weights are synced after each
    optimizer step as TRL's GRPOTrainer does (`VLLMGeneration.sync_weights`, server mode): the NCCL weight-sync
    group is opened once (`init_communicator`, on first use, on the model's device), every tensor is streamed with
    `update_named_params` (LoRA merged), then the server's prefix cache is reset.

    Backends alive in one process must use distinct ports ([`check_vllm_server_ports`]). With `params.seed`, vLLM
    seeds every prompt of the request with the same seed.

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            `vllm_server_host`, `vllm_server_port` and `vllm_group_port` of the agent's server.
        tokenizer (`PreTrainedTokenizerBase`):
            The agent's tokenizer (chat template, decoding).
        model (`PreTrainedModel`, *optional*):
            The training model; its generation config adds EOS ids (else the checkpoint's `generation_config.json`).
        connection_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds to wait for the server to come up.
    """

    _live: ClassVar[dict[str, tuple[AgentConfig, weakref.ref]]] = {}

    def __init__(self, agent: AgentConfig, tokenizer: Any, *, model: Any = None, connection_timeout: float = 240.0):
        live = [owner for owner, backend in type(self)._live.values() if backend() is not None]
        check_vllm_server_ports([*live, agent])
        _import_vllm()  # the client's weight sync runs on vLLM's NCCL engine
        from trl.generation import vllm_client

        super().__init__(agent.name, tokenizer, _agent_eos_token_ids(agent, tokenizer, model))
        self.agent = agent
        try:
            self.client = vllm_client.VLLMClient(
                host=agent.vllm_server_host,
                server_port=agent.vllm_server_port,
                group_port=agent.vllm_group_port,
                connection_timeout=connection_timeout,
            )
        except OSError as error:  # requests' ConnectionError after `connection_timeout`
            raise ConnectionError(
                f"Agent `{agent.name}`: no vLLM server answered at {agent.vllm_server_host}:{agent.vllm_server_port} "
                f"within {connection_timeout:g} s. Start the agent's server first (`trl vllm-serve --model "
                f"{agent.model_name_or_path} --port {agent.vllm_server_port}`), or check `vllm_server_host` and "
                "`vllm_server_port`."
            ) from error
        self._communicator_ready = False
        self._key = f"{agent.name}@{id(self)}"
        type(self)._live[self._key] = (agent, weakref.ref(self))

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        extra: dict[str, Any] = {"stop_token_ids": list(self.eos_token_ids)}
        if params.seed is not None:
            extra["seed"] = params.seed
        output = self.client.generate(
            prompts=prompt_ids,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=_vllm_top_k(params.top_k),
            max_tokens=params.max_new_tokens,
            logprobs=0,
            generation_kwargs=extra,
        )
        if output["logprobs"] is None:
            raise RuntimeError(
                f"The vLLM server of agent `{self.name}` returned no logprobs. Start it with `trl vllm-serve` or with "
                "`vllm serve ... --logprobs-mode processed_logprobs --max-logprobs -1`."
            )
        # Prompt-major: the n completions of prompt p are at p*n ... p*n+n-1. Each token's logprob entries are sorted
        # by probability with the sampled token among them: pick it by id.
        logprob_ids = output.get("logprob_token_ids")
        completions = []
        for p in range(len(prompt_ids)):
            group = []
            for j in range(p * params.n, (p + 1) * params.n):
                token_ids = list(output["completion_ids"][j])
                steps = output["logprobs"][j]
                ids = logprob_ids[j] if logprob_ids is not None else [[t] for t in token_ids]
                logprobs = [lps[ids_t.index(t)] for t, lps, ids_t in zip(token_ids, steps, ids)]
                group.append(self._completion(token_ids, logprobs))
            completions.append(group)
        return GenerationOutput(prompt_ids=prompt_ids, completions=completions)

    def update_weights(self, model: Any) -> None:
        """
        Stream `model`'s weights (LoRA merged) to the server and reset its prefix cache.

        Args:
            model (`PreTrainedModel` or `peft.PeftModel`):
                The training model, unwrapped, on the CUDA device that joins the server's NCCL group.
        """
        if not self._communicator_ready:
            self.client.init_communicator(device=next(model.parameters()).device)
            self._communicator_ready = True
        with vllm_named_weights(model) as weights:
            metadata = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in weights]
            self.client.update_named_params(metadata, iter(weights))
        self.client.reset_prefix_cache()

    def close(self) -> None:
        """Close the weight-sync group and free this agent's ports for another backend."""
        type(self)._live.pop(self._key, None)
        if self._communicator_ready:
            self.client.close_communicator()
            self._communicator_ready = False


# ---------------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------------
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
