"""Generation with `model.generate` on the training model itself: no copy of the weights, nothing to sync."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ilr.generation.base import GenerationBackend, GenerationOutput, SamplingParams, agent_eos_token_ids


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)


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
